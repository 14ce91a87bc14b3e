#!/usr/bin/env bash
# One device call for issue 28 (parts 1 and 2), ~9 minutes on one H100 or H200:
#   build (WKV kernel, FusedAdam for sm_90) -> the whole 7B (bench/whole_model.py: train() where the memory plan
#   fits the card, else forward+backward of 32 layers + a 1/8 ZeRO-2 partition's optimizer step, summed as an
#   estimate) -> the profile at 7b width, 8 layers (bench/profile_step.py) -> the policy-"none" GPU test ->
#   7b width, 8 layers, policy "none" against "selective" through the real train(), same call and settings ->
#   ZeRO-2 settings side by side at that shape ("overlap": defaults, before, overlap_comm, small buckets) -> the
#   1b5 preset with overlap_comm off and on ("b1b5") -> ZeRO's reduction once per step against the defaults, 7b
#   width and 1b5 ("once") -> the 1b5 at micro-batch 8 ("b1b5m8").
#   bash bench/issue28_device.sh [STAGES]    STAGES: comma list of build,whole,profile,profile1b5,gputest,none,overlap,L12,b1b5,once,b1b5m8 (default all)
#   The ZeRO comparison alone: `bash bench/issue28_device.sh build,overlap` (~2 minutes a variant; the budget
#   check drops the last ones on a cold machine).
# Expects a site: /tmp/site312 unpacked already, or SITE_ARCHIVE (default .site-bench/site312.tar.xz), or else the
# wheels (deepspeed, pydantic, hjson) in ../.whl or .whl, as bench/run_train_gpu.sh; JSON, traces and
# logs go to $OUT. A stage starts only while the call's budget (BUDGET_S, default 540) still covers its limit.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
archive=${SITE_ARCHIVE:-.site-bench/site312.tar.xz}  # SLIM=1 bash bench/pack_site.sh; carry [".site-bench"]
if [[ ! -d /tmp/site312 && -f $archive ]]; then
  tar -xJf "$archive" -C /tmp || exit 1
fi
if [[ -d /tmp/site312 ]]; then  # unpacked above, or by bench/fp8_device.sh setup / pipeline_1gpu.sh earlier
  site=/tmp/site312
else
  WHL=$(ls -d .whl ../.whl 2>/dev/null | head -1)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  site=/tmp/site
fi
export PYTHONPATH=$PWD:$site PYTHONUNBUFFERED=1 RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels TORCH_CUDA_ARCH_LIST=9.0
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
stages=",${1:-build,whole,profile,profile1b5,gputest,none,overlap,L12,b1b5,once,b1b5m8},"
budget=${BUDGET_S:-540}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,memory.used --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
# clocks and power through the call: tells a falling MFU from step to step apart from the allocator's doing
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv \
  -lms 1000 > "$OUT/clocks.csv" 2>/dev/null &
clocks=$!
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s"; }
want() { [[ $stages == *,$1,* ]] && (( $(date +%s) - t0 + $2 <= budget )) || { [[ $stages == *,$1,* ]] && echo "== skip $1: budget"; false; }; }
quiet() { grep -v -E "^\[|Warning|warn\(|^USDT"; }
if want build 150; then
  bash bench/build_gpu.sh
  python3 -c "import torch; from rwkv5.model import _inductor_options as o; print('torch', torch.__version__, 'block compile options', o())" | tee "$OUT/inductor.txt"
  stamp build
fi
if want whole 170; then
  timeout 170 python3 bench/whole_model.py --out "$OUT/whole-7b.json" 2>&1 | quiet | tail -20 | tee "$OUT/whole.log"
  stamp whole
fi
# A profile that wrote its step trace but not its breakdown: break the trace down on its own.
breakdown_left() {
  for trace in "$OUT"/profile-*-step.json.gz; do
    [[ -f $trace && ! -f ${trace%-step.json.gz}-profile.json ]] || continue
    python3 bench/profile_step.py --from-trace "$trace" --grad-accum 4 --out-dir "$OUT" 2>&1 | quiet | tail -12
  done
}
if want profile 150; then
  # Unfiltered and unbuffered too: in session 15 both profiles wrote their step trace and ended without a word
  # (breakdown computed afterwards from the trace); the raw log shows why next time.
  PYTHONUNBUFFERED=1 timeout 150 python3 bench/profile_step.py --layers 8 --grad-accum 4 --out-dir "$OUT" 2>&1 \
    | tee "$OUT/profile-raw.log" | quiet | tail -30 | tee "$OUT/profile.log"
  breakdown_left
  stamp profile
fi
if want profile1b5 150; then  # the 1b5 preset's step (0.431 against 0.48): where its time goes
  PYTHONUNBUFFERED=1 timeout 150 python3 bench/profile_step.py --preset 1b5 --layers 24 --grad-accum 4 --out-dir "$OUT" \
    2>&1 | tee "$OUT/profile-1b5-raw.log" | quiet | tail -30 | tee "$OUT/profile-1b5.log"
  breakdown_left
  stamp profile1b5
fi
if want gputest 80; then
  timeout 80 python3 -m pytest -q -x -p no:cacheprovider -s tests/gpu/test_compiled_block_shapes.py 2>&1 | quiet | tail -8 | tee "$OUT/gputest.log"
  stamp gputest
