"""The model itself: parameter count, RWKV-LM key names and shapes, initialisation, checkpointing, loss."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv5.config import ModelConfig, count_parameters, model_preset
from rwkv5.model import RWKV5, lm_loss

# Odd sizes on purpose: 3 heads of 32, ffn 336 (3.5 * 96), a vocabulary larger than C (head gain > 1).
CUSTOM = ModelConfig(n_layer=3, n_embd=96, head_size=32, vocab_size=150)


def rwkv_lm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of an RWKV-LM v5.2 checkpoint, written out from its model definition."""
    C, H, N, F, V = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn, cfg.vocab_size
    shapes = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        norms = ["ln0", "ln1", "ln2"] if i == 0 else ["ln1", "ln2"]
        shapes.update({f"{b}{ln}.{p}": (C,) for ln in norms for p in ("weight", "bias")})
        shapes.update({f"{b}att.time_mix_{x}": (1, 1, C) for x in "kvrg"})
        shapes.update({f"{b}att.time_decay": (H, N), f"{b}att.time_faaaa": (H, N)})
        shapes.update({f"{b}att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "gate", "output")})
        shapes.update({f"{b}att.ln_x.weight": (C,), f"{b}att.ln_x.bias": (C,)})
        shapes.update({f"{b}ffn.time_mix_k": (1, 1, C), f"{b}ffn.time_mix_r": (1, 1, C)})
        shapes.update({f"{b}ffn.key.weight": (F, C), f"{b}ffn.receptance.weight": (C, C), f"{b}ffn.value.weight": (C, F)})
    return shapes


@pytest.fixture(scope="module")
def custom():
    return RWKV5(CUSTOM)


@pytest.fixture(scope="module")
def tiny():
    with torch.device("meta"):  # shapes only: skips the seconds-long orthogonal init of the 65536-row head
        return RWKV5(model_preset("tiny"))


def test_parameter_count_matches_config(tiny, custom):
    for model in (tiny, custom):
        assert sum(p.numel() for p in model.parameters()) == count_parameters(model.cfg)
    assert count_parameters(model_preset("7b")) == 7_518_044_160


@pytest.mark.parametrize("which", ["tiny", "custom"])
def test_state_dict_is_rwkv_lm(which, request):
    model = request.getfixturevalue(which)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == rwkv_lm_shapes(model.cfg)


def _is_orthogonal(w: torch.Tensor, gain: float) -> bool:
    """Rows (or columns, for tall matrices) orthonormal up to `gain`."""
    w = w.double()
    gram = w.T @ w if w.shape[0] > w.shape[1] else w @ w.T
    return torch.allclose(gram, gain**2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)


def test_init_matrices(custom):
    C, F, V = CUSTOM.n_embd, CUSTOM.ffn, CUSTOM.vocab_size
    for i, block in enumerate(custom.blocks):
        for zero in (block.att.output, block.ffn.value, block.ffn.receptance):
            assert not zero.weight.any(), f"block {i}: output projections start at zero"
        assert _is_orthogonal(block.att.receptance.weight, 1.0)
        assert _is_orthogonal(block.att.value.weight, 1.0)
        assert _is_orthogonal(block.att.key.weight, 0.1)
        assert _is_orthogonal(block.att.gate.weight, 0.1)
        assert _is_orthogonal(block.ffn.key.weight, math.sqrt(F / C))
    assert _is_orthogonal(custom.head.weight, 0.5 * math.sqrt(V / C))
    emb = custom.emb.weight
    assert emb.abs().max() <= 1e-4 and emb.std() > 1e-5


def test_init_schedules_follow_rwkv_lm(custom):
    C, L = CUSTOM.n_embd, CUSTOM.n_layer
    ddd = torch.arange(C) / C
    n = torch.arange(C, dtype=torch.float32)
    for i, block in enumerate(custom.blocks):
        r1 = 1 - i / L  # 1 at the first layer, towards 0 at the last
        r0 = i / (L - 1)  # 0 at the first layer, 1 at the last
        # RWKV-LM v5: mix = weight of the current token; deeper layers weigh it more.
        torch.testing.assert_close(block.att.time_mix_k.flatten(), ddd.pow(r1))
        torch.testing.assert_close(block.att.time_mix_v.flatten(), ddd.pow(r1) + 0.3 * r0)
        torch.testing.assert_close(block.att.time_mix_r.flatten(), ddd.pow(0.5 * r1))
        torch.testing.assert_close(block.ffn.time_mix_k.flatten(), ddd.pow(r1))
        decay = block.att.time_decay.flatten()
        assert decay[0].item() == pytest.approx(-6.0) and decay[-1].item() == pytest.approx(-1.0)
        assert torch.all(decay[1:] >= decay[:-1])
        zigzag = ((n + 1) % 3 - 1) * 0.1
        torch.testing.assert_close(block.att.time_faaaa.flatten(), r0 * (1 - n / (C - 1)) + zigzag)
        assert torch.all(block.att.ln_x.weight == 1)


SMALL = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=50)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_gives_identical_loss_and_grads(random_model, policy):
    plain = random_model(SMALL).train()
    ckpt = RWKV5(SMALL, activation_memory=policy).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        # A pre-hook on the time mix: recomputation in backward calls it again (the checkpoint sits inside
        # Block.forward, so the block's own hooks run once).
        model.blocks[0].att.register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    idx = torch.randint(0, SMALL.vocab_size, (2, 21))
    losses = []
    for model in (plain, ckpt):
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        losses.append(loss)
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block ran again in backward
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8, msg=name)


def test_selective_checkpoint_keeps_matmul_outputs_only():
    """Under "selective" backward recomputes elementwise work but no matrix product; "full" recomputes them."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    idx = torch.randint(0, SMALL.vocab_size, (2, 33))
    flops = {}
    for policy in ("none", "selective", "full"):
        model = RWKV5(SMALL, activation_memory=policy).train()
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops[policy] = counter.get_total_flops()
    assert flops["selective"] == flops["none"]  # no matmul runs twice
    assert flops["full"] > flops["none"]


def test_policy_and_grad_checkpoint_agree():
    model = RWKV5(SMALL, grad_checkpoint=True)
    assert model.activation_memory == "full" and all(b.activation_memory == "full" for b in model.blocks)
    model.grad_checkpoint = False
    assert model.activation_memory == "none"
    with pytest.raises(ValueError, match="activation_memory"):
        RWKV5(SMALL, activation_memory="some")


def test_l2_wrap_only_touches_the_largest_logit():
    B, T, V = 2, 5, 11
    logits = torch.randn(B, T, V) * 3
    targets = torch.randint(0, V, (B, T))
    grads = []
    for wrap in (False, True):
        leaf = logits.clone().requires_grad_()
        loss = lm_loss(leaf, targets, l2_wrap=wrap)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    (loss_plain, g_plain), (loss_wrap, g_wrap) = grads
    assert loss_plain == loss_wrap  # the loss value itself is unchanged
    diff = g_wrap - g_plain
    top, arg = logits.max(dim=-1, keepdim=True)
    expected = torch.zeros_like(logits).scatter_(-1, arg, top * 1e-4 / (B * T))
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-9)
    assert (diff != 0).sum() == B * T


def test_loss_falls_when_overfitting_one_batch():
    model = RWKV5(SMALL).train()
    idx = torch.randint(1, SMALL.vocab_size, (2, 17))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(SMALL.vocab_size), abs=0.2)  # starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses
