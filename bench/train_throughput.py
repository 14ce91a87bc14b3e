"""Pretraining throughput of the real training function: tokens/s per GPU, MFU, peak memory, step breakdown.

    python3 bench/train_throughput.py --preset 1b5 --steps 30                      # one GPU
    python3 bench/train_throughput.py --preset 7b --layers 4 --blocks              # 7B width, 4 layers
    torchrun --nproc-per-node 2 bench/train_throughput.py --preset 7b --steps 20   # ZeRO-2 across GPUs

`--layers N` keeps the preset's width and cuts the depth; `--compile`, `--activation-memory` and
`--grad-accum` override the preset, `--set` any RunConfig field and `--ds` the DeepSpeed config itself. The peak memory is compared with `rwkv5.train.memory_plan` for the same
config. `--blocks` also times one Block alone (eager and compiled) and a plain-PyTorch block around fla's
chunk_rwkv6 (the anchor) in the same process, so the ratios come from one card.

Runs `rwkv5.train.worker.train` (the function Ray Train runs for `pretrain/7b`: the same model, CUDA WKV kernel,
DeepSpeed ZeRO-2 bf16 config with FusedAdam, and packed loader) on synthetic shards, launched by torchrun
instead of Ray. Steps after `--warmup` are measured. A step is split into phases by timing the engine's
forward (with the loss), backward (which includes ZeRO-2's overlapped gradient reduce-scatter) and step
(optimizer, then the parameter all-gather), each ended by a CUDA synchronize on timed steps only; data wait
comes from the loader; `--phases` turns these synchronizing timers on (they cost overlap, so MFU is
measured without them). Writes `bench/results/train-<preset>[-L<layers>]-<gpus>gpu-<card>.json` (rank 0).
No checkpoint is written (`NoCheckpoints`). Without CUDA it runs on the CPU (`--preset tiny`: the CPU tests).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import card_slug  # noqa: E402
from bench.zero_overhead import deepspeed_overrides  # noqa: E402
from rwkv5.train.callbacks import Callback  # noqa: E402
from rwkv5.train.config import run_preset, with_overrides  # noqa: E402
from rwkv5.train.worker import TrainJob, train  # noqa: E402

PHASES = ("forward", "backward", "step")
# Without CUDA the same run trains on the CPU (gloo, the PyTorch WKV op, emulated float8): the path CPU tests
# drive end to end. It has no allocator peaks to read (peak_memory_gb 0).
GPU = torch.cuda.is_available()


def _peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if GPU else 0


def _reset_peak_memory() -> None:
    if GPU:
        torch.cuda.reset_peak_memory_stats()


def _synchronize() -> None:
    if GPU:
        torch.cuda.synchronize()


class StepRows(Callback):
    """Per-step rows (loss, step time, MFU, memory, compile time) without timing inside a step.

    Also splits the peak memory into the backward part (before each optimizer step) and the optimizer step's
    own, for the memory plan's two peaks: reading the allocator's counters does not synchronize.
    """

    def __init__(self):
        self.rows: list[dict] = []
        self.backward_peak = self.step_peak = 0

    def pre_train(self, ctx):
        super().pre_train(ctx)
        engine = ctx.engine
        step = engine.step

        def split_peaks(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                self.backward_peak = max(self.backward_peak, _peak_memory())
                _reset_peak_memory()
            out = step(*args, **kwargs)
            if boundary:
                self.step_peak = max(self.step_peak, _peak_memory())
                _reset_peak_memory()
            return out

        engine.step = split_peaks

    def post_step(self, info, metrics):
        self.rows.append({"step": info.step, "loss": info.loss, "step_time_s": info.step_time_s,
                          "data_wait_s": info.data_wait_s})

    def log_metrics(self, step, metrics):
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update({k: float(v) for k, v in metrics.items()
                                  if k in ("tokens_per_s", "mfu", "gpu_mem_gb", "compile_s")})


class PhaseTimer(Callback):
    """Wraps the engine's forward/backward/step with synchronized timers and collects per-step rows."""

    def __init__(self):
        self.rows: list[dict] = []
        self._phase = {p: 0.0 for p in PHASES}

    def pre_train(self, ctx):
        super().pre_train(ctx)
        engine = ctx.engine
        for name in PHASES:
            method = getattr(engine, "forward" if name == "forward" else name)
            setattr(engine, "forward" if name == "forward" else name, self._timed(name, method))

    def _timed(self, phase: str, method):
        @functools.wraps(method)
        def run(*args, **kwargs):
            _synchronize()
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            _synchronize()
            self._phase[phase] += time.perf_counter() - t0
            return out

        return run

    def post_step(self, info, metrics):
        row = {"step": info.step, "loss": info.loss, "step_time_s": info.step_time_s,
               "data_wait_s": info.data_wait_s, **{f"{p}_s": v for p, v in self._phase.items()}}
        self.rows.append(row)
        self._phase = {p: 0.0 for p in PHASES}

    def log_metrics(self, step, metrics):
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update({k: float(v) for k, v in metrics.items() if k in ("tokens_per_s", "mfu",
                                                                                   "gpu_mem_gb", "compile_s")})


