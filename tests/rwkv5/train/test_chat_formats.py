"""Chat data shapes: each parses into turns and masks only the answers; a bad line is one error naming the file,
the line and the accepted formats; the held-out split is fixed and kept out of training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rwkv5.errors import DataError
from rwkv5.train.chat import encode_chat, heldout_split, read_chat_jsonl
from rwkv5.train.chat_formats import ACCEPTED_FORMATS, chat_format, chat_turns
from tests.support.byte_tokenizer import ByteTokenizer

PIPPA = Path(__file__).resolve().parents[2] / "data" / "pippa-sample.jsonl"  # tests/data/README.md: origin
TOK = ByteTokenizer()


def _learned(sample: dict) -> tuple[str, str]:
    """(whole decoded input, decoded learned tokens) of a sample."""
    ids, mask = encode_chat(sample, TOK.encode)
    return TOK.decode(ids), TOK.decode([i for i, m in zip(ids, mask) if m])


def _write(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_pippa_persona_definitions_and_greeting_are_input_not_loss():
    samples = read_chat_jsonl(PIPPA)
    assert len(samples) == 8 and {chat_format(s) for s in samples} == {"pippa"}
    mirela = samples[0]  # opens with the greeting as the bot's first message
    text, learned = _learned(mirela)
    assert text.startswith("System: You are Captain Mirela.\n\nA weathered airship captain")
    # Placeholders name the character and the user as the turns do.
    assert "User: Where are we headed?\nCaptain Mirela: East, to the lantern markets." in text
    assert "{{" not in text
    greeting = mirela["bot_greeting"]
    assert text.count(greeting) == 1 and f"Assistant: {greeting}\n\nUser: I can tie a bowline" in text
    # Learned: exactly the bot's answers after the greeting, each with the blank line that ends it, then id 0.
    answers = [m["message"] for m in mirela["conversation"][2::2]]
    assert learned == " " + "\n\n ".join(answers)
    ids, mask = encode_chat(mirela, TOK.encode)
    assert ids[-1] == 0 and mask[-1] == 1
    assert "persona" not in learned and greeting not in learned and "bowline, captain" not in learned

    sentinel = samples[3]  # <BOT>/<USER> placeholders, a greeting the conversation does not repeat
    text, learned = _learned(sentinel)
    assert "User: Are you dangerous?\nSentinel-7: Negative." in text and "<BOT>" not in text
    assert "Assistant: Visitor detected. Oxygen levels: acceptable. How may I assist User?\n\nUser: Is anyone" in text
    assert "Visitor detected" not in learned and learned.startswith(" Negative. The crew left")


def test_sharegpt_messages_and_text_forms_encode_alike():
    text_form = {"text": "System: be brief\n\nUser: hi there\n\nAssistant: hello!\n\nUser: bye\n\nAssistant: see you"}
    messages = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                             {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"},
                             {"role": "assistant", "content": "see you"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi there"},
                                  {"from": "gpt", "value": "hello!"}, {"from": "user", "value": "bye"},
                                  {"from": "assistant", "value": "see you"}]}
    expected = encode_chat(text_form, TOK.encode)
    assert TOK.decode(expected[0]) == text_form["text"]
    assert _learned(text_form)[1] == " hello!\n\n see you"  # no role prefix, no system or user text
    assert encode_chat(messages, TOK.encode) == expected
    assert encode_chat(sharegpt, TOK.encode) == expected
    assert [chat_format(s) for s in (text_form, messages, sharegpt)] == ["text", "messages", "sharegpt"]


def test_text_before_the_first_role_is_kept_as_written():
    sample = {"text": "Notes for the day.\n\nUser: and?\n\nAssistant: done"}
    turns = chat_turns(sample)
    assert [(t.role, t.learned, t.labelled) for t in turns] == [("user", False, False), ("user", False, True),
                                                                ("assistant", True, True)]
    assert _learned(sample) == (sample["text"], " done")


@pytest.mark.parametrize(
    "lines, line_no, problem",
    [
        ([{"messages": [{"role": "user", "content": "q"}]}, {"prompt": "q", "completion": "a"}], 2,
         "not a chat sample"),
        ([{"bot_name": "A", "conversation": [{"message": "hi", "is_human": True}]},
          {"conversations": [{"from": "human", "value": "hi"}]}], 2, "a sharegpt sample in a pippa file"),
        ([{"text": "User: a\n\nAssistant: b"}, "", {"text": "User: c"}, "{broken"], 4, "invalid JSON"),
        ([{"conversations": [{"from": "bing", "value": "hi"}]}], 1, "conversations[0].from is 'bing'"),
        ([{"bot_name": "A", "conversation": [{"message": "hi", "is_human": "yes"}]}], 1,
         "conversation[0].is_human must be true or false"),
        ([{"messages": [{"role": "tool", "content": "{}"}]}], 1, "messages[0].role is 'tool'"),
        ([["a list"]], 1, "not a chat sample"),
    ],
    ids=["unknown-shape", "mixed-formats", "bad-json", "sharegpt-role", "pippa-field", "messages-role", "not-object"],
)
def test_a_bad_line_is_one_error_naming_file_line_and_formats(tmp_path, lines, line_no, problem):
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line_no}: ") and problem in message, message
    assert message.endswith(f"accepted formats: {ACCEPTED_FORMATS}")
    assert re.search(r"PIPPA .*ShareGPT .*chat messages .*text ", message)


def test_the_demo_chat_set_parses(tmp_path):
    from data_prep.chat_sample import build_chat_sample

    samples = read_chat_jsonl(build_chat_sample(tmp_path / "chat-sample.jsonl", limit=40))
    assert len(samples) == 40 and all(chat_format(s) == "text" for s in samples)
    assert all(_learned(s)[1] for s in samples)


def test_heldout_split_is_fixed_and_never_trained_on():
    samples = [{"text": f"User: q{i}\n\nAssistant: a{i}"} for i in range(40)]
    train, held = heldout_split(samples, 6, seed=0)
    assert len(held) == 6 and len(train) == 34
    assert sorted(map(json.dumps, heldout_split(samples[::-1], 6)[1])) == sorted(map(json.dumps, held))  # any order
    assert heldout_split(samples, 6, seed=1)[1] != held
    assert all(s in heldout_split(samples, 8)[1] for s in held)  # a larger slice holds the smaller one

    copy = dict(held[0])
    train, _ = heldout_split(samples + [copy], 6)
    assert copy not in train  # a duplicate of a held-out conversation is not trained on either
    assert heldout_split(samples, 0) == (samples, [])
    with pytest.raises(DataError, match="leaves none to train on"):
        heldout_split(samples[:3], 3)
