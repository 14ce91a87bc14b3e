"""Device memory of a pretraining run per GPU under DeepSpeed ZeRO-2 bf16, computed from the config alone.

Model states are counted from what ZeRO-2 allocates: bf16 weights on every GPU; the gradient partition and
the fp32 master weights and Adam moments split over the GPUs (a second gradient partition during backward when
micro-batches accumulate; with `zero.reduce_once_per_step`, instead, the full bf16 gradients autograd sums
through the step); bf16 reduce buckets. Activations are counted per
block from what each activation-memory policy keeps (see `rwkv5.model.Block`), plus the transient of one block
being recomputed and differentiated, plus the chunked loss. The peak is the larger of the backward peak and
the optimizer-step peak (when ZeRO flattens the gradient partition and converts it to fp32).

Precision "fp8" (torchao float8 block linears, `rwkv5.train.precision`) is planned as bf16 plus one term: torchao
saves each linear's bf16 input and weight for backward, exactly what `nn.Linear` saves, and under "selective"
the kept matmul outputs are bf16 either way, so the kept activations and the model states do not change. What
fp8 adds is transient: the float8 copies (1 byte an element) of the operands of the linear being run, at most
the largest one's input, output gradient and weight with its transposed copy (`_fp8_transient`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rwkv5.config import count_parameters
from rwkv5.errors import ConfigError
from rwkv5.model import LOSS_CHUNK_ELEMENTS
from rwkv5.train.config import RunConfig

__all__ = ["MemoryPlan", "plan_memory", "block_activation_elements", "format_plan"]

GB = 1e9

# bf16 elements each block keeps per token, as multiples of (C, F) = (n_embd, ffn width).
#   selective: block input, r, k, v, gate and att.output matmul outputs, WKV y, ffn key (F), receptance and
#     value outputs: 9 C + F.
#   none: every tensor autograd saves in eager mode (inputs of each matmul, norm inputs and outputs, token
#     shifts, mixes, activations): 23 C + 3 F.
#   full: the block input only: C.
_KEEP = {"selective": (9, 1), "none": (23, 3), "full": (1, 0)}
# Gradient partition bytes per parameter: ZeRO-2 keeps the reduced gradients of its partition in the model's
# dtype (bf16) between micro-batches and makes the float32 copy only inside the optimizer step (step_extra).
_GRAD_PARTITION_BYTES = 2


def block_activation_elements(policy: str, n_embd: int, ffn: int) -> int:
    """bf16 elements one block keeps per token for backward under `policy`."""
    if policy not in _KEEP:
        raise ConfigError(f"activation_memory must be one of {', '.join(_KEEP)}, got {policy!r}")
    c, f = _KEEP[policy]
    return c * n_embd + f * ffn


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU. `peak` = max(backward peak, optimizer-step peak); `headroom` = 1 - peak / gpu_memory."""

    preset: str
    gpus: int
    gpu_memory: float
    micro_batch: int
    ctx_len: int
    grad_accum: int
    activation_memory: str
    precision: str
    parameters: int
    weights: float
    gradients: float
    accumulating: float
    """The second gradient partition during backward from a step's second micro-batch on (0 without accumulation,
    and when reducing once per step)."""
    local_gradients: float
    """Reducing once per step: the full bf16 gradients autograd sums on every GPU until the step's one reduction
    (0 otherwise: ZeRO-2 frees each gradient once it is copied to its bucket)."""
    optimizer: float
    buckets: float
    activations: float
    """Kept for backward by all blocks, the embedding, the final norm and the loss, for one micro-batch."""
    transient: float
    """One block recomputed and differentiated (with fp8: plus one linear's float8 operands), or the loss's
    logits chunk and fp32 weight gradient."""
    step_extra: float
    """The optimizer step's flattened bf16 and fp32 copies of the gradient partition."""
    backward_peak: float
    step_peak: float
    peak: float
    headroom: float

    def fits(self, min_headroom: float = 0.10) -> bool:
        return self.headroom >= min_headroom

    def as_dict(self) -> dict:
        return asdict(self)


def _fp8_transient(tokens: int, n_embd: int, ffn: int) -> float:
    """Bytes of the float8 operands of the largest block linear (ffn key or value, C x F) in flight at once:
    its input and output gradient (tokens x (C + F) together, one each of the two is F wide) and its weight
    cast twice (forward, and transposed for the input gradient)."""
    return float(tokens * (n_embd + ffn) + 2 * n_embd * ffn)


