"""Compiles and seconds of the chunked loss step over ragged row counts: a static compile (how it was) against
`rwkv5.model.compile_chunk_step` (automatic dynamic shapes), in one run.

    python bench/loss_step_compile.py [--device cpu] [--vocab 65536] [--out bench/results/loss-step-compile-<device>.json]

Chat samples (the milestone fine-tune, the held-out evaluation) give each sample's last chunk its own row
count. Each variant is run twice in a fresh Dynamo state over the same 12 row counts with the inductor
backend: "cold" compiles into an empty inductor cache folder, "warm" finds the graphs the cold pass cached, as
every later milestone process does (`TORCHINDUCTOR_CACHE_DIR` is shared). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW_COUNTS = (100, 237, 311, 480, 512, 77, 999, 640, 333, 123, 50, 800)


def _pass(make, device: str, vocab: int) -> tuple[int, float]:
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = make()
    began = time.perf_counter()
    for n in ROW_COUNTS:
        logits = torch.randn(n, vocab, device=device, dtype=torch.float32)  # the evaluation runs in float32
        targets = torch.randint(0, vocab, (n,), device=device)
        weight = torch.full((n,), 1.0 / n, device=device)
        step(logits, targets, weight, 0.0, False)
    if device == "cuda":
        torch.cuda.synchronize()
    return int(counters["stats"]["unique_graphs"]), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="loss-step-inductor-")
    sys.path.insert(0, str(REPO))
    import torch

    from bench.record import card_slug, environment, write_record
    from rwkv5.model import _chunk_loss_grad, compile_chunk_step

    variants = {"static (before)": lambda: torch.compile(_chunk_loss_grad, dynamic=False),
                "compile_chunk_step": compile_chunk_step}
    rows = []
    for label, make in variants.items():
        for cache in ("cold", "warm"):
            graphs, seconds = _pass(make, args.device, args.vocab)
            rows.append({"variant": label, "cache": cache, "graphs": graphs, "seconds": round(seconds, 2)})
    base = {row["cache"]: row["seconds"] for row in rows if row["variant"] == "static (before)"}
    print(f"{'variant':<20} {'cache':<6} {'graphs':>6} {'seconds':>8} {'vs static':>10}")
    for row in rows:
        print(f"{row['variant']:<20} {row['cache']:<6} {row['graphs']:>6} {row['seconds']:>8.2f} "
              f"{row['seconds'] / base[row['cache']]:>9.2f}x")
    device = torch.device(args.device)
    write_record(args.out or REPO / "bench" / "results" / f"loss-step-compile-{card_slug(device)}.json",
                 {**environment(device, __file__), "vocab": args.vocab, "row_counts": ROW_COUNTS, "rows": rows})


if __name__ == "__main__":
    main()
