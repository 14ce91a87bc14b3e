"""Peak GPU memory of one long-context fine-tune step: a 4k-token sample against a 128k-token one.

    python3 bench/finetune_memory.py --preset 7b --layers 8   # the 7B's width at 8 layers, 4096 vs 131072 tokens
    python3 bench/finetune_memory.py --preset 1b5             # the 1b5 preset
    python3 bench/finetune_memory.py --device cpu --tiny      # smoke run of the script itself (no figures)

Runs `rwkv5.train.chat.segmented_loss` (state passing with one checkpointed segment at a time) and one AdamW
step on a fresh model in bf16 (initialised on the device: `rwkv5.model.build_model`), for each sample length,
and records `torch.cuda.max_memory_allocated` over the step. With segment-level recomputation the two peaks
should be within 10% (issue 27's `peak_ratio` <= 1.1): the long sample only adds one RWKV state per segment
(`state_bytes_per_segment`: 8.7 MB for the 7B's width at 8 layers). Writes
`bench/results/finetune-memory-<card>.json`.

Needs only torch, numpy, safetensors and pydantic (no DeepSpeed, no Ray, no installed package): the repo
root is put on sys.path. The WKV op is the CUDA kernel when it builds, else the PyTorch chunked one
(`--wkv-backend` forces one).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import bench_device, card_slug, environment, write_record  # noqa: E402
from rwkv5.config import ModelConfig, model_preset  # noqa: E402
from rwkv5.model import RWKVState, build_model  # noqa: E402
from rwkv5.train.chat import segmented_loss  # noqa: E402
from rwkv5.wkv import default_backend  # noqa: E402

# Smoke-run shape: seconds on a CPU, exercises every code path of the script.
TINY = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=512)
TARGET_RATIO = 1.10


def one_step(cfg: ModelConfig, tokens: int, segment_len: int, device: torch.device, seed: int = 0) -> dict:
    """Build a fresh bf16 model, run one masked fine-tune step on a `tokens`-long sample, measure it."""
    torch.manual_seed(seed)
    model = build_model(cfg, device).to(torch.bfloat16).train()
    # foreach=False: the multi-tensor path allocates one temporary per parameter group at once.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (1, tokens + 1), generator=gen).to(device)  # (1, T+1)
    mask = (torch.rand(1, tokens, generator=gen) < 0.5).to(device)  # half the targets count, like a chat
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    loss = segmented_loss(model, ids[:, :-1], ids[:, 1:], mask, segment_len=segment_len)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    row = {
        "tokens": tokens,
        "segments": -(-tokens // segment_len),
        "loss": float(loss.detach()),
        "step_s": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "state_bytes_per_segment": RWKVState.zeros(cfg, 1).nbytes(),
        "peak_bytes": None,
        "peak_minus_start_bytes": None,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_bytes"] = peak
        row["peak_minus_start_bytes"] = peak - before
    del model, opt, loss, ids, mask
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (smoke run only).")
    parser.add_argument("--preset", default="169m", help="Model preset. Default: 169m.")
    parser.add_argument("--layers", type=int, default=None, help="The preset's width at this depth.")
    parser.add_argument("--tiny", action="store_true", help="A tiny model and short samples (smoke run).")
    parser.add_argument("--lengths", default="4096,131072", help="Sample lengths in tokens, comma-separated.")
    parser.add_argument("--segment-len", type=int, default=4096, help="Tokens per segment. Default: 4096.")
    parser.add_argument("--wkv-backend", default=None, help="Force the WKV op: cuda, chunk or naive.")
    parser.add_argument("--out", default=None, help="JSON path. Default: bench/results/finetune-memory-<card>.json.")
    args = parser.parse_args(argv)

    device = bench_device(parser, args)
    cfg = TINY if args.tiny else model_preset(args.preset)
    if args.layers:
        cfg = cfg.model_copy(update={"n_layer": args.layers})
    lengths = [int(n) for n in args.lengths.split(",")]
    segment_len = args.segment_len
    if args.tiny:
        lengths, segment_len = [64, 512], 64

    # A discarded warm-up step: kernel builds, cuBLAS workspaces and allocator pools would otherwise count
    # against the first length only.
    one_step(cfg, min(lengths), segment_len, device)
    rows = [one_step(cfg, n, segment_len, device) for n in lengths]
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["peak_ratio_to_first"] = None if base is None else round(row["peak_bytes"] / base, 4)

    print(f"{'tokens':>8} {'segments':>8} {'peak GiB':>9} {'ratio':>7} {'step s':>8} {'tok/s':>10}")
    for row in rows:
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.3f}"
        ratio = "-" if row["peak_ratio_to_first"] is None else f"{row['peak_ratio_to_first']:.3f}"
        print(f"{row['tokens']:>8} {row['segments']:>8} {peak:>9} {ratio:>7} {row['step_s']:>8} "
              f"{row['tokens_per_s']:>10}")
    worst = max((r["peak_ratio_to_first"] for r in rows if r["peak_ratio_to_first"] is not None), default=None)
    model_name = "tiny-smoke" if args.tiny else args.preset + (f"-L{args.layers}" if args.layers else "")
    result = {
        **environment(device, __file__, argv),
        "bench": "finetune_memory",
        "model": model_name,
        "model_config": cfg.model_dump(),
        "segment_len": segment_len,
        "dtype": "bfloat16 weights, AdamW",
        "wkv_backend": default_backend(device),
        "cpu": platform.processor() or None,
        "rows": rows,
        "max_peak_ratio": worst,
        "target_ratio": TARGET_RATIO,
        "within_target": None if worst is None else worst <= TARGET_RATIO,
    }
    write_record(args.out or ROOT / "bench" / "results" / f"finetune-memory-{card_slug(device)}.json", result)
    return result


if __name__ == "__main__":
    main()
