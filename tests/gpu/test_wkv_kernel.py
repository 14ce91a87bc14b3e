"""The CUDA WKV5 kernel against a float64 reference on the GPU: outputs, final state and every gradient.

Inputs are bf16 (as the model produces them), the reference runs in float64 on the same bf16-rounded values,
and each output must match within a relative error of 1e-2 (||out - ref|| / ||ref||). Every kernel output
starts as NaN (`set_poison`), so an element the kernel forgets to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

from kernels.wkv5 import chunk_wkv5, naive_wkv5

BF16_RATIO = 1e-2
DECAYS = {
    "strong": (-1.0, 2.0),  # w down to exp(-e^2) ~ 6e-4
    "weak": (-8.0, -4.0),  # w up to 1 - 3e-4: long memory
    "mixed": (-8.0, 2.0),
}
NAMES = ("r", "k", "v", "w", "u", "state")


@pytest.fixture(scope="module", autouse=True)
def _poisoned_outputs():
    from kernels.build import load_wkv5

    ext = load_wkv5()
    ext.set_poison(True)
    yield
    ext.set_poison(False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, N, decay, with_state, device="cuda"):
    lo, hi = DECAYS[decay]
    x = {
        "r": torch.randn(B, T, H, N, device=device).bfloat16(),
        "k": torch.randn(B, T, H, N, device=device).bfloat16(),
        "v": torch.randn(B, T, H, N, device=device).bfloat16(),
        "w": torch.empty(H, N, device=device).uniform_(lo, hi),
        "u": torch.randn(H, N, device=device) * 0.5,
        "state": torch.randn(B, H, N, N, device=device) if with_state else None,
    }
    return x


def leaves(inputs, dtype=None):
    out = {}
    for name, x in inputs.items():
        out[name] = None if x is None else x.detach().to(dtype or x.dtype).requires_grad_()
    return out


def run(fn, inputs, dy, dstate):
    """y, final state and the gradients of <y, dy> + <state, dstate> with respect to every given input."""
    y, s = fn(**inputs)
    ((y.double() * dy.double()).sum() + (s.double() * dstate.double()).sum()).backward()
    return y, s, {n: x.grad for n, x in inputs.items() if x is not None}


def compare(case, error_table, ours, ref):
    y, s, g = ours
    y_ref, s_ref, g_ref = ref
    errs = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
    for n in g_ref:
        errs["d" + n] = rel_err(g[n], g_ref[n])
    error_table.append({"case": case, **errs})
    bad = {n: e for n, e in errs.items() if not e <= BF16_RATIO}
    assert not bad, f"{case}: relative errors over {BF16_RATIO}: {bad}"


def check(case, error_table, reference, B, T, H, N, decay, with_state):
    """Fresh inputs through cuda_wkv5 and `reference` (in float64), compared and added to the error table."""
    from kernels.wkv5.cuda import cuda_wkv5

    inputs = make_inputs(B, T, H, N, decay, with_state)
    dy = torch.randn(B, T, H, N, device="cuda")
    dstate = torch.randn(B, H, N, N, device="cuda")
    ours = run(cuda_wkv5, leaves(inputs), dy, dstate)
    ref = run(reference, leaves(inputs, torch.float64), dy, dstate)
    compare(case, error_table, ours, ref)


CASES = [  # (B, T, H, N)
    (1, 1, 2, 64),
    (2, 37, 3, 64),
    (1, 200, 1, 32),
    (2, 100, 2, 128),
    (3, 64, 4, 64),
    (8, 33, 16, 32),
    (16, 20, 32, 64),
    (1, 130, 2, 128),
]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "init_state"])
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}_T{}_H{}_N{}".format(*s))
def test_cuda_vs_float64(shape, decay, with_state, error_table):
    B, T, H, N = shape
    case = f"B{B} T{T} H{H} N{N} {decay} {'s0' if with_state else '--'}"
    check(case, error_table, naive_wkv5, B, T, H, N, decay, with_state)


@pytest.mark.parametrize("N", [32, 64, 128])
@pytest.mark.parametrize("decay", ["weak", "mixed"])
def test_long_sequence(N, decay, error_table):
    """T = 3001 (many chunks, a partial last one) against the float64 chunked path."""
    B, T, H = 2, 3001, 2
    check(f"long B{B} T{T} H{H} N{N} {decay}", error_table, chunk_wkv5, B, T, H, N, decay, True)


@pytest.mark.parametrize("splits", [(70, 80), (1, 63, 64, 22)], ids=["2calls", "4calls"])
def test_state_carried_across_calls(splits, error_table):
    """Calls chained through the state equal one call over the whole sequence, gradients included."""
    from kernels.wkv5.cuda import cuda_wkv5

    B, H, N, T = 2, 3, 64, sum(splits)
    inputs = make_inputs(B, T, H, N, "mixed", True)
    dy = torch.randn(B, T, H, N, device="cuda")
    dstate = torch.randn(B, H, N, N, device="cuda")

    def chained(r, k, v, w, u, state):
        ys, start = [], 0
        for n in splits:
            y, state = cuda_wkv5(r[:, start:start + n], k[:, start:start + n], v[:, start:start + n], w, u, state)
            ys.append(y)
            start += n
        return torch.cat(ys, 1), state

    ours = run(chained, leaves(inputs), dy, dstate)
    ref = run(naive_wkv5, leaves(inputs, torch.float64), dy, dstate)
    compare(f"carried {'+'.join(map(str, splits))}", error_table, ours, ref)


SPLIT_CASES = [  # (B, T, H, N, splits): pieces of a multiple of 64 steps, the last one shorter
    (2, 65, 3, 64, 2),  # a last piece of 1 step
    (1, 200, 2, 32, 3),  # 2 pieces: 128 + 72
    (2, 130, 2, 128, 2),  # 128 + 2
    (1, 777, 4, 64, 5),  # 5 pieces of 192, the last 9
    (3, 300, 2, 64, 64),  # more splits asked than 64-step pieces exist: 5 pieces
]


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}_T{}_H{}_N{}_split{}".format(*c))
def test_time_splits(case, decay, error_table, monkeypatch):
    """The sequence cut into pieces run in parallel (pass 1, scan, pass 2) matches the reference."""
    B, T, H, N, splits = case
    monkeypatch.setenv("RWKV5_WKV_SPLITS", str(splits))
    check(f"split{splits} B{B} T{T} H{H} N{N} {decay}", error_table, naive_wkv5, B, T, H, N, decay, True)


@pytest.mark.parametrize("N", [32, 64, 128])
def test_time_splits_long_auto(N, error_table, monkeypatch):
    """T = 3001 at B*H = 2 with RWKV5_WKV_SPLITS=auto (5 pieces), zero initial state, against float64."""
    from kernels.wkv5.cuda import default_splits

    B, T, H = 1, 3001, 2
    monkeypatch.setenv("RWKV5_WKV_SPLITS", "auto")
    assert default_splits(B * H, T, torch.device("cuda")) == 5
    check(f"split auto long B{B} T{T} H{H} N{N} weak", error_table, chunk_wkv5, B, T, H, N, "weak", False)


@pytest.mark.parametrize("N", [32, 64])
def test_chunk_64(N, error_table, monkeypatch):
    """Chunks of 64 steps forward and backward (not the default 32), T not a multiple of 64, with a state."""
    monkeypatch.setenv("RWKV5_WKV_CHUNK", "64")
    monkeypatch.setenv("RWKV5_WKV_BWD_CHUNK", "64")
    check(f"chunk64 B2 T150 H2 N{N} mixed", error_table, naive_wkv5, 2, 150, 2, N, "mixed", True)


@pytest.mark.parametrize("N", [32, 64])
def test_chunk_64_split(N, error_table, monkeypatch):
    """Chunks of 64 steps with time splits: the state-only pass 1 (its own block shape) at that chunk length."""
    monkeypatch.setenv("RWKV5_WKV_CHUNK", "64")
    monkeypatch.setenv("RWKV5_WKV_BWD_CHUNK", "64")
    monkeypatch.setenv("RWKV5_WKV_SPLITS", "3")
    check(f"chunk64 split3 B1 T300 H2 N{N} mixed", error_table, naive_wkv5, 1, 300, 2, N, "mixed", True)


def test_dispatch_default_and_compile():
    """rwkv5.wkv picks the kernel on CUDA, and torch.compile traces the custom op without a graph break."""
    from kernels.wkv5.cuda import cuda_wkv5
    from rwkv5.wkv import default_backend, wkv5

    assert default_backend("cuda") == "cuda"
    inputs = make_inputs(2, 50, 2, 64, "mixed", True)
    y_eager, s_eager = cuda_wkv5(**inputs)
    y_disp, s_disp = wkv5(**inputs)
    compiled = torch.compile(cuda_wkv5, fullgraph=True)
    y_comp, s_comp = compiled(**inputs)
    for out in (y_disp, y_comp):
        assert torch.equal(out, y_eager)
    for out in (s_disp, s_comp):
        assert torch.equal(out, s_eager)


@pytest.mark.parametrize("splits", ["1", "auto"])
def test_indices_past_2_31(splits, monkeypatch):
    """B*T*C > 2^31 elements: the last steps (strong decay, so a short window suffices) are still right."""
    from kernels.wkv5.cuda import cuda_wkv5

    monkeypatch.setenv("RWKV5_WKV_SPLITS", splits)

    B, H, N = 1, 64, 64
    T = 2**31 // (H * N) + 100
    window = 48  # w <= exp(-e) per step: older steps weigh < 1e-50
    r, k, v = (torch.randn(B, T, H, N, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = torch.empty(H, N, device="cuda").uniform_(1.0, 2.0)
    u = torch.randn(H, N, device="cuda") * 0.5
    tail = slice(T - window, T)
    dy = torch.zeros(B, T, H, N, device="cuda", dtype=torch.bfloat16)
    dy[:, tail] = torch.randn(B, window, H, N, device="cuda").bfloat16()
    leaves_ = [x.requires_grad_() for x in (r, k, v)]
    y, s = cuda_wkv5(*leaves_, w, u)
    y.backward(dy)
    ref_in = [x.detach()[:, tail].double().requires_grad_() for x in (r, k, v)]
    y_ref, s_ref = naive_wkv5(*ref_in, w.double(), u.double())
    y_ref.backward(dy[:, tail].double())
    # y and dr read the state at the window start (zero in the reference): compare the last 16 steps only.
    last = slice(window - 16, window)
    assert rel_err(y[:, tail][:, last], y_ref[:, last]) <= BF16_RATIO
    assert rel_err(s, s_ref) <= BF16_RATIO
    assert rel_err(leaves_[0].grad[:, tail][:, last], ref_in[0].grad[:, last]) <= BF16_RATIO
    for ours, ref in zip(leaves_[1:], ref_in[1:]):
        assert rel_err(ours.grad[:, tail], ref.grad) <= BF16_RATIO
    assert torch.isfinite(y).all() and all(torch.isfinite(x.grad).all() for x in leaves_)
