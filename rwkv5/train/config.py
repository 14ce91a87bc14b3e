"""Typed run configuration and the named run presets.

A run preset is a function returning a full `RunConfig` (torchtitan's `config_registry` habit): `tiny` is the
CPU demo and test run, `7b` the reference run, and the model preset names `169m`, `430m`, `1b5`, `3b` give
short benchmark runs of those models. Variants copy a base and edit it with `with_overrides`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from rwkv5.config import ModelConfig, model_preset
from rwkv5.errors import ConfigError

__all__ = [
    "BatchConfig",
    "OptimConfig",
    "CheckpointConfig",
    "StabilityConfig",
    "MilestoneConfig",
    "MetricsConfig",
    "ZeroConfig",
    "RunConfig",
    "RUN_PRESETS",
    "run_preset",
    "with_overrides",
    "validate_section",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatchConfig(_Section):
    """How many tokens one optimizer step reads, independent of the number of workers."""

    ctx_len: int = 128
    """Tokens per training sequence (the loader yields ctx_len + 1 ids: inputs and shifted targets)."""
    micro_batch: int = 2
    """Sequences per worker per forward/backward."""
    global_batch: int = 8
    """Sequences per optimizer step over all workers. Gradient accumulation = global / (micro * workers),
    so the global sample order and the step size stay the same when the worker count changes."""

    @model_validator(mode="after")
    def _check(self) -> "BatchConfig":
        for name in ("ctx_len", "micro_batch", "global_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"batch.{name} must be > 0, got {getattr(self, name)}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"batch.global_batch ({self.global_batch}) must be a multiple of batch.micro_batch "
                f"({self.micro_batch})"
            )
        return self

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` workers; raises if the batch does not split evenly."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"batch.global_batch ({self.global_batch}) is not a multiple of batch.micro_batch "
                f"({self.micro_batch}) x workers ({world_size})"
            )
        return self.global_batch // per_step


class OptimConfig(_Section):
    """AdamW and the learning-rate schedule (RWKV-LM's choices where it has them)."""

    lr: float = 2e-4
    """Peak learning rate, reached after the warm-up."""
    final_lr: float = 2e-5
    """Learning rate at the end of the token budget (cosine decay from `lr`)."""
    warmup_steps: int = 10
    """Linear warm-up from 0 over this many optimizer steps."""
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only (linear and embedding weights); vectors and time_* parameters get none."""
    time_decay_lr_scale: float = 2.0
    """RWKV trains time_decay with a larger rate (RWKV-LM's lr_2x group)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; set explicitly because DeepSpeed 0.19 silently defaults to 1.0. 0 = off."""

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.lr <= 0 or self.final_lr < 0 or self.final_lr > self.lr:
            raise ConfigError(f"optim.lr ({self.lr}) must be > 0 and optim.final_lr ({self.final_lr}) in [0, lr]")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        return self


class CheckpointConfig(_Section):
    every_steps: int = 100
    """Save a DeepSpeed checkpoint every this many optimizer steps (and always at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted once a newer one is complete."""

    @model_validator(mode="after")
    def _check(self) -> "CheckpointConfig":
        if self.every_steps <= 0:
            raise ConfigError(f"checkpoint.every_steps must be > 0, got {self.every_steps}")
        if self.keep_last <= 0:
            raise ConfigError(f"checkpoint.keep_last must be > 0, got {self.keep_last}")
        return self


class StabilityConfig(_Section):
    spike_window: int = 50
    """Steps of loss history behind the running mean and standard deviation."""
    spike_sigma: float = 6.0
    """A loss above mean + spike_sigma * std of the window is a spike."""
    spike_min_history: int = 20
    """No spike is called before this many finite losses are in the window."""
    spike_action: Literal["log", "skip", "rollback"] = "log"
    """log: count it; skip: do not apply the step; rollback: reload the last checkpoint and skip the data
    read since then, up to and including the offending step."""

    @model_validator(mode="after")
    def _check(self) -> "StabilityConfig":
        if self.spike_window < 2 or self.spike_min_history < 2 or self.spike_min_history > self.spike_window:
            raise ConfigError(
                f"stability.spike_min_history ({self.spike_min_history}) must be in [2, stability.spike_window "
                f"({self.spike_window})]"
            )
        if self.spike_sigma <= 0:
            raise ConfigError(f"stability.spike_sigma must be > 0, got {self.spike_sigma}")
        return self


class MilestoneConfig(_Section):
    fraction: float = 0.1
    """A consolidated bf16 checkpoint is written each time this fraction of the token budget is passed."""
    pause: bool = False
    """End training right after each milestone is written (its checkpoint saved, its hooks run), so that the
    milestone run can use the GPUs; the next launch resumes from that checkpoint (milestone mode `shared`)."""

    @model_validator(mode="after")
    def _check(self) -> "MilestoneConfig":
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"milestones.fraction must be in (0, 1], got {self.fraction}")
        return self


class MetricsConfig(_Section):
    peak_flops: float = 989e12
    """Peak dense bf16 FLOP/s of one device, the MFU denominator (H100/H200 SXM: 989e12)."""
    log_every: int = 1
    """Log metrics every this many optimizer steps."""
    mlflow_tracking_uri: str | None = None
    """MLflow server; None = the MLFLOW_TRACKING_URI environment variable, and no MLflow if that is unset."""
    mlflow_experiment: str = "rwkv5-pretrain"
    system_metrics: bool = True
    """Let MLflow sample CPU/GPU/memory of the rank-0 node alongside the training metrics."""

    @model_validator(mode="after")
    def _check(self) -> "MetricsConfig":
        if self.peak_flops <= 0 or self.log_every <= 0:
            raise ConfigError("metrics.peak_flops and metrics.log_every must be > 0")
        return self


class ZeroConfig(_Section):
    """DeepSpeed ZeRO-2 communication. Matters mostly on several workers; one worker has nothing to send.

    Per micro-batch, ZeRO-2 (DeepSpeed 0.19.8, bf16) copies each gradient into the bucket as autograd produces
    it, reduces each full bucket, copies this rank's part of it into the partition buffer and, from the second
    micro-batch of a step on, adds that to the previous micro-batches' sum: two copies and one add per
    parameter, plus a few ops and one collective per bucket (`bench/NOTES.md`, issue 28, "What ZeRO-2 runs per
    micro-batch"). No setting removes the per-parameter work while keeping ZeRO-2; `bench/zero_overhead.py`
    counts what each candidate setting changes.
    """

    overlap_comm: bool | None = None
    """Reduce gradient buckets on a side stream while backward goes on. None: on several workers only (on one, the
    second bucket buffer costs memory for copies alone); True on one worker puts ZeRO's per-micro-batch gradient
    copies beside backward instead of between its kernels (issue 28's profile: ~9% of a micro-batch), the same
    ops in the same number, at the price of a device synchronization at the end of every backward; whether that
    pays on one GPU is for `bench/issue28_device.sh` to measure."""
    reduce_bucket_size: int = 200_000_000
    """Gradient elements per reduce bucket. Each bucket is a bf16 buffer (two with overlap_comm): 2e8 is 400 MB,
    about one layer of the 7B, large enough for full-bandwidth collectives and small next to 80 GB. A gradient
    larger than a bucket (the 7B's embedding and head, 2.68e8) is reduced where autograd left it, without the
    copy into the bucket: buckets of 5e8 (DeepSpeed's default) would copy those two as well (+1.1 GB a micro-batch
    at 7b width with 8 layers) to save a few collectives; buckets below every matrix (1.6e7) would spare all
    matrices that copy (-3.5 GB) at ten times the reduce calls, which `bench/issue28_device.sh` times on a GPU."""
    allgather_bucket_size: int = 200_000_000
    """Parameter elements per all-gather after the optimizer step (bf16, 400 MB at 2e8)."""
    reduce_scatter: bool = False
    """Split each bucket by the rank that owns each slice and divide it by the world size before reducing it
    (DeepSpeed's default, True). With DeepSpeed's `use_multi_rank_bucket_allreduce` (on by default) the split
    bucket is all-reduced whole anyway, so False (one in-place all-reduce of the bucket, then a multiply by
    1/workers) moves the same bytes, skips the concatenation of a bucket whose slices belong to several ranks,
    and on one worker skips the scaling altogether: DeepSpeed divides every gradient by 1 otherwise (13
    kernels writing 4.6 GB per micro-batch at 7b width with 8 layers). Gradients stay partitioned either way."""
    reduce_once_per_step: bool = False
    """Let autograd sum the micro-batches' gradients where they are and reduce them once per optimizer step
    (DeepSpeed's `engine.coalesce_grad_reduction()`), instead of ZeRO-2's copy, reduce and add per micro-batch.
    Removes the bucket and partition copies of every micro-batch but the step's and divides the collectives by
    the accumulation; costs the full bf16 gradients held through the step on every worker (2 bytes a parameter,
    against the 2/workers of a partition: the memory plan counts it). What it gains is for the device benches."""

    def overlaps(self, workers: int) -> bool:
        """Whether buckets are reduced on a side stream for a run on `workers` workers."""
        return self.overlap_comm if self.overlap_comm is not None else workers > 1

    @model_validator(mode="after")
    def _check(self) -> "ZeroConfig":
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"zero.{name} must be > 0, got {getattr(self, name)}")
        return self


