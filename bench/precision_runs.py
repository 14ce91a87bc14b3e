"""`bench/train_throughput.py --precision bf16 fp8 [--fp8-recipe tensorwise rowwise]`: one run per precision (and
fp8 recipe), each a child process with the same arguments otherwise, so each has its own peak memory, compile
and allocator; the record holds each run and `fp8_speedup`, fp8's tokens/s over bf16's (the first recipe
listed; `fp8_speedup_by_recipe` for each). A child's stderr passes through; when a run fails, its last 40 lines
are printed again after it, unfiltered, between `== <label> failed` and `== end of <label>'s stderr` (a device
script's filter of the whole log must not swallow the traceback), the record lists it under `failed` and the
parent exits non-zero."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from bench.record import ROOT, write_record

__all__ = ["run_labels", "strip_options", "merge", "run_child", "compare"]

_OWN = ("--precision", "--fp8-recipe", "--out")
TAIL_LINES = 40


def run_labels(precisions: list[str], recipes: list[str]) -> list[tuple[str, str, str]]:
    """(label, precision, recipe) per run: bf16 once, fp8 once per recipe ("fp8" alone for one recipe)."""
    runs = []
    for precision in dict.fromkeys(precisions):
        if precision == "bf16":
            runs.append(("bf16", "bf16", recipes[0]))
        else:
            runs += [(f"fp8-{r}" if len(recipes) > 1 else "fp8", "fp8", r) for r in recipes]
    return runs


def strip_options(argv: list[str], names=_OWN) -> list[str]:
    """`argv` without the options in `names` and their values (`--name v1 v2` and `--name=v`)."""
    out, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=", 1)[0] in names and "=" not in arg
            if arg.split("=", 1)[0] in names:
                continue
        elif skipping:
            continue
        out.append(arg)
    return out


def merge(records: dict[str, dict], command: str) -> dict:
    """One record from the runs' records (label -> train_throughput record)."""
    tps = {label: r["tokens_per_s_per_gpu"] for label, r in records.items()}
    by_recipe = {r["fp8_recipe"]: tps[label] / tps["bf16"] for label, r in records.items()
                 if r.get("precision") == "fp8" and "bf16" in tps}
    first = next((label for label, r in records.items() if r.get("precision") == "fp8"), None)
    return {
        "command": command, "precision": list(records),
        "tokens_per_s_per_gpu": tps, "mfu": {label: r.get("mfu") for label, r in records.items()},
        "step_time_s": {label: r["step_time_s"] for label, r in records.items()},
        "peak_memory_gb": {label: r["peak_memory_gb"] for label, r in records.items()},
        "fp8_speedup": tps[first] / tps["bf16"] if first and "bf16" in tps else None,
        "fp8_speedup_by_recipe": by_recipe,
        "runs": records,
    }


def run_child(cmd: list[str], tail_lines: int = TAIL_LINES) -> tuple[int, list[str]]:
    """Run `cmd`, its stdout inherited and its stderr copied to ours line by line as it comes.

    Returns:
        The exit status and the last `tail_lines` lines of its stderr.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(cmd, stderr=subprocess.PIPE) as proc:
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip("\n"))
    return proc.returncode, list(tail)


def compare(argv: list[str], precisions: list[str], recipes: list[str], out: str | None) -> dict:
    """Run train_throughput.py once per precision/recipe with `argv` otherwise unchanged; write the merged record."""
    script = Path(__file__).resolve().with_name("train_throughput.py")
    base = strip_options(argv)
    records, failed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, precision, recipe in run_labels(precisions, recipes):
            child = Path(tmp) / f"{label}.json"
            cmd = [sys.executable, str(script), *base, "--precision", precision, "--fp8-recipe", recipe,
                   "--out", str(child)]
            print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
            code, tail = run_child(cmd)
            if code != 0 or not child.exists():
                failed[label] = code
                why = f"exit {code}" if code else "exit 0 without a record"
                print(f"== {label} failed ({why}); the last {len(tail)} lines of its stderr:", *tail,
                      f"== end of {label}'s stderr", sep="\n", flush=True)
                continue
            records[label] = json.loads(child.read_text())
    if not records:
        raise SystemExit(f"no run finished: {', '.join(failed)} failed")
    merged = merge(records, " ".join(["python3", "bench/train_throughput.py", *argv])) | {"failed": failed}
    first = next(iter(records.values()))
    depth = f"-L{first['model']['n_layer']}" if "--layers" in argv else ""
    target = Path(out or ROOT / f"bench/results/train-{first['preset']}{depth}-{first['gpus']}gpu-{first['card']}-fp8.json")
    write_record(target, merged)
    print("tokens/s/GPU " + ", ".join(f"{k} {v:,.0f}" for k, v in merged["tokens_per_s_per_gpu"].items())
          + f"; fp8_speedup {merged['fp8_speedup']}")
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed (their stderr above); the record holds the other runs")
    return merged