fi
for policy in none selective; do
  if want none 180; then  # a cold inductor cache: "none" did not finish compile + 4 steps in 90 s (session 12)
    timeout 180 python3 bench/train_throughput.py --preset 7b --layers 8 --grad-accum 16 --steps 4 --warmup 2 \
      --activation-memory $policy --out "$OUT/train-7b-L8-ga16-$policy.json" 2>&1 | quiet | tail -6 | tee "$OUT/train-$policy.log"
    stamp "train $policy"
  fi
done
# ZeRO-2 variants beside the defaults, same shape and settings as "train selective" (bench/NOTES.md, issue 28,
# "What ZeRO-2 runs per micro-batch"; counts from bench/zero_overhead.py):
#   defaults: the current config (skipped when the "none" stage already ran "selective" in this call);
#   before:   the config before that change: DeepSpeed's reduce_scatter (a divide-by-1 of every gradient on one
#             GPU) and its throughput timer (two device synchronizations a micro-batch);
#   overlap:  overlap_comm on one GPU: copies and reduce on a side stream, one device sync a micro-batch;
#   bucket16m: reduce buckets below every matrix (1.6e7 elements): matrices skip the bucket copy (-3.5 GB of
#             copies a micro-batch), ten times the reduce calls.
zero_variant() {
  case $1 in
    defaults) echo "" ;;
    before) echo "--ds zero_optimization.reduce_scatter=true timers=null" ;;
    overlap) echo "--overlap-comm on" ;;
    bucket16m) echo "--set zero.reduce_bucket_size=16000000" ;;
  esac
}
for variant in defaults before overlap bucket16m; do
  [[ $variant == defaults && -f "$OUT/train-7b-L8-ga16-selective.json" ]] && continue
  if want overlap 120; then
    json="$OUT/train-7b-L8-ga16-selective-$variant.json"
    [[ $variant == defaults ]] && json="$OUT/train-7b-L8-ga16-selective.json"
    # shellcheck disable=SC2046  # the variant's flags are meant to split
    timeout 120 python3 bench/train_throughput.py --preset 7b --layers 8 --grad-accum 16 --steps 4 --warmup 2 \
      --activation-memory selective $(zero_variant $variant) --out "$json" 2>&1 \
      | quiet | tail -6 | tee "$OUT/train-zero-$variant.log"
    stamp "train selective, ZeRO $variant"
  fi
done
if want L12 200; then  # 12 of the 7B's 32 layers (plan 70.2 GB of an H100's 85): the head's share 12% -> 8%
  timeout 200 python3 bench/train_throughput.py --preset 7b --layers 12 --grad-accum 16 --steps 4 --warmup 1 \
    --precision bf16 fp8 --fp8-recipe tensorwise --out "$OUT/train-7b-L12-fp8.json" 2>&1 \
    | grep -E "^==|tokens/s|fp8_speedup|Error" | tail -8 | tee "$OUT/train-L12.log"
  stamp "7b width, 12 layers, bf16 and fp8"
fi
for overlap in off on; do  # the 1b5 preset's own settings (micro 4 x accum 8), ZeRO's copies inline and beside
  if want b1b5 120; then
    timeout 120 python3 bench/train_throughput.py --preset 1b5 --steps 6 --warmup 3 --overlap-comm $overlap \
      --out "$OUT/train-1b5-overlap-$overlap.json" 2>&1 | quiet | tail -6 | tee "$OUT/train-1b5-$overlap.log"
    stamp "1b5, overlap_comm $overlap"
  fi
done
# Reduce once per step (`zero.reduce_once_per_step`, DeepSpeed's coalesce_grad_reduction) against the defaults at
# 7b width (16 micro-batches a step) and on the 1b5 preset (8): ZeRO's per-micro-batch bucket and partition copies
# go (bench/zero_overhead.py: 362 -> 90.5 copies a micro-batch at accumulation 4); the defaults run first, so the
# variant meets the warmer, power-capped card.
for run in 7b:defaults 7b:once 1b5:defaults 1b5:once; do
  preset=${run%%:*} variant=${run#*:}
  if want once 130; then
    shape="--layers 8 --grad-accum 16 --steps 4 --warmup 2 --activation-memory selective"
    [[ $preset == 1b5 ]] && shape="--steps 6 --warmup 3"
    flag=""
    [[ $variant == once ]] && flag="--set zero.reduce_once_per_step=true"
    # shellcheck disable=SC2086  # shape and flag are meant to split
    timeout 130 python3 bench/train_throughput.py --preset $preset $shape $flag \
      --out "$OUT/train-$preset-once-$variant.json" 2>&1 | quiet | tail -6 | tee "$OUT/train-$preset-once-$variant.log"
    stamp "$preset, reduce once per step: $variant"
  fi
done
if want b1b5m8 130; then  # the 1b5 at micro-batch 8 x 4 (plan 74.2 GB): twice the work per kernel launch, the
  # same step; its profile is 15.5% idle and 17.4% elementwise kernels (bench/NOTES.md, session 15)
  timeout 130 python3 bench/train_throughput.py --preset 1b5 --steps 6 --warmup 3 --micro-batch 8 --global-batch 32 \
    --out "$OUT/train-1b5-micro8.json" 2>&1 | quiet | tail -6 | tee "$OUT/train-1b5-micro8.log"
  stamp "1b5, micro-batch 8"
fi
kill $clocks 2>/dev/null
ls -la "$OUT"
