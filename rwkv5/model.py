"""RWKV v5.2 ("Eagle", with gate), read top to bottom: state, TimeMix, ChannelMix, Block, RWKV5.

Parameter names and shapes are RWKV-LM's, so a `state_dict()` is already an RWKV-LM checkpoint.
The same forward serves training (no state), segmented long-context training and RNN-mode inference
(state in, state out; T may be 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkv5.config import ModelConfig
from rwkv5.wkv import wkv5

__all__ = ["RWKV5", "RWKVState", "TimeMix", "ChannelMix", "Block", "l2wrap", "lm_loss"]

# GroupNorm of y / 8: RWKV-LM's head_size_divisor. Equivalent to eps 64e-5 on y.
HEAD_SIZE_DIVISOR = 8


@dataclass
class RWKVState:
    """Everything the model remembers between calls; its size does not depend on the context length.

    att_shift (Tensor): `[L, B, C]` last input of each time mix (token shift).
    wkv (Tensor): `[L, B, H, N, N]` float32 WKV state (fp32: the decay is close to 1).
    ffn_shift (Tensor): `[L, B, C]` last input of each channel mix.
    """

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, device=None, dtype=torch.float32) -> "RWKVState":
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return cls(
            att_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch, H, N, N, device=device, dtype=torch.float32),
            ffn_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
        )

    def detach(self) -> "RWKVState":
        return RWKVState(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.att_shift, self.wkv, self.ffn_shift))


def _shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x shifted one step back in time, with `last` (or zeros) in front: `[B, T, C]`."""
    prev = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([prev, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """The WKV attention replacement: token shift, r/k/v/g projections, WKV5, GroupNorm and gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        # Mix and decay schedules from RWKV-LM: early layers look more at the previous token, decays
        # span fast to slow across channels, and deeper layers remember longer.
        ratio_0_to_1 = layer_id / max(cfg.n_layer - 1, 1)
        ratio_1_to_almost0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        # v5 weighs the current token by time_mix (x * mix + shifted * (1 - mix)); the `1 - pow` form
        # belongs to v6's time_maa, whose formula weighs the shifted token instead.
        self.time_mix_k = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.time_mix_v = nn.Parameter(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_mix_g = nn.Parameter(ddd.pow(0.5 * ratio_1_to_almost0))
        n = torch.arange(C, dtype=torch.float32)
        decay_speed = -6.0 + 5.0 * (n / (C - 1)).pow(0.7 + 1.3 * ratio_0_to_1)
        self.time_decay = nn.Parameter(decay_speed.view(H, N))
        zigzag = ((n + 1) % 3 - 1) * 0.1
        self.time_faaaa = nn.Parameter((ratio_0_to_1 * (1.0 - n / (C - 1)) + zigzag).view(H, N))

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=1e-5)

    def forward(self, x, shift=None, wkv_state=None):
        """x `[B, T, C]` -> (out `[B, T, C]`, last input `[B, C]`, WKV state `[B, H, N, N]`)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shift(x, shift)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        xg = x * self.time_mix_g + xx * (1 - self.time_mix_g)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        y, wkv_state = wkv5(r, k, v, self.time_decay, self.time_faaaa, wkv_state)
        y = self.ln_x(y.reshape(B * T, C) / HEAD_SIZE_DIVISOR).view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """The feed-forward: token shift, squared-ReLU key, value, sigmoid receptance gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.time_mix_k = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.time_mix_r = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.key = nn.Linear(C, cfg.ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.ffn, C, bias=False)

    def forward(self, x, shift=None):
        """x `[B, T, C]` -> (out `[B, T, C]`, last input `[B, C]`)."""
        xx = _shift(x, shift)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k = torch.relu(self.key(xk)).square()
        return torch.sigmoid(self.receptance(xr)) * self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)  # normalises the (tiny-init) embedding
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, att_shift=None, wkv_state=None, ffn_shift=None):
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, att_shift, wkv_state, ffn_shift


class RWKV5(nn.Module):
    """RWKV v5.2 language model.

    Args:
        cfg (ModelConfig): shape of the model.
        grad_checkpoint (bool): recompute each block in backward instead of keeping its activations.
            Default: False.
    """

    def __init__(self, cfg: ModelConfig, grad_checkpoint: bool = False):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpoint = grad_checkpoint
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_matrices()

    @torch.no_grad()
    def reset_matrices(self) -> None:
        """RWKV-LM's initialisation of every matrix (vectors keep their schedules from __init__).

        Orthogonal with gain sqrt(out/in) when out > in; output projections start at zero so each block
        starts as the identity; key and gate are scaled 0.1; the embedding is tiny uniform (ln0 rescales it).
        """
        nn.init.uniform_(self.emb.weight, a=-1e-4, b=1e-4)
        zero = (".att.output.", ".ffn.value.", ".ffn.receptance.")
        tenth = (".att.key.", ".att.gate.")
        for name, p in self.named_parameters():
            if p.ndim != 2 or name == "emb.weight" or "time_" in name:
                continue
            out_f, in_f = p.shape
            gain = math.sqrt(out_f / in_f) if out_f > in_f else 1.0
            scale = 0.5 if name == "head.weight" else 1.0
            if any(z in f".{name}" for z in zero):
                nn.init.zeros_(p)
                continue
            if any(t in f".{name}" for t in tenth):
                scale = 0.1
            nn.init.orthogonal_(p, gain=gain * scale)

    def forward(self, idx: torch.Tensor, state: RWKVState | None = None, return_state: bool = False):
        """Token ids `[B, T]` -> logits `[B, T, V]` (and the new state when `return_state`).

        Args:
            idx (Tensor): token ids `[B, T]`.
            state (RWKVState, optional): state after the previous tokens. Default: the empty state.
            return_state (bool): also return the state after the last token. Default: False.
        """
        x = self.emb(idx)
        shifts, wkvs, ffns = [], [], []
        for i, block in enumerate(self.blocks):
            layer_state = (None, None, None) if state is None else (state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x, a, s, f = checkpoint(block, x, *layer_state, use_reentrant=False)
            else:
                x, a, s, f = block(x, *layer_state)
            if return_state:
                shifts.append(a)
                wkvs.append(s)
                ffns.append(f)
        logits = self.head(self.ln_out(x))
        if not return_state:
            return logits
        return logits, RWKVState(torch.stack(shifts), torch.stack(wkvs), torch.stack(ffns))


class _L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds a small push-down on each position's largest logit.

    RWKV trains with it so logits do not drift to large values (bf16 and long training stay stable).
    """

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, dim=-1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_output, glogits * grad_output


def l2wrap(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return _L2Wrap.apply(loss, logits)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
            l2_wrap: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over `[B, T]` targets (optionally masked), with RWKV's L2-wrap.

    Args:
        logits (Tensor): `[B, T, V]`.
        targets (Tensor): `[B, T]` token ids.
        mask (Tensor, optional): `[B, T]`, 1 where the target counts (e.g. assistant tokens). Default: all.
        l2_wrap (bool): apply the L2-wrap regulariser. Default: True.
    """
    flat = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if mask is None:
        loss = flat.mean()
    else:
        m = mask.reshape(-1).to(flat.dtype)
        loss = (flat * m).sum() / m.sum().clamp(min=1)
    return l2wrap(loss, logits) if l2_wrap else loss
