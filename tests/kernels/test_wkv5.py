"""WKV5 variants against the float64 sequential reference: outputs, final state and every gradient."""

from __future__ import annotations

import pytest
import torch

from kernels.wkv5 import chunk_wkv5, naive_wkv5

B, H, N = 2, 2, 16
FP32_RATIO = 1e-5

# (low, high) of time_decay; the per-step decay is exp(-exp(time_decay)).
DECAYS = {
    "strong": (-1.0, 2.0),  # w down to exp(-e^2) ~ 6e-4: the state forgets within a few steps
    "weak": (-8.0, -4.0),  # w up to 1 - 3e-4: long memory, state grows over the sequence
    "mixed": (-8.0, 2.0),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, ratio: float = FP32_RATIO) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err < ratio, f"{name}: relative error {err:.3e} >= {ratio:.0e}"


def make_inputs(T: int, decay: str, with_state: bool, dtype=torch.float32) -> dict[str, torch.Tensor]:
    lo, hi = DECAYS[decay]
    inputs = {
        "r": torch.randn(B, T, H, N),
        "k": torch.randn(B, T, H, N),
        "v": torch.randn(B, T, H, N),
        "w": torch.empty(H, N).uniform_(lo, hi),
        "u": torch.randn(H, N) * 0.5,
    }
    if with_state:
        inputs["state"] = torch.randn(B, H, N, N)
    return {name: x.to(dtype).requires_grad_() for name, x in inputs.items()}


def leaves_like(inputs: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    return {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}


def run_with_grads(fn, inputs, dy, dstate):
    """Forward, then backward of <y, dy> + <state, dstate>; returns y, state and each input's gradient."""
    y, state = fn(**inputs)
    ((y * dy.to(y.dtype)).sum() + (state * dstate.to(state.dtype)).sum()).backward()
    return y, state, {name: x.grad for name, x in inputs.items()}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "init_state"])
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("T", [1, 15, 63, 100], ids=lambda t: f"T{t}")
def test_chunk(T, decay, with_state):
    inputs = make_inputs(T, decay, with_state)
    ref_inputs = leaves_like(inputs, torch.float64)
    dy, dstate = torch.randn(B, T, H, N), torch.randn(B, H, N, N)

    y, state, grads = run_with_grads(chunk_wkv5, inputs, dy, dstate)
    y_ref, state_ref, grads_ref = run_with_grads(naive_wkv5, ref_inputs, dy, dstate)

    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert_close("y", y, y_ref)
    assert_close("final state", state, state_ref)
    for name in inputs:
        assert_close(f"d{name}", grads[name], grads_ref[name])


@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("split", [1, 37, 64], ids=lambda s: f"split{s}")
def test_chunk_state_carry(split, decay):
    """Two calls that pass the state along equal one call over the concatenation, gradients included."""
    T = 100
    inputs = make_inputs(T, decay, with_state=True)
    dy, dstate = torch.randn(B, T, H, N), torch.randn(B, H, N, N)

    y_one, state_one, grads_one = run_with_grads(chunk_wkv5, inputs, dy, dstate)

    two = leaves_like(inputs, torch.float32)
    first = {n: two[n][:, :split] for n in "rkv"}
    second = {n: two[n][:, split:] for n in "rkv"}
    y1, s1 = chunk_wkv5(**first, w=two["w"], u=two["u"], state=two["state"])
    y2, s2 = chunk_wkv5(**second, w=two["w"], u=two["u"], state=s1)
    y_two = torch.cat([y1, y2], dim=1)
    ((y_two * dy).sum() + (s2 * dstate).sum()).backward()

    assert_close("y", y_two, y_one)
    assert_close("final state", s2, state_one)
    for name in inputs:
        assert_close(f"d{name}", two[name].grad, grads_one[name])


def test_chunk_rejects_bad_shapes():
    inputs = make_inputs(5, "mixed", with_state=False)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\[H, N\]"):
            chunk_wkv5(inputs["r"], inputs["k"], inputs["v"], inputs["w"][:1], inputs["u"])
        with pytest.raises(ValueError, match="state must be"):
            chunk_wkv5(inputs["r"], inputs["k"], inputs["v"], inputs["w"], inputs["u"], torch.zeros(B, H, N))
