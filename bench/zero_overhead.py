"""What DeepSpeed ZeRO-2 runs per micro-batch to reduce gradients, counted for each candidate config (issue 28).

    python3 bench/zero_overhead.py                          # world size 1, then 2 (gloo), every candidate
    python3 bench/zero_overhead.py --ranks 1 --configs project deepspeed_default

The model has the 7b preset's shape at width 64: 8 layers, n_embd 64, vocab 1024 (V/C = 16, FFN 3.5 C as the
7B's), so every matrix is (64/4096)^2 of the 7B's and, with the bucket sizes scaled by the same factor
(`SCALE`), each bucket holds the same parameters as at 7b width with 8 layers (issue 28's profile). Vectors
(norms, mixes) are relatively larger here (they scale with C, matrices with C^2): they may shift a bucket edge.

Each config runs the real `train()` (DeepSpeed ZeRO-2 bf16 on gloo, CPU) for two steps of warm-up and one step
of `--grad-accum` micro-batches, counted (step 2: DeepSpeed's throughput timer starts synchronizing there).
DeepSpeed's per-micro-batch gradient path is wrapped in named ranges (`zero.hook`: the per-parameter gradient
hook, which copies the gradient into the bucket; `zero.reduce`: the bucket's scaling and collective;
`zero.partition_copy`: the reduced gradient copied into the partition buffer; `zero.epilogue`: the end of
backward, which adds it to the previous micro-batches' gradients), and every aten op dispatched inside them is
counted by a TorchDispatchMode and, as a cross-check, by torch.profiler (`prof copy_`: aten::copy_ calls):
- `copies`: copy_ / _to_copy / cat / clone that move data, `copy MB` the bytes written (a copy_ onto the same
  memory is a `no-op`: ATen returns early and launches nothing);
- `elemwise`: every other op that writes a tensor (add_, div_, mul_, ...), `elem MB` the bytes written;
- `colls`: c10d collectives, `wire MB` what a rank sends in a ring (all-reduce 2 (N-1)/N of the buffer);
- `syncs`: DeepSpeed's device synchronizations in the step (on the CPU only the unconditional ones).
Counts are per micro-batch and do not depend on the hardware: a GPU launches one kernel or memcpy per copy and
per elementwise op. MB are as at 7b width with 8 layers (bytes here / SCALE). CPU timings are not the point.
Writes `bench/results/zero-overhead-cpu.json` (per rank, per range, per micro-batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import ROOT, environment, write_record  # noqa: E402
from rwkv5.train.callbacks import Callback  # noqa: E402
from rwkv5.train.config import RunConfig, run_preset, with_overrides  # noqa: E402

__all__ = ["CANDIDATES", "SCALE", "ZeroOpCounter", "bench_config", "count_config", "deepspeed_overrides",
           "write_documents"]

WIDTH = 64
SCALE = (WIDTH / 4096) ** 2
"""Elements of any matrix here over the 7B's: bucket sizes given in 7B elements are multiplied by it."""

