"""Parameter groups, the optimizer and the DeepSpeed config.

Groups follow RWKV-LM: weight decay on matrices only (linear and embedding weights), none on vectors, norms
and the time_* parameters, and a larger rate for time_decay. The optimizer is built here rather than from
the DeepSpeed config so the same guard (skip an update without touching weights or moments) wraps FusedAdam
on GPU and torch AdamW on CPU.
"""

from __future__ import annotations

import torch

from rwkv5.train.config import OptimConfig, RunConfig

__all__ = ["param_groups", "build_optimizer", "deepspeed_config"]


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: decayed matrices, time_decay (scaled rate, no decay), and everything else (no decay).

    Each group carries `lr_scale`, which `lr_schedule.apply_lr` multiplies into the base rate, and `name`.
    """
    decay, fast, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("time_decay"):
            fast.append(p)
        elif p.ndim == 2 and "time_" not in name:
            decay.append(p)
        else:
            plain.append(p)
    groups = [
        {"name": "matrices", "params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"name": "time_decay", "params": fast, "weight_decay": 0.0, "lr_scale": cfg.time_decay_lr_scale},
        {"name": "vectors", "params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def _guarded(base: type) -> type:
    """A subclass of optimizer class `base` whose step() does nothing while `skip_next` is set.

    DeepSpeed's ZeRO optimizer calls the inner optimizer's step() on the fp32 master partition and then
    copies the master back into the bf16 weights, so a no-op step leaves weights and moments bit-identical.
    """

    class Guarded(base):
        skip_next = False

        def step(self, closure=None):
            if self.skip_next:
                return None
            return super().step(closure)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """FusedAdam (decoupled weight decay) on CUDA, torch AdamW elsewhere; both guarded, betas/eps from cfg."""
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        from rwkv5.train.deepspeed_import import import_deepspeed

        import_deepspeed()
        from deepspeed.ops.adam import FusedAdam

        return _guarded(FusedAdam)(groups, adam_w_mode=True, **kwargs)
    return _guarded(torch.optim.AdamW)(groups, foreach=False, **kwargs)


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """ZeRO stage 2 in bf16 with explicit clipping; batch sizes from the run preset and the worker count.

    Bucket sizes, overlap, reduce_scatter and the reduction once per step come from `cfg.zero`
    (`ZeroConfig.overlaps`: by default on several workers only). DeepSpeed's throughput timer is off: it
    synchronizes the device in every forward and every `engine.step()` (twice a micro-batch, draining the GPU's
    queue), and `SpeedCallback` measures instead.
    """
    zero = cfg.zero
    accum = cfg.batch.grad_accum(world_size)
    # Reducing once per step, the loop runs all of a step's micro-batches inside one coalescing block and steps
    # once: to DeepSpeed that is one micro-batch of all of them (it would otherwise scale each by 1/accum and
    # expect a step() per micro-batch).
    once = zero.reduce_once_per_step
    return {
        "train_batch_size": cfg.batch.global_batch,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch * (accum if once else 1),
        "gradient_accumulation_steps": 1 if once else accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": True, "check_grad_overflow": True},
        "zero_optimization": {
            "stage": 2,
            "contiguous_gradients": True,
            "overlap_comm": zero.overlaps(world_size),
            "reduce_scatter": zero.reduce_scatter,
            "reduce_bucket_size": zero.reduce_bucket_size,
            "allgather_bucket_size": zero.allgather_bucket_size,
        },
        "checkpoint": {"load_universal": load_universal},
        # Our optimizers are subclasses of the tested FusedAdam / torch AdamW that only add the skip guard.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
    }
