"""The WKV dispatch (`rwkv5.wkv`): backend choice, its single-step path and the chunked path against the kernels."""

from __future__ import annotations

import pytest
import torch

from kernels.wkv5 import chunk_wkv5, naive_wkv5
from rwkv5.wkv import wkv5
from tests.kernels.test_wkv5 import B, H, N, assert_close, leaves_like, make_inputs, run_with_grads


def test_cpu_dispatch_keeps_pytorch_path():
    from rwkv5.wkv import available_backends, default_backend

    assert available_backends("cpu") == ["chunk", "naive"]
    assert default_backend("cpu") == "chunk"


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "init_state"])
def test_dispatch_step_matches_chunk(with_state):
    """wkv5 takes its single-step path for T == 1; it must agree with the chunked path."""
    inputs = make_inputs(1, "mixed", with_state)
    chunk_inputs = leaves_like(inputs, torch.float32)
    dy, dstate = torch.randn(B, 1, H, N), torch.randn(B, H, N, N)

    y, state, grads = run_with_grads(lambda **kw: wkv5(**kw, backend="chunk"), inputs, dy, dstate)
    y_c, state_c, grads_c = run_with_grads(chunk_wkv5, chunk_inputs, dy, dstate)

    assert_close("y", y, y_c)
    assert_close("final state", state, state_c)
    for name in inputs:
        assert_close(f"d{name}", grads[name], grads_c[name])


def test_dispatch_sequence_matches_reference():
    inputs = make_inputs(40, "mixed", with_state=True)
    ref = leaves_like(inputs, torch.float64)
    with torch.no_grad():
        y, state = wkv5(**inputs)
        y_ref, state_ref = naive_wkv5(**ref)
    assert_close("y", y, y_ref)
    assert_close("final state", state, state_ref)


def test_dispatch_rejects_unknown_backend():
    inputs = make_inputs(3, "mixed", with_state=False)
    with pytest.raises(ValueError, match="unknown WKV backend"):
        wkv5(**inputs, backend="triton")