def plan_memory(cfg: RunConfig, gpus: int, gpu_memory_gb: float, micro_batch: int | None = None,
                activation_memory: str | None = None) -> MemoryPlan:
    """What one GPU holds when `cfg` trains on `gpus` GPUs of `gpu_memory_gb` GB each.

    Args:
        cfg (RunConfig): the run (model, batch, ZeRO buckets, activation policy).
        gpus (int): data-parallel workers.
        gpu_memory_gb (float): memory of one GPU in GB (1e9 bytes).
        micro_batch (int, optional): instead of cfg.batch.micro_batch. Default: the config's.
        activation_memory (str, optional): instead of cfg.activation_memory. Default: the config's.
    """
    if gpus <= 0 or gpu_memory_gb <= 0:
        raise ConfigError(f"plan needs gpus > 0 and gpu_memory > 0, got {gpus} and {gpu_memory_gb}")
    m = cfg.model
    B = micro_batch or cfg.batch.micro_batch
    policy = activation_memory or cfg.activation_memory
    P = count_parameters(m)
    C, F, V, L, T = m.n_embd, m.ffn, m.vocab_size, m.n_layer, cfg.batch.ctx_len
    tokens = B * T
    weights = 2.0 * P
    gradients = _GRAD_PARTITION_BYTES * P / gpus
    optimizer = 12.0 * P / gpus  # fp32 master, Adam m and v
    bucket_buffers = 2 if cfg.zero.overlaps(gpus) else 1
    buckets = 2.0 * cfg.zero.reduce_bucket_size * bucket_buffers

    per_token = L * block_activation_elements(policy, C, F) + 2 * C  # + embedding output and ln_out input
    # The loss keeps d(hidden) per token and the head's weight gradient (bf16) until backward.
    activations = 2.0 * tokens * per_token + 2.0 * tokens * C + 2.0 * V * C
    block_transient = 2.0 * tokens * block_activation_elements("none", C, F)
    if cfg.precision == "fp8":
        block_transient += _fp8_transient(tokens, C, F)
    chunk = max(1, LOSS_CHUNK_ELEMENTS // V)
    loss_transient = 4.0 * V * C + 8.0 * min(chunk, tokens) * V  # fp32 dW, chunk logits bf16 + fp32 + grad
    transient = max(block_transient, loss_transient)
    step_extra = 6.0 * P / gpus

    states = weights + gradients + optimizer + buckets
    grad_accum = cfg.batch.global_batch // (B * gpus) if cfg.batch.global_batch % (B * gpus) == 0 else 0
    # From a step's second micro-batch on, ZeRO-2 reduces into a fresh partition-sized buffer while the running
    # sum of the earlier ones is still held (DeepSpeed 0.19.8 stage_1_and_2.py:2192 and :1039): two partitions
    # live during backward. The step then sums and frees one, so the step peak holds one.
    once = cfg.zero.reduce_once_per_step
    accumulating = gradients if grad_accum != 1 and not once else 0.0
    local_gradients = 2.0 * P if once else 0.0
    backward_peak = states + accumulating + local_gradients + activations + transient
    step_peak = states + step_extra
    peak = max(backward_peak, step_peak)
    return MemoryPlan(
        preset=cfg.preset, gpus=gpus, gpu_memory=gpu_memory_gb * GB, micro_batch=B, ctx_len=T,
        grad_accum=grad_accum,
        activation_memory=policy, precision=cfg.precision, parameters=P, weights=weights, gradients=gradients,
        accumulating=accumulating, local_gradients=local_gradients, optimizer=optimizer,
        buckets=buckets, activations=activations, transient=transient, step_extra=step_extra,
        backward_peak=backward_peak, step_peak=step_peak, peak=peak, headroom=1.0 - peak / (gpu_memory_gb * GB),
    )


def format_plan(plan: MemoryPlan) -> str:
    """A small table in GB, for the CLI."""
    rows = [
        ("weights (bf16, every GPU)", plan.weights),
        (f"gradients (bf16 partition, 1/{plan.gpus})", plan.gradients),
        (f"optimizer (fp32 master + Adam, 1/{plan.gpus})", plan.optimizer),
        ("gradient partition being reduced (backward)", plan.accumulating),
        ("full gradients until the step's one reduction", plan.local_gradients),
        ("reduce buckets (bf16)", plan.buckets),
        (f"activations / micro-batch ({plan.activation_memory}, B{plan.micro_batch} T{plan.ctx_len})",
         plan.activations),
        ("transient (one block's backward or the loss)", plan.transient),
        ("backward peak", plan.backward_peak),
        ("optimizer-step peak", plan.step_peak),
        ("total (peak)", plan.peak),
    ]
    width = max(len(name) for name, _ in rows)
    matmuls = "" if plan.precision == "bf16" else f" ({plan.precision} block matmuls)"
    lines = [f"{plan.preset}: {plan.parameters:,} parameters, ZeRO-2 bf16{matmuls} on {plan.gpus} GPU(s) of "
             f"{plan.gpu_memory / GB:g} GB; grad accumulation {plan.grad_accum}"]
    lines += [f"{name:<{width}}  {value / GB:8.2f} GB" for name, value in rows]
    lines.append(f"{'headroom':<{width}}  {plan.headroom:8.1%}")
    return "\n".join(lines)
