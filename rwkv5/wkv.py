"""One entry point for the WKV5 recurrence, picking the fastest variant that runs on the inputs' device.

Backends: "chunk" (PyTorch, any device), "cuda" (our kernel, CUDA tensors), "naive" (float64 reference,
tests only). `RWKV5_WKV_BACKEND` overrides the choice for debugging.
"""

from __future__ import annotations

import os

import torch

from kernels.wkv5 import chunk_wkv5, naive_wkv5

__all__ = ["wkv5", "wkv5_step", "available_backends", "default_backend"]

_BACKENDS = ("chunk", "cuda", "naive")


def _cuda_kernel():
    """The CUDA variant, or None when it is not built into this checkout or no GPU is present."""
    try:
        from kernels.wkv5 import cuda as cuda_module  # imported lazily: building needs nvcc
    except ImportError:
        return None
    return getattr(cuda_module, "cuda_wkv5", None)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    found = ["chunk", "naive"]
    if device.type == "cuda" and _cuda_kernel() is not None:
        found.insert(0, "cuda")
    return found


def default_backend(device: torch.device | str) -> str:
    forced = os.environ.get("RWKV5_WKV_BACKEND")
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"RWKV5_WKV_BACKEND={forced!r}; expected one of {_BACKENDS}")
        return forced
    return available_backends(device)[0]


def wkv5(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV5 with state in and out, differentiable in every input.

    Args:
        r, k, v (Tensor): receptance, key, value `[B, T, H, N]` (as the linear layers produce them).
        w (Tensor): time_decay `[H, N]`; the per-step decay exp(-exp(w)) is formed in float32.
        u (Tensor): time_faaaa, the bonus of the current token `[H, N]`.
        state (Tensor, optional): `[B, H, N, N]` float32, [key channel, value channel]. Default: zeros.
        backend (str, optional): "chunk", "cuda" or "naive". Default: the fastest for the device.

    Returns:
        y `[B, T, H, N]` in r's dtype, and the final state `[B, H, N, N]` in float32.
    """
    backend = backend or default_backend(r.device)
    if backend == "cuda":
        kernel = _cuda_kernel()
        if kernel is None:
            raise RuntimeError("the CUDA WKV5 kernel is not available in this build")
        return kernel(r, k, v, w, u, state)
    if backend == "naive":
        return naive_wkv5(r, k, v, w, u, state)
    if backend == "chunk":
        if r.shape[1] == 1:
            return wkv5_step(r, k, v, w, u, state)
        return chunk_wkv5(r, k, v, w, u, state)
    raise ValueError(f"unknown WKV backend {backend!r}; expected one of {_BACKENDS}")


def wkv5_step(r, k, v, w, u, state=None):
    """A single step (T == 1): the RNN-mode inference path, a few small products."""
    B, T, H, N = r.shape
    if T != 1:
        raise ValueError(f"wkv5_step takes T == 1, got T = {T}")
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    s = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)
    rt, kt, vt = (x[:, 0].to(dt) for x in (r, k, v))  # (B, H, N)
    kv = kt[..., :, None] * vt[..., None, :]  # (B, H, N, N)
    y = torch.einsum("bhi,bhij->bhj", rt, u.to(dt)[..., None] * kv + s)
    s = torch.exp(-torch.exp(w.to(dt)))[..., None] * s + kv
    return y[:, None].to(r.dtype), s
