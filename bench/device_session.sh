#!/usr/bin/env bash
# One device call for two records: the issue-27 memory benches (bench/longctx_memory.sh, ~3 min) beside the
# start of the recorded pretrain/1gpu run (bench/pipeline_1gpu.sh start). The memory benches need the packages
# the run unpacks (pydantic in /tmp/site312) and read peaks per process (torch.cuda.max_memory_allocated), so
# the run beside them does not change their figures; their GPU time overlaps only the run's first minutes (stack
# start, sample, tokenization, its first pretraining launch), which the run's record states.
#   bash bench/device_session.sh [WAIT_S]      with carry [".site"]; then `bash bench/pipeline_1gpu.sh finish`
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
(
  for _ in $(seq 120); do [[ -f /tmp/detached.log ]] && break; sleep 2; done  # the run has unpacked /tmp/site312
  OUT=/tmp/longctx PYTHONPATH=/tmp/site312 bash bench/longctx_memory.sh > /tmp/longctx.log 2>&1
  tar -czf "$OUT/longctx.tgz" -C /tmp longctx longctx.log
) &
bash bench/pipeline_1gpu.sh start "${1:-540}"
wait
tail -n 25 /tmp/longctx.log
