"""Weight-only quantization: error within half a quantization step, exact packing, and a quantized model
that still runs in RNN mode with logits close to the bf16 model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwkv5.config import ModelConfig
from rwkv5.errors import ConfigError
from rwkv5.infer import HostEmbedding, embedding_on_host, prefill
from rwkv5.model import RWKV5
from rwkv5.quantize import QuantizedEmbedding, QuantizedLinear, QuantizedWeight, quantize_model, weight_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_within_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 48).unsqueeze(1)  # rows of very different scale
    qw = QuantizedWeight(w, bits, group=64)
    err = (qw.dequantize(dtype=torch.float32) - w).abs()
    steps = qw.scale.float().repeat_interleave(qw.group, dim=1) if bits == 4 else qw.scale.float()
    # Half a step from rounding, plus the bf16 rounding of the scale itself (at most 7 or 127 steps x 2^-8).
    slack = 0.5 + (7 if bits == 4 else 127) * 2.0**-8
    assert (err <= steps * slack + 1e-12).all()
    assert err.max() > 0  # it did quantize


def test_four_bit_packing_is_exact_on_the_grid():
    # Values already on the grid (integers -7..7 times a power-of-two scale) come back exactly.
    torch.manual_seed(1)
    codes = torch.randint(-7, 8, (6, 32)).float()
    codes[:, 0] = 7  # every group's absmax is 7 steps, so the scale is exactly the step
    w = codes * 0.25
    qw = QuantizedWeight(w, 4, group=32)
    assert qw.q.shape == (6, 16) and qw.q.dtype == torch.uint8
    assert torch.equal(qw.dequantize(dtype=torch.float32), w)
    assert int(qw.q[0, 0] & 0xF) == 7 + 8  # low nibble holds the even column


def test_embedding_lookup_dequantizes_only_its_rows():
    emb = nn.Embedding(100, 64)
    qe = QuantizedEmbedding(emb, 4, group=32, dtype=torch.float32)
    idx = torch.tensor([[3, 99, 3], [0, 50, 7]])
    full = qe.weight.dequantize(dtype=torch.float32)
    assert torch.equal(qe(idx), full[idx])


@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_dequantization_gives_the_same_product(monkeypatch, bits):
    import rwkv5.quantize

    torch.manual_seed(2)
    layer = QuantizedLinear(nn.Linear(64, 100, bias=False), bits, group=32)
    x = torch.randn(3, 5, 64)
    whole = x @ layer.weight.dequantize(dtype=torch.float32).T
    monkeypatch.setattr(rwkv5.quantize, "_DEQUANT_BLOCK", 64 * 30)  # blocks of 30 rows: 30, 30, 30, 10
    assert [b.stop - b.start for b in layer.weight.row_blocks()] == [30, 30, 30, 10]
    assert torch.allclose(layer(x), whole, atol=1e-5)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="bits"):
        QuantizedWeight(torch.randn(4, 8), 3)
    with pytest.raises(ConfigError, match="group"):
        QuantizedWeight(torch.randn(4, 96), 4, group=64)
    with pytest.raises(ConfigError, match="bias"):
        QuantizedLinear(nn.Linear(8, 4, bias=True), 8)


# This model's errors: bf16 vs fp32 0.013, 8-bit vs bf16 0.027, 4-bit vs bf16 0.32; the tolerances sit above.
@pytest.mark.parametrize("bits,tolerance", [(8, 0.05), (4, 0.5)])
def test_quantized_model_tracks_the_original(bits, tolerance):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=128, head_size=32, vocab_size=512)
    model = RWKV5(cfg)
    # Trained-looking weights: RWKV-LM's init zeroes output projections, which would hide their error.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    model = model.to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        want = model(idx).float()
    before = weight_bytes(model)
    quantize_model(model, bits, group=64)
    assert isinstance(model.head, QuantizedLinear) and isinstance(model.emb, QuantizedEmbedding)
    assert weight_bytes(model) < before * (0.55 if bits == 8 else 0.32)
    with torch.no_grad():
        got = model(idx).float()
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < tolerance
    # RNN mode over the quantized model: chunked prefill equals the whole context at once.
    logits_chunked, _ = prefill(model, idx[0], chunk_len=7)
    assert torch.allclose(logits_chunked, got[0, -1], atol=2e-2, rtol=2e-2)


def test_a_bare_linear_or_embedding_comes_back_quantized():
    # A module cannot replace itself in place: its quantized form is the return value.
    assert isinstance(quantize_model(nn.Linear(64, 32, bias=False), 4, group=32), QuantizedLinear)
    assert isinstance(quantize_model(nn.Embedding(10, 64), 8), QuantizedEmbedding)
    assert isinstance(quantize_model(nn.Embedding(10, 64), 8, embedding=False), nn.Embedding)


def test_quantized_embedding_on_the_host_gives_the_same_logits(random_model):
    cfg = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=300)
    model = quantize_model(random_model(cfg).to(torch.bfloat16), 4, group=32)
    ids = torch.randint(0, cfg.vocab_size, (40,))
    want, _ = prefill(model, ids, chunk_len=16)
    embedding_on_host(model)
    assert isinstance(model.emb, HostEmbedding) and isinstance(model.emb.inner, QuantizedEmbedding)
    assert model.emb.inner.weight.q.device.type == "cpu"
    got, _ = prefill(model, ids, chunk_len=16)
    assert torch.equal(got, want)
