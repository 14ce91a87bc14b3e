"""Fine-tune: segmented (state-passing) gradients equal whole-sequence ones, the assistant mask, a loss that falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rwkv5.config import ModelConfig
from rwkv5.errors import ConfigError, DataError
from rwkv5.train.chat import (
    assistant_loss,
    encode_chat,
    encode_chat_samples,
    finetune,
    read_chat_jsonl,
    segmented_loss,
)
from rwkv5.model import l2wrap, lm_loss
from tests.support.byte_tokenizer import ByteTokenizer

DEMO = Path(__file__).resolve().parents[2] / "data" / "rwkv-lm-demo.jsonl"  # tests/data/README.md: origin
# A small vocabulary keeps the head cheap; 260 covers the byte-level stand-in tokenizer below.
CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=260)


def _reference_loss(model, ids, mask):
    """`lm_loss` on the whole sequence, with the cross-entropy in float64 (lm_loss computes it in float32)."""
    logits = model(ids[:, :-1])  # (B, T, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    m = mask.flatten().double()
    return l2wrap((ce * m).sum() / m.sum(), logits)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm().clamp(min=1e-300)).item()


@pytest.mark.parametrize(
    "segment_len, grad_checkpoint",
    [(1, False), (6, True), (23, False), (40, False)],
    ids=["seg1", "seg6-block-ckpt", "seg23-whole", "seg40-longer"],
)
def test_segmented_gradients_equal_unsegmented(random_model, segment_len, grad_checkpoint):
    model = random_model(CFG).double().train()
    model.grad_checkpoint = grad_checkpoint
    T = 23  # not a multiple of 6: the last segment is short
    ids = torch.randint(0, CFG.vocab_size, (2, T + 1))
    mask = (torch.rand(2, T) < 0.6).long()

    ref_loss = _reference_loss(model, ids, mask)
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    loss = segmented_loss(model, ids[:, :-1], ids[:, 1:], mask, segment_len=segment_len)
    loss.backward()
    got = _grads(model)

    assert abs(loss.item() - ref_loss.item()) < 1e-12 * abs(ref_loss.item())
    errors = {n: _rel(got[n], ref[n]) for n in ref}
    assert max(errors.values()) < 1e-10, errors
    # The state path matters: early-layer time_decay only reaches later segments' loss through the state.
    assert ref["blocks.0.att.time_decay"].abs().max() > 0


def test_segments_without_state_passing_would_differ(random_model):
    """Guard for the test above: cutting the sample without carrying the state changes the gradient."""
    model = random_model(CFG).double().train()
    ids = torch.randint(0, CFG.vocab_size, (1, 33))
    lm_loss(model(ids[:, :-1]), ids[:, 1:], l2_wrap=False).backward()
    ref = _grads(model)["blocks.0.att.time_decay"]
    model.zero_grad(set_to_none=True)
    halves = [(ids[:, :16], ids[:, 1:17]), (ids[:, 16:32], ids[:, 17:33])]
    sum(lm_loss(model(x), y, l2_wrap=False) / 2 for x, y in halves).backward()
    assert _rel(_grads(model)["blocks.0.att.time_decay"], ref) > 1e-3


def test_segment_recompute_keeps_only_states(random_model):
    """With recomputation the forward saves no activation of segment length x vocabulary (the logits)."""
    model = random_model(CFG).train()
    T, S = 96, 16
    ids = torch.randint(0, CFG.vocab_size, (1, T + 1))
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        segmented_loss(model, ids[:, :-1], ids[:, 1:], segment_len=S)
    largest = max(s.numel() for s in saved)
    assert largest < S * CFG.vocab_size  # one segment's logits would be S x V
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        segmented_loss(model, ids[:, :-1], ids[:, 1:], segment_len=S, recompute=False)
    assert max(s.numel() for s in saved) >= S * CFG.vocab_size  # the test can see logits when they are kept


def test_segmented_loss_rejects_bad_input(random_model):
    model = random_model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    with pytest.raises(ConfigError, match="segment_len"):
        segmented_loss(model, ids[:, :-1], ids[:, 1:], segment_len=0)
    with pytest.raises(ConfigError, match="one shape"):
        segmented_loss(model, ids[:, :-1], ids[:, :-2])


def test_mask_covers_exactly_the_assistant_answers():
    tok = ByteTokenizer()
    sample = {"text": "System: be brief\n\nUser: hi there\n\nAssistant: hello!\n\nUser: bye\n\nAssistant: see you"}
    ids, mask = encode_chat(sample, tok.encode)
    assert tok.decode(ids[:-1]) == sample["text"] and ids[-1] == 0
    learned = [i for i, m in zip(ids, mask) if m]
    # Answers and the blank line that ends a turn; no role prefix, no user or system text.
    assert tok.decode(learned) == " hello!\n\n see you"
    assert learned[-1] == 0  # the end of document is learned too

    messages = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                             {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"},
                             {"role": "assistant", "content": "see you"}]}
    assert encode_chat(messages, tok.encode) == (ids, mask)


def test_read_chat_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"text": "User: a\n\nAssistant: b"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: invalid JSON"):
        read_chat_jsonl(path)
    with pytest.raises(DataError, match="no chat sample has assistant tokens"):
        encode_chat_samples([{"text": "User: only a question"}], ByteTokenizer().encode)


def test_finetune_on_demo_chat_lowers_assistant_loss(random_model):
    tok = ByteTokenizer()
    # The four samples whose answer starts earliest (byte tokens make prompts long).
    samples = sorted(read_chat_jsonl(DEMO), key=lambda s: s["text"].find("Assistant:"))[:4]
    model = random_model(CFG)
    encoded = encode_chat_samples(samples, tok.encode, max_len=320)
    assert len(encoded) == 4 and all(sum(m) < len(m) / 2 for _, m in encoded)  # most tokens are not learned
    before = assistant_loss(model, encoded, segment_len=160)
    result = finetune(model, samples, tok.encode, steps=12, lr=5e-3, max_len=320, segment_len=160)
    after = assistant_loss(model, encoded, segment_len=160)
    assert result.steps == 12 and result.assistant_tokens > 0
    assert after < before - 0.3, (before, after)
