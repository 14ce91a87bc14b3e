"""Loss parity of precision "fp8" against bf16: the same run (seed, data, order) under both, through the real
`train()`; acceptance: the final 20-step mean losses within 1%.

    python3 bench/fp8_parity.py                       # GPU: 169m preset, 300 steps, ctx 512 x 16 sequences
    python3 bench/fp8_parity.py --smoke               # CPU check: tiny model, 8 steps, emulated float8

Data: the SlimPajama-format sample (`data_prep.sample`, 12 MB of text, ~3M tokens) tokenized with the World
tokenizer, built once under --workdir. The 169m preset keeps its model, optimizer, "selective" and compile on
CUDA; the batch is 16 sequences of 512 (8,192 tokens a step, 2.5M tokens in 300 steps: under one pass over the
sample). Writes `bench/results/fp8-parity-<model>-<card>.json` (both curves, per-step tokens/s, the verdict)
and a PNG of the two curves beside it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import ROOT, card_slug, environment, write_record  # noqa: E402

from rwkv5.train.callbacks import Callback  # noqa: E402
from rwkv5.train.config import run_preset, with_overrides  # noqa: E402

ACCEPT = 0.01  # |fp8 - bf16| / bf16 of the final-window mean loss


class Curve(Callback):
    """Loss and tokens/s per optimizer step."""

    def __init__(self):
        self.loss: list[float] = []
        self.tokens_per_s: list[float] = []

    def post_step(self, info, metrics):
        self.loss.append(info.loss)

    def log_metrics(self, step, metrics):
        if "tokens_per_s" in metrics:
            self.tokens_per_s.append(float(metrics["tokens_per_s"]))


def sample_tokens(workdir: Path, megabytes: float) -> Path:
    """The sample corpus tokenized under `workdir` (both steps skip work already done); returns the train split."""
    from data_prep.sample import SampleSpec, build_sample
    from data_prep.tokenize import TokenizeConfig, tokenize

    build_sample(workdir / "raw", SampleSpec(megabytes=megabytes))
    tokenize(workdir / "raw", workdir / "tokens", TokenizeConfig(progress=False))
    return workdir / "tokens" / "train"


def parity_config(args, precision: str):
    if args.smoke:
        base = with_overrides(run_preset("tiny"), {"batch.ctx_len": 64, "batch.micro_batch": 2,
                                                   "batch.global_batch": 4, "activation_memory": "selective"})
    else:
        base = with_overrides(run_preset("169m"), {"batch.ctx_len": args.ctx_len, "batch.micro_batch": args.batch,
                                                   "batch.global_batch": args.batch})
    return with_overrides(base, {
        "token_budget": (args.steps + 1) * base.tokens_per_step, "stop_at_step": args.steps, "seed": args.seed,
        "checkpoint.every_steps": 10**6, "milestones.fraction": 1.0, "metrics.system_metrics": False,
        "precision": precision, "fp8_recipe": args.recipe,
    })


def tail_mean(values: list[float], window: int) -> float:
    return statistics.fmean(values[-window:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default: 300 (smoke: 8)")
    ap.add_argument("--window", type=int, default=None, help="final steps averaged; default: 20 (smoke: 4)")
    ap.add_argument("--recipe", choices=("tensorwise", "rowwise"), default="tensorwise")
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--megabytes", type=float, default=None, help="sample text; default: 12 (smoke: 1)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny model, few steps, emulated float8")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.steps = args.steps or (8 if args.smoke else 300)
    window = args.window or (4 if args.smoke else 20)
    use_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if use_gpu else "cpu")
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "rwkv5-fp8-parity")
    data = sample_tokens(workdir, args.megabytes or (1.0 if args.smoke else 12.0))

    from rwkv5.train.launch import train_here

    curves, configs = {}, {}
    for precision in ("bf16", "fp8"):
        cfg = configs[precision] = parity_config(args, precision)
        curve = curves[precision] = Curve()
        train_here(cfg, f"parity-{precision}-{args.recipe}", data, workdir / "runs", callbacks=[curve],
                   use_gpu=use_gpu)
        # A fresh run each time: drop the checkpoints so a rerun does not resume.
        import shutil

        shutil.rmtree(workdir / "runs" / f"parity-{precision}-{args.recipe}", ignore_errors=True)
    bf16, fp8 = (tail_mean(curves[p].loss, window) for p in ("bf16", "fp8"))
    rel = (fp8 - bf16) / bf16
    cfg = configs["fp8"]
    model = "tiny" if args.smoke else "169m"
    record = environment(device, __file__, sys.argv[1:] if argv is None else argv) | {
        "model_preset": model, "model": cfg.model.model_dump(), "batch": cfg.batch.model_dump(),
        "activation_memory": cfg.activation_memory, "compile": cfg.compile and use_gpu,
        "fp8_recipe": args.recipe, "fp8_emulated": not use_gpu, "seed": args.seed, "steps": args.steps,
        "window": window, "data": f"data_prep.sample ({args.megabytes or (1.0 if args.smoke else 12.0)} MB), "
                                  "World tokenizer",
        "final_mean_loss": {"bf16": bf16, "fp8": fp8}, "relative_difference": rel,
        "acceptance": ACCEPT, "passed": abs(rel) <= ACCEPT,
        "tokens_per_s": {p: statistics.median(c.tokens_per_s[2:] or c.tokens_per_s) for p, c in curves.items()
                         if c.tokens_per_s},
        "loss": {p: c.loss for p, c in curves.items()},
    }
    record["torchao"] = importlib.metadata.version("torchao")
    out = Path(args.out or ROOT / f"bench/results/fp8-parity-{model}-{card_slug(device)}.json")
    write_record(out, record)
    png = out.with_suffix(".png")
    png.write_bytes(_plot(record))
    print(f"wrote {png}")
    print(f"final {window}-step mean loss: bf16 {bf16:.4f}, fp8 ({args.recipe}) {fp8:.4f}, "
          f"difference {rel:+.2%} ({'within' if record['passed'] else 'outside'} {ACCEPT:.0%})")
    return record


def _plot(record: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rwkv5.train.trace import figure_png

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        for precision, losses in record["loss"].items():
            ax.plot(range(1, len(losses) + 1), losses, lw=1.0, label=precision)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{record['model_preset']}: bf16 vs fp8 ({record['fp8_recipe']}), final "
                     f"{record['window']}-step mean {record['relative_difference']:+.2%}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        return figure_png(fig)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
