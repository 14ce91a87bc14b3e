"""Supervised fine-tuning on chat data, loss on assistant turns only.

Samples are JSONL: either `{"text": "User: ...\\n\\nAssistant: ..."}` (RWKV-LM's demo format) or
`{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`. This is the single-process
version used by the milestone flow on small models; the long-context DeepSpeed path builds on the same
masking (`encode_chat`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv5.errors import DataError
from rwkv5.model import RWKV5, lm_loss

__all__ = ["encode_chat", "read_chat_jsonl", "FinetuneResult", "finetune"]

_TURN = re.compile(r"(?:^|\n\n)(System|User|Assistant):", re.MULTILINE)


def _turns_from_text(text: str) -> list[tuple[str, str]]:
    """Split "User: ...\\n\\nAssistant: ..." into (role, text-with-prefix) pieces that concatenate to text."""
    starts = [m.start() if m.start() == 0 else m.start() + 2 for m in _TURN.finditer(text)]
    if not starts:
        return [("user", text)]
    pieces = []
    if starts[0] > 0:
        pieces.append(("user", text[: starts[0]]))
    for a, b in zip(starts, starts[1:] + [len(text)]):
        chunk = text[a:b]
        role = chunk.split(":", 1)[0].lower()
        pieces.append((role, chunk))
    return pieces


def encode_chat(sample: dict, encode) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask that is 1 on assistant-turn tokens (the ones the loss counts).

    The role prefix ("Assistant:") is not learned; the answer and the end-of-document id 0 are.
    """
    if "messages" in sample:
        pieces = []
        for i, m in enumerate(sample["messages"]):
            sep = "" if i == 0 else "\n\n"
            pieces.append((m["role"], f"{sep}{m['role'].capitalize()}: {m['content']}"))
    elif "text" in sample:
        pieces = _turns_from_text(sample["text"])
    else:
        raise DataError("chat sample has neither 'text' nor 'messages'")
    ids: list[int] = []
    mask: list[int] = []
    for role, chunk in pieces:
        if role == "assistant":
            prefix, _, body = chunk.partition(":")
            head = encode(prefix + ":")
            body_ids = encode(body)
            ids += head + body_ids
            mask += [0] * len(head) + [1] * len(body_ids)
        else:
            piece = encode(chunk)
            ids += piece
            mask += [0] * len(piece)
    ids.append(0)
    mask.append(1 if any(mask) else 0)
    return ids, mask


def read_chat_jsonl(path: str | Path) -> list[dict]:
    """All samples of a chat JSONL file; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: chat data file not found")
    samples = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{no}: invalid JSON ({exc.msg})") from None
            if not isinstance(sample, dict) or not ({"text", "messages"} & sample.keys()):
                raise DataError(f"{path}:{no}: a chat sample needs 'text' or 'messages'")
            samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no chat samples")
    return samples


@dataclass
class FinetuneResult:
    steps: int
    first_loss: float
    last_loss: float
    assistant_tokens: int


def finetune(
    model: RWKV5,
    samples: list[dict],
    encode,
    steps: int = 20,
    lr: float = 1e-4,
    max_len: int = 256,
    seed: int = 0,
) -> FinetuneResult:
    """A few AdamW steps on (masked) chat samples, one sample per step, cycling through them in a seeded order.

    Args:
        model (RWKV5): trained in place.
        samples (list[dict]): chat samples (see the module docstring).
        encode: text -> token ids.
        steps (int): optimizer steps. Default: 20.
        lr (float): learning rate. Default: 1e-4.
        max_len (int): samples are cut to this many tokens. Default: 256.
        seed (int): sample order. Default: 0.
    """
    encoded = [encode_chat(s, encode) for s in samples]
    encoded = [(ids[: max_len + 1], mask[: max_len + 1]) for ids, mask in encoded if sum(mask[1 : max_len + 1])]
    if not encoded:
        raise DataError("no chat sample has assistant tokens within max_len")
    device = next(model.parameters()).device
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    model.train()
    losses = []
    counted = 0
    for step in range(steps):
        ids, mask = encoded[order[step % len(order)]]
        x = torch.tensor(ids, device=device)[None]
        m = torch.tensor(mask, device=device)[None]
        loss = lm_loss(model(x[:, :-1]), x[:, 1:], m[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        counted += int(m[:, 1:].sum())
    model.eval()
    return FinetuneResult(steps=steps, first_loss=losses[0], last_loss=losses[-1], assistant_tokens=counted)
