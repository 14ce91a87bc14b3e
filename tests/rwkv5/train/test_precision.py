"""Precision "fp8": which modules torchao converts, and that an emulated float8 model trains like the bf16 one
(CPU: the float8 casts are real, the products fp32). The GPU run is tests/gpu/test_fp8_training.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rwkv5.config import ModelConfig
from rwkv5.model import RWKV5
from rwkv5.train.config import run_preset, with_overrides
from rwkv5.train.precision import apply_precision, float8_linear_names, is_block_linear

BLOCK_LINEARS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output",
                 "ffn.key", "ffn.receptance", "ffn.value")
CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=512)


def _run(precision: str, recipe: str = "tensorwise", policy: str = "none"):
    return with_overrides(run_preset("tiny"), {
        "model.n_embd": 64, "model.head_size": 16, "model.vocab_size": 512, "precision": precision,
        "fp8_recipe": recipe, "activation_memory": policy,
    })


def _model(policy: str = "none") -> RWKV5:
    torch.manual_seed(0)
    model = RWKV5(CFG, activation_memory=policy)
    with torch.no_grad():  # RWKV-LM's init zeroes the output projections: give every matrix a gradient path
        for name, p in model.named_parameters():
            if p.ndim == 2 and "time_" not in name:
                p.normal_(std=0.5 / p.shape[1] ** 0.5)
    return model.to(torch.bfloat16)


def test_bf16_converts_nothing():
    model = _model()
    assert apply_precision(model, _run("bf16"), "cpu") == []
    assert float8_linear_names(model) == []


def test_fp8_converts_exactly_the_block_linears():
    model = _model()
    keys = list(model.state_dict())
    names = apply_precision(model, _run("fp8"), "cpu")
    assert sorted(names) == sorted(f"blocks.{i}.{n}" for i in range(CFG.n_layer) for n in BLOCK_LINEARS)
    assert type(model.head) is nn.Linear and type(model.emb) is nn.Embedding
    assert list(model.state_dict()) == keys  # checkpoints are the same for both precisions
    # The float8 matmul's rule: a linear with a dimension not divisible by 16 stays as it is.
    assert not is_block_linear(nn.Linear(64, 24), "blocks.0.att.key")
    assert not is_block_linear(nn.Linear(64, 64), "head")


@pytest.mark.parametrize("recipe,policy", [("tensorwise", "none"), ("rowwise", "selective")])
def test_emulated_fp8_forward_backward_is_close_to_bf16(recipe, policy):
    ref, fp8 = _model(policy), _model(policy)
    apply_precision(fp8, _run("fp8", recipe, policy), "cpu")
    torch.manual_seed(1)
    idx, targets = torch.randint(1, 512, (2, 48)), torch.randint(1, 512, (2, 48))
    losses = []
    for model in (ref, fp8):
        loss = model(idx, targets=targets)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 1e-2 * losses[0], losses
    for (name, p), q in zip(ref.named_parameters(), fp8.parameters()):
        g, h = p.grad.float().flatten(), q.grad.float().flatten()
        assert torch.isfinite(h).all(), name
        if g.norm() > 0:
            assert torch.cosine_similarity(g, h, dim=0) > 0.9, name


def test_fp8_needs_16_divisible_widths():
    with pytest.raises(ValueError, match="model.n_embd"):
        with_overrides(run_preset("tiny"), {"precision": "fp8", "model.n_embd": 72, "model.head_size": 8})


def test_fp8_trains_through_deepspeed_zero2_bf16_like_bf16(token_data, small_run, tmp_path):
    """The real train() on the CPU (gloo, emulated float8): converted before DeepSpeed, whose bf16 cast and
    ZeRO-2 flattening take the float8 linears like plain ones; the losses follow bf16's from the same seed."""
    from rwkv5.train.callbacks import Callback
    from rwkv5.train.launch import train_here

    class Seen(Callback):
        def __init__(self):
            self.losses = []

        def pre_train(self, ctx):
            self.float8 = float8_linear_names(ctx.model)
            self.dtypes = {p.dtype for p in ctx.model.parameters()}

        def post_step(self, info, metrics):
            self.losses.append(info.loss)

    seen = {}
    for precision in ("bf16", "fp8"):
        seen[precision] = Seen()
        cfg = small_run(4, **{"precision": precision, "activation_memory": "selective",
                              "checkpoint.every_steps": 100})
        train_here(cfg, precision, token_data, tmp_path, callbacks=[seen[precision]])
    bf16, fp8 = seen["bf16"], seen["fp8"]
    assert bf16.float8 == [] and len(fp8.float8) == 8 * cfg.model.n_layer and fp8.dtypes == {torch.bfloat16}
    assert len(fp8.losses) == 4 and fp8.losses[0] == pytest.approx(bf16.losses[0], rel=1e-2)
    assert fp8.losses == pytest.approx(bf16.losses, rel=3e-2)
