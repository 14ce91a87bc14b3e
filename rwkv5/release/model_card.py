"""The model card (README.md) of a release.

A pure function of its inputs (no dates), so rebuilding a release from the same checkpoints gives the same
bytes, and a re-run finds nothing to upload. The loss-curve figure comes from `rwkv5.train.trace`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rwkv5.config import ModelConfig, count_parameters

__all__ = ["model_card", "LOSS_CURVE"]

LOSS_CURVE = "loss_curve.png"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _transformers_section(variants: Mapping[str, Mapping]) -> str:
    """How to load a variant's folder with transformers, and the normalisation convention other ports must match."""
    folder = next(iter(variants), "base")
    return (
        "\n## Loading with transformers\n\n"
        f"Each variant's folder (`{'/`, `'.join(variants)}/`) carries its own modeling, configuration and tokenizer "
        "code (`trust_remote_code`):\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("<release>/{folder}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("<release>/{folder}", trust_remote_code=True)\n'
        "```\n\n"
        f"`<release>` is this folder; from the Hub, pass the repository id and `subfolder=\"{folder}\"`. The model "
        "is an RNN: `model(ids, state=out.state)` continues from an earlier output, so a long prompt can be fed in "
        "pieces with constant memory; `generate` does this by itself.\n\n"
        "Normalisation convention: each time mix divides its WKV output y by `head_size_divisor` (8) and applies "
        "GroupNorm with eps 1e-5, which is GroupNorm with eps 64e-5 on y itself (`group_norm_epsilon` in "
        "`config.json`), as RWKV-LM and the `rwkv` package do. A port that applies eps 1e-5 to y gives different "
        "logits. Layers are not rescaled (`rescale_every: 0`).\n"
    )


def model_card(
    name: str,
    config: ModelConfig,
    variants: Mapping[str, Mapping],
    files: Sequence[str],
    evals: Mapping[str, Mapping[str, float]],
    loss_curve: str | None,
    figures: Sequence[tuple[str, str]] = (),
) -> str:
    """README.md text: architecture, parameter count, tokens seen, data, hyperparameters, evals, files.

    Args:
        name: release name (the title).
        config: the model's shape (base and fine-tune share it).
        variants: variant name ("base", "finetune") -> checkpoint metadata (tokens_seen, data, hyperparameters...).
        files: release paths, listed in the card.
        evals: variant -> metric -> value; one table column per variant. `chat_loss` of "base" and
            "finetune" (the held-out chat loss, `rwkv5.eval.evaluate.flat_metrics`) also goes in the fine-tune
            line, as before and after.
        loss_curve: path of the loss-curve PNG in the release, or None.
        figures: (path in the release, caption) of further figures, each under a heading of its caption.
    """
    base = variants.get("base", {})
    hyper = {k: v for meta in variants.values() for k, v in (meta.get("hyperparameters") or {}).items()}
    facts = {k: v for k, v in base.items() if k not in ("hyperparameters", "data")}
    ft = variants.get("finetune")
    front = "---\nlicense: apache-2.0\nlibrary_name: rwkv\ntags:\n- rwkv\n- rwkv5\n- text-generation\n---\n\n"
    parts = [
        f"{front}# {name}\n",
        "RWKV v5.2 (Eagle) language model with the output gate, trained by rwkv5-pipeline: a linear-attention RNN "
        "with matrix-valued state per head, trainable in parallel and run as an RNN with constant memory.\n",
        "## Architecture\n",
        _table(["", ""], [
            ("parameters", count_parameters(config)),
            ("layers", config.n_layer),
            ("width (n_embd)", config.n_embd),
            ("heads x head size", f"{config.n_embd // config.head_size} x {config.head_size}"),
            ("channel-mix width", config.ffn),
            ("vocabulary", config.vocab_size),
        ]),
        "## Training\n",
        f"- tokens seen: {_fmt(base.get('tokens_seen'))}\n",
        f"- data: {base.get('data', 'not recorded')}\n",
    ]
    parts += [f"- {k}: {_fmt(v)}\n" for k, v in sorted(facts.items()) if k != "tokens_seen"]
    if ft is not None:
        before, after = (evals.get(v, {}).get("chat_loss") for v in ("base", "finetune"))
        scored = (f"; held-out chat loss (per assistant token) {_fmt(before)} before, {_fmt(after)} after"
                  if before is not None and after is not None else "")
        parts.append(f"- fine-tune: {ft.get('finetuned_on', 'chat data')}, "
                     f"{_fmt(ft.get('finetune_steps'))} steps, loss on assistant turns only{scored}\n")
    if hyper:
        parts += ["\n## Hyperparameters\n\n", _table(["name", "value"], sorted(hyper.items()))]
    if evals:
        cols = [v for v in variants if v in evals]
        metrics = sorted({m for v in cols for m in evals[v]})
        rows = [[m] + [evals[v].get(m) for v in cols] for m in metrics]
        parts += ["\n## Evaluation\n\n", _table(["metric", *cols], rows)]
    if loss_curve:
        parts += ["\n## Loss curve\n\n", f"![training loss]({loss_curve})\n"]
    for path, caption in figures:
        parts += [f"\n## {caption}\n\n", f"![{caption}]({path})\n"]
    parts.append(_transformers_section(variants))
    parts += [
        "\n## Files\n\n",
        "".join(f"- `{f}`\n" for f in files),
        "\n`*/model.pth` is a plain bf16 state dict that the `rwkv` package loads "
        "(`RWKV(model='base/model', strategy='cpu fp32')`); `*/model.safetensors` with `*/config.json` uses the "
        "Hugging Face RWKV5 names; `manifest.json`, written last, holds the size and sha256 of every file.\n",
    ]
    return "".join(parts)
