#!/usr/bin/env bash
# The device calls of the one-GPU pipeline run: a bare GPU machine to a recorded `pretrain/1gpu` run.
#   bash bench/pipeline_1gpu.sh start [WAIT_S]    first call: carry [".site"] (the output of bench/pack_site.sh)
#   bash bench/pipeline_1gpu.sh finish [WAIT_S]   a next call on the still-warm machine (within its 30 s idle time)
# With RECORD_AT_S set, a run still going that many seconds into the call is asked (SIGUSR1) to record what
# finished so far: the last call of a session's device time.
# `start` unpacks the carried packages, starts the builds (WKV5 kernel, DeepSpeed's FusedAdam, the tokenizer's C
# extension) and bench/pipeline_1gpu.py in a session of their own (setsid), so the run outlives the call: one
# call may run 10 minutes, and the whole run (stack start, pretraining, ten milestone runs of ~40 s each on an
# H100) takes about that long. Each mode waits up to WAIT_S (default 540) for the run's JSON, then copies to
# $OUT what there is: $RECORD-<card>.json (default pipeline-1gpu-shared), the run's log and the stack's and
# Ray's logs (logs.tgz), and once the run is recorded, the build caches (caches.tgz: copy it to .site/ for the
# next session's `start`).
set -uo pipefail
mode=${1:?start or finish}
wait_s=${2:-540}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }
export PYTHONPATH=$PWD:/tmp/site312 PATH=/tmp/site312/bin:$PATH PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
export RWKV5_HOME=/tmp/rwkv5-state PREFECT_UI_ENABLED=false PREFECT_WORKER_QUERY_SECONDS=2
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) card=h200 ;; *H100*) card=h100 ;; *) card=gpu ;; esac
result=/tmp/${RECORD:-pipeline-1gpu-shared}-$card.json

if [[ $mode == start ]]; then
  echo "$gpu -> $card"
  tar -xJf .site/site312.tar.xz -C /tmp || exit 1
  py=$(command -v python3)
  for script in /tmp/site312/bin/*; do  # console scripts made elsewhere: point them at this python3
    if head -n1 "$script" | grep -q '^#!.*python'; then sed -i "1s|.*|#!$py|" "$script"; fi
  done
  stamp unpacked
  # Build caches an earlier device run sent back (caches.tgz, put in .site/): the WKV5 kernel loads instead of
  # building, and the first pretraining finds its compiled graphs. Touched, so that ninja does not take the
  # checkout's newer sources for changes; a cache that does not match is simply not used.
  if [[ -f .site/caches.tgz ]]; then
    tar -xzf .site/caches.tgz -C /tmp && find /tmp/rwkv5-kernels -type f -exec touch {} + 2>/dev/null
    stamp "build caches unpacked"
  fi
  # The run (its pretraining waits for the kernel in the preflight stage), detached from this call.
  # The builds at low priority, so that `rwkv5 up` beside them is not slowed (101 s in session 14; 58 s in the
  # half-GPU record's run).
  setsid bash -c "nice -n 10 python3 -m kernels.build > /tmp/kernel-build.log 2>&1 &
    nice -n 10 python3 -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()' \
      > /tmp/fused-adam.log 2>&1 &
    nice -n 10 python3 setup.py -q build_ext --inplace > /tmp/ext-build.log 2>&1 &
    python3 bench/pipeline_1gpu.py --out $result --deadline-s 1500 ${PIPELINE_ARGS:-} > /tmp/pipeline.log 2>&1" \
    < /dev/null > /tmp/detached.log 2>&1 &  # no descriptor of this call's output stays open in it
elif [[ $mode != finish ]]; then
  echo "mode: start or finish" >&2
  exit 2
fi

shown=0
asked=0
while [[ ! -f $result ]] && (( $(date +%s) - t0 < wait_s )); do
  sleep 5
  if [[ -n ${RECORD_AT_S:-} && $asked == 0 ]] && (( $(date +%s) - t0 >= RECORD_AT_S )); then
    pkill -USR1 -f "^python3 bench/pipeline_1gpu.py" && stamp "asked the run to record what finished"
    asked=1
  fi
  lines=$(wc -l < /tmp/pipeline.log 2>/dev/null || echo 0)
  if (( lines > shown )); then sed -n "$((shown + 1)),${lines}p" /tmp/pipeline.log | grep -v -E "Warning|warn\("; fi
  shown=$lines
done
if [[ -f $result ]]; then
  cp "$result" "$OUT/"  # first: device time may end at any moment
  for _ in $(seq 15); do pgrep -f bench/pipeline_1gpu.py > /dev/null || break; sleep 1; done  # its `down`
  sed -n "$((shown + 1)),\$p" /tmp/pipeline.log
  stamp "run recorded"
else
  stamp "run still going: call again with 'finish' within the machine's idle time"
fi
cp /tmp/pipeline.log "$OUT/pipeline.log" 2>/dev/null
tail -n 2 /tmp/kernel-build.log /tmp/fused-adam.log /tmp/ext-build.log 2>/dev/null
# The stack's logs (the worker's holds every flow run's output) and the Ray session's logs.
tar -czf "$OUT/logs.tgz" -C "$RWKV5_HOME" logs $(cd "$RWKV5_HOME" && ls -d ray/session_latest/logs 2>/dev/null) \
  2>/dev/null
# The build caches for the next session's run (at most 16 MiB come back: the kernel's alone if both are more).
if [[ -f $result ]]; then
  tar -czf "$OUT/caches.tgz" -C /tmp rwkv5-kernels inductor 2>/dev/null
  if (( $(stat -c %s "$OUT/caches.tgz" 2>/dev/null || echo 0) > 16000000 )); then
    tar -czf "$OUT/caches.tgz" -C /tmp rwkv5-kernels 2>/dev/null
  fi
fi
ls -la "$OUT"
