"""Training precision: the block linears in float8 (torchao) under `RunConfig.precision == "fp8"`.

Only the linear layers inside the blocks (att receptance/key/value/gate/output, ffn key/receptance/value: 96%
of the 7B's matmul parameters, the head the other 4%) become torchao `Float8Linear`s. The embedding (a
lookup), the head and the chunked loss (`rwkv5.model.chunked_lm_loss` reads `head.weight` directly; the
65536-way softmax is the precision-sensitive end) stay in bf16, as do the WKV op, the norms and the mixes.

A `Float8Linear` is an `nn.Linear` subclass with the same `weight` parameter, so parameter names, checkpoints,
DeepSpeed's bf16 cast and ZeRO-2's flattening are unchanged: ZeRO keeps the fp32 master weights and Adam
moments, the bf16 working weights are what each matmul casts to float8 (dynamic scales, no amax history, so
no extra state to checkpoint). Convert before `deepspeed.initialize` and before `compile_blocks`.
torchao saves the bf16 input (and weight) for backward, as `nn.Linear` does, so activation memory is that of
bf16 (`rwkv5.train.memory_plan`); under "selective" the matmul outputs are kept (`rwkv5.model._MATMULS` lists
`_scaled_mm`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from rwkv5.errors import ConfigError
from rwkv5.train.config import RunConfig

__all__ = ["is_block_linear", "apply_precision", "float8_linear_names"]

# Float8 matmuls (torch._scaled_mm) need both matrix dimensions of the weight divisible by 16.
_FP8_DIVISOR = 16


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """torchao's module filter: linear layers under `blocks.` whose dimensions float8 matmuls accept."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("blocks."):
        return False
    out_f, in_f = module.weight.shape
    return out_f % _FP8_DIVISOR == 0 and in_f % _FP8_DIVISOR == 0


def _emulate(device: torch.device) -> bool:
    """Float8 matmuls in hardware on CUDA 8.9+ (H100/H200); emulated (casts kept, fp32 products) on the CPU."""
    if device.type != "cuda":
        return True
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(
            f"precision 'fp8' needs a GPU of compute capability 8.9+ (H100, H200, L4, ...), "
            f"got {torch.cuda.get_device_name(device)}"
        )
    return False


def apply_precision(model: nn.Module, cfg: RunConfig, device: torch.device | str) -> list[str]:
    """Convert `model`'s block linears to float8 training when `cfg.precision` is "fp8"; bf16: nothing.

    Args:
        model (nn.Module): an `RWKV5`, before `deepspeed.initialize` and `compile_blocks`.
        cfg (RunConfig): `precision` and `fp8_recipe`.
        device (torch.device | str): where it trains (CPU: emulated float8).

    Returns:
        The names of the converted modules (empty under bf16).
    """
    if cfg.precision == "bf16":
        return []
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("precision 'fp8' needs torchao: pip install 'rwkv5-pipeline[fp8]'") from None
    config = Float8LinearConfig.from_recipe_name(cfg.fp8_recipe)
    config = dataclasses.replace(config, emulate=_emulate(torch.device(device)))
    convert_to_float8_training(model, module_filter_fn=is_block_linear, config=config)
    return float8_linear_names(model)


def float8_linear_names(model: nn.Module) -> list[str]:
    """Names of the modules that run float8 matmuls (torchao `Float8Linear`)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
