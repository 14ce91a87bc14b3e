"""Supervised fine-tuning on chat data, loss on assistant turns only, samples of any length.

Samples are JSONL in one of the shapes of `rwkv5.train.chat_formats` (PIPPA, ShareGPT, chat messages, or
RWKV-LM's demo text form `{"text": "User: ...\\n\\nAssistant: ..."}`), read by `read_chat_jsonl`.

Long context by state passing (`segmented_loss`): a sample is cut into segments of `segment_len` tokens; each
segment starts from the RWKV state (token shifts and the WKV state) the previous one ended with, and gradients
flow back through that state (full backpropagation through time, not truncated). Each segment runs under
`torch.utils.checkpoint`, so the forward keeps only the small per-segment states and the backward recomputes
one segment at a time: memory follows the segment length, not the sample length.

`finetune` is the single-process loop (milestone flow on small models, tests); `rwkv5.train.finetune` runs
the same loss under DeepSpeed ZeRO-2 through the pretraining Ray Train path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkv5.errors import ConfigError, DataError
from rwkv5.model import RWKV5, RWKVState, l2wrap
from rwkv5.train.chat_formats import chat_turns, read_chat_jsonl

__all__ = [
    "DEFAULT_SEGMENT_LEN",
    "DEFAULT_HELDOUT",
    "resolve_chat_data",
    "encode_chat",
    "read_chat_jsonl",
    "heldout_split",
    "encode_chat_samples",
    "segmented_loss",
    "assistant_loss",
    "FinetuneResult",
    "finetune",
]

# Tokens per segment: the 7B's pretraining context, where one segment's activations fit a GPU.
DEFAULT_SEGMENT_LEN = 4096
# Held-out chat samples scored before and after each milestone fine-tune: enough conversations (thousands of
# assistant tokens) for a stable mean, few enough to score in seconds on the tiny model's CPU.
DEFAULT_HELDOUT = 32


def resolve_chat_data(uri: str, cache_dir: str | Path) -> Path:
    """A local chat JSONL file for `uri`: a path, an fsspec URL (copied once into `cache_dir`), or a Hub
    dataset file `hf://datasets/<repo>[@<revision>]/<file>` (fetched with the token of `HF_TOKEN`, verified
    against the checksum the Hub lists, resumed, cached: `data_prep.fetch`).

    Raises:
        DataError: the resolved file does not exist.
        SourceError, DownloadError: a Hub file that cannot be fetched and verified.
    """
    from data_prep.fetch import fetch_file

    path = fetch_file(uri, cache_dir)
    if not path.is_file():
        raise DataError(f"{path}: chat data file not found")
    return path


def heldout_split(samples: list[dict], heldout: int = DEFAULT_HELDOUT, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) samples: the `heldout` samples with the smallest seeded hash of their content.

    A pure function of the file's samples, whatever their order, so the fine-tune and the evaluation agree on
    it without sharing state; a copy of a held-out sample elsewhere in the file is held out too, so the
    fine-tune never sees a scored conversation.

    Raises:
        ConfigError: heldout < 0.
        DataError: holding out `heldout` samples would leave none to train on.
    """
    if heldout < 0:
        raise ConfigError(f"finetune.heldout must be >= 0, got {heldout}")
    keys = [hashlib.sha256(f"{seed}:{json.dumps(s, sort_keys=True)}".encode()).digest() for s in samples]
    chosen = sorted(range(len(samples)), key=lambda i: (keys[i], i))[:heldout]
    held_keys = {keys[i] for i in chosen}
    train = [s for s, key in zip(samples, keys) if key not in held_keys]
    if not train:
        raise DataError(f"holding out {heldout} of {len(samples)} chat samples leaves none to train on")
    return train, [samples[i] for i in sorted(chosen)]


