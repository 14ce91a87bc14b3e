"""Chat sample shapes and their turns: PIPPA, ShareGPT, chat messages and the User:/Assistant: text form.

Every shape becomes one list of `Turn`s, which `rwkv5.train.chat.encode_chat` renders in a single template
("System: ...\\n\\nUser: ...\\n\\nAssistant: ..."), so a model fine-tuned on any of them answers in one form.
Only `Turn.learned` turns (assistant answers) count in the loss; persona and context (a system message,
PIPPA's description, definitions and greeting) are input only, like user turns.

A file holds one shape: `read_chat_jsonl` detects it on the first sample and refuses a line of another shape
or of none, in one line naming the file, the line and `ACCEPTED_FORMATS`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from rwkv5.errors import DataError

__all__ = ["ACCEPTED_FORMATS", "Turn", "chat_format", "chat_turns", "read_chat_jsonl"]

ACCEPTED_FORMATS = (
    "PIPPA {bot_name, bot_description, bot_definitions, bot_greeting, conversation: [{message, is_human}]}, "
    "ShareGPT {conversations: [{from: human|user|gpt|assistant|system, value}]}, "
    "chat messages {messages: [{role: system|user|assistant, content}]}, "
    'text {"text": "User: ...\\n\\nAssistant: ..."}'
)

_KEYS = {"pippa": "conversation", "sharegpt": "conversations", "messages": "messages", "text": "text"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MESSAGE_ROLES = ("system", "user", "assistant")
_TEXT_TURN = re.compile(r"(?:^|\n\n)(System|User|Assistant):", re.MULTILINE)
# Character-card placeholders: PIPPA writes {{char}}/{{user}}, older TavernAI cards <BOT>/<USER>.
_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)


@dataclass(frozen=True)
class Turn:
    """One turn: `role` ("system", "user" or "assistant") and its text; `learned` turns count in the loss.
    `labelled` is False only for text before the first role prefix of the text form, kept as it was written."""

    role: str
    text: str
    learned: bool = False
    labelled: bool = True


def chat_format(sample: object) -> str | None:
    """The shape of a parsed JSON line ("pippa", "sharegpt", "messages", "text"), None for none of them."""
    if isinstance(sample, dict):
        for name, key in _KEYS.items():
            if key in sample:
                return name
    return None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{what} is {type(value).__name__}, not a string")
    return value


def _items(sample: dict, key: str) -> list[dict]:
    items = sample[key]
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise DataError(f"'{key}' must be a non-empty list of objects")
    return items


def _pippa_turns(sample: dict) -> list[Turn]:
    name = _text(sample.get("bot_name"), "bot_name").strip()
    if not name:
        raise DataError("bot_name is empty")

    def fill(text: object, what: str) -> str:
        return _USER.sub("User", _CHAR.sub(name, _text(text or "", what))).strip()

    context = "\n\n".join(part for part in (f"You are {name}.", fill(sample.get("bot_description"), "bot_description"),
                                            fill(sample.get("bot_definitions"), "bot_definitions")) if part)
    turns = [Turn("system", context)]
    messages = _items(sample, "conversation")
    greeting = fill(sample.get("bot_greeting"), "bot_greeting")
    for i, message in enumerate(messages):
        if not isinstance(message.get("is_human"), bool):
            raise DataError(f"conversation[{i}].is_human must be true or false")
        text = fill(message.get("message"), f"conversation[{i}].message")
        turns.append(Turn("user", text) if message["is_human"] else Turn("assistant", text, learned=True))
    if greeting:
        # The greeting is the card's, not a learned answer; PIPPA often repeats it as the first bot message.
        if turns[1].role == "assistant" and turns[1].text == greeting:
            turns[1] = Turn("assistant", greeting)
        else:
            turns.insert(1, Turn("assistant", greeting))
    return turns


def _sharegpt_turns(sample: dict) -> list[Turn]:
    turns = []
    for i, item in enumerate(_items(sample, "conversations")):
        role = _SHAREGPT_ROLES.get(item.get("from"))
        if role is None:
            raise DataError(f"conversations[{i}].from is {item.get('from')!r}, not one of {sorted(_SHAREGPT_ROLES)}")
        turns.append(Turn(role, _text(item.get("value"), f"conversations[{i}].value"), learned=role == "assistant"))
    return turns


def _message_turns(sample: dict) -> list[Turn]:
    turns = []
    for i, item in enumerate(_items(sample, "messages")):
        role = item.get("role")
        if role not in _MESSAGE_ROLES:
            raise DataError(f"messages[{i}].role is {role!r}, not one of {list(_MESSAGE_ROLES)}")
        turns.append(Turn(role, _text(item.get("content"), f"messages[{i}].content"), learned=role == "assistant"))
    return turns


def _text_turns(sample: dict) -> list[Turn]:
    """Split "User: ...\\n\\nAssistant: ..." at its role prefixes; text before the first one is a user turn."""
    text = _text(sample["text"], "text")
    matches = list(_TEXT_TURN.finditer(text))
    if not matches:
        return [Turn("user", text, labelled=False)]
    turns = []
    head = text[: matches[0].start()]
    if head:
        turns.append(Turn("user", head, labelled=False))
    for match, end in zip(matches, [m.start() for m in matches[1:]] + [len(text)]):
        role = match[1].lower()
        body = text[match.end() : end]
        turns.append(Turn(role, body[1:] if body.startswith(" ") else body, learned=role == "assistant"))
    return turns


_PARSERS = {"pippa": _pippa_turns, "sharegpt": _sharegpt_turns, "messages": _message_turns, "text": _text_turns}


def chat_turns(sample: dict) -> list[Turn]:
    """The turns of one sample of any accepted shape.

    Raises:
        DataError: an unknown shape, or a known one with a missing or mistyped field (the message names it).
    """
    fmt = chat_format(sample)
    if fmt is None:
        raise DataError(f"not a chat sample; accepted formats: {ACCEPTED_FORMATS}")
    return _PARSERS[fmt](sample)


def read_chat_jsonl(path: str | Path) -> list[dict]:
    """Every sample of a chat JSONL file, checked: one shape for the whole file, each line parses into turns.

    Raises:
        DataError: a missing or empty file, or a bad line: one line naming the file, the line number, what is
            wrong and the accepted formats.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: chat data file not found")
    samples: list[dict] = []
    file_format, first = None, 0
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                fmt = chat_format(sample)
                if fmt is None:
                    raise DataError("not a chat sample")
                if file_format is not None and fmt != file_format:
                    raise DataError(f"a {fmt} sample in a {file_format} file (detected on line {first})")
                chat_turns(sample)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{no}: invalid JSON ({exc.msg}); accepted formats: {ACCEPTED_FORMATS}") \
                    from None
            except DataError as exc:
                raise DataError(f"{path}:{no}: {exc}; accepted formats: {ACCEPTED_FORMATS}") from None
            file_format, first = file_format or fmt, first or no
            samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no chat samples")
    return samples
