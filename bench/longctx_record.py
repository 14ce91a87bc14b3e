"""Issue 27's device record: the long-context fine-tune peak ratio and the 7B's inference peaks in one JSON.

    python3 bench/longctx_record.py --finetune ft.json --inference infer.json   # -> bench/results/longctx-<card>.json

Reads what `bench/finetune_memory.py` and `bench/infer_memory.py` wrote on the same machine and states the
acceptance figures at the top: `peak_ratio` (peak at the longest sample / peak at the shortest, target
<= 1.1) and, per weight format, the inference peak at the longest context against its goal. Both records
travel whole under "finetune_record" and "inference_record" (their commands, options and versions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import ROOT, environment, write_record  # noqa: E402
from rwkv5.errors import ConfigError  # noqa: E402


def _read(path: Path, bench: str) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON record ({exc})") from None
    if record.get("bench") != bench:
        raise ConfigError(f"{path}: expected the record of bench {bench!r}, found bench={record.get('bench')!r}")
    return record


def combine(finetune: dict, inference: dict, command: str) -> dict:
    """The longctx record of a fine-tune memory record and an inference memory record (`command` made it)."""
    rows = finetune["rows"]
    inference_rows = []
    for result in inference["results"]:
        longest = result["contexts"][-1]
        inference_rows.append({
            "bits": result["bits"], "context": longest["context"], "peak_gb": longest["peak_gb"],
            "goal_gb": result.get("goal_gb"), "within_goal": result.get("within_goal"),
            "device_weight_gb": result["device_weight_gb"], "chunk": result["chunk"],
            "prefill_s": longest["prefill_s"], "decode_tokens_s": result["decode_tokens_s"],
        })
    return {
        "bench": "longctx_memory",
        "gpu": inference["gpu"],
        "card": inference["card"],
        "same_gpu": inference["gpu"] == finetune["gpu"],
        "versions": {k: inference[k] for k in ("torch", "cuda", "python")},
        "commit": inference["commit"],
        "commands": [finetune["command"], inference["command"], command],
        "peak_ratio": finetune["max_peak_ratio"],
        "peak_ratio_target": finetune["target_ratio"],
        "peak_ratio_within_target": finetune["within_target"],
        "finetune": {"model": finetune["model"], "segment_len": finetune["segment_len"],
                     "wkv_backend": finetune["wkv_backend"],
                     "peaks_bytes": {str(r["tokens"]): r["peak_bytes"] for r in rows}},
        "inference": {"preset": inference["preset"], "options": inference["options"], "rows": inference_rows},
        "finetune_record": finetune,
        "inference_record": inference,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune", type=Path, required=True, help="bench/finetune_memory.py's JSON")
    ap.add_argument("--inference", type=Path, required=True, help="bench/infer_memory.py's JSON")
    ap.add_argument("--out", type=Path, default=None, help="Default: bench/results/longctx-<card>.json")
    args = ap.parse_args(argv)
    finetune = _read(args.finetune, "finetune_memory")
    inference = _read(args.inference, "infer_memory")
    record = combine(finetune, inference, environment("cpu", __file__, argv)["command"])
    out = args.out or ROOT / "bench" / "results" / f"longctx-{inference['card']}.json"
    print(f"peak_ratio {record['peak_ratio']} (target <= {record['peak_ratio_target']})")
    for row in record["inference"]["rows"]:
        print(f"{row['bits']:>2}-bit: peak {row['peak_gb']} GB at {row['context']} tokens (goal {row['goal_gb']} GB)")
    write_record(out, record)
    return record


if __name__ == "__main__":
    main()
