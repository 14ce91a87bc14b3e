#!/usr/bin/env bash
# One device call: build the kernels, run the GPU tests (error table), then the benchmark.
#   bash bench/run_gpu.sh [tests|bench|all|variants|compare] [bench shape indices] [variants]
# Expects the benchmark-only wheels (fla-core, pydantic for rwkv5) in .whl/ and writes logs under $OUT.
# compare: the GPU tests, registers per kernel, ncu stall counters at (8,4096), then ours (with the given
# variants, no fla) beside the previous kernel copied to .v4/ (`git archive <rev> kernels bench/wkv_kernel.py
# | tar -x -C .v4`), built in parallel with ours.
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
if [[ $what == compare && -d .v4 ]]; then
  (cd .v4 && PYTHONPATH=$PWD RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels-old python3 -m kernels.build > /tmp/build-old.log 2>&1 || tail -30 /tmp/build-old.log) &
fi
python3 -m kernels.build --verbose > /tmp/build.log 2>&1 || { tail -60 /tmp/build.log; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
if [[ $what == tests || $what == all || $what == compare ]]; then
  RWKV5_ERROR_TABLE=$OUT/errors.txt timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kernels/test_kernel_import.py 2>&1 | tail -40 | tee "$OUT/tests.log"
  [[ $what == compare ]] || cat "$OUT/errors.txt" 2>/dev/null
  awk '{for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+e[-+][0-9]+$/ && $i + 0 > m) m = $i + 0}
       END {print "largest relative error in the table:", m}' "$OUT/errors.txt" 2>/dev/null
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
if [[ $what == compare ]]; then
  variants=${3:-32:32}
  for so in /tmp/rwkv5-kernels/*/*.so; do cuobjdump --dump-resource-usage "$so"; done 2>&1 \
    | grep -E "Function|REG" | sed -e 's/_ZN4wkv5//' | cut -c1-160 > "$OUT/resources.txt"
  grep -A1 -E "Function (.*fwd_kernelILi64ELi(32|64)ELb0|.*bwd_a_kernelILi64ELi32ELb0|.*bwd_b_kernelILi64ELi32ELb0)" \
    "$OUT/resources.txt" | grep -o "REG:[0-9]*.*SHARED:[0-9]*" | head -4
  if command -v ncu >/dev/null || [[ -x /usr/local/cuda/bin/ncu ]]; then
    RWKV5_WKV_SPLITS=1 timeout 240 "$(command -v ncu || echo /usr/local/cuda/bin/ncu)" --clock-control none \
      -k regex:"fwd_kernel|bwd_a_kernel|bwd_b_kernel" -s 3 -c 3 --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats \
      --section MemoryWorkloadAnalysis --section SourceCounters \
      python3 bench/wkv_kernel.py --profile-once 0 > "$OUT/ncu.txt" 2>&1
    grep -E "^  [a-z_:]*kernel|Duration|Issued Ipc Active|Eligible Warps|No Eligible|Achieved Occupancy|Stall|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -60
  else
    echo "ncu not found"
  fi
  echo "profile: $(( $(date +%s) - t0 )) s"
  python3 bench/wkv_kernel.py --out "$OUT/wkv_kernel-new.json" --shapes "$shapes" --no-torch --no-fla \
    --variants "$variants" > /tmp/bench-new.log 2>&1 || tail -20 /tmp/bench-new.log
  wait
  old_variants=$(echo "$variants" | tr ',' '\n' | awk -F: 'NF <= 3' | paste -sd, -)
  (cd .v4 && PYTHONPATH=$PWD RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels-old python3 bench/wkv_kernel.py \
    --out "$OUT/wkv_kernel-old.json" --shapes "$shapes" --no-torch --variants "$old_variants" > /tmp/bench-old.log 2>&1 || tail -20 /tmp/bench-old.log)
  python3 bench/wkv_kernel.py --compare "$OUT/wkv_kernel-old.json" "$OUT/wkv_kernel-new.json"
  echo "compare: $(( $(date +%s) - t0 )) s"
fi
