"""LAMBADA (OpenAI variant): accuracy and perplexity of each passage's last word, in RNN mode.

Each line of the JSONL file is `{"text": ...}`; the target is the text after the last space and the context
everything before it. The convention is RWKV's own LAMBADA evaluation (BlinkDL/RWKV-LM `RWKV-v7/rwkv_v7_demo.py`:
`src = [0] + tokenizer.encode(context)`, `dst = tokenizer.encode(" " + target)`): the context follows an
end-of-document token (id 0) and the target is scored with its leading space. The lm-eval adapter
(`rwkv5.eval.lm_eval_adapter`) puts the same token before every context, so its `lambada_openai` numbers equal
these (tests/rwkv5/eval/test_lm_eval_adapter.py).

The data: `SHIPPED_LAMBADA`, the OpenAI variant's 5,153 test passages, ships with the package (origin and
licence: `rwkv5/eval/assets/README.md`); `HUB_LAMBADA` is the same set on the Hugging Face Hub. The context is run once (`infer.prefill`), then the target's
tokens are scored from the carried state in one more forward call: a prediction is correct when every
target token is the most likely one (greedy), and the perplexity is exp of the mean negative
log-likelihood of the whole word (per word, not per token).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv5.errors import DataError
from rwkv5.infer import DEFAULT_CHUNK_LEN, EOD_ID, prefill

__all__ = ["SHIPPED_LAMBADA", "HUB_LAMBADA", "LambadaResult", "fetch_lambada", "read_lambada", "score_continuation", "lambada_eval"]


SHIPPED_LAMBADA = Path(__file__).resolve().parent / "assets" / "lambada_test.jsonl"
"""LAMBADA (OpenAI variant, 5,153 passages) as shipped with the package; `fetch_lambada("shipped")` names it."""
HUB_LAMBADA = "hf://datasets/EleutherAI/lambada_openai/data/lambada_test_en.jsonl"
"""The same test set on the Hub (lm-eval's `lambada_openai` reads this repository)."""


@dataclass
class LambadaResult:
    accuracy: float
    """Fraction of passages whose last word is the greedy continuation, token for token."""
    ppl: float
    """exp(mean negative log-likelihood of the target word)."""
    samples: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ppl": self.ppl, "samples": self.samples}


def _local_path(uri: str) -> Path | None:
    """The file that "shipped", a path or a file:// URL names; None for a remote URL."""
    if uri == "shipped":
        return SHIPPED_LAMBADA
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None


def fetch_lambada(uri: str, cache_dir: str | Path) -> Path:
    """A local path for a LAMBADA file given as "shipped" (`SHIPPED_LAMBADA`), a path or an fsspec URL (e.g.
    `HUB_LAMBADA`); a URL is fetched once into `cache_dir` (`data_prep.fetch.fetch_file`: a Hub file verified
    against the checksum the Hub lists)."""
    from data_prep.fetch import fetch_file

    return _local_path(uri) or fetch_file(uri, cache_dir)


def read_lambada(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " target") pairs of a LAMBADA JSONL file ("shipped": `SHIPPED_LAMBADA`); `limit` keeps the
    first ones.

    Raises:
        DataError: missing file, bad JSON, or a passage without a space (no last word to predict).
    """
    path = _local_path(str(path)) or Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LAMBADA file not found")
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{no}: expected a JSON object with a 'text' string") from None
            context, sep, target = text.rpartition(" ")
            if not sep or not context or not target:
                raise DataError(f"{path}:{no}: passage has no last word to predict")
            pairs.append((context, " " + target))
    if not pairs:
        raise DataError(f"{path}: no LAMBADA passages")
    return pairs


@torch.no_grad()
def score_continuation(
    model, logits: torch.Tensor, state, target: list[int], chunk_len: int = DEFAULT_CHUNK_LEN
) -> tuple[float, bool]:
    """Log-likelihood of `target` after a context whose last logits `[V]` and state are given, and whether
    it is the greedy continuation.

    The target is fed `chunk_len` tokens at a time from the carried state, so a continuation of any length
    (a whole document, for rolling perplexity) costs the memory of one chunk. The given state is not
    modified (each forward returns a new one).
    """
    ll, greedy = 0.0, True
    current = logits.float()[None]  # (1, V): the row that predicts the next target token
    for start in range(0, len(target), chunk_len):
        piece = target[start : start + chunk_len]
        tgt = torch.tensor(piece, dtype=torch.long, device=logits.device)
        rows = current
        if start + len(piece) < len(target) or len(piece) > 1:
            # Feed the whole piece: its outputs but the last predict the piece's own tokens after the first,
            # the last one predicts the next piece's first token.
            out, state = model(tgt[None], state, return_state=True)  # (1, n, V)
            rows = torch.cat([current, out[0, :-1].float()])
            current = out[0, -1:].float()
        logp = torch.log_softmax(rows, dim=-1)  # (n, V)
        ll += float(logp.gather(1, tgt[:, None]).sum())
        greedy = greedy and bool((logp.argmax(dim=-1) == tgt).all())
    return ll, greedy


def lambada_eval(
    model,
    encode,
    path: str | Path,
    limit: int | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> LambadaResult:
    """LAMBADA accuracy and perplexity of `model` (batch 1, RNN mode; put it in eval mode).

    Args:
        model (RWKV5): the model.
        encode: text -> token ids (the model's tokenizer).
        path: LAMBADA JSONL file.
        limit (int, optional): evaluate only the first passages. Default: all.
        chunk_len (int): context tokens per forward call. Default: DEFAULT_CHUNK_LEN.
    """
    pairs = read_lambada(path, limit)
    nll, correct = 0.0, 0
    for context, target in pairs:
        logits, state = prefill(model, [EOD_ID] + encode(context), chunk_len=chunk_len)
        ll, greedy = score_continuation(model, logits, state, encode(target), chunk_len)
        nll -= ll
        correct += greedy
    n = len(pairs)
    return LambadaResult(accuracy=correct / n, ppl=math.exp(min(nll / n, 700.0)), samples=n)
