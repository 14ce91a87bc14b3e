"""The pieces behind cheap training memory: the chunked head + loss, activation policies under torch.compile,
and initialising the model where it will train (meta device, then allocated)."""

from __future__ import annotations

import pytest
import torch

from rwkv5.config import ModelConfig
from rwkv5.model import RWKV5, Block, _chunk_loss_grad, build_model, chunked_lm_loss, compile_chunk_step, lm_loss

SMALL = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=300)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("l2_wrap", [True, False], ids=["l2wrap", "plain"])
def test_chunked_loss_equals_plain(masked, l2_wrap):
    torch.manual_seed(0)
    B, T, C, V = 3, 37, 64, 300  # 111 tokens in chunks of 16: the last chunk is partial
    h0, w0 = torch.randn(B, T, C, dtype=torch.float64), torch.randn(V, C, dtype=torch.float64) * 0.3
    targets = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).float() if masked else None

    def run(fn, dtype):
        h, w = h0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        loss = fn(h, w)
        # A scale other than 1 reaches backward, as DeepSpeed's 1/grad_accum does.
        return (loss.detach().double(), *torch.autograd.grad(loss * 0.5, (h, w)))

    plain = lambda h, w: lm_loss(h @ w.t(), targets, mask, l2_wrap)  # noqa: E731
    chunked = lambda h, w: chunked_lm_loss(h, w, targets, mask, l2_wrap, chunk_tokens=16)  # noqa: E731
    ref = run(plain, torch.float64)
    got32, want32 = run(chunked, torch.float32), run(plain, torch.float32)
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got32, want32):
        assert _rel(a, b) < 1e-5, name
    got16 = run(chunked, torch.bfloat16)
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got16, ref):
        assert _rel(a, b) < 1e-2, name


def test_chunked_loss_is_what_the_model_returns_with_targets():
    torch.manual_seed(0)
    model = RWKV5(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (2, 17))
    got = model(idx[:, :-1], targets=idx[:, 1:])
    got.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert _rel(grads[name], p.grad) < 1e-5 or p.grad.abs().max() == 0, name


def test_chunked_loss_without_grad_keeps_nothing():
    h, w = torch.randn(2, 9, 8), torch.randn(40, 8)
    t = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        loss = chunked_lm_loss(h, w, t, chunk_tokens=4)
    assert loss.item() == pytest.approx(lm_loss(h @ w.t(), t).item(), rel=1e-6)


@pytest.mark.parametrize("want_grad", [False, True])
def test_compiled_loss_step_compiles_at_most_twice_for_ragged_chunks(want_grad):
    """Chat samples give every last chunk its own row count (the milestone fine-tune, the held-out evaluation):
    the compiled loss step must not recompile per count (a static compile did, up to Dynamo's limit of 8, in
    every fresh milestone process), and keeps the eager numbers."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = compile_chunk_step(backend="aot_eager")
    for n in (5, 11, 3, 17, 8, 13):
        logits, targets = torch.randn(n, 40), torch.randint(0, 40, (n,))
        weight = torch.full((n,), 1.0 / n)
        got, want = step(logits, targets, weight, 1e-4 / n, want_grad), _chunk_loss_grad(
            logits, targets, weight, 1e-4 / n, want_grad)
        torch.testing.assert_close(got[0], want[0])
        if want_grad:
            torch.testing.assert_close(got[1], want[1])
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_block_compiles_whole_with_each_policy(policy):
    """fullgraph=True fails on any graph break: the block, its checkpoint and the WKV trace as one graph."""
    torch.manual_seed(0)
    eager = Block(SMALL, 1, policy).train()
    compiled = Block(SMALL, 1, policy).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    x = torch.randn(2, 19, SMALL.n_embd)
    outs = []
    for block in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = block(xi)[0]
        (y.square().mean()).backward()
        outs.append((y, xi.grad, [p.grad for p in block.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_blocks_keeps_parameter_names():
    model = RWKV5(SMALL)
    names = list(model.state_dict())
    model.compile_blocks(backend="aot_eager")
    assert list(model.state_dict()) == names


def test_meta_then_device_init_matches_the_cpu_init():
    """build_model's GPU path (meta, to_empty, init_weights), run on the CPU: same schedules exactly, same
    zeros, and matrices from the same distributions (per tensor mean and std) as the plain constructor."""
    cfg = ModelConfig(n_layer=4, n_embd=256, head_size=64, vocab_size=1024, dim_ffn=896)
    torch.manual_seed(0)
    plain = RWKV5(cfg, activation_memory="selective")
    with torch.device("meta"):
        lazy = RWKV5(cfg, activation_memory="selective")
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(1)
    lazy.init_weights()
    assert lazy.activation_memory == "selective"
    for (name, a), b in zip(plain.named_parameters(), lazy.parameters()):
        if a.ndim != 2 or "time_" in name:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # schedules and norms: deterministic
        elif a.abs().max() == 0:
            assert b.abs().max() == 0, name
        else:
            assert not torch.equal(a, b), name  # really drawn again
            # Two independent means differ by sqrt(2) std / sqrt(n) typically: 6 of those would be a real shift.
            assert b.mean().item() == pytest.approx(a.mean().item(), abs=6 * a.std().item() / a.numel() ** 0.5), name
            assert b.std().item() == pytest.approx(a.std().item(), rel=0.02), name


def test_build_model_on_cpu_is_the_plain_constructor():
    torch.manual_seed(3)
    a = build_model(SMALL, "cpu", activation_memory="full")
    torch.manual_seed(3)
    b = RWKV5(SMALL, activation_memory="full")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
