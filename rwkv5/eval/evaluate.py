"""Evaluation: validation loss and perplexity per SlimPajama source, LAMBADA, the held-out chat loss, and the
report around them.

Windows come from the validation split in stream order (each exactly once), so the numbers are a pure
function of the checkpoint and the dataset. `evaluate_checkpoint` runs what is asked for (`rwkv5 eval`),
`format_table` prints it, `write_report` stores it as JSON (`rwkv5.tracking.log_eval_report` adds it to an
MLflow run).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.loader import validation_dataset
from rwkv5.model import RWKV5
from rwkv5.train.chat import DEFAULT_HELDOUT

__all__ = [
    "ValidationResult",
    "validation_loss",
    "chat_heldout_loss",
    "evaluate_checkpoint",
    "evaluate_saved",
    "flat_metrics",
    "format_table",
    "write_report",
]


@dataclass
class ValidationResult:
    loss: float
    """Mean next-token cross-entropy (nats) over all evaluated tokens."""
    tokens: int
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    """{source: {"loss", "ppl", "tokens"}}."""

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def to_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "by_source": self.by_source}


@torch.no_grad()
def validation_loss(
    model: RWKV5,
    data_dir: str,
    ctx_len: int = 128,
    batch_size: int = 4,
    max_windows: int | None = None,
    expected_tokenizer: str | None = None,
) -> ValidationResult:
    """Mean loss of `model` on the validation windows of `data_dir`, overall and per source.

    Args:
        model (RWKV5): the model (its device is used).
        data_dir (str): a tokenized validation split (manifest.json).
        ctx_len (int): tokens per window. Default: 128.
        batch_size (int): windows per forward. Default: 4.
        max_windows (int, optional): evaluate only the first windows (smoke runs). Default: all.
        expected_tokenizer (str, optional): refuse shards of another tokenizer.
    """
    ds = validation_dataset(data_dir, ctx_len, expected_tokenizer=expected_tokenizer)
    n = len(ds) if max_windows is None else min(len(ds), max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, n, batch_size):
        tokens, ids = ds.batch(range(start, min(start + batch_size, n)))
        x = torch.from_numpy(tokens.astype("int64")).to(device)
        logits = model(x[:, :-1])
        per_window = F.cross_entropy(
            logits.float().transpose(1, 2), x[:, 1:], reduction="none"
        ).sum(dim=1)  # (B,)
        for sample_id, total in zip(ids.tolist(), per_window.tolist()):
            source = ds.source_of(sample_id)
            sums[source] += total
            counts[source] += ctx_len
    model.train(was_training)
    tokens = sum(counts.values())
    by_source = {
        s: {"loss": sums[s] / counts[s], "ppl": math.exp(min(sums[s] / counts[s], 50.0)), "tokens": counts[s]}
        for s in sorted(sums)
    }
    return ValidationResult(loss=sum(sums.values()) / max(tokens, 1), tokens=tokens, by_source=by_source)


def chat_heldout_loss(model: RWKV5, encode, chat_data: str | os.PathLike, heldout: int = DEFAULT_HELDOUT,
                      max_len: int | None = 1024) -> dict:
    """Mean loss per assistant token (no L2-wrap) on the held-out samples of a chat file: the samples the
    milestone fine-tune leaves out (`rwkv5.train.chat.heldout_split`), so base and fine-tune are scored on one
    fixed set the fine-tune never saw.

    Args:
        model (RWKV5): the model (its device is used).
        encode: text -> token ids (the fine-tune's tokenizer).
        chat_data: a local chat JSONL in a shape of `rwkv5.train.chat_formats`.
        heldout (int): held-out samples; the fine-tune's `heldout`. Default: DEFAULT_HELDOUT.
        max_len (int, optional): samples cut to this many tokens, as the fine-tune cuts them. Default: 1024.

    Returns:
        `{"loss", "samples", "tokens"}`: samples and assistant tokens scored (held-out samples without an
        assistant token within `max_len` are skipped).
    """
    from rwkv5.train.chat import assistant_loss, encode_chat_samples, heldout_split, read_chat_jsonl

    _, held = heldout_split(read_chat_jsonl(chat_data), heldout)
    encoded = encode_chat_samples(held, encode, max_len)
    return {"loss": assistant_loss(model, encoded), "samples": len(encoded),
            "tokens": sum(sum(mask[1:]) for _, mask in encoded)}


def eval_device(model_bytes: int) -> torch.device:
    """The GPU when one is visible and has room for the model twice over (weights, activations, logits); else
    the CPU. On one GPU shared with training, a small model's evaluation takes seconds there instead of tens
    of seconds on the cores; beside a full training GPU (a large model) it stays on the CPU."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if free > 2 * model_bytes:
            return torch.device("cuda")
    return torch.device("cpu")


def evaluate_saved(checkpoint: str | os.PathLike, validation: str | None = None, lambada: str | None = None,
                   ctx_len: int = 128, limit: int | None = None, chat_data: str | None = None,
                   chat_heldout: int = DEFAULT_HELDOUT, chat_max_len: int | None = 1024) -> dict:
    """`evaluate_checkpoint` of a saved checkpoint (native or RWKV .pth) in float32 (on `eval_device`), with
    the RWKV World tokenizer: what a milestone evaluates for its base and its fine-tune. The report's
    "device" says where it ran; with `chat_data` (a local file) it holds the held-out chat loss, "chat"."""
    from data_prep.tokenizer import load_tokenizer
    from rwkv5.checkpoint import load_checkpoint
    from rwkv5.quantize import weight_bytes

    model, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    device = eval_device(weight_bytes(model))
    report = evaluate_checkpoint(model.to(device).eval(), load_tokenizer().encode, lambada=lambada,
                                 validation=validation, limit=limit, ctx_len=ctx_len, chat_data=chat_data,
                                 chat_heldout=chat_heldout, chat_max_len=chat_max_len)
    return report | {"device": device.type}


def evaluate_checkpoint(
    model: RWKV5,
    encode=None,
    lambada: str | None = None,
    validation: str | None = None,
    limit: int | None = None,
    ctx_len: int = 128,
    batch_size: int = 4,
    chat_data: str | None = None,
    chat_heldout: int = DEFAULT_HELDOUT,
    chat_max_len: int | None = 1024,
) -> dict:
    """The evaluations asked for, as one JSON-ready report.

    Args:
        model (RWKV5): the model, in eval mode on its device.
        encode: text -> token ids; needed for LAMBADA.
        lambada (str, optional): LAMBADA JSONL file.
        validation (str, optional): tokenized validation split (manifest.json).
        limit (int, optional): first LAMBADA passages / validation windows only (smoke runs). Default: all.
        ctx_len (int), batch_size (int): validation windows. Defaults: 128, 4.
        chat_data (str, optional): chat JSONL whose held-out samples are scored (`chat_heldout_loss`).
        chat_heldout (int), chat_max_len (int, optional): see `chat_heldout_loss`. Defaults: 32, 1024.

    Returns:
        `{"lambada": {"accuracy", "ppl", "samples"}, "validation": {"loss", "ppl", "tokens", "by_source"},
        "chat": {"loss", "samples", "tokens"}}`, with only the parts asked for.
    """
    from rwkv5.eval.lambada import lambada_eval

    report: dict = {}
    if lambada:
        report["lambada"] = lambada_eval(model, encode, lambada, limit=limit).to_dict()
    if validation:
        report["validation"] = validation_loss(model, validation, ctx_len, batch_size, max_windows=limit).to_dict()
    if chat_data:
        report["chat"] = chat_heldout_loss(model, encode, chat_data, chat_heldout, chat_max_len)
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    """MLflow metric names for a report: `lambada_accuracy`, `val_loss`, `val_loss.<source>`, `chat_loss`, ...,
    `loss_at_<position>` (`rwkv5.eval.long_context`)."""
    metrics: dict[str, float] = {}
    if "chat" in report:
        metrics["chat_loss"] = report["chat"]["loss"]
    if "lambada" in report:
        metrics["lambada_accuracy"] = report["lambada"]["accuracy"]
        metrics["lambada_ppl"] = report["lambada"]["ppl"]
    if "validation" in report:
        val = report["validation"]
        metrics["val_loss"], metrics["val_ppl"] = val["loss"], val["ppl"]
        for source, row in val["by_source"].items():
            metrics[f"val_loss.{source}"], metrics[f"val_ppl.{source}"] = row["loss"], row["ppl"]
    for position, loss in report.get("long_context", {}).get("positions", {}).items():
        metrics[f"loss_at_{int(position):06d}"] = loss  # zero-padded: tables sort by name
    return metrics


def format_table(report: dict) -> str:
    """A plain-text table: one row per metric (and per validation source)."""
    rows = [("metric", "value")]
    if "lambada" in report:
        lam = report["lambada"]
        rows += [(f"lambada accuracy (n={lam['samples']})", f"{lam['accuracy']:.4f}"),
                 ("lambada ppl", f"{lam['ppl']:.3f}")]
    if "validation" in report:
        val = report["validation"]
        rows += [(f"validation loss (tokens={val['tokens']})", f"{val['loss']:.4f}"),
                 ("validation ppl", f"{val['ppl']:.3f}")]
        for source, row in val["by_source"].items():
            rows.append((f"  {source} loss / ppl", f"{row['loss']:.4f} / {row['ppl']:.3f}"))
    if "chat" in report:
        chat = report["chat"]
        rows.append((f"held-out chat loss (samples={chat['samples']}, tokens={chat['tokens']})", f"{chat['loss']:.4f}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path
