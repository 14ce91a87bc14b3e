#!/usr/bin/env bash
# Issue 28 part 3 (fp8) on one GPU in one device call: packages, builds, the fp8 GPU tests, loss parity and the
# speedup, each under its own time limit so one stage's trouble leaves the others' results.
#   run(command="bash bench/fp8_device.sh", carry=[".site"], timeout_s=600)
#   bash bench/fp8_device.sh STAGES            STAGES: comma list of setup,build,tests,parity,speed (default all)
# SITE_ARCHIVE: the site to unpack (default .site/site312.tar.xz; the slim one of `SLIM=1 bash bench/pack_site.sh`
# is .site-bench/site312.tar.xz: then carry [".site-bench"]).
# Needs in .site/ (ignored by git): site312.tar.xz (bench/pack_site.sh: deepspeed, pydantic, ...) and the torchao
# wheel (torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl, abi3: any CPython >= 3.10),
# together ~60 MB of the 64 MiB a call carries. Estimated on an H100 (seconds): setup 25, build 60-90, tests
# 60-90 (three compiled 20-step runs), parity 100-150 (169m, 300 steps x 8,192 tokens, bf16 then fp8), speed
# 150-200 (7b width, 8 layers, micro 2 x accum 32, 4 steps: bf16, fp8 tensorwise, fp8 rowwise); ~8 minutes.
# Results in $OUT: build.log, tests.log, fp8-parity-169m.json/.png, train-7b-L8-fp8.json.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/site312 PATH=/tmp/site312/bin:$PATH PYTHONUNBUFFERED=1
export RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels TORCH_CUDA_ARCH_LIST=9.0 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1
stages=",${1:-setup,build,tests,parity,speed},"
t0=$(date +%s)
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s"; }
quiet() { grep -v -E "^\[|Warning|warn\(|Failed to load|KernelPreference"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
if [[ $stages == *,setup,* ]]; then
  tar -xJf "${SITE_ARCHIVE:-.site/site312.tar.xz}" -C /tmp || exit 1
  if ls .site/torchao-*.whl > /dev/null 2>&1; then  # else packed into the site already (a slim site: no Ray)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site312 .site/torchao-*.whl || exit 1
  fi
  python3 -c "import torch, torchao, deepspeed; from torchao.float8 import convert_to_float8_training
print('torch', torch.__version__, 'torchao', torchao.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | quiet
  stamp setup
fi
if [[ $stages == *,build,* ]]; then
  bash bench/build_gpu.sh
  stamp build
fi
if [[ $stages == *,tests,* ]]; then
  timeout ${TESTS_LIMIT:-150} python3 -m pytest -q -p no:cacheprovider -s tests/gpu/test_fp8_training.py 2>&1 \
    | quiet | tail -30 | tee "$OUT/tests.log"
  stamp tests
fi
if [[ $stages == *,parity,* ]]; then
  timeout ${PARITY_LIMIT:-220} python3 bench/fp8_parity.py --steps ${PARITY_STEPS:-300} \
    --out "$OUT/fp8-parity-169m.json" 2>&1 | quiet | tail -6
  stamp parity
fi
if [[ $stages == *,speed,* ]]; then
  # clocks and power beside the runs: tells a falling MFU from step to step apart from the allocator's doing
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv \
    -lms 1000 > "$OUT/speed-clocks.csv" 2>/dev/null &
  clocks=$!
  timeout ${SPEED_LIMIT:-260} python3 bench/train_throughput.py --preset 7b --layers 8 --grad-accum ${SPEED_ACCUM:-32} \
    --steps ${SPEED_STEPS:-4} --warmup 1 --precision bf16 fp8 --fp8-recipe tensorwise rowwise \
    --out "$OUT/train-7b-L8-fp8.json" > /tmp/speed.log 2>&1
  # rank-prefixed lines ("[rank0]: Traceback ...") carry a child's error: keep them in the tail
  grep -E "^==|tokens/s|wrote|Error|error|rank0\]: [^ W]" /tmp/speed.log | tail -20
  # and each failed child's last 40 stderr lines as bench/precision_runs.py repeats them, unfiltered
  sed -n '/^== .* failed (/,/^== end of /p' /tmp/speed.log
  grep -v -E "Warning|warn\(|^ +return func" /tmp/speed.log | tail -60 > "$OUT/speed.tail"
  kill $clocks 2>/dev/null
  stamp speed
fi
