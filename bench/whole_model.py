"""The whole 7B on one GPU (issue 28): the real `train()` where the memory plan says it fits the card, else its
two halves measured apart and summed into an estimate of the per-GPU step of an 8-GPU run.

    python3 bench/whole_model.py                         # mode by the card's memory (--mode auto)
    python3 bench/whole_model.py --mode split            # the halves, on any card
    python3 bench/whole_model.py --device cpu --tiny     # smoke run: tiny width, CPU, DeepSpeed on gloo

Modes:
- `train`: `bench/train_throughput.py --preset 7b --micro-batch 1` (the real `train()`: ZeRO-2 on one GPU
  holds weights, gradients and fp32 optimizer states), chosen by `--mode auto` when `rwkv5.train.memory_plan`
  leaves `--min-headroom` of the card.
- `split`: (1) forward + backward of all layers at the preset's micro-batch, `accum` micro-batches per step (the
  preset's accumulation per GPU on `--gpus` GPUs), with the same model, compiled blocks, activation policy and
  chunked loss as `train()`, gradients accumulating in bf16 as ZeRO-2 keeps them; no optimizer states.
  (2) DeepSpeed ZeRO-2's `engine.step()` (bf16 -> fp32 gradient copy, norm and clipping, FusedAdam, fp32 -> bf16
  copy) on a module holding 1/`--gpus` of every parameter of the preset: one rank's partition. The per-GPU step
  estimate is (1) + (2); it leaves out the gradient reduce-scatter and parameter all-gather between GPUs
  (overlapped with backward and small next to the step on NVLink) and the data loader (< 0.5% in the records).

MFU is the project's formula (`rwkv5.train.metrics.mfu`: 6 x matmul parameters x tokens/s / 989e12).
Writes `bench/results/whole-<preset>-<card>.json` (`bench/record.py`: GPU, versions, command).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import ROOT, card_slug, environment, write_record  # noqa: E402
from rwkv5.config import count_matmul_parameters, count_parameters  # noqa: E402
from rwkv5.train.config import RunConfig, run_preset, with_overrides  # noqa: E402
from rwkv5.train.memory_plan import plan_memory  # noqa: E402
from rwkv5.train.metrics import mfu  # noqa: E402

__all__ = ["smoke_config", "time_forward_backward", "partition_module", "time_partition_step", "estimate"]

TINY = {"model.n_embd": 128, "model.n_layer": 2, "model.head_size": 32, "model.vocab_size": 65536,
        "model.dim_ffn": 448, "batch.ctx_len": 64}


def smoke_config(cfg: RunConfig) -> RunConfig:
    """`cfg` at a width the CPU runs in seconds: same batch, accumulation and policy, tiny model and context."""
    return with_overrides(cfg, TINY)


def device_and_preset(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, RunConfig]:
    """The device of `--device` (an argparse error without CUDA) and the preset, tiny under `--tiny`."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available; use --device cpu --tiny for a smoke run")
    cfg = run_preset(args.preset)
    return device, smoke_config(cfg) if args.tiny else cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def time_forward_backward(cfg: RunConfig, device: torch.device, accum: int, steps: int = 3,
                          warmup: int = 1) -> dict:
    """Median seconds of `accum` micro-batches of forward + backward (one step's worth, no optimizer).

    The first micro-batch (which compiles the blocks on CUDA) is timed apart as `compile_s`. Gradients stay
    allocated and are zeroed in place between steps, as ZeRO-2's partition buffer is.
    """
    from rwkv5.model import build_model

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = build_model(cfg.model, device, activation_memory=cfg.activation_memory).to(torch.bfloat16).train()
    build_s = time.perf_counter() - t0
    compiled = cfg.compile and device.type == "cuda"
    if compiled:
        model.compile_blocks(dynamic=False)
    B, T, V = cfg.batch.micro_batch, cfg.batch.ctx_len, cfg.model.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    batches = [torch.randint(1, V, (B, T + 1), generator=gen).to(device) for _ in range(min(accum, 4))]

    def micro(i: int) -> float:
        tokens = batches[i % len(batches)]
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    micro(0)
    _sync(device)
    compile_s = time.perf_counter() - t0
    step_s, losses = [], []
    for step in range(warmup + steps):
        model.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        for i in range(accum):
            loss = micro(i)
        _sync(device)
        if step >= warmup:
            step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    out = {
        "micro_batch": B, "ctx_len": T, "accum": accum, "n_layer": cfg.model.n_layer,
        "activation_memory": cfg.activation_memory, "compile": compiled, "build_s": build_s,
        "compile_s": compile_s if compiled else None, "steps_measured": len(step_s), "step_s": step_s,
        "fwd_bwd_step_s": statistics.median(step_s), "micro_batch_s": statistics.median(step_s) / accum,
        "loss_last": losses[-1], "peak_memory_gb": _peak_gb(device),
    }
    del model, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


