"""Input checks shared by every WKV5 variant, so they all reject bad shapes with the same message."""

from __future__ import annotations

import torch

__all__ = ["check_shapes"]


def check_shapes(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                 state: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Raise ValueError quoting the observed shapes unless they fit; returns (B, T, H, N)."""
    B, T, H, N = r.shape
    if k.shape != r.shape or v.shape != r.shape:
        raise ValueError(f"r, k, v must share a shape [B, T, H, N]; got {tuple(r.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if w.shape != (H, N) or u.shape != (H, N):
        raise ValueError(f"w and u must be [H, N] = [{H}, {N}]; got {tuple(w.shape)}, {tuple(u.shape)}")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"state must be [B, H, N, N] = [{B}, {H}, {N}, {N}]; got {tuple(state.shape)}")
    return B, T, H, N
