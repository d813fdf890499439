#!/usr/bin/env bash
# Runs on a lent GPU machine (device tool): GPU tests and the GPU benchmarks, logs under $OUT.
# Usage: bash scripts/gpu_session.sh [what ...]   what: tests train_tests key_training profile profile_enc profile_stage decode_tests coarse_tests coarse coarsemax breakdown decode decode8 decodemax host generate generate_spread em_* e2e_* collect
set -uo pipefail
. scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
for what in "$@"; do
  case $what in
    decode_tests) python3 -m pytest -q -x tests/kernels/test_decode.py tests/integrations/test_cache.py -m gpu 2>&1 | tee "$OUT/decode_tests.log" | tail -5 ;;
    coarse_tests) python3 -m pytest -q -x tests/kernels/test_decode.py tests/integrations/test_coarse_decode.py -m gpu 2>&1 | tee "$OUT/coarse_tests.log" | tail -5 ;;
    coarse) python3 benchmarks/decode_coarse.py 2>&1 | tee "$OUT/coarse.log" | grep -v "^{" | tail -30 ;;
    coarsemax) python3 benchmarks/decode_coarse.py --batch max 2>&1 | tee "$OUT/coarsemax.log" | grep -v "^{" | tail -30 ;;
    tests) python3 -m pytest -q -x tests/kernels tests/pipeline/test_collect.py tests/quant tests/integrations/test_cache.py tests/integrations/test_coarse_decode.py -m gpu 2>&1 | tee "$OUT/tests.log" | tail -5
           # the interpreter of triton < 3.9 fails on numpy 2 (a loop over a runtime int): CI runs
           # these with 3.9; here only where the installed triton is as new
           if python3 -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) < (3, 9))"; then
             python3 -m pytest -q tests/kernels -k interpreter 2>&1 | tee "$OUT/interpreter_tests.log" | tail -3
           else
             echo "interpreter tests: not run (triton $(python3 -c 'import triton; print(triton.__version__)') < 3.9; CI runs them)" | tee "$OUT/interpreter_tests.log"
           fi ;;
    train_tests) python3 -m pytest -q -x tests/kernels/test_split16.py tests/kernels/test_em_estep.py tests/kernels/test_em_init.py tests/kernels/test_encode.py tests/kernels/test_beam.py tests/quant -m gpu 2>&1 | tee "$OUT/train_tests.log" | tail -5 ;;
    profile) python3 benchmarks/train_profile.py --steps 3 2>&1 | tee "$OUT/train_profile.log" | grep -v "^{" | tail -120 ;;
    profile_enc) python3 benchmarks/train_profile.py --what e2e,encode --steps 3 2>&1 | tee "$OUT/profile_enc.log" | grep -v "^{" | tail -60 ;;
    profile_stage) python3 benchmarks/train_profile.py --what em_stage 2>&1 | tee "$OUT/profile_stage.log" | grep -v "^{" | tail -80 ;;
    breakdown) python3 benchmarks/decode_breakdown.py 2>&1 | tee "$OUT/breakdown.log" | grep -v "^{" | tail -80 ;;
    decode) python3 benchmarks/decode_attention.py 2>&1 | tee "$OUT/decode.log" | tail -12 ;;
    decode8) python3 benchmarks/decode_attention.py --batch 8 2>&1 | tee "$OUT/decode8.log" | tail -12 ;;
    decodemax) python3 benchmarks/decode_attention.py --batch max 2>&1 | tee "$OUT/decodemax.log" | tail -18 ;;
    host) python3 benchmarks/decode_host.py 2>&1 | tee "$OUT/host.log" | grep -v "^{" | tail -64 ;;
    generate_small) timeout 200 python3 benchmarks/generate_speed.py --shape smollm2-135m --prompt 4096 --new 64 2>&1 | grep -v "it/s\]" | tee "$OUT/generate_small.log" | tail -6 ;;
    generate32k) timeout 300 python3 benchmarks/generate_speed.py --prompt 32768 --new 16 2>&1 | grep -v "it/s\]" | tee "$OUT/generate32k.log" | tail -6 ;;
    generate_spread) timeout 500 python3 benchmarks/generate_speed.py --prompt 4096 --new 64 --repeats 9 2>&1 | grep -v "it/s\]" | tee "$OUT/generate_spread.log" | tail -7 ;;
    generate) timeout 200 python3 benchmarks/generate_speed.py --prompt 4096 --new 32 2>&1 | grep -v "it/s\]" | tee "$OUT/generate.log" | tail -6 ;;
    key_training) python3 benchmarks/key_training.py --num_samples 1100000 --lstsq_beams 8 --adam_budget_s 0 --plot "$OUT/key_training.png" 2>&1 | tee "$OUT/key_training.log" | grep -v "^{" | tail -22 ;;
    e2e_quick) python3 benchmarks/e2e_layer.py --epochs 2 2>&1 | tee "$OUT/e2e_quick.log" | tail -12 ;;
    e2e_full) python3 benchmarks/e2e_layer.py --budget_s 420 2>&1 | tee "$OUT/e2e_full.log" | tail -12 ;;
    em_quick) python3 benchmarks/em_layer.py --residuals 2 --max_iters 10 --ref_iters 3 2>&1 | tee "$OUT/em_quick.log" | tail -14 ;;
    em_tune) python3 benchmarks/em_layer.py --tune --residuals 1 --max_iters 3 --ref_iters 0 2>&1 | tee "$OUT/em_tune.log" | tail -40 ;;
    em_full) python3 benchmarks/em_layer.py --ref_iters 5 2>&1 | tee "$OUT/em_full.log" | tail -16 ;;
    collect) python3 benchmarks/collect_throughput.py --random_shape llama-3.1-8b --seq 8192 --tokens 32768 --out_dir /dev/shm 2>&1 | grep -v "it/s\]\|tok/s\]" | tee "$OUT/collect_shm.log" | tail -6
             python3 benchmarks/collect_throughput.py --random_shape llama-3.1-8b --seq 8192 --tokens 32768 --out_dir "$DEV" 2>&1 | grep -v "it/s\]\|tok/s\]" | tee "$OUT/collect_disk.log" | tail -6 ;;
  esac
done
