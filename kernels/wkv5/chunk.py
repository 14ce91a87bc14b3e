"""Chunked WKV5 in plain PyTorch: the CPU path and the fallback everywhere.

Inside a chunk of L steps the recurrence unrolls into an attention-like product; across chunks only the
(N, N) state is carried. Every decay factor is exp(non-positive number), so strong decays underflow to 0
instead of overflowing (no w^-t factorisation). Computation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from kernels.wkv5.shapes import check_shapes

__all__ = ["chunk_wkv5"]


def chunk_wkv5(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV5 over a sequence, differentiable in every input including `state`.

    Args:
        r, k, v (Tensor): `[B, T, H, N]`, any float dtype; any T >= 0.
        w (Tensor): time_decay `[H, N]`; the per-step decay is exp(-exp(w)).
        u (Tensor): time_faaaa (bonus) `[H, N]`.
        state (Tensor, optional): initial state `[B, H, N, N]`, [key channel, value channel]. Default: zeros.
        chunk_size (int): steps per chunk. Default: 32.

    Returns:
        y `[B, T, H, N]` in r's dtype and the final state `[B, H, N, N]` in float32 (float64 for float64
        inputs).
    """
    B, T, H, N = check_shapes(r, k, v, w, u, state)
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    # (B, H, T, N): heads become batch dims for the products below.
    rr, kk, vv = (x.to(dt).transpose(1, 2) for x in (r, k, v))
    log_w = -torch.exp(w.to(dt))  # (H, N), <= 0
    bonus = u.to(dt)
    s = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)

    full = T // chunk_size * chunk_size
    ys = []
    if full:
        y, s = _chunks(rr[:, :, :full], kk[:, :, :full], vv[:, :, :full], log_w, bonus, s, chunk_size)
        ys.append(y)
    if T > full:
        y, s = _chunks(rr[:, :, full:], kk[:, :, full:], vv[:, :, full:], log_w, bonus, s, T - full)
        ys.append(y)
    y = torch.cat(ys, dim=2) if ys else rr
    return y.transpose(1, 2).to(r.dtype), s


def _chunks(r, k, v, log_w, bonus, s, L):
    """Process `[B, H, C*L, N]` inputs as C chunks of L steps, starting from state s."""
    B, H, T, N = r.shape
    C = T // L
    r, k, v = (x.reshape(B, H, C, L, N) for x in (r, k, v))
    t = torch.arange(L, device=r.device, dtype=log_w.dtype)

    # Intra-chunk: A[t, s] = sum_i r_t,i k_s,i w_i^(t-1-s) for s < t; the diagonal carries the bonus u.
    gap = (t[:, None] - 1 - t[None, :])  # (L, L)
    causal = gap >= 0
    decay_ts = torch.exp(gap.clamp(min=0)[None, :, :, None] * log_w[:, None, None, :])  # (H, L, L, N)
    decay_ts = decay_ts * causal[None, :, :, None]
    att = torch.einsum("bhcti,bhcsi,htsi->bhcts", r, k, decay_ts)
    diag = torch.einsum("bhcti,bhcti,hi->bhct", r, k, bonus)
    y = torch.einsum("bhcts,bhcsj->bhctj", att, v) + diag[..., None] * v

    # Inter-chunk: the state at each chunk start, decayed to each position.
    k_to_end = k * torch.exp((L - 1 - t)[:, None] * log_w[:, None, :])[None, :, None]  # w^(L-1-s)
    chunk_kv = torch.einsum("bhcsi,bhcsj->bhcij", k_to_end, v)  # (B, H, C, N, N)
    decay_chunk = torch.exp(L * log_w)[None, :, :, None]  # (1, H, N, 1)
    starts = []
    for c in range(C):
        starts.append(s)
        s = decay_chunk * s + chunk_kv[:, :, c]
    starts = torch.stack(starts, dim=2)  # (B, H, C, N, N)
    r_from_start = r * torch.exp(t[:, None] * log_w[:, None, :])[None, :, None]  # w^t
    y = y + torch.einsum("bhcti,bhcij->bhctj", r_from_start, starts)
    return y.reshape(B, H, T, N), s
