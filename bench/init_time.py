"""Seconds from a bare process to an initialised 7b model on one GPU (`build_model`: meta, then on the GPU).

    python3 bench/init_time.py --preset 7b --out bench/results/init-7b-<card>.json

Reported: the process's age when the model is ready (interpreter start, imports, CUDA context, allocation and
initialisation), and the `build_model` call alone. Also the per-parameter-kind mean and std, to set beside
the CPU constructor's.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv5.config import count_parameters, model_preset  # noqa: E402
from rwkv5.model import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    born = psutil.Process().create_time()
    cfg = model_preset(args.preset)
    torch.cuda.init()
    torch.manual_seed(0)
    t0 = time.time()
    model = build_model(cfg, "cuda")
    torch.cuda.synchronize()
    t1 = time.time()
    stats = {}
    with torch.no_grad():
        for name in ("emb.weight", "blocks.5.att.receptance.weight", "blocks.5.att.key.weight",
                     "blocks.5.ffn.key.weight", "blocks.5.att.output.weight", "head.weight",
                     "blocks.5.att.time_decay"):
            p = dict(model.named_parameters())[name]
            stats[name] = {"mean": p.float().mean().item(), "std": p.float().std().item()}
    card = torch.cuda.get_device_name(0)
    result = {
        "command": " ".join(["python3", *sys.argv]), "gpu": card, "preset": args.preset,
        "parameters": count_parameters(cfg), "torch": torch.__version__,
        "process_start_to_ready_s": t1 - born, "script_start_to_ready_s": t1 - T_START,
        "build_model_s": t1 - t0, "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        "host_rss_gb": psutil.Process().memory_info().rss / 1e9, "stats": stats,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}))
    out = Path(args.out or f"bench/results/init-{args.preset}-{card.replace('NVIDIA ', '').split()[0].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    os.environ.get("OUT") and print(f"wrote {out}")


if __name__ == "__main__":
    main()
