"""Where a training step's time goes (issue 28): one torch.profiler trace of a real `train()` step and one of the
compiled block alone, each broken down by category, per micro-batch.

    python3 bench/profile_step.py --layers 8 --grad-accum 4        # 7b width, 8 layers; then the block alone
    python3 bench/profile_step.py --device cpu --tiny               # smoke run (CPU: aten ops instead of kernels)
    python3 bench/profile_step.py --from-trace bench/results/profile-7b-L8-h100-step.json.gz --grad-accum 4
                                    # the breakdown of a trace already written (a run that ended after its trace)

Categories of device time (GPU kernels; on the CPU the self time of aten ops), first by the named range an event
falls in, then by its name:
- `optimizer`: FusedAdam's kernels inside `rwkv5.optimizer_step` (`rwkv5/train/worker.py`);
- `zero_bookkeeping`: everything else inside the optimizer step (flattening, fp32 copies, norm, clipping,
  copy-back), DeepSpeed's gradient reduce (`rwkv5.zero_reduce`, wrapped here) and any NCCL kernel;
- `head_loss`: inside `rwkv5.head_loss` (`rwkv5/model.py`: ln_out, head, chunked loss and its gradient);
- `block_wkv`, `block_matmul`, `block_elementwise` (Triton kernels of the compiled blocks): the blocks' own work;
- `other`: the rest (eager aten kernels outside the ranges: embedding, gradient hooks' copies, zeroing);
- `idle`: the window's span minus the union of device work: launch gaps, host syncs, allocator stalls. The
  host's time in cudaMalloc/cudaFree and in synchronisations is reported beside it.
Traces go to `<out-dir>/profile-<preset>-L<layers>-<card>-{step,block}.json.gz` (only device events and
ranges when the full trace compresses beyond 4.5 MB) and the breakdown to `...-profile.json`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import ROOT, card_slug, environment, write_record  # noqa: E402
from rwkv5.train.callbacks import Callback  # noqa: E402
from rwkv5.train.config import RunConfig, with_overrides  # noqa: E402

__all__ = ["breakdown", "category", "ProfileStep", "profile_block"]

_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
_MATMUL = re.compile(r"gemm|xmma|cutlass|nvjet|cublas|sm90_|sm80_|aten::(mm|addmm|bmm|matmul|linear)\b")
_COMMS = re.compile(r"nccl|reduce_scatter|all_gather|allreduce|all_reduce")
_ALLOC = {"cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync", "cudaHostAlloc"}
_SYNC = re.compile(r"^cuda(Stream|Device|Event)Synchronize$")
MAX_TRACE_BYTES = 4_500_000


def category(name: str, in_range: str | None) -> str:
    """The category of one device event called `name`, inside the innermost `rwkv5.*` range `in_range`."""
    low = name.lower()
    if in_range == "rwkv5.optimizer_step":
        return "optimizer" if ("adam" in low or "multi_tensor" in low) else "zero_bookkeeping"
    if in_range == "rwkv5.zero_reduce" or _COMMS.search(low):
        return "zero_bookkeeping"
    if in_range == "rwkv5.head_loss":
        return "head_loss"
    if "wkv" in low:
        return "block_wkv"
    if _MATMUL.search(low):
        return "block_matmul"
    if low.startswith("triton_") or "triton" in low:
        return "block_elementwise"
    return "other"


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, duration minus that of events nested in it on the same thread): for CPU ops, which nest."""
    out = []
    by_thread: dict = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, self time]
        for e in evs:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                out.append(tuple(stack.pop()))
            if stack:
                stack[-1][1] -= e["dur"]
            stack.append([e, float(e["dur"])])
        out += [tuple(s) for s in stack]
    return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def breakdown(trace: dict, micro_batches: int) -> dict:
    """Milliseconds per micro-batch by category from a Chrome trace (`torch.profiler` export) of that many.

    Device events are GPU kernels, copies and sets when the trace has any, else the CPU's aten ops (self time).
    """
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    work = [(e, float(e["dur"])) for e in evs if e.get("cat") in _DEVICE_CATS]
    range_cat = "gpu_user_annotation"
    if not work:
        work = [(e, t) for e, t in _self_times([e for e in evs if e.get("cat") == "cpu_op"])]
        range_cat = "user_annotation"
    ranges = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in evs
                     if e.get("cat") == range_cat and str(e.get("name", "")).startswith("rwkv5.")),
                    key=lambda r: r[1] - r[0])  # innermost (shortest) first
    totals: dict[str, float] = {}
    for e, self_us in work:
        inside = next((name for s, end, name in ranges if s <= e["ts"] < end), None)
        cat = category(e["name"], inside)
        totals[cat] = totals.get(cat, 0.0) + self_us
    spans = [(e["ts"], e["ts"] + e["dur"]) for e, _ in work]
    span_us = (max(s[1] for s in spans) - min(s[0] for s in spans)) if spans else 0.0
    busy_us = _union_us(spans)
    totals["idle"] = max(0.0, span_us - busy_us)
    runtime = [e for e in evs if e.get("cat") == "cuda_runtime"]
    per = 1e3 * micro_batches  # microseconds -> milliseconds per micro-batch
    return {
        "micro_batches": micro_batches,
        "span_ms": span_us / per,
        "busy_ms": busy_us / per,
        "ms": {k: v / per for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "share": {k: v / span_us if span_us else 0.0 for k, v in totals.items()},
        "host_allocator_ms": sum(e["dur"] for e in runtime if e["name"] in _ALLOC) / per,
        "host_sync_ms": sum(e["dur"] for e in runtime if _SYNC.match(e["name"])) / per,
    }


def _save_trace(prof, path: Path) -> dict:
    """Export `prof`'s trace gzipped at `path` (only device events and ranges if the whole is too large)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
    data = gzip.compress(json.dumps(trace).encode())
    if len(data) > MAX_TRACE_BYTES:
        keep = _DEVICE_CATS | {"gpu_user_annotation", "user_annotation"}
        slim = {**trace, "traceEvents": [e for e in trace["traceEvents"] if e.get("cat") in keep or e.get("ph") == "M"]}
        data = gzip.compress(json.dumps(slim).encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path} ({len(data) / 1e6:.2f} MB)")
    return trace


def _activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _ranged(name: str, fn):
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return run


class ProfileStep(Callback):
    """Profiles training step `step` (all its micro-batches and its optimizer step) into `path`."""

    def __init__(self, step: int, path: Path, device: torch.device):
        self.step, self.path, self.device = step, path, device
        self.prof = None
        self.trace: dict | None = None

    def pre_train(self, ctx):
        super().pre_train(ctx)
        opt = ctx.engine.optimizer
        for name in ("reduce_ipg_grads", "reduce_independent_p_g_buckets_and_remove_grads"):
            if hasattr(opt, name):  # DeepSpeed ZeRO-2's gradient hooks: their copies and reduces, named
                setattr(opt, name, _ranged("rwkv5.zero_reduce", getattr(opt, name)))
        if self.step == 0:
            self._start()

    def _start(self):
        self.prof = torch.profiler.profile(activities=_activities(self.device))
        self.prof.__enter__()

    def post_step(self, info, metrics):
        if info.step == self.step - 1:
            self._start()
        elif info.step == self.step and self.prof is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.__exit__(None, None, None)
            self.trace = _save_trace(self.prof, self.path)
            self.prof = None


def profile_block(cfg: RunConfig, device: torch.device, path: Path, iters: int = 2) -> dict:
    """Trace of `iters` forward + backward calls of one compiled Block at the run's micro-batch shape."""
    from rwkv5.model import Block

    dtype = torch.bfloat16
    block = Block(cfg.model, 1, cfg.activation_memory).to(device, dtype).train()
    if device.type == "cuda" and cfg.compile:
        block.compile(dynamic=False)
    x = torch.randn(cfg.batch.micro_batch, cfg.batch.ctx_len, cfg.model.n_embd, device=device, dtype=dtype)
    dy = torch.randn_like(x)

    def run():
        xi = x.detach().requires_grad_()
        block(xi)[0].backward(dy)

    for _ in range(3):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=_activities(device)) as prof:
        for _ in range(iters):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return breakdown(_save_trace(prof, path), iters)


