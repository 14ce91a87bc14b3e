#!/usr/bin/env bash
# The builds a training call needs, side by side: the WKV5 CUDA kernel and DeepSpeed's FusedAdam (sm_90 with
# TORCH_CUDA_ARCH_LIST=9.0). Sourced or run from the repo root with PYTHONPATH and RWKV5_KERNEL_CACHE set; the
# kernel's log goes to $OUT/build.log, FusedAdam's to /tmp/fused.log, and the last lines of both are printed.
python3 -m kernels.build > "${OUT:-/tmp}/build.log" 2>&1 &
python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" > /tmp/fused.log 2>&1 &
wait
tail -2 "${OUT:-/tmp}/build.log"; tail -2 /tmp/fused.log