class NoCheckpoints:
    """A checkpoint store that holds nothing: `train()` starts fresh and its closing save writes nothing.

    That save comes after the measured steps, and at 7b width with 8 layers it is ~32 GB (14 bytes a parameter:
    bf16 weights, fp32 master and Adam moments) and tens of seconds, and each run kept its own under /tmp: two
    of them fill a 64 GiB device disk (issue 28: after a direct run, all three `--precision` child runs failed).
    Also, torchrun runs all use the run name "bench": a kept checkpoint made the next one resume past its end.
    """

    def latest(self) -> None:
        return None

    def save(self, engine, state, metrics) -> None:
        pass


def _documents(tokens: int, seed: int = 0):
    """Arithmetic sequences of ids (the loss falls visibly, so a broken run shows)."""
    rng = np.random.default_rng(seed)
    written = 0
    while written < tokens:
        start, step, length = rng.integers(1, 60000), rng.integers(1, 7), rng.integers(500, 8000)
        written += length + 1
        yield np.append((start + step * np.arange(length)) % 65000 + 1, 0).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b5")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the summary")
    ap.add_argument("--micro-batch", type=int, default=None, help="override the preset's micro-batch")
    ap.add_argument("--global-batch", type=int, default=None, help="override (default: micro x GPUs)")
    ap.add_argument("--layers", type=int, default=None, help="the preset's width at this depth")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step per GPU")
    ap.add_argument("--activation-memory", choices=("none", "selective", "full"), default=None)
    ap.add_argument("--compile", choices=("on", "off"), default=None)
    ap.add_argument("--overlap-comm", choices=("on", "off"), default=None,
                    help="ZeRO-2 bucket reduce on a side stream (default: on several GPUs only)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                    help="RunConfig overrides by dotted key (zero.reduce_bucket_size=16000000)")
    ap.add_argument("--ds", nargs="+", default=[], metavar="KEY=JSON",
                    help="DeepSpeed config overrides by dotted key, null deletes one (timers=null: DeepSpeed's "
                         "default); bench/zero_overhead.py's deepspeed_overrides")
    ap.add_argument("--precision", nargs="+", choices=("bf16", "fp8"), default=None,
                    help="block matmul precision; several: one run each, fp8_speedup in one record")
    ap.add_argument("--fp8-recipe", nargs="+", choices=("tensorwise", "rowwise"), default=None,
                    help="fp8 scaling recipe(s); default: the preset's")
    ap.add_argument("--phases", action="store_true", help="time forward/backward/step (synchronizes)")
    ap.add_argument("--blocks", action="store_true", help="also time one Block and the fla anchor block")
    ap.add_argument("--block-batch", type=int, default=4, help="batch of the isolated block timings")
    ap.add_argument("--workdir", default=None, help="shared folder for data and checkpoints (multi-GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.blocks and not GPU:
        ap.error("--blocks times CUDA kernels: no GPU here")
    if len(args.precision or []) > 1 or len(args.fp8_recipe or []) > 1:
        from bench.precision_runs import compare

        compare(sys.argv[1:], args.precision or [run_preset(args.preset).precision],
                args.fp8_recipe or [run_preset(args.preset).fp8_recipe], args.out)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = run_preset(args.preset)
    micro = args.micro_batch or cfg.batch.micro_batch
    accum = args.grad_accum or max(1, cfg.batch.global_batch // (cfg.batch.micro_batch * world))
    overrides = {"batch.micro_batch": micro, "batch.global_batch": args.global_batch or micro * world * accum,
                 "checkpoint.every_steps": 10**6, "milestones.fraction": 1.0, "metrics.system_metrics": False}
    if args.layers:
        overrides["model.n_layer"] = args.layers
    if args.activation_memory:
        overrides["activation_memory"] = args.activation_memory
    if args.compile:
        overrides["compile"] = args.compile == "on"
    if args.overlap_comm:
        overrides["zero.overlap_comm"] = args.overlap_comm == "on"
    if args.precision:
        overrides["precision"] = args.precision[0]
    if args.fp8_recipe:
        overrides["fp8_recipe"] = args.fp8_recipe[0]
    overrides.update(_key_values(args.set))
    cfg = with_overrides(cfg, overrides)
    cfg = with_overrides(cfg, {"token_budget": (args.steps + 1) * cfg.tokens_per_step,
                               "stop_at_step": args.steps})
    work = Path(args.workdir or tempfile.gettempdir()) / f"rwkv5-throughput-{args.preset}-{world}-{cfg.batch.global_batch}"
    data = work / "data"
    if rank == 0 and not (data / "manifest.json").exists():
        from data_prep.shards import write_token_dataset

        write_token_dataset(data, _documents(cfg.tokens_per_step * (args.steps + 2)), "synthetic-bench",
                            shard_tokens=100_000_000)
    while not (data / "manifest.json").exists():
        time.sleep(1)
    timer = PhaseTimer() if args.phases else StepRows()
    _reset_peak_memory()
    t0 = time.time()
    ds_overrides = _key_values(args.ds)
    with deepspeed_overrides(ds_overrides):
        train(TrainJob(cfg, f"bench-{time.time_ns()}" if world == 1 else "bench", str(data), str(work / "runs"),
                       callbacks=[timer], use_gpu=GPU), store=NoCheckpoints())
    wall = time.time() - t0
    peak = _peak_memory()
    if isinstance(timer, StepRows):
        peak = max(peak, timer.backward_peak, timer.step_peak)
    if rank != 0:
        return
    steady = timer.rows[args.warmup:]

    def med(key):
        return statistics.median(r[key] for r in steady if key in r)

    import deepspeed

    from rwkv5.wkv import default_backend

    from rwkv5.train.memory_plan import plan_memory

    step_s = med("step_time_s")
    phases = {p: med(f"{p}_s") for p in PHASES if args.phases} | {"data_wait": med("data_wait_s")}
    phases["other"] = max(0.0, step_s - sum(phases.values()))
    tokens_gpu = cfg.tokens_per_step / step_s / world
    card_gb = (torch.cuda.get_device_properties(0).total_memory if GPU
               else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 1e9
    device_name = torch.cuda.get_device_name(0) if GPU else "cpu"
    plan = plan_memory(cfg, world, card_gb)
    result = {
        "command": " ".join(["python3", *sys.argv]) if world == 1 else
        f"torchrun --nproc-per-node {world} " + " ".join(sys.argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "preset": args.preset, "gpus": world, "gpu": device_name, "card": card_slug("cuda" if GPU else "cpu"),
        "model": cfg.model.model_dump(), "batch": cfg.batch.model_dump(), "grad_accum": cfg.batch.grad_accum(world),
        "activation_memory": cfg.activation_memory, "compile": cfg.compile,
        "compile_s": next((r["compile_s"] for r in timer.rows if "compile_s" in r), None),
        "wkv_backend": default_backend("cuda" if GPU else "cpu"), "zero_stage": 2, "dtype": "bf16",
        "overlap_comm": cfg.zero.overlaps(world), "zero": cfg.zero.model_dump(),
        "deepspeed_overrides": ds_overrides,
        "precision": cfg.precision, "fp8_recipe": cfg.fp8_recipe if cfg.precision == "fp8" else None,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "steps_measured": len(steady), "step_time_s": step_s, "tokens_per_s_per_gpu": tokens_gpu,
        "mfu": med("mfu") if any("mfu" in r for r in steady) else None,
        "peak_memory_gb": peak / 1e9, "planned_peak_gb": plan.peak / 1e9,
        "plan_error": plan.peak / peak - 1 if peak else None,
        "measured_backward_peak_gb": getattr(timer, "backward_peak", 0) / 1e9,
        "measured_step_peak_gb": getattr(timer, "step_peak", 0) / 1e9,
        "plan": {k: v / 1e9 if isinstance(v, float) and v > 1e6 else v
                                                     for k, v in plan.as_dict().items()},
        "phases_s": phases, "phase_fraction": {k: v / step_s for k, v in phases.items()},
        "loss_first": timer.rows[0]["loss"], "loss_last": timer.rows[-1]["loss"], "wall_s": wall,
        "per_step": timer.rows,
    }
    print(f"\n{args.preset} L{cfg.model.n_layer} on {world} GPU(s): {tokens_gpu:,.0f} tokens/s/GPU, MFU "
          f"{result['mfu']}, step {step_s:.3f} s, compile {result['compile_s']} s, peak "
          f"{result['peak_memory_gb']:.2f} GB (plan {result['planned_peak_gb']:.2f} GB, "
          f"{result['plan_error'] or 0:+.1%})")
    print(f"{'phase':<10} {'s':>8} {'share':>7}")
    for name, seconds in phases.items():
        print(f"{name:<10} {seconds:>8.4f} {seconds / step_s:>7.1%}")
    depth = f"-L{args.layers}" if args.layers else ""
    out = Path(args.out or f"bench/results/train-{args.preset}{depth}-{world}gpu-{result['card']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, result)
    if args.blocks:  # after the training numbers are safe on disk: fla's first calls autotune for a while
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        from block_timing import time_blocks

        result["blocks"] = time_blocks(cfg.model, args.block_batch, cfg.batch.ctx_len)
        _write(out, result)


def _key_values(items: list[str]) -> dict:
    """`["a.b=1", "c=null"]` -> `{"a.b": 1, "c": None}`: JSON values, a bare word as a string."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _write(out: Path, result: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