# Candidate configs: RunConfig overrides (`zero.*`; bucket sizes in 7B elements, scaled by SCALE here) and
# DeepSpeed config overrides (`ds`: dotted keys into the dict `deepspeed_config` builds; see
# `deepspeed_overrides`). All keep ZeRO stage 2: partitioned gradients and optimizer states.
CANDIDATES: dict[str, dict] = {
    # DeepSpeed 0.19.8's own defaults for stage 2: buckets of 5e8, no overlap, contiguous gradients,
    # reduce_scatter with use_multi_rank_bucket_allreduce, the synchronized throughput timer.
    "deepspeed_default": {"ds": {"zero_optimization": {"stage": 2}, "timers": None}},
    # The project's config before issue 28's change (main at c7e0794): DeepSpeed's reduce_scatter and timer.
    "project_before": {"ds": {"zero_optimization.reduce_scatter": True, "timers": None}},
    "project": {},  # ZeroConfig's defaults as the run presets have them
    "overlap_comm": {"zero": {"overlap_comm": True}},
    "bucket_5e7": {"zero": {"reduce_bucket_size": 50_000_000}},
    "bucket_1e8": {"zero": {"reduce_bucket_size": 100_000_000}},
    "bucket_2.6e8": {"zero": {"reduce_bucket_size": 260_000_000}},  # just below the embedding and head (2.68e8)
    "bucket_5e8": {"zero": {"reduce_bucket_size": 500_000_000}},
    "bucket_1e9": {"zero": {"reduce_bucket_size": 1_000_000_000}},
    "bucket_1.6e7": {"zero": {"reduce_bucket_size": 16_000_000}},  # below every matrix (C^2 = 1.68e7)
    "reduce_scatter": {"ds": {"zero_optimization.reduce_scatter": True}},
    "no_contiguous": {"ds": {"zero_optimization.contiguous_gradients": False}},
    "no_multi_rank_allreduce": {"ds": {"zero_optimization.reduce_scatter": True,
                                       "zero_optimization.use_multi_rank_bucket_allreduce": False}},
    "round_robin": {"ds": {"zero_optimization.round_robin_gradients": True}},
    "comm_fp32": {"ds": {"communication_data_type": "fp32"}},
    "grad_accum_fp32": {"ds": {"data_types": {"grad_accum_dtype": "fp32"}}},
    # Gradients summed by autograd where they are, reduced once per step (`engine.coalesce_grad_reduction()`).
    # The sums themselves (autograd's add_ into .grad, one per parameter from the second micro-batch on) fall
    # outside ZeRO's ranges and are not counted here: they replace the epilogue's.
    "reduce_once": {"zero": {"reduce_once_per_step": True}},
}

