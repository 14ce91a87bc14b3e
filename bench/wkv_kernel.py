"""Times the WKV5 CUDA kernel against flash-linear-attention's chunk_rwkv6 and our PyTorch chunked path.

    python bench/wkv_kernel.py --out bench/results/wkv_kernel-h200.json

Per shape (B, T, C, H): forward and forward+backward, median of many CUDA-event timings after warm-up,
inputs bf16; ours once as one sweep per (batch, head) and, where `RWKV5_WKV_SPLITS=auto` cuts the sequence
into pieces (small B*H), once more split (columns "split"); the backward returns the gradients of r, k, v,
time_decay, time_faaaa (torch.autograd.grad: no accumulation into .grad). fla gets w = -exp(time_decay) broadcast over
time (materialised once, outside the timing), scale=1.0, u = time_faaaa. The floor is the bytes each pass
must move (fwd: r, k, v read and y written; bwd: r, k, v, dy read and dr, dk, dv written) over the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.wkv5 import chunk_wkv5  # noqa: E402

SHAPES = [(8, 4096, 4096, 64), (4, 4096, 4096, 64), (1, 16384, 4096, 64), (1, 131072, 4096, 64),
          (16, 2048, 2048, 32)]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_time(fn, warmup: int, reps: int, budget_s: float = 20.0) -> float:
    """Median milliseconds of fn() over up to `reps` runs (fewer if they exceed `budget_s`)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, start = [], time.time()
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if time.time() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), 3, 20)
    return 2 * x.numel() / (ms * 1e-3)


def make(B, T, C, H, device="cuda"):
    N = C // H
    g = torch.Generator(device=device).manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, device=device, generator=g).bfloat16().requires_grad_() for _ in range(3))
    w = torch.empty(H, N, device=device).uniform_(-6.0, 1.0, generator=g).requires_grad_()
    u = (torch.randn(H, N, device=device, generator=g) * 0.5).requires_grad_()
    dy = torch.randn(B, T, H, N, device=device, generator=g).bfloat16()
    return r, k, v, w, u, dy


def with_env(settings: dict[str, str], fn):
    """Call fn() with environment variables set, restoring them after."""
    saved = {n: os.environ.get(n) for n in settings}
    os.environ.update(settings)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ours_fns(r, k, v, w, u, dy):
    """Our forward alone (no autograd graph) and forward+backward (gradients of r, k, v, w, u), as closures."""
    from kernels.wkv5.cuda import cuda_wkv5

    def fwd():
        with torch.no_grad():
            cuda_wkv5(r, k, v, w, u)

    def fwd_bwd():
        y, _ = cuda_wkv5(r, k, v, w, u)
        torch.autograd.grad(y, (r, k, v, w, u), dy)

    return fwd, fwd_bwd


