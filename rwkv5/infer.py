"""RNN-mode inference: feed a context in chunks, then sample one token at a time from the carried state.

Everything here runs on `RWKV5.forward(idx, state, return_state=True)`; the model keeps no cache that grows
with the context, so a prompt of any length costs `RWKVState.nbytes()` of memory (about 32 MiB for the 7B)
plus the activations of one chunk. A prefill asks the head for the last position only, so a chunk never holds
its `T x V` logits. `embedding_on_host(model)` keeps the embedding table in host memory (0.54 GB of GPU memory
for the 7B in bf16): a token reads one row of it.

    model.eval()
    logits, state = prefill(model, tokenizer.encode("The capital of France is"))
    token = sample_logits(logits, temperature=1.0, top_p=0.85, generator=torch.Generator().manual_seed(0))
    logits, state = step(model, token, state)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rwkv5.errors import ConfigError
from rwkv5.model import RWKV5, RWKVState

__all__ = ["DEFAULT_CHUNK_LEN", "EOD_ID", "HostEmbedding", "embedding_on_host", "prefill", "step", "sample_logits",
           "generate", "iter_file_ids"]

# Tokens per forward call while prefilling: long enough to use the chunked WKV well, short enough that the
# activations of one call (chunk_len x vocab logits among them) stay small.
DEFAULT_CHUNK_LEN = 256
# End of document in the RWKV World vocabulary; also what a fresh document follows.
EOD_ID = 0
# Characters of a context file read and tokenized at a time by iter_file_ids.
_FILE_BLOCK_CHARS = 1 << 16


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def iter_file_ids(
    path: str | os.PathLike, tokenizer: _Tokenizer, block_chars: int = _FILE_BLOCK_CHARS
) -> Iterator[int]:
    """Token ids of a UTF-8 text file, read and tokenized a block at a time (memory independent of its size).

    Blocks end after a line break where there is one, so that few tokens are cut in two; tokens that would
    span a block boundary come out split, so the ids can differ slightly from encoding the whole text at
    once. Bytes that are not UTF-8 are replaced.

    Raises:
        ConfigError: the file does not exist or is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"generate.context_file: {path} is not a readable file")
    carry = ""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while block := f.read(block_chars):
            text = carry + block
            cut = text.rfind("\n") + 1 or len(text)
            carry = text[cut:]
            yield from tokenizer.encode(text[:cut])
    if carry:
        yield from tokenizer.encode(carry)