class _Partition(nn.Module):
    """Parameters shaped like 1/`parts` of each of `model`'s (one dimension divided), keeping the names that
    `rwkv5.train.optim.param_groups` sorts by ('.' becomes '__'); forward is a cheap loss touching them all."""

    def __init__(self, model: nn.Module, parts: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.weights = nn.ParameterDict()
        for name, p in model.named_parameters():
            shape = list(p.shape)
            dim = next((d for d, n in enumerate(shape) if n % parts == 0 and n >= parts), None)
            if dim is None:
                raise ValueError(f"{name} {tuple(shape)}: no dimension divisible by {parts}")
            shape[dim] //= parts
            self.weights[name.replace(".", "__")] = nn.Parameter(torch.empty(shape, device=device).normal_(std=0.02))

    def forward(self) -> torch.Tensor:
        return torch.stack([p.float().square().mean() for p in self.weights.values()]).sum()


def partition_module(cfg: RunConfig, parts: int, device: torch.device | str = "cpu") -> _Partition:
    """A module of 1/`parts` of every parameter of `cfg.model`: one ZeRO-2 rank's share of `parts` GPUs."""
    from rwkv5.model import RWKV5

    with torch.device("meta"):
        full = RWKV5(cfg.model)
    return _Partition(full, parts, device)


def time_partition_step(cfg: RunConfig, device: torch.device, parts: int, steps: int = 3,
                        warmup: int = 1) -> dict:
    """Median seconds of DeepSpeed ZeRO-2's `engine.step()` (the real run's optimizer and config) on one rank's
    partition of `parts` GPUs, run as a one-GPU engine; the backward before each step is timed apart."""
    from rwkv5.train.optim import build_optimizer, deepspeed_config, param_groups
    from rwkv5.train.worker import _setup_distributed

    _setup_distributed(device.type == "cuda")
    from rwkv5.train.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()
    module = partition_module(cfg, parts, device)
    n = sum(p.numel() for p in module.parameters())
    one = with_overrides(cfg, {"batch.micro_batch": 1, "batch.global_batch": 1})
    optimizer = build_optimizer(param_groups(module, cfg.optim), cfg.optim, device)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(one, 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, backward_s = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        engine.backward(engine())
        _sync(device)
        t1 = time.perf_counter()
        engine.step()
        _sync(device)
        if i >= warmup:
            backward_s.append(t1 - t0)
            step_s.append(time.perf_counter() - t1)
    out = {"parts": parts, "parameters": n, "optimizer": type(optimizer).__name__, "steps_measured": len(step_s),
           "step_s": step_s, "optimizer_step_s": statistics.median(step_s),
           "backward_bookkeeping_s": statistics.median(backward_s), "peak_memory_gb": _peak_gb(device)}
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, optimizer, module
    gc.collect()
    return out


def estimate(cfg: RunConfig, fwd_bwd: dict, opt: dict) -> dict:
    """Per-GPU step of a `opt['parts']`-GPU run as forward+backward + the partition's optimizer step."""
    step_s = fwd_bwd["fwd_bwd_step_s"] + opt["optimizer_step_s"]
    tokens = fwd_bwd["accum"] * fwd_bwd["micro_batch"] * fwd_bwd["ctx_len"]
    tps = tokens / step_s
    matmul = count_matmul_parameters(cfg.model)
    return {
        "what": f"ESTIMATE of the per-GPU step of a {opt['parts']}-GPU ZeRO-2 run: forward+backward of "
                f"{fwd_bwd['accum']} micro-batches + the optimizer step of one 1/{opt['parts']} partition, measured "
                "apart on one GPU; no gradient reduce-scatter or parameter all-gather",
        "step_s": step_s, "tokens_per_step_per_gpu": tokens, "tokens_per_s_per_gpu": tps,
        "mfu": mfu(matmul, tps, cfg.metrics.peak_flops), "matmul_parameters": matmul,
        "mfu_fwd_bwd_only": mfu(matmul, tokens / fwd_bwd["fwd_bwd_step_s"], cfg.metrics.peak_flops),
        "optimizer_share": opt["optimizer_step_s"] / step_s,
    }


def _plan(cfg: RunConfig, micro: int, card_gb: float) -> dict:
    one = with_overrides(cfg, {"batch.micro_batch": micro, "batch.global_batch": micro})
    plan = plan_memory(one, 1, card_gb)
    return {k: v / 1e9 if isinstance(v, float) and v > 1e6 else v for k, v in plan.as_dict().items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--mode", choices=("auto", "train", "split"), default="auto")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the run being estimated (split mode)")
    ap.add_argument("--accum", type=int, default=None,
                    help="micro-batches per step per GPU. Default: the preset's on --gpus GPUs")
    ap.add_argument("--layers", type=int, default=None, help="the preset's width at this depth")
    ap.add_argument("--activation-memory", choices=("none", "selective", "full"), default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-headroom", type=float, default=0.03, help="auto: train() when the plan leaves this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny width (CPU smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device, cfg = device_and_preset(ap, args)
    overrides = {"model.n_layer": args.layers} if args.layers else {}
    if args.activation_memory:
        overrides["activation_memory"] = args.activation_memory
    cfg = with_overrides(cfg, overrides) if overrides else cfg
    accum = args.accum or max(1, cfg.batch.global_batch // (cfg.batch.micro_batch * args.gpus))
    card_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 0.0
    plan = _plan(cfg, 1, card_gb) if card_gb else _plan(cfg, 1, 1.0)
    mode = args.mode
    if mode == "auto":
        mode = "train" if card_gb and plan["headroom"] >= args.min_headroom else "split"
    print(f"{args.preset}: {count_parameters(cfg.model):,} parameters; plan at micro-batch 1 on one "
          f"{card_gb:.1f} GB card (0: no GPU): peak {plan['peak']:.2f} GB (backward {plan['backward_peak']:.2f}, "
          f"optimizer step {plan['step_peak']:.2f}), headroom {plan['headroom']:.1%} -> mode {mode}", flush=True)
    record = environment(device, __file__, sys.argv[1:] if argv is None else argv)
    record.update({"preset": args.preset, "tiny": args.tiny, "mode": mode, "card_gb": card_gb,
                   "model": cfg.model.model_dump(), "parameters": count_parameters(cfg.model),
                   "plan_micro1_1gpu": plan})
    out = Path(args.out or ROOT / f"bench/results/whole-{args.preset}{'-tiny' if args.tiny else ''}-"
               f"{card_slug(device)}.json")
    if mode == "train":
        train_out = out.with_name(out.stem + "-train.json")
        cmd = [sys.executable, str(ROOT / "bench/train_throughput.py"), "--preset", args.preset,
               "--micro-batch", "1", "--grad-accum", str(accum * cfg.batch.micro_batch), "--steps",
               str(args.warmup + args.steps + 1), "--warmup", str(args.warmup + 1), "--out", str(train_out)]
        record["train_command"] = " ".join(cmd[1:])
        record["train_rc"] = subprocess.run(cmd).returncode
        record["train_record"] = str(train_out)
        write_record(out, record)
        return record
    fb = time_forward_backward(cfg, device, accum, args.steps, args.warmup)
    print(f"forward+backward, {cfg.model.n_layer} layers, {accum} x micro-batch {cfg.batch.micro_batch}: "
          f"{fb['fwd_bwd_step_s']:.3f} s ({fb['micro_batch_s'] * 1e3:.1f} ms per micro-batch), peak "
          f"{fb['peak_memory_gb']} GB, compile {fb['compile_s']} s", flush=True)
    record["forward_backward"] = fb
    write_record(out, record)  # the expensive half is safe on disk before DeepSpeed starts
    opt = time_partition_step(cfg, device, args.gpus, args.steps, args.warmup)
    print(f"optimizer step of 1/{args.gpus} ({opt['parameters']:,} parameters, {opt['optimizer']}): "
          f"{opt['optimizer_step_s'] * 1e3:.1f} ms", flush=True)
    record["optimizer_partition"] = opt
    record["estimate"] = estimate(cfg, fb, opt)
    from rwkv5.train.deepspeed_import import import_deepspeed

    record["deepspeed"] = import_deepspeed().__version__
    e = record["estimate"]
    print(f"ESTIMATE per-GPU step on {args.gpus} GPUs: {e['step_s']:.3f} s, {e['tokens_per_s_per_gpu']:,.0f} "
          f"tokens/s/GPU, MFU {e['mfu']:.3f} (forward+backward alone {e['mfu_fwd_bwd_only']:.3f})", flush=True)
    write_record(out, record)
    return record


if __name__ == "__main__":
    main()