def bench_shape(shape, fla_fn, warmup, reps, variants=(), with_torch=True):
    from kernels.wkv5.cuda import default_splits

    B, T, C, H = shape
    r, k, v, w, u, dy = make(*shape)
    row = {"B": B, "T": T, "C": C, "H": H}
    elems = B * T * C
    row["bytes_fwd"] = elems * 2 * 4
    row["bytes_fwd_bwd"] = elems * 2 * 4 + elems * 2 * 7

    ours_fwd, ours_fwd_bwd = ours_fns(r, k, v, w, u, dy)
    one_sweep = {"RWKV5_WKV_SPLITS": "1"}
    row["ours_fwd_ms"] = with_env(one_sweep, lambda: cuda_time(ours_fwd, warmup, reps))
    row["ours_fwd_bwd_ms"] = with_env(one_sweep, lambda: cuda_time(ours_fwd_bwd, warmup, reps))
    auto = {"RWKV5_WKV_SPLITS": "auto"}
    splits = with_env(auto, lambda: (default_splits(B * H, T, r.device), default_splits(B * H, T, r.device, True)))
    if max(splits) > 1:
        row["splits_fwd"], row["splits_bwd"] = splits
        row["ours_split_fwd_ms"] = with_env(auto, lambda: cuda_time(ours_fwd, warmup, reps))
        row["ours_split_fwd_bwd_ms"] = with_env(auto, lambda: cuda_time(ours_fwd_bwd, warmup, reps))
    for variant in variants:  # "fwd_chunk:bwd_chunk[:splits[:bwd_splits]]", through the same entry point
        fwd_chunk, bwd_chunk, *rest = variant.split(":")
        env = {"RWKV5_WKV_CHUNK": fwd_chunk, "RWKV5_WKV_BWD_CHUNK": bwd_chunk,
               "RWKV5_WKV_SPLITS": rest[0] if rest else "1",
               "RWKV5_WKV_BWD_SPLITS": rest[1] if len(rest) > 1 else (rest[0] if rest else "1")}
        row[f"ours_fwd_ms@{variant}"] = with_env(env, lambda: cuda_time(ours_fwd, warmup, reps))
        row[f"ours_fwd_bwd_ms@{variant}"] = with_env(env, lambda: cuda_time(ours_fwd_bwd, warmup, reps))

    if fla_fn is not None:
        w_log = (-torch.exp(w.detach())).expand(B, T, H, C // H).contiguous().requires_grad_()
        u_fla = u.detach().clone().requires_grad_()

        def fla_fwd():
            with torch.no_grad():
                fla_fn(r, k, v, w_log, u_fla, scale=1.0, output_final_state=True)

        def fla_fwd_bwd():
            o, _ = fla_fn(r, k, v, w_log, u_fla, scale=1.0, output_final_state=True)
            torch.autograd.grad(o, (r, k, v, w_log, u_fla), dy)

        try:
            row["fla_fwd_ms"] = cuda_time(fla_fwd, warmup, reps)
            row["fla_fwd_bwd_ms"] = cuda_time(fla_fwd_bwd, warmup, reps)
        except Exception as exc:  # report and keep timing the other variants
            row["fla_error"] = repr(exc)[:300]
        del w_log, u_fla

    if with_torch and B * T <= 32768:

        def torch_fwd_bwd():
            y, _ = chunk_wkv5(r, k, v, w, u)
            torch.autograd.grad(y, (r, k, v, w, u), dy)

        def torch_fwd():
            with torch.no_grad():
                chunk_wkv5(r, k, v, w, u)

        row["torch_fwd_ms"] = cuda_time(torch_fwd, 1, 3)
        row["torch_fwd_bwd_ms"] = cuda_time(torch_fwd_bwd, 1, 3)
    elif with_torch:
        row["torch_skipped"] = "B*T > 32768: its Python loop over chunks takes seconds per call"
    return row


def kernel_times(shape, splits: str, reps: int = 5) -> dict[str, float]:
    """Mean device milliseconds per forward+backward of each CUDA kernel ours launches (torch.profiler).

    Splits the measured time between pass 1, the scans and pass 2 of each sweep, which the end-to-end
    timings cannot.
    """
    from torch.profiler import ProfilerActivity, profile

    from kernels.wkv5.cuda import cuda_wkv5

    r, k, v, w, u, dy = make(*shape)

    def step():
        y, _ = cuda_wkv5(r, k, v, w, u)
        torch.autograd.grad(y, (r, k, v, w, u), dy)

    def profiled():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
        return prof

    prof = with_env({"RWKV5_WKV_SPLITS": splits}, profiled)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[event.key[:90]] = event.device_time_total / reps / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_once(shape) -> None:
    """One warm-up forward+backward, then one more: the second is what `ncu -s 3 -c 3` records."""
    from kernels.wkv5.cuda import cuda_wkv5

    r, k, v, w, u, dy = make(*shape)
    for _ in range(2):
        y, _ = cuda_wkv5(r, k, v, w, u)
        torch.autograd.grad(y, (r, k, v, w, u), dy)
    torch.cuda.synchronize()


def alternate(shapes, setting: str, rounds: int, out: Path) -> None:
    """Times ours with an environment variable at each of several values, interleaved round by round.

    `setting` is NAME=V1,V2,...: every round times each value (median of 10 calls after 2 warm-ups), so slow
    drifts of the card (clocks, temperature) hit every value alike; the result is the median over rounds.
    """
    name, values = setting.split("=", 1)
    values = values.split(",")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "driver": _driver_version(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "setting": name, "rows": []}
    for shape in shapes:
        fwd, fwd_bwd = ours_fns(*make(*shape))
        samples = {(val, what): [] for val in values for what in ("fwd", "fwd_bwd")}
        for _ in range(rounds):
            for val in values:
                for what, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    samples[(val, what)].append(with_env({name: val}, lambda: cuda_time(fn, 2, 10)))
        row = {"B": shape[0], "T": shape[1], "C": shape[2], "H": shape[3]}
        for (val, what), times in samples.items():
            row[f"{what}_ms@{name}={val}"] = statistics.median(times)
            row[f"{what}_samples@{name}={val}"] = times
        result["rows"].append(row)
        print(",".join(map(str, shape)), " ".join(f"{key}={ms:.3f}" for key, ms in row.items() if "_ms@" in key),
              flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def compare(old_path: str, new_path: str) -> None:
    """Prints every time measured in both result files (same keys) with the ratio new / old."""
    old, new = json.loads(Path(old_path).read_text()), json.loads(Path(new_path).read_text())
    print(f"{'shape':>18} {'time':>28} {'old ms':>8} {'new ms':>8} {'new/old':>7}")
    for row_new in new["rows"]:
        shape = (row_new["B"], row_new["T"], row_new["C"], row_new["H"])
        row_old = next((r for r in old["rows"] if (r["B"], r["T"], r["C"], r["H"]) == shape), {})
        for key, ms in row_new.items():
            if "_ms" not in key or key.startswith("floor"):
                continue
            was = row_old.get(key)
            ratio = f"{ms / was:7.3f}" if was else ""
            print(f"{','.join(map(str, shape)):>18} {key:>28} {was or float('nan'):8.3f} {ms:8.3f} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/wkv_kernel-h200.json")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--shapes", default="all", help="'all' or indices into SHAPES, e.g. 0,2")
    parser.add_argument("--variants", default="",
                        help="extra settings to time as fwd_chunk:bwd_chunk[:splits], e.g. 32:32,64:32:4")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch chunked path")
    parser.add_argument("--no-fla", action="store_true",
                        help="skip fla (its first calls compile and autotune for minutes): ours only, to compare versions")
    parser.add_argument("--kernels", default="",
                        help="instead of timing, list each kernel's time per fwd+bwd under these RWKV5_WKV_SPLITS "
                             "settings, e.g. 1,auto")
    parser.add_argument("--profile-once", type=int, default=None, metavar="SHAPE",
                        help="run two forward+backward passes at SHAPES[SHAPE] and exit (for ncu)")
    parser.add_argument("--alternate", metavar="NAME=V1,V2",
                        help="time ours at each value of an environment variable, interleaved over --rounds rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                        help="print the times of two result files side by side and exit")
    args = parser.parse_args()
    if args.profile_once is not None:
        profile_once(SHAPES[args.profile_once])
        return
    if args.compare:
        compare(*args.compare)
        return
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.alternate:
        alternate(shapes, args.alternate, args.rounds, Path(args.out))
        return
    if args.kernels:
        for shape in shapes:
            for splits in args.kernels.split(","):
                print(f"{shape} RWKV5_WKV_SPLITS={splits}: ms per fwd+bwd by kernel")
                for name, ms in kernel_times(shape, splits).items():
                    print(f"  {ms:8.3f}  {name}")
        return

    fla_fn = None
    if not args.no_fla:
        try:
            from fla.ops.rwkv6 import chunk_rwkv6 as fla_fn
        except ImportError as exc:
            print(f"fla not importable ({exc}); timing ours and the PyTorch path only")
    bw = copy_bandwidth()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fla": _version("fla-core") if fla_fn is not None else None,
        "chunk_env": os.environ.get("RWKV5_WKV_CHUNK"),
        "driver": _driver_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "copy_bandwidth_bytes_per_s": bw,
        "rows": [],
    }
    rows = result["rows"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        variants = [v for v in args.variants.split(",") if v]
        row = bench_shape(shape, fla_fn, args.warmup, args.reps, variants, not args.no_torch)
        row["floor_fwd_ms"] = row["bytes_fwd"] / bw * 1e3
        row["floor_fwd_bwd_ms"] = row["bytes_fwd_bwd"] / bw * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
        tmp = out.with_suffix(".tmp")  # rewritten after every shape: a cut-off run keeps what it measured
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)
        torch.cuda.empty_cache()

    nan = float("nan")
    header = (f"{'B,T,C,H':>20} {'ours fwd':>9} {'split':>7} {'fla fwd':>8} {'x':>5} {'ours f+b':>9} {'split':>7}"
              f" {'fla f+b':>8} {'x':>5} {'torch f+b':>10} {'floor f':>8} {'floor f+b':>9}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; times in ms; split = RWKV5_WKV_SPLITS=auto where it splits;"
          f" x = fla / (the faster of ours); floor = byte floor / (the faster of ours)")
    print(header)
    for row in rows:
        fla_f, fla_fb = row.get("fla_fwd_ms", nan), row.get("fla_fwd_bwd_ms", nan)
        split_f, split_fb = row.get("ours_split_fwd_ms", nan), row.get("ours_split_fwd_bwd_ms", nan)
        best_f = min(row["ours_fwd_ms"], split_f) if split_f == split_f else row["ours_fwd_ms"]
        best_fb = min(row["ours_fwd_bwd_ms"], split_fb) if split_fb == split_fb else row["ours_fwd_bwd_ms"]
        shape = f"{row['B']},{row['T']},{row['C']},{row['H']}"
        print(f"{shape:>20} {row['ours_fwd_ms']:9.3f} {split_f:7.3f} {fla_f:8.3f} {fla_f / best_f:5.2f} "
              f"{row['ours_fwd_bwd_ms']:9.3f} {split_fb:7.3f} {fla_fb:8.3f} {fla_fb / best_fb:5.2f} "
              f"{row.get('torch_fwd_bwd_ms', nan):10.2f} "
              f"{row['floor_fwd_ms'] / best_f:8.2f} {row['floor_fwd_bwd_ms'] / best_fb:9.2f}")


if __name__ == "__main__":
    main()