def _print(title: str, b: dict) -> None:
    print(f"\n{title}: {b['span_ms']:.2f} ms per micro-batch ({b['busy_ms']:.2f} busy); host allocator "
          f"{b['host_allocator_ms']:.2f} ms, host sync {b['host_sync_ms']:.2f} ms")
    for k, v in b["ms"].items():
        print(f"  {k:<18} {v:9.3f} ms  {b['share'][k]:6.1%}")


def breakdown_file(trace_path: Path, micro_batches: int, out_dir: Path, argv: list[str]) -> dict:
    """The step breakdown of a trace this script wrote, as `<stem>-profile.json` in `out_dir` (without the block
    profile): for a run that wrote its trace and ended before its breakdown (session 15 on the H100)."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    stem = trace_path.name.removesuffix(".json.gz").removesuffix("-step")
    record = environment("cpu", __file__, argv) | {"from_trace": trace_path.name, "grad_accum": micro_batches}
    record["step"] = breakdown(trace, micro_batches)
    record["step_trace"] = trace_path.name
    _print(f"{trace_path.name}, {micro_batches} micro-batches", record["step"])
    write_record(out_dir / f"{stem}-profile.json", record)
    return record


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches in the profiled step")
    ap.add_argument("--activation-memory", choices=("none", "selective", "full"), default=None)
    ap.add_argument("--step", type=int, default=2, help="the step profiled (earlier ones warm up and compile)")
    ap.add_argument("--no-block", action="store_true", help="skip the block-alone profile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny width (CPU smoke run)")
    ap.add_argument("--out-dir", default=str(ROOT / "bench/results"))
    ap.add_argument("--from-trace", default=None,
                    help="only break down this step trace (.json.gz) into <out-dir>/<its stem>-profile.json; "
                         "--grad-accum: its micro-batches")
    args = ap.parse_args(argv)
    if args.from_trace:
        return breakdown_file(Path(args.from_trace), args.grad_accum, Path(args.out_dir),
                              sys.argv[1:] if argv is None else argv)
    from bench.train_throughput import _documents
    from bench.whole_model import device_and_preset
    from rwkv5.train.worker import TrainJob, train

    device, cfg = device_and_preset(ap, args)
    micro = cfg.batch.micro_batch
    overrides = {"model.n_layer": args.layers if not args.tiny else cfg.model.n_layer,
                 "batch.global_batch": micro * args.grad_accum, "checkpoint.every_steps": 10**6,
                 "milestones.fraction": 1.0, "metrics.system_metrics": False, "stop_at_step": args.step + 1}
    if args.activation_memory:
        overrides["activation_memory"] = args.activation_memory
    cfg = with_overrides(cfg, overrides)
    cfg = with_overrides(cfg, {"token_budget": (args.step + 2) * cfg.tokens_per_step})
    stem = f"profile-{args.preset}{'-tiny' if args.tiny else ''}-L{cfg.model.n_layer}-{card_slug(device)}"
    out_dir = Path(args.out_dir)
    record = environment(device, __file__, sys.argv[1:] if argv is None else argv)
    record.update({"preset": args.preset, "model": cfg.model.model_dump(), "micro_batch": micro,
                   "ctx_len": cfg.batch.ctx_len, "grad_accum": args.grad_accum,
                   "activation_memory": cfg.activation_memory, "compile": cfg.compile and device.type == "cuda"})
    with tempfile.TemporaryDirectory() as work:
        from data_prep.shards import write_token_dataset

        data = Path(work) / "data"
        write_token_dataset(data, _documents(cfg.tokens_per_step * (args.step + 3)), "synthetic-bench",
                            shard_tokens=100_000_000)
        cb = ProfileStep(args.step, out_dir / f"{stem}-step.json.gz", device)
        t0 = time.perf_counter()
        train(TrainJob(cfg, f"profile-{time.time_ns()}", str(data), str(Path(work) / "runs"), callbacks=[cb],
                       use_gpu=device.type == "cuda"))
        record["train_wall_s"] = time.perf_counter() - t0
    record["step"] = breakdown(cb.trace, args.grad_accum)
    record["step_trace"] = f"{stem}-step.json.gz"
    _print(f"train() step {args.step}, {args.grad_accum} micro-batches", record["step"])
    write_record(out_dir / f"{stem}-profile.json", record)
    if not args.no_block:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record["block"] = profile_block(cfg, device, out_dir / f"{stem}-block.json.gz")
        record["block_trace"] = f"{stem}-block.json.gz"
        _print("one block alone (x1 per micro-batch shape)", record["block"])
        blocks = record["block"]["span_ms"] * cfg.model.n_layer
        record["gap"] = {"blocks_ms": blocks, "step_ms": record["step"]["span_ms"],
                         "blocks_share_of_step": blocks / record["step"]["span_ms"]}
        print(f"\n{cfg.model.n_layer} blocks alone: {blocks:.2f} ms of the step's {record['step']['span_ms']:.2f} ms "
              f"per micro-batch ({record['gap']['blocks_share_of_step']:.1%})")
        write_record(out_dir / f"{stem}-profile.json", record)
    return record


if __name__ == "__main__":
    main()
