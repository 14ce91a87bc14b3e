#!/usr/bin/env bash
# One device call for issue 16: build, then the measurements and GPU tests, each under its own time limit.
#   bash bench/run_train_gpu.sh STAGES        STAGES: comma list of build,b7,init,tests,b1b5,blocks
# Expects the wheels (deepspeed, pydantic, hjson, fla-core) in ../.whl or .whl; logs and JSON go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WHL=$(ls -d .whl ../.whl 2>/dev/null | head -1)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels TORCH_CUDA_ARCH_LIST=9.0
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
stages=",${1:-build,b7,init,tests},"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
t0=$(date +%s)
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s"; }
if [[ $stages == *,build,* ]]; then
  bash bench/build_gpu.sh
  stamp build
fi
if [[ $stages == *,b7,* ]]; then
  timeout ${B7_LIMIT:-330} python3 bench/train_throughput.py --preset 7b --layers ${B7_LAYERS:-4} --grad-accum 64 \
    --steps ${B7_STEPS:-5} --warmup 2 ${B7_BLOCKS---blocks} --out "$OUT/train-7b-L${B7_LAYERS:-4}.json" 2>&1 \
    | grep -v -E "^\[|Warning|warn\(" | tail -25
  stamp b7
fi
if [[ $stages == *,init,* ]]; then
  timeout 120 python3 bench/init_time.py --preset 7b --out "$OUT/init-7b.json" 2>&1 | tail -3
  stamp init
fi
if [[ $stages == *,tests,* ]]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider -s tests/gpu/test_compiled_training.py \
    tests/gpu/test_wkv_kernel.py::test_dispatch_default_and_compile 2>&1 | grep -v -E "^\[|Warning|warn\(" \
    | tail -30 | tee "$OUT/tests.log"
  stamp tests
fi
if [[ $stages == *,b1b5,* ]]; then
  timeout ${B15_LIMIT:-300} python3 bench/train_throughput.py --preset 1b5 --steps ${B15_STEPS:-8} --warmup 3 \
    --out "$OUT/train-1b5.json" \
    2>&1 | grep -v -E "^\[|Warning|warn\(" | tail -15
  stamp b1b5
fi
