"""bench/profile_step.py's breakdown: device events are filed by the named range they fall in, then by name, and
the window's gaps count as idle, per micro-batch."""

from __future__ import annotations

import pytest

from bench.profile_step import breakdown, main


def _x(name, cat, ts, dur):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_breakdown_files_kernels_by_range_then_name():
    trace = {"traceEvents": [
        _x("rwkv5.head_loss", "gpu_user_annotation", 300, 100),
        _x("rwkv5.optimizer_step", "gpu_user_annotation", 500, 200),
        _x("sm90_xmma_gemm_bf16bf16_bf16f32", "kernel", 0, 100),       # a block's matmul
        _x("wkv5_forward_kernel", "kernel", 100, 20),                  # the WKV op
        _x("triton_per_fused_add_mul_0", "kernel", 120, 80),           # compiled block elementwise
        _x("triton_red_fused_chunk_loss", "kernel", 300, 50),          # Triton, but inside head_loss
        _x("sm90_xmma_gemm_bf16bf16_bf16f32", "kernel", 350, 50),      # the head's matmul
        _x("multi_tensor_apply_kernel<AdamFunctor>", "kernel", 500, 60),
        _x("Memcpy DtoD (Device -> Device)", "gpu_memcpy", 560, 40),   # ZeRO's copies in the step
        _x("ncclDevKernel_ReduceScatter_Sum_bf16", "kernel", 620, 30),
        _x("at::native::vectorized_elementwise_kernel", "kernel", 650, 50),  # step: bookkeeping
        _x("cudaMalloc", "cuda_runtime", 0, 10),
        _x("cudaStreamSynchronize", "cuda_runtime", 700, 4),
    ]}
    b = breakdown(trace, micro_batches=2)
    ms = {k: v * 2 * 1e3 for k, v in b["ms"].items()}  # back to microseconds over the window
    assert ms == pytest.approx({"block_matmul": 100, "block_wkv": 20, "block_elementwise": 80, "head_loss": 100,
                                "optimizer": 60, "zero_bookkeeping": 120, "idle": 220})
    assert b["span_ms"] == pytest.approx(0.7 / 2)
    assert b["host_allocator_ms"] == pytest.approx(0.005) and b["host_sync_ms"] == pytest.approx(0.002)


def test_a_written_trace_is_broken_down_on_its_own(tmp_path):
    """`--from-trace`: the breakdown of a trace already on disk, named after it, the same as `breakdown`'s."""
    import gzip
    import json

    trace = {"traceEvents": [_x("sm90_xmma_gemm_bf16bf16_bf16f32", "kernel", 0, 100),
                             _x("triton_per_fused_add_mul_0", "kernel", 150, 50)]}
    path = tmp_path / "profile-7b-L8-h100-step.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    record = main(["--from-trace", str(path), "--grad-accum", "2", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "profile-7b-L8-h100-profile.json").read_text())
    assert written["step"] == record["step"] == breakdown(trace, 2)
    assert written["step"]["ms"]["idle"] == pytest.approx(50 / 2e3) and written["from_trace"] == path.name
