"""RWKV v5.2 ("Eagle", with gate), read top to bottom: state, TimeMix, ChannelMix, Block, RWKV5.

Parameter names and shapes are RWKV-LM's, so a `state_dict()` is already an RWKV-LM checkpoint.
The same forward serves training (no state), segmented long-context training and RNN-mode inference
(state in, state out; T may be 1).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from rwkv5.config import ModelConfig
from rwkv5.wkv import wkv5

__all__ = ["RWKV5", "RWKVState", "TimeMix", "ChannelMix", "Block", "ActivationMemory", "ACTIVATION_MEMORY",
           "build_model", "chunked_lm_loss", "l2wrap", "lm_loss"]

# GroupNorm of y / 8: RWKV-LM's head_size_divisor. Equivalent to eps 64e-5 on y.
HEAD_SIZE_DIVISOR = 8

ActivationMemory = Literal["none", "selective", "full"]
ACTIVATION_MEMORY = ("none", "selective", "full")

# Outputs worth keeping under "selective": the matrix products (the expensive part of a block) and the WKV
# op (a custom op in namespace rwkv5 on CUDA). Everything else in a block is elementwise or a norm, cheap to
# recompute and as large as a matmul output, so it is recomputed in backward. `_scaled_mm` is the float8 matmul
# of precision "fp8" (rwkv5.train.precision) as compiled graphs show it; eager ones see its `mm`.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_mm.default}


def _selective_policy(ctx, op, *args, **kwargs):
    if op in _MATMULS or getattr(op, "namespace", None) == "rwkv5":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_selective_context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


@functools.cache
def _inductor_options() -> dict:
    """Inductor settings that compiled blocks need on this torch: {} where the installed version is sound.

    Inductor's Triton "mix-order reduction" (on by default since torch 2.10) fuses a reduction over rows with one
    over columns, e.g. LayerNorm's backward with a (1, 1, C) mix parameter's gradient summed over B*T tokens,
    once B*T >= 4096, >= 2 C and B*T*C >= 5*2^20 (7b width from B*T = 8192). Up to torch 2.11 its final reduce
    returned that gradient as (C,): "CompiledFunctionBackward returned an invalid gradient ... got [4096] but
    expected shape compatible with [1, 1, 4096]" (pytorch/pytorch#178080; fixed by restoring the buffer's shape,
    PR #178098). Where the installed inductor lacks that fix, blocks compile without the fusion.
    """
    try:
        import inspect

        from torch._inductor.codegen.simd import SIMDScheduling

        codegen = SIMDScheduling._codegen_mix_order_reduction
    except (ImportError, AttributeError):
        return {}  # no mix-order reduction in this torch: nothing to work around
    try:
        source = inspect.getsource(codegen)
    except (OSError, TypeError):
        source = ""  # the fusion exists but its fix cannot be confirmed (no .py source): turn it off
    return {} if "final_shape" in source else {"triton.mix_order_reduction": False}


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


def _mix(x: torch.Tensor, shifted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """v5's token mix: `weight` of the current token, the rest of the previous one."""
    return x * weight + shifted * (1 - weight)


def _last(x: torch.Tensor) -> torch.Tensor:
    """The last position of x `[B, T, C]` -> `[B, C]`, as a copy: a view would keep all of x alive in the
    returned state (two `T x C` inputs per layer: 0.5 GB for the 7B's 32 layers at T = 1024)."""
    return x[:, -1].clone()


