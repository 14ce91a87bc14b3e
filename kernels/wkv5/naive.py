"""Sequential WKV5 reference: the recurrence exactly as written, in float64. Tests only."""

from __future__ import annotations

import torch

__all__ = ["naive_wkv5"]


def naive_wkv5(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step at a time, in float64.

    Args:
        r, k, v (Tensor): `[B, T, H, N]`.
        w (Tensor): time_decay `[H, N]`; the per-step decay is exp(-exp(w)).
        u (Tensor): time_faaaa (bonus) `[H, N]`.
        state (Tensor, optional): `[B, H, N, N]` indexed [key channel, value channel]. Default: zeros.

    Returns:
        y `[B, T, H, N]` in r's dtype, and the final state `[B, H, N, N]` (float64 for float64 inputs,
        else float32).
    """
    B, T, H, N = r.shape
    f64 = torch.float64
    r64, k64, v64 = r.to(f64), k.to(f64), v.to(f64)
    decay = torch.exp(-torch.exp(w.to(f64)))[..., None]  # (H, N, 1)
    bonus = u.to(f64)[..., None]  # (H, N, 1)
    s = torch.zeros(B, H, N, N, dtype=f64, device=r.device) if state is None else state.to(f64)
    ys = []
    for t in range(T):
        kv = k64[:, t, :, :, None] * v64[:, t, :, None, :]  # (B, H, N, N)
        ys.append(torch.einsum("bhi,bhij->bhj", r64[:, t], bonus * kv + s))
        s = decay * s + kv
    y = torch.stack(ys, dim=1) if ys else r64.new_zeros(B, 0, H, N)
    state_dtype = f64 if r.dtype == f64 else torch.float32
    return y.to(r.dtype), s.to(state_dtype)
