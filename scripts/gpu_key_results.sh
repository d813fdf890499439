#!/usr/bin/env bash
# EM vs E2E key codebooks for the embedded SmolLM2 on a lent GPU (every layer, 12-bit codes, 2 and 1
# bit), and the key-training benchmarks, in phases that each fit one call of the device tool (the
# machine stays warm between calls; every phase resumes what an earlier call left):
#   call 1, carry .gguf_parts/part_aa .whl:  bash scripts/gpu_key_results.sh bench
#       GPU tests of the encoders, benchmarks/key_training.py at Llama-3.1-8B shapes; keeps part_aa
#   or call 1:  bash scripts/gpu_key_results.sh retime   (about 7 minutes; keeps part_aa too)
#       E2E's default at Llama-3.1-8B shapes (untied, 8 rounds, STEPS=search; STEPS=search,full
#       adds whole steps, about 3 minutes more) and EM alone on exactly 1,000,000 vectors
#   call 2.., carry .gguf_parts/part_ab .whl:  bash scripts/gpu_key_results.sh keys [SECONDS]
#       joins the GGUF, collects $COLLECT tokens per layer once, trains (in order, resuming) EM-2,
#       E2E-2 from EM-2, EM-1, E2E-1 from EM-1, stopping cleanly after SECONDS (default 540)
#       CARRIED=DIR (a carried folder of codebook_* folders from an earlier machine) is copied in
#       first: finished layers are then skipped, so E2E goes on where that machine stopped;
#       JOBS="e2e 11,e2e 5" (default "em 11,e2e 11,em 5,e2e 5") runs only those, in that order
#   last call:  bash scripts/gpu_key_results.sh report
#       compare-codebooks of the four folders, the one-layer plot on layer 14's collected keys, and
#       the codebook folders as tarballs in $OUT (LAYER14=0 skips the plot; TAR="e2e" packs only
#       the E2E folders)
#   or, carry .gguf_parts/part_ab .whl and EM folders:  CARRIED=DIR RESIDUALS="5 11" \
#       bash scripts/gpu_key_results.sh untied [SECONDS]
#       E2E with untied tables (train-keys' default; $ROUNDS rounds) from the carried EM folders into $DEV/untied,
#       compare-codebooks of EM, the carried tied E2E folder (if any) and the untied one, the untied
#       folders as tarballs in $OUT, and $DEV/cache_keys (EM and untied E2E under the names the
#       cache phase reads: KEY_DIRS=$DEV/cache_keys); LAYERS="0,14,29" trains only those layers
#       (EM first where the EM folder lacks them: at 2 bits no EM folder may be carried), PROCS=2
#       runs train-keys as that many processes on the one GPU (torchrun; layers split between them)
#   then:  bash scripts/gpu_key_results.sh values   (value codecs of 2 and 1 bit from the same
#       collected data's scales: VALUES="2 600 165,1 500 135" = bits, steps, seconds each; on a
#       fresh machine after the bench call, carry .gguf_parts/part_ab: it joins and collects as the key
#       phases do), and
#       bash scripts/gpu_key_results.sh cache [eval compare options]   (every cache method with these
#       key codebooks and value codecs: scripts/gpu_results.sh)
set -uo pipefail
PHASE=$1 BEGIN=$(date +%s)
. scripts/device_env.sh
DATA=$DEV/values_data  # where scripts/device_model.sh collects (the report reads it too)
NUM_SAMPLES=${NUM_SAMPLES:-1100000}  # 5% of them validate: 1,045,000 keys train per layer
COLLECT=${COLLECT:-1120000}          # the 16,384 rows after the samples are the held-out rows
K=$DEV/keys
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case $PHASE in
  bench)
    [ -f .gguf_parts/part_aa ] && cp .gguf_parts/part_aa "$DEV/"
    python3 -m pytest -q -x tests/kernels/test_beam.py tests/kernels/test_encode.py tests/quant/test_beam.py \
      tests/quant/test_refine.py -m "gpu or not gpu" 2>&1 | tee "$OUT/tests.log" | tail -3
    python3 benchmarks/key_training.py --num_samples "$NUM_SAMPLES" --beams 1,2,4,8,16 --lstsq_beams 8 --adam_budget_s 0 \
      --plot "$OUT/llama_shapes.png" 2>&1 | tee "$OUT/llama_shapes.log" | grep -v "^{" | tail -22 ;;
  retime)
    [ -f .gguf_parts/part_aa ] && cp .gguf_parts/part_aa "$DEV/"
    python3 benchmarks/key_training.py --num_samples "$NUM_SAMPLES" --beams 1,8 --lstsq_beams 8 --tables untied \
      --steps "${STEPS:-search}" --rounds 8 --adam_budget_s 0 --plot "$OUT/llama_untied.png" 2>&1 \
      | tee "$OUT/llama_untied.log" | grep -v "^{" | tail -12
    python3 benchmarks/em_layer.py --ref_iters 0 2>&1 | tee "$OUT/em_layer.log" | grep -v "^{" | tail -6 ;;
  keys)
    . scripts/device_model.sh "$DEV/part_aa" .gguf_parts/part_ab
    mkdir -p "$K"
    [ -n "${CARRIED:-}" ] && cp -rn "$CARRIED"/codebook_* "$K"/
    end=$(( BEGIN + ${2:-540} ))
    IFS=, read -ra jobs <<< "${JOBS:-em 11,e2e 11,em 5,e2e 5}"
    for job in "${jobs[@]}"; do
      set -- $job
      em_dir=$K/codebook_12bits_64group_$2residuals
      name=$([ "$1" = e2e ] && echo codebook_e2e_12bits_64group_$2residuals || basename "$em_dir")
      init=$([ "$1" = e2e ] && echo "--init_dir $em_dir")
      left=$(( end - $(date +%s) ))
      [ $left -gt 20 ] || { echo "keys: out of time before $name"; break; }
      start=$(date +%s)
      timeout "$left" python3 -m commvq -q train-keys --key_dir "$DATA/data/key" --layers all --method "$1" \
        --code_bits 12 --residuals "$2" --num_samples "$NUM_SAMPLES" --output_dir "$K/$name" $init 2>&1 \
        | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|stage/s\]\|round/s\]" >> "$OUT/train_$name.log"
      echo "$name: rc ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s, layers done:" \
        "$(ls "$K/$name/metrics" 2>/dev/null | wc -l)"
    done ;;
  untied)
    . scripts/device_model.sh "$DEV/part_aa" .gguf_parts/part_ab
    mkdir -p "$K" "$DEV/untied" "$DEV/cache_keys"
    TRAIN="python3 -m commvq -q"
    [ "${PROCS:-1}" -gt 1 ] && TRAIN="python3 -m torch.distributed.run --standalone --nproc_per_node $PROCS -m commvq -q"
    [ -n "${CARRIED:-}" ] && cp -rn "$CARRIED"/codebook_12bits_* "$K"/
    end=$(( BEGIN + ${2:-540} ))
    for r in ${RESIDUALS:-5}; do
      em_dir=$K/codebook_12bits_64group_${r}residuals name=codebook_e2e_12bits_64group_${r}residuals
      left=$(( end - $(date +%s) ))
      [ $left -gt 20 ] || { echo "untied: out of time before R=$r"; break; }
      start=$(date +%s)
      timeout "$left" $TRAIN train-keys --key_dir "$DATA/data/key" --layers "${LAYERS:-all}" --method em \
        --code_bits 12 --residuals "$r" --num_samples "$NUM_SAMPLES" --output_dir "$em_dir" 2>&1 \
        | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|stage/s\]" >> "$OUT/train_em_$r.log"
      echo "EM R=$r: rc ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s, layers done: $(ls "$em_dir/metrics" 2>/dev/null | wc -l)"
      left=$(( end - $(date +%s) )) start=$(date +%s)
      timeout "$left" $TRAIN train-keys --key_dir "$DATA/data/key" --layers "${LAYERS:-all}" --method e2e \
        --tables untied --rounds "${ROUNDS:-8}" --code_bits 12 --residuals "$r" --num_samples "$NUM_SAMPLES" --init_dir "$em_dir" \
        --output_dir "$DEV/untied/$name" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|round/s\]" \
        >> "$OUT/train_untied_$r.log"
      echo "untied R=$r: rc ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s, layers done:" \
        "$(ls "$DEV/untied/$name/metrics" 2>/dev/null | wc -l)"
      tied=$([ -n "${CARRIED:-}" ] && [ -d "$CARRIED/$name" ] && echo "$CARRIED/$name")
      python3 -m commvq -q compare-codebooks "$em_dir" $tied "$DEV/untied/$name" --key_dir "$DATA/data/key" \
        --output "$OUT/compare_$r" 2>&1 | grep "^| \|mean"
      ln -sfn "$em_dir" "$DEV/cache_keys/"; ln -sfn "$DEV/untied/$name" "$DEV/cache_keys/"
      tar -C "$DEV/untied" -czf "$OUT/untied_$r.tgz" --exclude "*.png" "$name"
    done ;;
  report)
    python3 -m commvq -q compare-codebooks "$K"/codebook_12bits_64group_11residuals \
      "$K"/codebook_e2e_12bits_64group_11residuals "$K"/codebook_12bits_64group_5residuals \
      "$K"/codebook_e2e_12bits_64group_5residuals --key_dir "$DATA/data/key" --output "$OUT/compare_keys" 2>&1 | tail -2
    # the EM codebooks under the E2E folders' beam: how much of the gain is the encoder's
    python3 -m commvq -q compare-codebooks "$K"/codebook_12bits_64group_11residuals \
      "$K"/codebook_12bits_64group_5residuals --beam 8 --key_dir "$DATA/data/key" --output "$DEV/compare_em_beam8" \
      2>&1 | grep "^| "
    [ "${LAYER14:-1}" = 0 ] || python3 benchmarks/key_training.py --key_dir "$DATA/data/key" --layer 14 --residuals 11 --num_samples "$NUM_SAMPLES" \
      --heads 3 --head_dim 64 --beams 1,2,4,8,16 --adam_budget_s 75 --plot "$OUT/layer14.png" 2>&1 \
      | tee "$OUT/layer14.log" | grep -v "^{" | tail -22
    # at most 8 files of 16 MiB come back: the folders travel as one tarball in 15 MB parts
    rm -f "$OUT"/compare_keys/compare.png
    dirs=(codebook_e2e_12bits_64group_11residuals codebook_e2e_12bits_64group_5residuals)
    [ "${TAR:-all}" = e2e ] || dirs+=(codebook_12bits_64group_11residuals codebook_12bits_64group_5residuals)
    tar -C "$K" -czf "$DEV/codebooks.tgz" --exclude "*.png" "${dirs[@]}"
    split -b 15M "$DEV/codebooks.tgz" "$OUT/codebooks.tgz.part_"
    ls -la "$OUT" "$OUT"/compare_keys ;;
  values)
    # a machine that ran no key phase joins the GGUF (part_ab carried, part_aa kept by the bench
    # call) and collects here: the same deterministic collection, so the same scales
    . scripts/device_model.sh "$DEV/part_aa" .gguf_parts/part_ab
    IFS=, read -ra runs <<< "${VALUES:-2 600 165,1 500 135}"
    for run in "${runs[@]}"; do
      set -- $run
      start=$(date +%s)
      timeout "$3" python3 -m commvq train-values --model embedded --dataset embedded \
        --scale_file "$DATA/data/learnable_scale.pt" --output_dir "$DEV/values/value_codec_$1bit" --quant_bits "$1" \
        --max_seq_length 4096 --steps "$2" --warmup_steps $(($2 / 10)) --save_every 100 2>&1 | tr '\r' '\n' \
        | grep -v "it/s\]\|s/it\]" > "$OUT/train_values_$1bit.log"
      echo "values $1 bit: rc ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"; tail -1 "$OUT/train_values_$1bit.log"
    done ;;
  cache)
    shift
    KEY_DIRS=$K bash scripts/gpu_results.sh "$@" ;;
esac