def encode_chat(sample: dict, encode) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask that is 1 on the tokens the loss counts, for a sample of any accepted shape
    (`rwkv5.train.chat_formats`).

    Turns are rendered "Role: text", separated by a blank line. Of a learned (assistant) turn, the role prefix
    "Assistant:" is not learned; its text and the blank line that ends it are, so an answer learns to end.
    Everything else (system, persona, greeting, user turns) is input only. The end-of-document id 0 closes the
    sample and is learned when any answer is.
    """
    turns = chat_turns(sample)
    ids: list[int] = []
    mask: list[int] = []
    for i, turn in enumerate(turns):
        prefix = f"{turn.role.capitalize()}:" if turn.labelled else ""
        body = (" " if turn.labelled else "") + turn.text + ("" if i == len(turns) - 1 else "\n\n")
        if turn.learned:
            head, learned = encode(prefix), encode(body)
            ids += head + learned
            mask += [0] * len(head) + [1] * len(learned)
        else:
            piece = encode(prefix + body)  # in one piece, as a prompt is tokenized at inference
            ids += piece
            mask += [0] * len(piece)
    ids.append(0)
    mask.append(1 if any(mask) else 0)
    return ids, mask


def encode_chat_samples(samples: list[dict], encode, max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """`encode_chat` of each sample, cut to `max_len + 1` ids (inputs and shifted targets), keeping only
    samples that still have an assistant token to learn.

    Raises:
        DataError: no sample has a learnable assistant token.
    """
    encoded = []
    for sample in samples:
        ids, mask = encode_chat(sample, encode)
        if max_len is not None:
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        if len(ids) > 1 and any(mask[1:]):
            encoded.append((ids, mask))
    if not encoded:
        raise DataError(f"no chat sample has assistant tokens within max_len={max_len}")
    return encoded


def _segment(model, inputs, targets, mask, att_shift, wkv, ffn_shift, denom, l2_scale):
    """One segment from a given state: its share of the loss and the state after it.

    Returns plain tensors (not an RWKVState) because torch.utils.checkpoint tracks tensors in tuples.
    """
    state = None if att_shift is None else RWKVState(att_shift, wkv, ffn_shift)
    logits, new = model(inputs, state, return_state=True)  # (B, S, V)
    # float32 at least (bf16 logits lose the loss), float64 kept for reference checks
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                         targets.flatten(), reduction="none")  # (B*S,)
    weight = torch.ones_like(ce) if mask is None else mask.flatten().to(ce.dtype)
    loss = (ce * weight).sum() / denom
    if l2_scale:
        # L2-wrap's push-down is 1e-4 / (B * S) per position of the logits it is given; scaling by S/T on
        # the way in and back out makes it 1e-4 / (B * T), as on the whole sample.
        loss = l2wrap(loss * l2_scale, logits) / l2_scale
    return loss, new.att_shift, new.wkv, new.ffn_shift


def segmented_loss(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    segment_len: int = DEFAULT_SEGMENT_LEN,
    recompute: bool = True,
    l2_wrap: bool = True,
) -> torch.Tensor:
    """Masked mean next-token loss of a long sequence, computed segment by segment with the state carried.

    Equals `lm_loss(model(inputs), targets, mask, l2_wrap)` in value and in every gradient (the tests check
    this in float64), whatever `segment_len` is. With `recompute`, the forward keeps only each segment's
    input state (`RWKVState.nbytes()`, ~2 MiB for the 169m) and the backward recomputes one segment at a
    time, so peak memory is that of one segment plus the states.

    Args:
        model: an `RWKV5` (or a module with its `forward(idx, state, return_state)`).
        inputs (Tensor): token ids `[B, T]`.
        targets (Tensor): next-token ids `[B, T]`.
        mask (Tensor, optional): `[B, T]`, 1 where the target counts (assistant tokens). Default: all.
        segment_len (int): tokens per segment. Default: DEFAULT_SEGMENT_LEN.
        recompute (bool): checkpoint each segment (when gradients are on). Default: True.
        l2_wrap (bool): RWKV's L2-wrap regulariser on the logits. Default: True.

    Raises:
        ConfigError: segment_len < 1 or shapes that disagree.
    """
    if segment_len < 1:
        raise ConfigError(f"finetune.segment_len must be >= 1, got {segment_len}")
    if inputs.shape != targets.shape or (mask is not None and mask.shape != inputs.shape):
        raise ConfigError(
            f"inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)} and mask "
            f"{None if mask is None else tuple(mask.shape)} must have one shape [B, T]"
        )
    B, T = inputs.shape
    denom = (mask.sum().clamp(min=1) if mask is not None else torch.tensor(B * T, device=inputs.device)).float()
    use_checkpoint = recompute and torch.is_grad_enabled()
    total, state = None, (None, None, None)
    for start in range(0, T, segment_len):
        end = min(start + segment_len, T)
        part = (inputs[:, start:end], targets[:, start:end], None if mask is None else mask[:, start:end])
        l2_scale = T / (end - start) if l2_wrap else 0.0
        if use_checkpoint:
            loss, *state = checkpoint(_segment, model, *part, *state, denom, l2_scale, use_reentrant=False)
        else:
            loss, *state = _segment(model, *part, *state, denom, l2_scale)
        total = loss if total is None else total + loss
    if total is None:
        raise ConfigError("segmented_loss needs at least one token")
    return total


@torch.no_grad()
def assistant_loss(model, encoded: list[tuple[list[int], list[int]]], segment_len: int = DEFAULT_SEGMENT_LEN) -> float:
    """Mean loss per assistant token over encoded samples (token-weighted), without L2-wrap: the number a
    fine-tune should lower."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, mask in encoded:
        x = torch.tensor(ids, device=device)[None]  # (1, T+1)
        m = torch.tensor(mask, device=device)[None, 1:]
        n = int(m.sum())
        total += float(segmented_loss(model, x[:, :-1], x[:, 1:], m, segment_len, l2_wrap=False)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


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
    max_len: int | None = 256,
    seed: int = 0,
    segment_len: int = DEFAULT_SEGMENT_LEN,
) -> FinetuneResult:
    """A few AdamW steps on (masked) chat samples, one sample per step, cycling through them in a seeded order.

    Args:
        model (RWKV5): trained in place.
        samples (list[dict]): chat samples (see the module docstring).
        encode: text -> token ids.
        steps (int): optimizer steps. Default: 20.
        lr (float): learning rate. Default: 1e-4.
        max_len (int, optional): samples are cut to this many tokens; None keeps them whole. Default: 256.
        seed (int): sample order. Default: 0.
        segment_len (int): tokens per state-passing segment (see `segmented_loss`).
            Default: DEFAULT_SEGMENT_LEN.
    """
    encoded = encode_chat_samples(samples, encode, max_len)
    device = next(model.parameters()).device
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    model.train()
    losses = []
    counted = 0
    for step in range(steps):
        ids, mask = encoded[order[step % len(order)]]
        x = torch.tensor(ids, device=device)[None]  # (1, T+1)
        m = torch.tensor(mask, device=device)[None]
        loss = segmented_loss(model, x[:, :-1], x[:, 1:], m[:, 1:], segment_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        counted += int(m[:, 1:].sum())
    model.eval()
    return FinetuneResult(steps=steps, first_loss=losses[0], last_loss=losses[-1], assistant_tokens=counted)
