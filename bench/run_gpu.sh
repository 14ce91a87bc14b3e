#!/usr/bin/env bash
# One device call: build the kernels, run the GPU tests (error table), then the benchmark.
#   bash bench/run_gpu.sh [tests|bench|all] [bench shape indices]
# Expects the benchmark-only wheels (fla-core, pydantic for rwkv5) in .whl/ and writes logs under $OUT.
set -o pipefail
what=${1:-all}
shapes=${2:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels
unset TORCH_CUDA_ARCH_LIST
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
t0=$(date +%s)
python3 -m kernels.build --verbose > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | head -30
echo "build: $(( $(date +%s) - t0 )) s"
if [[ $what == tests || $what == all ]]; then
  RWKV5_ERROR_TABLE=$OUT/errors.txt timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kernels/test_kernel_import.py 2>&1 | tail -40 | tee "$OUT/tests.log"
  cat "$OUT/errors.txt" 2>/dev/null
  echo "tests: $(( $(date +%s) - t0 )) s"
fi
if [[ $what == variants ]]; then
  # Other chunk lengths: their tests first, then their times beside the defaults and fla.
  RWKV5_WKV_CHUNK=32 RWKV5_WKV_BWD_CHUNK=64 RWKV5_ERROR_TABLE=$OUT/errors-32-64.txt timeout 200 \
    python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -5 | tee "$OUT/tests-32-64.log"
  echo "tests: $(( $(date +%s) - t0 )) s"
  python3 bench/wkv_kernel.py --out "$OUT/wkv_kernel-variants.json" --shapes "$shapes" --no-torch \
    --variants 32:32,64:64,32:64 2>&1 | tee "$OUT/bench-variants.log" | grep -v '^{'
  python3 -c "import json,sys; [print({k: round(v, 3) for k, v in r.items() if 'ms' in k}) for r in json.load(open(sys.argv[1]))['rows']]" "$OUT/wkv_kernel-variants.json"
  echo "variants: $(( $(date +%s) - t0 )) s"
fi
if [[ $what == bench || $what == all ]]; then
  python3 bench/wkv_kernel.py --out "$OUT/wkv_kernel-h200.json" --shapes "$shapes" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
