"""Weight-only quantization for inference: 8-bit per output row, 4-bit per group of input columns.

RNN-mode decoding reads every weight once per token, so its speed and the smallest GPU it fits on are set by
the bytes of the weights: 7.5B parameters are 15 GB in bf16, 7.5 GB in 8-bit and ~4 GB in 4-bit. Activations
and the state stay in bf16/fp32; each layer's weight is dequantized to the activation dtype just before its
matmul, in pieces of at most 2^24 entries, so no full bf16 copy of a large matrix ever exists.

Why our own few lines rather than bitsandbytes or torchao: both ship CUDA-specific builds tied to torch
versions (the H200 image has torch 2.11, CI a CPU wheel of 2.13), while this needs only `torch` and runs,
and is tested, on CPU as well. The format is plain symmetric absmax rounding:

- 8-bit: ``w[o, i] ~ q[o, i] * scale[o]`` with ``q`` in -127..127 (int8), ``scale = max|w[o, :]| / 127``.
- 4-bit: ``w[o, i] ~ (q[o, i] - 8) * scale[o, i // group]`` with ``q`` in 0..15 (two per uint8, low nibble
  first), ``scale = max|w[o, group]| / 7``; the code 0 (-8) is never produced, so the grid is symmetric.

Embedding rows are quantized the same way (a row is an "output"), and a lookup dequantizes only the rows it
reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkv5.errors import ConfigError

__all__ = ["BITS", "QuantizedWeight", "QuantizedLinear", "QuantizedEmbedding", "quantize_model", "weight_bytes"]

BITS = (8, 4)
DEFAULT_GROUP = 128
# Largest dequantized piece of a weight (entries): 32 MiB in bf16, so the 7B head (65536 x 4096) never
# exists as a whole in bf16 next to its 4-bit form.
_DEQUANT_BLOCK = 1 << 24


class QuantizedWeight(nn.Module):
    """A `[out, in]` matrix stored in `bits` per entry; `dequantize(rows)` rebuilds (some of) its rows.

    Args:
        weight (Tensor): the `[out, in]` matrix to store.
        bits (int): 8 or 4.
        group (int): input columns per 4-bit scale (ignored for 8-bit). Must divide `in`. Default: 128.
    """

    def __init__(self, weight: torch.Tensor, bits: int, group: int = DEFAULT_GROUP):
        super().__init__()
        if bits not in BITS:
            raise ConfigError(f"quantize.bits must be one of {BITS}, got {bits}")
        out_f, in_f = weight.shape
        w = weight.detach().float()
        self.bits, self.shape = bits, (out_f, in_f)
        if bits == 8:
            self.group = in_f
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (out, 1)
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        else:
            if in_f % group or group % 2:
                raise ConfigError(f"quantize.group must be even and divide the input size {in_f}, got {group}")
            self.group = group
            g = w.view(out_f, in_f // group, group)
            scale = g.abs().amax(dim=2).clamp(min=1e-12) / 7  # (out, in/group)
            q = (torch.round(g / scale.unsqueeze(2)).clamp(-7, 7) + 8).to(torch.uint8).view(out_f, in_f)
            q = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in/2): low nibble = even column
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        del w

    def dequantize(self, rows: torch.Tensor | slice | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The matrix (or `rows` of it: an index tensor gives `[*rows.shape, in]`) in `dtype`."""
        if rows is None:
            rows = slice(None)
        q, scale = self.q[rows], self.scale[rows].to(dtype)
        if self.bits == 8:
            return q.to(dtype) * scale
        # Filled in place: one output-sized buffer, no stacked or grouped temporaries of the same size.
        out = torch.empty((*q.shape[:-1], self.shape[1]), dtype=dtype, device=q.device)
        out[..., 0::2] = q & 0xF
        out[..., 1::2] = q >> 4
        out.sub_(8).unflatten(-1, (self.shape[1] // self.group, self.group)).mul_(scale.unsqueeze(-1))
        return out

    def row_blocks(self, max_elements: int | None = None) -> list[slice]:
        """Row ranges whose dequantized copies hold at most `max_elements` (default 2^24) entries each."""
        rows = max(1, (max_elements or _DEQUANT_BLOCK) // self.shape[1])
        return [slice(i, min(i + rows, self.shape[0])) for i in range(0, self.shape[0], rows)]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, group={self.group}"


class QuantizedLinear(nn.Module):
    """`nn.Linear` without bias whose weight is a `QuantizedWeight`."""

    def __init__(self, linear: nn.Linear, bits: int, group: int = DEFAULT_GROUP):
        super().__init__()
        if linear.bias is not None:
            raise ConfigError("quantize: only bias-free linear layers are supported (RWKV has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = QuantizedWeight(linear.weight, bits, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.row_blocks()
        if len(blocks) == 1:
            return F.linear(x, self.weight.dequantize(dtype=x.dtype))
        return torch.cat([F.linear(x, self.weight.dequantize(b, x.dtype)) for b in blocks], dim=-1)


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding` whose table is a `QuantizedWeight`; a lookup dequantizes only the rows it reads."""

    def __init__(self, embedding: nn.Embedding, bits: int, group: int = DEFAULT_GROUP, dtype=torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.weight = QuantizedWeight(embedding.weight, bits, group)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(idx, self.dtype)


def quantize_model(model: nn.Module, bits: int, group: int = DEFAULT_GROUP, embedding: bool = True,
                   dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every `nn.Linear` (and `nn.Embedding` when `embedding`) in `model` by its quantized form.

    Vectors (time_decay, mixes, norms) stay as they are: they are a fraction of a percent of the bytes and
    the recurrence is sensitive to them.

    Args:
        model: e.g. an `RWKV5`, on any device; quantization happens where its weights are.
        bits: 8 or 4.
        group: input columns per 4-bit scale. Default: 128.
        embedding: quantize embedding tables too. Default: True.
        dtype: dtype of embedding lookups (linear layers follow their input's dtype). Default: bf16.

    Returns:
        `model`, changed in place; when `model` is itself an `nn.Linear` or `nn.Embedding`, its quantized
        form (a module cannot replace itself in a parent it does not know).
    """
    if isinstance(model, nn.Linear):
        return QuantizedLinear(model, bits, group)
    if isinstance(model, nn.Embedding) and embedding:
        return QuantizedEmbedding(model, bits, group, dtype)
    for name, child in list(model.named_children()):
        setattr(model, name, quantize_model(child, bits, group, embedding, dtype))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers: what the model occupies before any activation."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