_COPIES = {"copy_", "_to_copy", "cat", "clone", "_copy_from", "_copy_from_and_resize"}
_ALLOCS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
# Bytes a rank sends per buffer byte in a ring collective, times (N - 1) / N: all-reduce = reduce-scatter +
# all-gather; a reduce to one rank moves each element once.
_WIRE = {"allreduce_": 2.0, "reduce_": 1.0, "reduce_scatter_": 1.0, "_reduce_scatter_base_": 1.0}
_RANGES = {  # ZeRO optimizer method -> range name; the innermost range owns an op
    "process_gradients": "zero.hook",
    "reduce_ready_partitions_and_remove_grads": "zero.hook",  # the once-per-step flush calls it per parameter
    "average_tensor": "zero.reduce",
    "buffered_reduce_fallback": "zero.reduce",
    "_buffered_reduce_fallback_preserving_fp32": "zero.reduce",
    "copy_grads_in_partition": "zero.partition_copy",
    "independent_gradient_partition_epilogue": "zero.epilogue",
}


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _same_memory(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """ATen's copy_ returns without work when source and destination are the same elements (Copy.cpp)."""
    return (dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
            and dst.storage_offset() == src.storage_offset() and dst.stride() == src.stride()
            and dst.shape == src.shape and dst.dtype == src.dtype)


class _Counting(TorchDispatchMode):
    """Counts aten/c10d ops dispatched while `stack` (range names) is not empty, under its innermost name."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.world = torch.distributed.get_world_size()
        self.micro = 0
        self.counts: dict[tuple[int, str], Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack:
            self._count(func, args, out)
        return out

    def _count(self, func, args, out) -> None:
        c = self.counts.setdefault((self.micro, self.stack[-1]), Counter())
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns == "c10d":
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            size = sum(_bytes(t) for t in tensors)
            c["collectives"] += 1
            c[f"collective:{name}"] += 1
            c["collective_bytes"] += size
            c["wire_bytes"] += size * _WIRE.get(name, 1.0) * (self.world - 1) / self.world
        elif ns != "aten" or func.is_view or name in ("detach", "alias", "lift_fresh"):
            return
        elif name in _ALLOCS:
            c["allocs"] += 1
            c["alloc_bytes"] += _bytes(out)
        elif name in _COPIES:
            if name == "copy_" and _same_memory(args[0], args[1]):
                c["noop_copies"] += 1
                return
            c["copies"] += 1
            c["copy_bytes"] += _bytes(args[0] if name == "copy_" else out)
        else:
            written = args[0] if name.endswith("_") and isinstance(args[0], torch.Tensor) else out
            c["elementwise"] += 1
            c[f"op:{name}"] += 1
            c["elementwise_bytes"] += _bytes(written)


class ZeroOpCounter(Callback):
    """Counts the ops of DeepSpeed ZeRO's gradient path in the micro-batches of step `step` (0-based).

    From step 2 on, DeepSpeed's throughput timer (when enabled) synchronizes the device in every forward and step,
    so the counted step is 2 by default. After training, `totals()` holds per-micro-batch means over the counted
    step and `per_micro_batch` the counts of each micro-batch; `device_syncs` counts DeepSpeed's
    `get_accelerator().synchronize()` calls in the whole step (on the CPU only the unconditional ones: those
    behind `resolves_data_dependency()`, as under overlap_comm, are skipped there).

    Args:
        step (int): the step counted. Default: 2.
        profile (bool): also run torch.profiler and count aten::copy_ calls inside the ranges (a cross-check).
            Default: True.
    """

    def __init__(self, step: int = 2, profile: bool = True):
        self.step, self.profile = step, profile
        self.stack: list[str] = []
        self.mode: _Counting | None = None
        self.prof = None
        self.counts: dict = {}
        self.micro_batches = 0
        self.profiler_copies = 0.0
        self.device_syncs = 0

    def pre_train(self, ctx) -> None:
        super().pre_train(ctx)
        from deepspeed.accelerator import get_accelerator

        opt, engine, accelerator = ctx.engine.optimizer, ctx.engine, get_accelerator()
        for method, name in _RANGES.items():
            if hasattr(opt, method):
                setattr(opt, method, self._ranged(name, getattr(opt, method)))
        backward, synchronize = engine.backward, accelerator.synchronize

        def counted_backward(*args, **kwargs):
            out = backward(*args, **kwargs)
            if self.mode is not None:
                self.mode.micro += 1
            return out

        def counted_synchronize(*args, **kwargs):
            self.device_syncs += self.mode is not None
            return synchronize(*args, **kwargs)

        engine.backward = counted_backward
        accelerator.synchronize = counted_synchronize
        self._restore = lambda: setattr(accelerator, "synchronize", synchronize)
        if self.step == 0:
            self._start()

    def _ranged(self, name: str, fn):
        def run(*args, **kwargs):
            self.stack.append(name)
            try:
                with torch.profiler.record_function(name):
                    return fn(*args, **kwargs)
            finally:
                self.stack.pop()

        return run

    def _start(self) -> None:
        if self.profile:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
        self.mode = _Counting(self.stack)
        self.mode.__enter__()

    def post_step(self, info, metrics) -> None:
        if info.step == self.step - 1:
            self._start()
        elif info.step == self.step and self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.micro_batches, self.counts, self.mode = self.mode.micro, self.mode.counts, None
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                copies = sum(e.name == "aten::copy_" and _in_range(e) for e in self.prof.events())
                self.profiler_copies, self.prof = copies / max(self.micro_batches, 1), None

    def close(self) -> None:
        if hasattr(self, "_restore"):
            self._restore()

    def _micro_of(self, micro: int) -> int:
        """Ops after the step's last backward (a reduction once per step flushes there) count to the last one."""
        return min(micro, self.micro_batches - 1)

    @property
    def per_micro_batch(self) -> list[dict]:
        out = [Counter() for _ in range(self.micro_batches)]
        for (micro, _), c in self.counts.items():
            out[self._micro_of(micro)].update(c)
        return [dict(c) for c in out]

    def totals(self) -> dict:
        """Per-micro-batch means: everything, then each range apart under `ranges`."""
        total, ranges = Counter(), {}
        for (_, name), c in self.counts.items():
            total.update(c)
            ranges.setdefault(name, Counter()).update(c)
        n = max(self.micro_batches, 1)

        def mean(c):
            return {k: v / n for k, v in sorted(c.items())}

        extra = {"device_syncs": self.device_syncs / n}
        if self.profile:
            extra["profiler_copy_calls"] = self.profiler_copies
        return {**mean(total), **extra, "ranges": {k: mean(v) for k, v in sorted(ranges.items())}}


def _in_range(event) -> bool:
    """Whether `event` was called by DeepSpeed inside a `zero.*` range: not from inside another aten op (a
    scalar's copy inside div_), nor the profiler's second record of it under the dispatch mode."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("zero."):
            return True
        if parent.name.startswith("aten::") or parent.name == "PythonDispatchMode":
            return False
        parent = parent.cpu_parent
    return False


@contextmanager
def deepspeed_overrides(settings: dict[str, Any]):
    """Within the block, `rwkv5.train.worker.deepspeed_config` returns its dict with `settings` applied.

    Keys are dotted paths into that dict (`"zero_optimization.reduce_scatter"`); a value of None deletes the key
    (so DeepSpeed's default applies). Benchmarks only: runs keep to `RunConfig`.
    """
    from rwkv5.train import worker

    real = worker.deepspeed_config

    def patched(*args, **kwargs):
        ds = copy.deepcopy(real(*args, **kwargs))
        for dotted, value in settings.items():
            *path, key = dotted.split(".")
            node = ds
            for part in path:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(key, None)
            else:
                node[key] = copy.deepcopy(value)
        patched.last = ds
        return ds

    worker.deepspeed_config = patched
    try:
        yield patched
    finally:
        worker.deepspeed_config = real


def bench_config(grad_accum: int, ranks: int) -> RunConfig:
    """The 7b preset at width 64 (see the module docstring), micro-batch 1, `grad_accum` micro-batches a step."""
    cfg = run_preset("7b")
    z = cfg.zero
    return with_overrides(cfg, {
        "model.n_layer": 8, "model.n_embd": WIDTH, "model.head_size": 32, "model.vocab_size": 1024,
        "model.dim_ffn": int(3.5 * WIDTH), "batch.ctx_len": 16, "batch.micro_batch": 1,
        "batch.global_batch": grad_accum * ranks, "token_budget": 4 * grad_accum * ranks * 16,
        "checkpoint.every_steps": 10**6, "milestones.fraction": 1.0, "metrics.system_metrics": False,
        "stop_at_step": 3, "compile": False, "activation_memory": "none",
        "zero.reduce_bucket_size": _scaled(z.reduce_bucket_size),
        "zero.allgather_bucket_size": _scaled(z.allgather_bucket_size),
    })


def write_documents(path: Path, tokens: int = 20_000) -> Path:
    """A token dataset with ids below 1024 (the bench model's vocabulary)."""
    from data_prep.shards import write_token_dataset

    rng = np.random.default_rng(0)

    def docs():
        written = 0
        while written < tokens:
            start, step, length = rng.integers(1, 1000), rng.integers(1, 7), rng.integers(50, 400)
            written += length + 1
            yield np.append((start + step * np.arange(length)) % 1020 + 1, 0).astype(np.uint16)

    write_token_dataset(path, docs(), "synthetic-zero-bench", shard_tokens=10**8)
    return path


def count_config(name: str, data: Path, work: Path, grad_accum: int = 4, ranks: int = 1,
                 profile: bool = True) -> dict:
    """Train the bench model under candidate `name` (a key of CANDIDATES) and count its ZeRO ops per micro-batch."""
    from rwkv5.train import worker

    spec = CANDIDATES[name]
    cfg = bench_config(grad_accum, ranks)
    cfg = with_overrides(cfg, {f"zero.{k}": _scaled(v) if k.endswith("bucket_size") else v
                               for k, v in spec.get("zero", {}).items()})
    counter = ZeroOpCounter(profile=profile)
    with deepspeed_overrides(spec.get("ds", {})) as ds:
        worker.train(worker.TrainJob(cfg, f"zero-{name}-{time.time_ns()}", str(data), str(work),
                                     callbacks=[counter], use_gpu=False))
    keep = ("zero_optimization", "timers", "communication_data_type", "data_types")
    return {"config": name, "deepspeed": {k: ds.last[k] for k in keep if k in ds.last},
            "micro_batches": counter.micro_batches, "per_micro_batch_mean": counter.totals(),
            "per_micro_batch": counter.per_micro_batch}


def _scaled(elements: int) -> int:
    """A bucket size in 7B elements at this width (even: DeepSpeed's all-gather alignment)."""
    return max(2, int(elements * SCALE) // 2 * 2)


_COLUMNS = [("copies", "copies"), ("copy_bytes", "copy MB"), ("noop_copies", "no-op"),
            ("elementwise", "elemwise"), ("elementwise_bytes", "elem MB"), ("collectives", "colls"),
            ("wire_bytes", "wire MB"), ("device_syncs", "syncs"), ("profiler_copy_calls", "prof copy_")]


def format_table(rows: list[dict], ranks: int) -> str:
    """One line per config: per-micro-batch means; MB as at 7b width, 8 layers (bytes here / SCALE / 1e6)."""
    lines = [f"{'world ' + str(ranks):<24}" + "".join(f"{label:>11}" for _, label in _COLUMNS)]
    for row in rows:
        m = row["per_micro_batch_mean"]
        cells = [f"{m.get(key, 0.0) / SCALE / 1e6:11.0f}" if key.endswith("bytes") else f"{m.get(key, 0.0):11.1f}"
                 for key, _ in _COLUMNS]
        lines.append(f"{row['config']:<24}" + "".join(cells))
    return "\n".join(lines)


def _worker(args) -> None:
    """One rank of a torchrun launch: every config in turn; rank 0 writes what all ranks counted."""
    import torch.distributed as dist

    rows = [count_config(name, Path(args.data), Path(args.work) / "runs", args.grad_accum,
                         int(os.environ["WORLD_SIZE"]), profile=not args.no_profiler)
            for name in args.configs]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps(gathered))


def _run_ranks(args, data: Path, work: Path, ranks: int) -> list[list[dict]]:
    from rwkv5.train.worker import _free_port

    out = work / f"ranks{ranks}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(_free_port()), __file__, "--worker", "--worker-out", str(out), "--data", str(data), "--work", str(work),
           "--ranks", str(ranks), "--grad-accum", str(args.grad_accum), "--configs", *args.configs]
    if args.no_profiler:
        cmd.append("--no-profiler")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes (gloo processes)")
    ap.add_argument("--configs", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches in the counted step")
    ap.add_argument("--no-profiler", action="store_true", help="count without torch.profiler's cross-check")
    ap.add_argument("--out", default=str(ROOT / "bench/results/zero-overhead-cpu.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    record = environment("cpu", __file__, sys.argv[1:] if argv is None else argv)
    import deepspeed

    record.update({"deepspeed": deepspeed.__version__, "scale": SCALE, "grad_accum": args.grad_accum,
                   "model": bench_config(args.grad_accum, 1).model.model_dump(), "candidates": CANDIDATES,
                   "worlds": {}})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_documents(work / "data")
        for ranks in args.ranks:
            if ranks == 1:
                per_rank = [[count_config(name, data, work / "runs", args.grad_accum, profile=not args.no_profiler)
                             for name in args.configs]]
            else:
                per_rank = _run_ranks(args, data, work, ranks)
            record["worlds"][str(ranks)] = per_rank
            print(format_table(per_rank[0], ranks) + ("  (rank 0)" if ranks > 1 else ""))
    write_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
