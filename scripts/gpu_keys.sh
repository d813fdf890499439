#!/usr/bin/env bash
# Key codebooks for the embedded SmolLM2 trained on a lent GPU from keys collected there, with their
# held-out key errors. The GGUF travels in two parts over two calls, as for scripts/gpu_values.sh:
#   call 1 (carry .gguf_parts/part_aa):  mkdir -p runs/device && cp .gguf_parts/part_aa runs/device/
#   call 2 (carry .gguf_parts/part_ab .whl):
#     COLLECT=131072 bash scripts/gpu_keys.sh runs/device/part_aa .gguf_parts/part_ab NAME [train-keys options]
# trains into runs/device/keys/NAME (NAME in the codebook folder pattern, e.g.
# codebook_e2e_12bits_64group_5residuals) and copies it to $OUT/NAME with compare-codebooks' table of
# held-out errors for every codebook the machine holds. COLLECT tokens per layer are collected once per
# warm machine (shared with gpu_values.sh); training uses the first --num_samples of them, the
# evaluation the 16,384 after the largest --num_samples.
set -uo pipefail
A=$1 B=$2 NAME=$3
shift 3
. scripts/device_env.sh
. scripts/device_model.sh "$A" "$B"
K=$DEV/keys
mkdir -p "$K"
start=$(date +%s)
python3 -m commvq -q train-keys --key_dir "$DATA/data/key" --layers all --output_dir "$K/$NAME" "$@" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" > "$OUT/train_$NAME.log"
echo "train $NAME: rc $? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/train_$NAME.log"
cp -r "$K/$NAME" "$OUT/"
python3 -m commvq -q compare-codebooks "$K"/codebook_* --key_dir "$DATA/data/key" --eval_samples 16384 \
  --output "$OUT/compare_keys" 2>&1 | tail -2
grep "^###\|^| mean\|^| layer" "$OUT/compare_keys/compare.md"
