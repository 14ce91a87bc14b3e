"""RNN-mode inference: peak GPU memory against context length, in bf16 and with 8-/4-bit weights.

    python3 bench/infer_memory.py --preset 7b --bits 16 8 4 --contexts 1024 32768 131072 \
        --out bench/results/infer-7b-h200.json

For each weight format the model is built one block at a time straight on the GPU (random weights: memory and
speed do not depend on their values, and no trained 7B exists), so building never holds more than one bf16
block beyond the final model. Then, for each context length, a fresh context of random ids is prefilled
`--chunk` tokens per forward call with the state carried (`rwkv5.infer.prefill`), and the peak allocated
memory is read; last, `--decode` tokens are generated one at a time (batch 1) and their rate is compared
with the memory-bandwidth bound (weight bytes read once per token at `--bandwidth` bytes/s).

Needs only torch, numpy, pydantic and safetensors (runs from a checkout on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv5.config import count_parameters, model_preset  # noqa: E402
from rwkv5.infer import prefill, step  # noqa: E402
from rwkv5.model import RWKV5, Block  # noqa: E402
from rwkv5.quantize import quantize_model, weight_bytes  # noqa: E402
from rwkv5.wkv import default_backend  # noqa: E402

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e


def build(preset: str, bits: int, device: torch.device) -> RWKV5:
    """The model in bf16 (`bits` 16) or quantized, materialised one block at a time on `device`."""
    cfg = model_preset(preset)
    with torch.device("meta"):
        model = RWKV5(cfg)  # the skeleton only; every part is replaced below

    def finish(module: nn.Module) -> nn.Module:
        module = module.to(torch.bfloat16)
        return quantize_model(module, bits) if bits < 16 else module

    for i in range(cfg.n_layer):
        with torch.device(device):
            model.blocks[i] = finish(Block(cfg, i))
    with torch.device(device):
        model.emb = finish(nn.Embedding(cfg.vocab_size, cfg.n_embd))
        model.head = finish(nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False))
        model.ln_out = nn.LayerNorm(cfg.n_embd).to(torch.bfloat16)
    return model.eval()


def measure(model: RWKV5, contexts: list[int], chunk: int, decode: int, device: torch.device) -> dict:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for length in contexts:
        ids = torch.randint(0, model.cfg.vocab_size, (length,), device=device, generator=gen)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        logits, state = prefill(model, ids, chunk_len=chunk)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"context": length, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                     "prefill_s": seconds, "prefill_tokens_s": length / seconds,
                     "finite": bool(torch.isfinite(logits).all())})
        print(f"  context {length:>7}: peak {rows[-1]['peak_gb']:.3f} GB, prefill {length / seconds:,.0f} tok/s",
              flush=True)
    token = int(torch.argmax(logits))
    for _ in range(3):  # warm-up
        logits, state = step(model, token, state)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(decode):
        logits, state = step(model, int(torch.argmax(logits)), state)
    torch.cuda.synchronize()
    decode_s = (time.perf_counter() - t0) / decode
    return {"contexts": rows, "decode_ms_per_token": decode_s * 1e3, "decode_tokens_s": 1 / decode_s,
            "state_mb": state.nbytes() / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768, 131072])
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per prefill forward call")
    ap.add_argument("--decode", type=int, default=32, help="tokens generated one at a time")
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="HBM bytes/s for the bound")
    ap.add_argument("--out", default="bench/results/infer-7b-h200.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    results = []
    for bits in args.bits:
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = build(args.preset, bits, device)
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated() / 1e9
        wbytes = weight_bytes(model)
        print(f"bits {bits}: weights {wbytes / 1e9:.2f} GB, allocated {loaded:.2f} GB, built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        with torch.no_grad():
            row = measure(model, args.contexts, args.chunk, args.decode, device)
        bound = args.bandwidth / wbytes
        row.update(bits=bits, weight_gb=wbytes / 1e9, allocated_after_load_gb=loaded,
                   decode_bound_tokens_s=bound, decode_fraction_of_bound=row["decode_tokens_s"] / bound)
        peaks = [c["peak_gb"] for c in row["contexts"]]
        row["peak_growth_longest_vs_shortest"] = peaks[-1] / peaks[0] - 1
        results.append(row)
        del model
    print(f"\n{'bits':>4} {'weights GB':>10} " + " ".join(f"{'peak@' + str(c):>12}" for c in args.contexts)
          + f" {'growth':>7} {'decode tok/s':>12} {'bound':>7} {'of bound':>8}")
    for r in results:
        print(f"{r['bits']:>4} {r['weight_gb']:>10.2f} " + " ".join(f"{c['peak_gb']:>12.3f}" for c in r["contexts"])
              + f" {r['peak_growth_longest_vs_shortest']:>7.2%} {r['decode_tokens_s']:>12.1f}"
              f" {r['decode_bound_tokens_s']:>7.0f} {r['decode_fraction_of_bound']:>8.1%}")
    out = {
        "command": " ".join(["python3", *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "preset": args.preset,
        "parameters": count_parameters(model_preset(args.preset)), "chunk": args.chunk,
        "wkv_backend": default_backend(device), "weights": "random (memory and speed do not depend on values)",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{args.out}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
