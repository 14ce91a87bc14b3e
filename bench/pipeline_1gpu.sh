#!/usr/bin/env bash
# The device call of the one-GPU pipeline run: a bare GPU machine to a recorded `pretrain/1gpu` run, in one call.
#   bash bench/pipeline_1gpu.sh            (device call: carry [".site"], the output of bench/pack_site.sh)
# Unpacks the carried packages, builds the WKV5 kernel and DeepSpeed's FusedAdam in the background while the
# stack starts, then bench/pipeline_1gpu.py runs the deployment and records it. Writes to $OUT:
# pipeline-1gpu-<card>.json, the run's log, and the stack's and Ray workers' logs (logs.tgz).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }
tar -xJf .site/site312.tar.xz -C /tmp || exit 1
py=$(command -v python3)
for script in /tmp/site312/bin/*; do  # console scripts made elsewhere: point them at this python3
  if head -n1 "$script" | grep -q '^#!.*python'; then sed -i "1s|.*|#!$py|" "$script"; fi
done
export PYTHONPATH=$PWD:/tmp/site312 PATH=/tmp/site312/bin:$PATH PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
export RWKV5_HOME=/tmp/rwkv5-state PREFECT_UI_ENABLED=false PREFECT_WORKER_QUERY_SECONDS=2
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) card=h200 ;; *H100*) card=h100 ;; *) card=gpu ;; esac
echo "$gpu -> $card"
stamp unpacked
python3 -m kernels.build > "$OUT/kernel-build.log" 2>&1 &
python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  > /tmp/fused-adam.log 2>&1 &
python3 bench/pipeline_1gpu.py --out "$OUT/pipeline-1gpu-$card.json" --deadline-s "${DEADLINE_S:-440}" 2>&1 \
  | tee /tmp/pipeline.log | grep -v -E "Warning|warn\(|^\s*$"
status=$?
wait
stamp "done (exit $status)"
tail -3 "$OUT/kernel-build.log" /tmp/fused-adam.log
cp /tmp/pipeline.log "$OUT/pipeline.log"
# The stack's logs (the worker's holds every flow run's output) and the Ray workers' stderr, 15 MB at most.
tar -czf "$OUT/logs.tgz" -C "$RWKV5_HOME" logs $(cd "$RWKV5_HOME" && ls -d ray/session_latest/logs 2>/dev/null) \
  2>/dev/null
ls -la "$OUT"
exit $status
