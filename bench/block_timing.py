"""One RWKV block alone, forward + backward in bf16: ours eager, ours compiled, and a plain-PyTorch block around
fla's chunk_rwkv6 (compiled, the WKV left to fla's Triton kernels) as the anchor.

Called by `train_throughput.py --blocks` after its training run, so the ratios come from the same process and
card. MFU here is 6 x the block's matmul parameters x tokens / time / 989e12, the training run's formula.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv5.config import ModelConfig
from rwkv5.model import HEAD_SIZE_DIVISOR, Block

PEAK = 989e12


def _time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median CUDA-event milliseconds of fn(): the kernel benchmark's timer."""
    from wkv_kernel import cuda_time  # bench/ is on sys.path: the scripts run from there

    return cuda_time(fn, warmup, reps)


class FlaAnchorBlock(nn.Module):
    """The v5.2 block written plainly, with fla's chunk_rwkv6 as the WKV (w broadcast over time)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, F_, H = cfg.n_embd, cfg.ffn, cfg.n_head
        self.H, self.N = H, cfg.head_size
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.mix = nn.Parameter(torch.rand(6, C))
        self.time_decay = nn.Parameter(torch.rand(H, cfg.head_size) * 5 - 6)
        self.time_faaaa = nn.Parameter(torch.rand(H, cfg.head_size) * 0.5)
        self.r, self.k, self.v, self.g, self.o = (nn.Linear(C, C, bias=False) for _ in range(5))
        self.ln_x = nn.GroupNorm(H, C, eps=1e-5)
        self.fk, self.fr, self.fv = nn.Linear(C, F_, bias=False), nn.Linear(C, C, bias=False), nn.Linear(F_, C, bias=False)
        for lin in (self.r, self.k, self.v, self.g, self.o, self.fk, self.fr, self.fv):
            nn.init.normal_(lin.weight, std=0.02)

    def forward(self, x):
        from fla.ops.rwkv6 import chunk_rwkv6

        B, T, C = x.shape
        h = self.ln1(x)
        hh = F.pad(h, (0, 0, 1, -1))
        mk, mv, mr, mg, fk, fr = self.mix
        r = self.r(h * mr + hh * (1 - mr)).view(B, T, self.H, self.N)
        k = self.k(h * mk + hh * (1 - mk)).view(B, T, self.H, self.N)
        v = self.v(h * mv + hh * (1 - mv)).view(B, T, self.H, self.N)
        g = F.silu(self.g(h * mg + hh * (1 - mg)))
        w = (-torch.exp(self.time_decay.float())).expand(B, T, self.H, self.N).contiguous()
        y, _ = chunk_rwkv6(r, k, v, w, self.time_faaaa, scale=1.0)
        y = self.ln_x(y.reshape(B * T, C) / HEAD_SIZE_DIVISOR).view(B, T, C)
        x = x + self.o(y * g)
        h = self.ln2(x)
        hh = F.pad(h, (0, 0, 1, -1))
        kk = torch.relu(self.fk(h * fk + hh * (1 - fk))).square()
        return x + torch.sigmoid(self.fr(h * fr + hh * (1 - fr))) * self.fv(kk)


def time_blocks(cfg: ModelConfig, batch: int, ctx_len: int) -> dict:
    """Median fwd+bwd milliseconds and MFU of one block at (batch, ctx_len), with compile seconds."""
    dev = torch.device("cuda")
    C, F_ = cfg.n_embd, cfg.ffn
    flops = 6.0 * (6 * C * C + 2 * C * F_) * batch * ctx_len
    x = torch.randn(batch, ctx_len, C, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    out = {"batch": batch, "ctx_len": ctx_len, "n_embd": C, "ffn": F_}

    def fwd_bwd(block):
        def run():
            xi = x.detach().requires_grad_()
            y = block(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(dy)
        return run

    def record(name, block, compile_it):
        t0 = time.perf_counter()
        if compile_it:
            block.compile(fullgraph=name.startswith("ours"), dynamic=False)
        fn = fwd_bwd(block)
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = _time_ms(fn)
        out[name] = {"fwd_bwd_ms": ms, "mfu": flops / (ms / 1e3) / PEAK, "first_call_s": first}
        print(f"block {name:<16} {ms:8.2f} ms  MFU {out[name]['mfu']:.3f}  first call {first:.1f} s", flush=True)

    for policy in ("none", "selective"):
        for compiled in (False, True):
            block = Block(cfg, 1, policy).to(dev, torch.bfloat16).train()
            try:
                record(f"ours_{'compiled' if compiled else 'eager'}_{policy}", block, compiled)
            except Exception as exc:  # one failed variant must not lose the others' numbers
                out[f"ours_{'compiled' if compiled else 'eager'}_{policy}"] = {"error": repr(exc)[:500]}
                print(f"block ours {policy} compiled={compiled} failed: {exc!r}"[:600], flush=True)
            del block
    try:
        anchor = FlaAnchorBlock(cfg).to(dev, torch.bfloat16).train()
        record("fla_compiled", anchor, True)
    except Exception as exc:
        out["fla_compiled"] = {"error": repr(exc)[:500]}
        print(f"fla anchor failed: {exc!r}"[:600], flush=True)
    return out