class RunConfig(_Section):
    """Everything a pretraining run needs besides its name, data and storage (those come from the CLI)."""

    preset: str
    """Name of the run preset this config came from (recorded in MLflow)."""
    model: ModelConfig
    token_budget: int
    """Tokens the schedule spans; the run ends when they have been read."""
    seed: int = 0
    """Seeds the model initialisation and the global sample order."""
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    stability: StabilityConfig = StabilityConfig()
    milestones: MilestoneConfig = MilestoneConfig()
    metrics: MetricsConfig = MetricsConfig()
    zero: ZeroConfig = ZeroConfig()
    activation_memory: Literal["none", "selective", "full"] = "none"
    """What each block keeps for backward: "none" (all activations), "selective" (matmul and WKV outputs;
    norms, token shift, mixes and gates are recomputed: a few % more time for about half the memory), "full"
    (the block input only: one more forward of every block). `rwkv5 plan` shows what fits."""
    compile: bool = False
    """torch.compile each block when training on CUDA (fuses the elementwise work around the matmuls); CPU runs
    ignore it. Compilation happens on the first step, reported apart as `compile_s`."""
    precision: Literal["bf16", "fp8"] = "bf16"
    """Matmul precision of the linear layers inside the blocks: "bf16" (the reference run's) or "fp8" (torchao
    float8 training: inputs, weights and output gradients cast to float8 per matmul with dynamic scales; weights,
    gradients, optimizer states, the embedding, the head and the loss stay as under bf16; `rwkv5.train.precision`).
    fp8 needs n_embd and the FFN width divisible by 16 (the float8 matmul's rule) and torchao (extra `fp8`); on
    CUDA a GPU of compute capability 8.9+ (H100/H200), on the CPU the float8 casts are emulated (tests)."""
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """torchao's scaling recipe under precision "fp8": "tensorwise" (one scale per tensor, cuBLAS's float8
    kernel) or "rowwise" (one scale per row, power-of-2 scales, CUTLASS's kernel: more accurate, usually
    slower). `bench/fp8_device.sh` measures both."""
    stop_at_step: int | None = None
    """Stop (with a checkpoint) after this many optimizer steps although the budget is not spent: benchmarks
    and preemption tests. The schedule still spans the whole budget."""

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.token_budget < self.tokens_per_step:
            raise ConfigError(
                f"token_budget ({self.token_budget}) is below one step ({self.tokens_per_step} tokens)"
            )
        if self.stop_at_step is not None and self.stop_at_step <= 0:
            raise ConfigError(f"stop_at_step must be > 0, got {self.stop_at_step}")
        if self.precision == "fp8" and (self.model.n_embd % 16 or self.model.ffn % 16):
            raise ConfigError(
                f"precision 'fp8' needs model.n_embd ({self.model.n_embd}) and the FFN width "
                f"({self.model.ffn}) divisible by 16 (float8 matmuls)"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch * self.batch.ctx_len

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the token budget (the last partial step is dropped)."""
        return self.token_budget // self.tokens_per_step


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted keys replaced (`{"optim.lr": 1e-3}`), validated like a fresh config."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section {dotted!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config field {dotted!r}")
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid override {overrides}: {exc}") from None


def validate_section(model: type[BaseModel], value: Any, section: str) -> Any:
    """`model` from a flow parameter or an event payload (a dict; None = its defaults), or `value` itself when it
    is one already; a validation error becomes one ConfigError naming each bad `section.field`."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value or {})
    except ValidationError as exc:
        problems = "; ".join(f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid {section} settings: {problems}") from None


def tiny() -> RunConfig:
    """The CPU demo: the tiny model, short sequences and small micro-batches (the 65536-way head dominates)."""
    return RunConfig(
        preset="tiny",
        model=model_preset("tiny"),
        token_budget=8 * 128 * 200,
        batch=BatchConfig(ctx_len=128, micro_batch=2, global_batch=8),
        optim=OptimConfig(lr=1e-3, final_lr=1e-4, warmup_steps=10),
        checkpoint=CheckpointConfig(every_steps=50, keep_last=2),
        stability=StabilityConfig(spike_window=20, spike_min_history=10),
        metrics=MetricsConfig(log_every=1),
    )


def reference_7b() -> RunConfig:
    """The reference run: 7B, ctx 4096, 112 sequences (458,752 tokens) per step, 627B tokens of SlimPajama.

    The batch is the reference run's own: 40.5B tokens at its step 88,000 is about 460k tokens per step, 112
    sequences of 4096 (micro-batch 2 x 7 accumulations x 8 GPUs), trained at lr 2e-4 after 10 warm-up steps.
    """
    return RunConfig(
        preset="7b",
        model=model_preset("7b"),
        token_budget=627_000_000_000,
        optim=OptimConfig(lr=2e-4, final_lr=1e-5, warmup_steps=10),
        # `rwkv5 plan` (rwkv5.train.recipe): 4.9 s per step on 8 GPUs at the MFU measured at 7b width on one
        # H100, so 600 steps are 49 minutes; that stays within an hour down to MFU 0.42, room for the 8-GPU
        # communication and the optimizer step the one-GPU measurement spread over 64 micro-batches.
        checkpoint=CheckpointConfig(every_steps=600, keep_last=3),
        # From `rwkv5 plan --preset 7b --gpus 8 --gpu-memory 80`: micro-batch 2 under "selective" leaves >= 10%
        # of 80 GB free (3 does not).
        batch=BatchConfig(ctx_len=4096, micro_batch=2, global_batch=112),
        activation_memory="selective",
        compile=True,
    )


def _benchmark(model_name: str, micro_batch: int, accum: int, activation_memory: str,
               ctx_len: int = 4096) -> RunConfig:
    """A short single-GPU run of a smaller model: the reference run's optimizer, 50 steps of budget.

    `accum` micro-batches per optimizer step keep the step (a fixed ~0.1 s) a few % of a step.
    """
    base = reference_7b()
    batch = BatchConfig(ctx_len=ctx_len, micro_batch=micro_batch, global_batch=micro_batch * accum)
    return RunConfig(
        preset=model_name,
        model=model_preset(model_name),
        token_budget=50 * batch.global_batch * ctx_len,
        batch=batch,
        optim=base.optim,
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=1),
        activation_memory=activation_memory,
        compile=True,
    )


RUN_PRESETS = {
    "tiny": tiny,
    "7b": reference_7b,
    "169m": lambda: _benchmark("169m", micro_batch=16, accum=4, activation_memory="selective"),
    "430m": lambda: _benchmark("430m", micro_batch=16, accum=4, activation_memory="selective"),
    "1b5": lambda: _benchmark("1b5", micro_batch=4, accum=8, activation_memory="selective"),
    "3b": lambda: _benchmark("3b", micro_batch=4, accum=8, activation_memory="selective"),
}


def run_preset(name: str) -> RunConfig:
    """Build a run preset by name, with an error that lists the valid ones."""
    try:
        return RUN_PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown run preset {name!r}; choose one of {', '.join(RUN_PRESETS)}") from None