class HostEmbedding(nn.Module):
    """An embedding table kept in host memory; a lookup copies only the rows it reads to the ids' device.

    RNN mode reads one row per token, so the table (65536 x 4096: 0.54 GB in bf16 for the 7B) need not take
    GPU memory: a prefill chunk of 1024 tokens copies 8 MiB. `model.to(dtype)` casts the table, `model.to(device)`
    leaves it where it is (the host is its place, and a move would put the whole table on the GPU first).

    Args:
        embedding (nn.Module): an `nn.Embedding` or `QuantizedEmbedding` on any device; it is moved to the host.
    """

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.inner = embedding.to("cpu")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Ids `[B, T]` on any device -> rows `[B, T, C]` on that device."""
        return self.inner(idx.to("cpu")).to(idx.device)

    def _apply(self, fn, recurse=True):
        # What `fn` does to an empty tensor of a tensor's dtype says whether it casts; only the cast is applied.
        return super()._apply(lambda t: t.to(fn(t.new_empty(0)).dtype), recurse)


def embedding_on_host(model: RWKV5) -> RWKV5:
    """Put `model.emb` in host memory as a `HostEmbedding` (in place; the GPU copy is freed). Returns `model`.

    Logits are unchanged: the rows are the same values, looked up on the host.
    """
    if not isinstance(model.emb, HostEmbedding):
        model.emb = HostEmbedding(model.emb)
    return model


def _device(model: RWKV5) -> torch.device:
    # Not simply the first parameter: that is the embedding's, which may be in host memory.
    return next(p.device for name, p in model.named_parameters() if not name.startswith("emb."))


@torch.no_grad()
def prefill(
    model: RWKV5,
    ids: Iterable[int] | torch.Tensor,
    state: RWKVState | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> tuple[torch.Tensor, RWKVState]:
    """Run a context through the model `chunk_len` tokens at a time and return what comes after it.

    `ids` may be any iterable, including a generator that reads a file lazily: only one chunk of ids is
    held at a time, and the state carried between chunks has a fixed size.

    Args:
        model (RWKV5): the model, batch size 1.
        ids (Iterable[int] | Tensor): token ids, at least one (a 1-D tensor is also accepted).
        state (RWKVState, optional): state after earlier text. Default: the empty state.
        chunk_len (int): tokens per forward call. Default: DEFAULT_CHUNK_LEN.

    Returns:
        The float32 logits `[V]` after the last id, and the state after it.

    Raises:
        ConfigError: `chunk_len` < 1, or `ids` is empty.
    """
    if chunk_len < 1:
        raise ConfigError(f"infer.chunk_len must be >= 1, got {chunk_len}")
    device = _device(model)
    if isinstance(ids, torch.Tensor):
        chunks: Iterable[Sequence[int] | torch.Tensor] = ids.reshape(-1).split(chunk_len)
    else:
        it = iter(ids)
        chunks = iter(lambda: list(itertools.islice(it, chunk_len)), [])
    logits, own = None, False
    for chunk in chunks:
        idx = torch.as_tensor(chunk, dtype=torch.long, device=device).view(1, -1)  # (1, T)
        # Once the state is one this call made, each chunk overwrites it in place: one state in memory, not two
        # (the caller's `state` is never written). Stand-ins for RWKV5 (tests, eval) keep the plain call.
        in_place = {"out_state": state} if own and isinstance(model, RWKV5) else {}
        out, state = model(idx, state, return_state=True, last_only=True, **in_place)
        logits, own = out[0, -1], True
    if logits is None:
        raise ConfigError("prefill needs at least one token id")
    return logits.float(), state


@torch.no_grad()
def step(model: RWKV5, token: int, state: RWKVState | None) -> tuple[torch.Tensor, RWKVState]:
    """Feed one token; returns the float32 logits `[V]` for the next one and the new state."""
    idx = torch.tensor([[token]], dtype=torch.long, device=_device(model))  # (1, 1)
    out, state = model(idx, state, return_state=True)
    return out[0, -1].float(), state


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Draw a token id from logits `[V]` with temperature and nucleus (top-p) sampling.

    Args:
        logits (Tensor): `[V]` unnormalised scores.
        temperature (float): divides the logits; 0 picks the most likely token. Default: 1.0.
        top_p (float): keep the fewest most likely tokens whose probability sums to at least top_p, then
            renormalise; 1.0 keeps all. Default: 1.0.
        generator (torch.Generator, optional): a CPU generator, for reproducible draws. Default: torch's.

    Raises:
        ConfigError: temperature < 0 or top_p outside (0, 1].
    """
    if temperature < 0:
        raise ConfigError(f"sampling.temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"sampling.top_p must be in (0, 1], got {top_p}")
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # A token stays if the mass strictly before it is below top_p, so the most likely one always stays.
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: RWKV5,
    tokenizer: _Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int | None = None,
    context: tuple[torch.Tensor, RWKVState] | None = None,
    stop_at_eod: bool = True,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled ids that continue `prompt`.

    Args:
        model (RWKV5): the model; put it in eval mode first.
        tokenizer: anything with `encode(str) -> list[int]`.
        prompt (str): text to continue; may be empty when `context` is given.
        max_new_tokens (int): upper bound on the ids yielded.
        temperature, top_p: see `sample_logits`. Defaults: 1.0, 0.85.
        seed (int, optional): seeds a private generator, so the same call yields the same ids.
            Default: torch's global generator.
        context (tuple, optional): `(logits, state)` after an earlier context, as `prefill` returns them
            (e.g. for a long file); the prompt continues it. Default: start a new document.
        stop_at_eod (bool): stop after sampling the end-of-document id (which is not yielded). Default: True.
        chunk_len (int): prefill chunk length. Default: DEFAULT_CHUNK_LEN.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"generate.max_new_tokens must be >= 0, got {max_new_tokens}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt) if prompt else []
    logits, state = context if context is not None else (None, None)
    if not ids and context is None:
        ids = [EOD_ID]  # a new document starts after an end-of-document token
    if ids:
        logits, state = prefill(model, ids, state, chunk_len)
    for _ in range(max_new_tokens):
        token = sample_logits(logits, temperature, top_p, generator)
        if stop_at_eod and token == EOD_ID:
            return
        yield token
        logits, state = step(model, token, state)