def _relu_square(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, in place when no graph is recorded: the FFN hidden (`T x ffn`, 29 MB per 1024 tokens for the
    7B) then exists once, not three times."""
    if x.requires_grad:
        return torch.relu(x).square()
    return torch.relu_(x).square_()


class TimeMix(nn.Module):
    """The WKV attention replacement: token shift, r/k/v/g projections, WKV5, GroupNorm and gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.reset_parameters()

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=1e-5)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM's mix and decay schedules: early layers look more at the previous token, decays span fast to
        slow across channels, and deeper layers remember longer. Matrices are `RWKV5.reset_matrices`' job."""
        C = self.n_head * self.head_size
        dev = self.time_decay.device
        ratio_0_to_1 = self.layer_id / max(self.n_layer - 1, 1)
        ratio_1_to_almost0 = 1.0 - self.layer_id / self.n_layer
        ddd = (torch.arange(C, dtype=torch.float32, device=dev) / C).view(1, 1, C)
        # v5 weighs the current token by time_mix (x * mix + shifted * (1 - mix)); the `1 - pow` form
        # belongs to v6's time_maa, whose formula weighs the shifted token instead.
        self.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        self.time_mix_v.copy_(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        self.time_mix_r.copy_(ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_mix_g.copy_(ddd.pow(0.5 * ratio_1_to_almost0))
        n = torch.arange(C, dtype=torch.float32, device=dev)
        decay_speed = -6.0 + 5.0 * (n / (C - 1)).pow(0.7 + 1.3 * ratio_0_to_1)
        self.time_decay.copy_(decay_speed.view_as(self.time_decay))
        zigzag = ((n + 1) % 3 - 1) * 0.1
        self.time_faaaa.copy_((ratio_0_to_1 * (1.0 - n / (C - 1)) + zigzag).view_as(self.time_faaaa))

    def forward(self, x, shift=None, wkv_state=None):
        """x `[B, T, C]` -> (out `[B, T, C]`, last input `[B, C]`, WKV state `[B, H, N, N]`)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        # Each mixed input dies with its product, the shift once the four are made and r, k, v after the WKV:
        # in inference no `T x C` temporary outlives its use.
        xx = _shift(x, shift)
        r = self.receptance(_mix(x, xx, self.time_mix_r)).view(B, T, H, N)
        k = self.key(_mix(x, xx, self.time_mix_k)).view(B, T, H, N)
        v = self.value(_mix(x, xx, self.time_mix_v)).view(B, T, H, N)
        g = F.silu(self.gate(_mix(x, xx, self.time_mix_g)))
        del xx
        y, wkv_state = wkv5(r, k, v, self.time_decay, self.time_faaaa, wkv_state)
        del r, k, v
        y = self.ln_x(y.reshape(B * T, C) / HEAD_SIZE_DIVISOR).view(B, T, C)
        return self.output(y * g), _last(x), wkv_state


class ChannelMix(nn.Module):
    """The feed-forward: token shift, squared-ReLU key, value, sigmoid receptance gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.reset_parameters()
        self.key = nn.Linear(C, cfg.ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.ffn, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The mix schedules (as TimeMix's); matrices are `RWKV5.reset_matrices`' job."""
        C = self.time_mix_k.shape[-1]
        ratio_1_to_almost0 = 1.0 - self.layer_id / self.n_layer
        ddd = (torch.arange(C, dtype=torch.float32, device=self.time_mix_k.device) / C).view(1, 1, C)
        self.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        self.time_mix_r.copy_(ddd.pow(ratio_1_to_almost0))

    def forward(self, x, shift=None):
        """x `[B, T, C]` -> (out `[B, T, C]`, last input `[B, C]`)."""
        xx = _shift(x, shift)
        r = torch.sigmoid(self.receptance(_mix(x, xx, self.time_mix_r)))
        k = _relu_square(self.key(_mix(x, xx, self.time_mix_k)))
        del xx
        return r * self.value(k), _last(x)


class Block(nn.Module):
    """TimeMix then ChannelMix, each on a LayerNorm of the residual stream.

    `activation_memory` says what training keeps for backward: "none" (everything autograd saves),
    "selective" (matmul and WKV outputs; norms, token shift, mixes and gates are recomputed), "full" (the block
    input only; the whole block is recomputed). The checkpoint sits inside `forward`, so `Block.compile()`
    compiles the recomputation along with the block.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, activation_memory: ActivationMemory = "none"):
        super().__init__()
        self.layer_id = layer_id
        # A bool, not layer_id, is what forward branches on: torch.compile then guards on two values, and the
        # blocks after the first share one compiled graph.
        self.has_ln0 = layer_id == 0
        self.activation_memory = activation_memory
        if self.has_ln0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)  # normalises the (tiny-init) embedding
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def compile(self, *args, **kwargs) -> None:
        """`nn.Module.compile` with the inductor options this torch needs (`_inductor_options`)."""
        fixes = _inductor_options()
        if fixes and kwargs.get("backend", "inductor") == "inductor":
            kwargs["options"] = {**fixes, **(kwargs.get("options") or {})}
        super().compile(*args, **kwargs)

    def forward(self, x, att_shift=None, wkv_state=None, ffn_shift=None):
        if self.activation_memory == "none" or not (self.training and torch.is_grad_enabled()):
            return self._forward(x, att_shift, wkv_state, ffn_shift)
        extra = {"context_fn": _selective_context} if self.activation_memory == "selective" else {}
        return checkpoint(self._forward, x, att_shift, wkv_state, ffn_shift, use_reentrant=False, **extra)

    def _forward(self, x, att_shift, wkv_state, ffn_shift):
        if self.has_ln0:
            x = self.ln0(x)
        dx, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, att_shift, wkv_state, ffn_shift


class RWKV5(nn.Module):
    """RWKV v5.2 language model.

    Args:
        cfg (ModelConfig): shape of the model.
        grad_checkpoint (bool): recompute each block in backward ("full" activation memory). Default: False.
        activation_memory (str): "none", "selective" or "full" (see `Block`); overrides grad_checkpoint.
            Default: None (from grad_checkpoint).

    Built under `torch.device("meta")` it allocates nothing; `to_empty` then `init_weights` initialise it on any
    device (`build_model`).
    """

    def __init__(self, cfg: ModelConfig, grad_checkpoint: bool = False,
                 activation_memory: ActivationMemory | None = None):
        super().__init__()
        self.cfg = cfg
        policy = activation_memory or ("full" if grad_checkpoint else "none")
        if policy not in ACTIVATION_MEMORY:
            raise ValueError(f"activation_memory must be one of {ACTIVATION_MEMORY}, got {policy!r}")
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, policy) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if not self.head.weight.is_meta:
            self.reset_matrices()

    @property
    def activation_memory(self) -> str:
        return self.blocks[0].activation_memory

    @activation_memory.setter
    def activation_memory(self, policy: str) -> None:
        if policy not in ACTIVATION_MEMORY:
            raise ValueError(f"activation_memory must be one of {ACTIVATION_MEMORY}, got {policy!r}")
        for block in self.blocks:
            block.activation_memory = policy

    @property
    def grad_checkpoint(self) -> bool:
        return self.activation_memory == "full"

    @grad_checkpoint.setter
    def grad_checkpoint(self, on: bool) -> None:
        self.activation_memory = "full" if on else "none"

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block in place (parameter names stay as they are); kwargs go to torch.compile."""
        for block in self.blocks:
            block.compile(**kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The whole initialisation on the parameters' current device: schedules, norms, then matrices."""
        for module in self.modules():
            if isinstance(module, (TimeMix, ChannelMix, nn.LayerNorm, nn.GroupNorm)):
                module.reset_parameters()
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

    def forward(self, idx: torch.Tensor, state: RWKVState | None = None, return_state: bool = False,
                targets: torch.Tensor | None = None, mask: torch.Tensor | None = None, last_only: bool = False,
                out_state: RWKVState | None = None):
        """Token ids `[B, T]` -> logits `[B, T, V]` (and the new state when `return_state`), or the loss.

        Args:
            idx (Tensor): token ids `[B, T]`.
            state (RWKVState, optional): state after the previous tokens. Default: the empty state.
            return_state (bool): also return the state after the last token. Default: False.
            targets (Tensor, optional): `[B, T]` next-token ids: return `chunked_lm_loss` (with L2-wrap) instead
                of logits, never holding the whole `[B, T, V]` logits. Default: None.
            mask (Tensor, optional): `[B, T]` loss mask, with targets. Default: all tokens count.
            last_only (bool): logits of the last position only, `[B, 1, V]`: a prefill needs no others, and
                the head's output is the largest activation of a chunk (T x V). Default: False.
            out_state (RWKVState, optional): with `return_state`, write the new state into this one (of the
                shapes and dtypes this call returns) instead of a new one; it may be `state` itself, since each
                layer reads its part of `state` before its new part is written. Inference only: the writes are
                in place. Default: None.
        """
        x = self.emb(idx)
        # The state after this call, filled layer by layer: per-layer pieces and then a stack would hold it twice.
        new = out_state
        for i, block in enumerate(self.blocks):
            layer_state = (None, None, None) if state is None else (state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            x, a, s, f = block(x, *layer_state)
            if return_state:
                if new is None:
                    L = len(self.blocks)
                    new = RWKVState(a.new_empty(L, *a.shape), s.new_empty(L, *s.shape), f.new_empty(L, *f.shape))
                new.att_shift[i], new.wkv[i], new.ffn_shift[i] = a, s, f
        if targets is not None:
            # A named range for profiles (bench/profile_step.py): the head and loss apart from the blocks.
            with torch.profiler.record_function("rwkv5.head_loss"):
                return chunked_lm_loss(self.ln_out(x), self.head.weight, targets, mask)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.head(self.ln_out(x))
        if not return_state:
            return logits
        return logits, new


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


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", **kwargs) -> RWKV5:
    """`RWKV5(cfg, **kwargs)` initialised directly on `device`: built on the meta device, then allocated and
    initialised there, so a GPU initialises its own weights (seconds for the 7B, no host copy). The CPU keeps
    the plain constructor, whose values (not only distributions) the CPU tests and resume checks rely on.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return RWKV5(cfg, **kwargs)
    with torch.device("meta"):
        model = RWKV5(cfg, **kwargs)
    model.to_empty(device=device)
    model.init_weights()
    return model


# Logits per chunk of the chunked loss: chunk_tokens * V elements (2^27: 2048 tokens at V = 65536), so its
# float32 softmax takes 512 MiB instead of B*T*V*4 bytes (8.6 GB at B8 T4096), in few enough chunks that the
# per-chunk update of the head's float32 gradient stays small.
LOSS_CHUNK_ELEMENTS = 1 << 27


def _chunk_loss_grad(logits, targets, token_weight, l2_factor: float, want_grad: bool):
    """Weighted CE sum of one chunk of logits `(n, V)` and, if wanted, d(loss)/d(logits) in the logits' dtype."""
    acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 inputs
    lf = logits.to(acc)
    tw = token_weight.to(acc)
    lse = torch.logsumexp(lf, dim=-1)
    loss = ((lse - lf.gather(-1, targets[:, None]).squeeze(-1)) * tw).sum()
    if not want_grad:
        return loss, None
    # d(mean CE)/d(logits) = (softmax - onehot) * token weight, plus L2-wrap's push on the top logit.
    g = torch.exp(lf - lse[:, None]) * tw[:, None]
    g = g.scatter_add(-1, targets[:, None], -tw[:, None])
    if l2_factor:
        top, ids = logits.max(dim=-1, keepdim=True)
        g = g.scatter_add(-1, ids, top.to(acc) * l2_factor)
    return loss, g.to(logits.dtype)


def compile_chunk_step(**kwargs):
    """`_chunk_loss_grad` under torch.compile with automatic dynamic shapes. Chat samples (the milestone
    fine-tune, the held-out evaluation) give each sample's last chunk its own row count: a static compile made
    one graph per count until Dynamo's recompile limit (8), then ran eagerly, and a fresh process paid those
    compiles again at every milestone. This compiles at most twice: static for the first count, then one graph
    with the row count symbolic (pretraining's chunks all have one count: one static graph). kwargs go to
    torch.compile (tests pick a quick backend)."""
    return torch.compile(_chunk_loss_grad, dynamic=None, **kwargs)


class _FusedOnCuda:
    """`_chunk_loss_grad` compiled on CUDA (one pass for the softmax statistics, one for the gradient, instead
    of a float32 copy per elementwise step); eager elsewhere, and eager for good if the first compile fails."""

    compiled = None
    failed = False
    worked = False

    def __call__(self, logits, *args):
        if not logits.is_cuda or self.failed:
            return _chunk_loss_grad(logits, *args)
        if self.worked:
            return self.compiled(logits, *args)
        try:
            self.compiled = self.compiled or compile_chunk_step()
            out = self.compiled(logits, *args)
        except Exception:  # a compiler problem must not stop training: same numbers, eager speed
            self.failed = True
            return _chunk_loss_grad(logits, *args)
        self.worked = True
        return out


_chunk_step = _FusedOnCuda()


def _accumulate_head_grad(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dw + g^T h with dw float32 and g, h in the model's dtype: on CUDA one product with a float32 output
    (no bf16 partial, no separate add); elsewhere the plain way."""
    if g.is_cuda and g.dtype != dw.dtype:
        try:
            return torch.addmm(dw, g.t(), h, out_dtype=dw.dtype)
        except (RuntimeError, TypeError):
            pass
    return dw.add_((g.t() @ h).to(dw.dtype))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Head matmul + cross-entropy + L2-wrap over chunks of tokens, never holding all logits.

    The loss is a scalar, so its gradients are known up to the incoming scale already in forward: each chunk's
    logits are made once, turned into d(loss)/d(logits) and multiplied straight into d(hidden) and d(weight);
    backward only scales them. The head costs the same three matmuls as the plain version, no recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight, l2_factor, chunk):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        dh = torch.empty_like(hidden) if want_grad else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = h @ weight.t()  # (n, V) in the model's dtype, as the plain head makes them
            part, g = _chunk_step(logits, targets[s:s + chunk], token_weight[s:s + chunk], l2_factor, want_grad)
            loss += part
            if want_grad:
                dh[s:s + chunk] = g @ weight
                dw = _accumulate_head_grad(dw, g, h)
        ctx.save_for_backward(dh, dw.to(weight.dtype) if want_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        go = grad_loss.to(dh.dtype)
        return dh * go, dw * go.to(dw.dtype), None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor | None = None, l2_wrap: bool = True, chunk_tokens: int | None = None
                    ) -> torch.Tensor:
    """`lm_loss(hidden @ weight.T, targets, mask, l2_wrap)` in value and gradients, in chunks of tokens.

    Args:
        hidden (Tensor): `[B, T, C]` final hidden states (after ln_out).
        weight (Tensor): head weight `[V, C]`.
        targets (Tensor): `[B, T]` token ids.
        mask (Tensor, optional): `[B, T]`, 1 where the target counts. Default: all.
        l2_wrap (bool): add RWKV's L2-wrap gradient. Default: True.
        chunk_tokens (int, optional): tokens per chunk. Default: 2^27 / V.

    Returns:
        The mean cross-entropy, float32 scalar.
    """
    B, T, C = hidden.shape
    V = weight.shape[0]
    flat_t = targets.reshape(-1)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if mask is None:
        token_weight = torch.full((B * T,), 1.0 / (B * T), dtype=acc, device=hidden.device)
    else:
        m = mask.reshape(-1).to(acc)
        token_weight = m / m.sum().clamp(min=1)
    chunk = chunk_tokens or max(1, LOSS_CHUNK_ELEMENTS // V)
    # L2-wrap scales by all B*T positions, masked or not, as `_L2Wrap` does.
    l2_factor = 1e-4 / (B * T) if l2_wrap else 0.0
    return _ChunkedHeadLoss.apply(hidden.reshape(B * T, C), weight, flat_t, token_weight, l2_factor, chunk)
