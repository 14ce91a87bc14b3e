"""WKV5 on the tensor cores: our CUDA kernels registered as torch custom ops (autograd and torch.compile see them).

Importing this module registers the ops `rwkv5::wkv5_fwd` and `rwkv5::wkv5_bwd` and builds nothing: the
extension is compiled (or loaded from the cache, see `kernels.build`) on the first call.
"""

from __future__ import annotations

import os

import torch

from kernels.build import load_wkv5
from kernels.wkv5.shapes import check_shapes

__all__ = ["cuda_wkv5", "default_chunk", "default_splits"]


def default_chunk(head_size: int, backward: bool = False) -> int:
    """Steps per shared-memory chunk of the forward (backward) kernel.

    `RWKV5_WKV_CHUNK` (`RWKV5_WKV_BWD_CHUNK`) forces 32 or 64. Default 32 for both: at head size 64 the forward
    then takes 46 KB of shared memory, so four blocks share a multiprocessor (faster than 64, bench/NOTES.md);
    the backward's kernels keep twice the arrays (64 only for head size <= 64).
    """
    name = "RWKV5_WKV_BWD_CHUNK" if backward else "RWKV5_WKV_CHUNK"
    forced = os.environ.get(name)
    if forced and forced not in ("32", "64"):
        raise ValueError(f"{name}={forced!r}; expected 32 or 64")
    chunk = int(forced) if forced else 32
    return 32 if backward and head_size == 128 else chunk


def default_splits(batch_heads: int, steps: int, device: torch.device, backward: bool = False) -> int:
    """How many pieces the sequence is cut into, run in parallel over time (README.md, "Time splits").

    One sweep per (batch, head) leaves most multiprocessors idle when B*H is small (B=1, H=64: 64 blocks on
    132). `RWKV5_WKV_SPLITS` chooses: unset or "auto" (the default) keeps one sweep once B*H reaches the
    number of multiprocessors, and below that cuts the sequence so that each pass has about four blocks per
    multiprocessor, with pieces of at least 512 steps (bench/NOTES.md "v5"); an integer forces that many
    pieces ("1": one sweep).
    `RWKV5_WKV_BWD_SPLITS`, when set, overrides it for the backward alone.
    """
    forced = os.environ.get("RWKV5_WKV_SPLITS", "auto")
    if backward:
        forced = os.environ.get("RWKV5_WKV_BWD_SPLITS", forced)
    if forced != "auto":
        if not forced.isdigit() or not 1 <= int(forced) <= 65535:
            raise ValueError(f"RWKV5_WKV_SPLITS={forced!r}; expected 'auto' or an integer in [1, 65535]")
        return int(forced)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if batch_heads >= sms:
        return 1
    return max(1, min(4 * sms // max(batch_heads, 1), steps // 512))


@torch.library.custom_op("rwkv5::wkv5_fwd", mutates_args=())
def _wkv5_fwd(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    state: torch.Tensor | None, chunk: int, splits: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = load_wkv5().forward(r, k, v, w, u, state, chunk, splits)
    return y, s


@_wkv5_fwd.register_fake
def _wkv5_fwd_fake(r, k, v, w, u, state, chunk, splits=1):
    B, _, H, N = r.shape
    return torch.empty_like(r), r.new_empty((B, H, N, N), dtype=torch.float32)


@torch.library.custom_op("rwkv5::wkv5_bwd", mutates_args=())
def _wkv5_bwd(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    state: torch.Tensor | None, dy: torch.Tensor, dstate: torch.Tensor | None, chunk: int, splits: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dr, dk, dv, dlog_w, du, dstate0 = load_wkv5().backward(r, k, v, w, u, state, dy, dstate, chunk, splits)
    # Per-(batch, head) partials summed here in fp32; d/dw of log w = -exp(w) is log w itself.
    dw = dlog_w.sum(0) * -torch.exp(w)
    return dr, dk, dv, dw, du.sum(0), dstate0


@_wkv5_bwd.register_fake
def _wkv5_bwd_fake(r, k, v, w, u, state, dy, dstate, chunk, splits=1):
    B, _, H, N = r.shape
    f32 = torch.float32
    return (torch.empty_like(r), torch.empty_like(r), torch.empty_like(r), w.new_empty((H, N), dtype=f32),
            w.new_empty((H, N), dtype=f32), r.new_empty((B, H, N, N), dtype=f32))


def _setup_context(ctx, inputs, output):
    r, k, v, w, u, state = inputs[:6]
    ctx.save_for_backward(r, k, v, w, u, state)


def _backward(ctx, dy, dstate):
    r, k, v, w, u, state = ctx.saved_tensors
    B, T, H, N = r.shape
    dr, dk, dv, dw, du, dstate0 = _wkv5_bwd(
        r, k, v, w, u, state, dy.contiguous(), None if dstate is None else dstate.contiguous(),
        default_chunk(N, backward=True), default_splits(B * H, T, r.device, backward=True),
    )
    # One gradient per argument received: the dispatcher drops `splits` when it equals its default.
    no_grads = (None,) * (len(ctx.needs_input_grad) - 6)
    return (dr, dk, dv, dw, du, dstate0 if state is not None else None, *no_grads)


_wkv5_fwd.register_autograd(_backward, setup_context=_setup_context)


def cuda_wkv5(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV5 with state in and out on CUDA tensors, differentiable in every input including `state`.

    Args:
        r, k, v (Tensor): `[B, T, H, N]`, N in {32, 64, 128}, any T >= 1; computed in bfloat16 (other
            dtypes are cast, and y is cast back).
        w (Tensor): time_decay `[H, N]`; the per-step decay exp(-exp(w)) is formed in float32.
        u (Tensor): time_faaaa `[H, N]`.
        state (Tensor, optional): `[B, H, N, N]` float32, [key channel, value channel]. Default: zeros.

    Returns:
        y `[B, T, H, N]` in r's dtype and the final state `[B, H, N, N]` in float32.

    `RWKV5_WKV_SPLITS` cuts the sequence into pieces run in parallel (see `default_splits`).
    """
    B, T, H, N = check_shapes(r, k, v, w, u, state)
    if N not in (32, 64, 128):
        raise ValueError(f"the CUDA WKV5 kernel takes head size 32, 64 or 128; got {N}")
    if T < 1:
        raise ValueError(f"the CUDA WKV5 kernel needs T >= 1; got T = {T}")
    bf = torch.bfloat16
    rr, kk, vv = (x.to(bf).contiguous() for x in (r, k, v))
    ww, uu = (x.float().contiguous() for x in (w, u))
    s = None if state is None else state.float().contiguous()
    y, s_out = torch.ops.rwkv5.wkv5_fwd(rr, kk, vv, ww, uu, s, default_chunk(N), default_splits(B * H, T, r.device))
    return y.to(r.dtype), s_out
