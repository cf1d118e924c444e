"""Check one decoded row against the spec's method and dataset format.

The rules are the ones trl 1.16 and the chat templates rely on, so a row that passes
here tokenizes in the generated script: the keys each format needs, message lists of
``{role, content}`` with known roles, turns that alternate user/assistant after an
optional system message, non-empty text, and an SFT conversation that ends with the
assistant's reply (the tokens SFT learns from).

Each row also gets a *shape* (``"conversational"`` or ``"plain"``, plus ``", implicit
prompt"`` for preference pairs without a ``prompt``): trl looks at the first row only to
decide how to tokenize the whole dataset, so every row must share the first row's shape.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# Keys each format reads from a row (trl's names).
KEYS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}


@dataclass(frozen=True)
class RowFault:
    """One thing wrong with a row: where inside the row, and what."""

    field_path: str | None
    """Path inside the row, e.g. ``messages[2].role``; ``None`` for the row as a whole."""
    message: str


@dataclass(frozen=True)
class RowVerdict:
    faults: list[RowFault]
    shape: str | None
    """``"conversational"`` / ``"plain"`` (``", implicit prompt"`` appended for preference
    pairs without a prompt); ``None`` when the row is too broken to tell."""


def check_row(record: dict[str, Any], method: str, data_format: str) -> RowVerdict:
    """Every fault of one row for ``method`` trained on ``data_format``."""
    missing = [key for key in KEYS_BY_FORMAT[data_format] if key not in record]
    if data_format == "preference" and missing == ["prompt"]:
        return _check_implicit_preference(record)
    if missing:
        return RowVerdict([_missing_keys_fault(record, data_format, missing)], None)
    if data_format == "messages":
        return _check_messages_row(record["messages"], method)
    if data_format == "text":
        return RowVerdict(_check_text(record["text"], "text"), "plain")
    if data_format == "prompt_completion":
        return _check_prompt_completion(record)
    if data_format == "preference":
        return _check_preference(record)
    return _check_prompt_only(record["prompt"])


def guess_format(record: dict[str, Any]) -> str | None:
    """The format a row's keys suggest, for a "did you mean" on a format mismatch."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return None


def _missing_keys_fault(record: dict[str, Any], data_format: str, missing: list[str]) -> RowFault:
    names = ", ".join(f"`{key}`" for key in missing)
    present = ", ".join(f"`{key}`" for key in list(record)[:8]) or "none"
    plural = "s" if len(missing) > 1 else ""
    message = f"missing key{plural} {names} for format {data_format!r} (the row has {present})"
    # Suggest another format only when the row has none of this format's own keys
    # (`prompt` is shared by several formats, so it does not count).
    own_keys = set(KEYS_BY_FORMAT[data_format]) - {"prompt"}
    guessed = None if own_keys & set(record) else guess_format(record)
    if guessed is not None and guessed != data_format:
        message += f"; the row looks like format {guessed!r}: check dataset.format"
    return RowFault(None, message)


def _check_text(value: Any, field_path: str) -> list[RowFault]:
    if not isinstance(value, str):
        return [RowFault(field_path, f"must be a string; got {_kind(value)}")]
    if not value.strip():
        return [RowFault(field_path, "is empty")]
    return []


def _check_messages_row(messages: Any, method: str) -> RowVerdict:
    if not isinstance(messages, list):
        message = f"must be a list of {{role, content}} messages; got {_kind(messages)}"
        return RowVerdict([RowFault("messages", message)], None)
    # SFT learns from the assistant's reply, so the conversation must end with one; a GRPO
    # prompt may end on the user (the model answers) or the assistant (the model continues).
    last_roles = ("assistant",) if method == "sft" else ("user", "assistant")
    return RowVerdict(check_conversation(messages, "messages", last_roles), "conversational")


def check_conversation(
    messages: Sequence[Any], field_path: str, last_roles: tuple[str, ...]
) -> list[RowFault]:
    """A whole conversation: optional system, then user/assistant turns (tools after calls)."""
    if not messages:
        return [RowFault(field_path, "is an empty list; it needs at least one user message")]
    faults = _check_message_items(messages, field_path)
    if faults:
        return faults
    roles = [message["role"] for message in messages]
    previous = "start"
    for index, role in enumerate(roles):
        problem = _turn_order_problem(previous, role, index)
        if problem:
            faults.append(RowFault(f"{field_path}[{index}].role", problem))
            break
        previous = role
    if not faults and roles[-1] not in last_roles:
        wanted = " or ".join(repr(role) for role in last_roles)
        why = " (SFT trains on the assistant's reply)" if last_roles == ("assistant",) else ""
        faults.append(
            RowFault(
                field_path,
                f"the conversation ends with {roles[-1]!r}; it must end with {wanted}{why}",
            )
        )
    return faults


def _turn_order_problem(previous: str, role: str, index: int) -> str | None:
    """Why ``role`` may not follow ``previous``, or ``None`` when it may."""
    allowed = {
        "start": ("system", "user"),
        "system": ("user",),
        "user": ("assistant",),
        "assistant": ("user", "tool"),
        "tool": ("tool", "assistant"),
    }[previous]
    if role in allowed:
        return None
    if role == "system":
        return "a system message may only come first"
    if previous == "start":
        return (
            f"the conversation starts with {role!r}; start with 'user' (after an optional 'system')"
        )
    if role == previous:
        return (
            f"two {role!r} messages in a row (messages {index - 1} and {index}); turns must "
            "alternate user/assistant after an optional system message"
        )
    if role == "tool":
        return "a 'tool' message must follow an assistant message that calls a tool"
    return f"{role!r} cannot follow {previous!r}; expected {' or '.join(repr(r) for r in allowed)}"


def _check_message_items(messages: Sequence[Any], field_path: str) -> list[RowFault]:
    faults: list[RowFault] = []
    for index, message in enumerate(messages):
        where = f"{field_path}[{index}]"
        if not isinstance(message, dict):
            faults.append(
                RowFault(
                    where, f"must be an object with `role` and `content`; got {_kind(message)}"
                )
            )
            continue
        role = message.get("role")
        if "role" not in message:
            faults.append(RowFault(where, "missing key `role`"))
        elif role not in ROLES:
            faults.append(RowFault(f"{where}.role", _unknown_role_message(role)))
        calls_tool = role == "assistant" and bool(message.get("tool_calls"))
        if "content" not in message:
            if not calls_tool:
                faults.append(RowFault(where, "missing key `content`"))
            continue
        content = message["content"]
        if calls_tool and content in (None, ""):
            continue
        faults.extend(_check_text(content, f"{where}.content"))
    return faults


def _unknown_role_message(role: Any) -> str:
    allowed = ", ".join(ROLES)
    message = f"unknown role {role!r}; use one of: {allowed}"
    if isinstance(role, str):
        close = difflib.get_close_matches(role.lower(), ROLES, n=1, cutoff=0.5)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


def _check_continuation(messages: Any, field_path: str) -> list[RowFault]:
    """``completion`` / ``chosen`` / ``rejected`` as messages: the assistant's side of a turn."""
    if not messages:
        return [RowFault(field_path, "is an empty list; it needs the assistant's message")]
    faults = _check_message_items(messages, field_path)
    if faults:
        return faults
    if messages[0]["role"] != "assistant":
        return [
            RowFault(f"{field_path}[0].role", f"must be 'assistant'; got {messages[0]['role']!r}")
        ]
    return []


def _check_prompt_completion(record: dict[str, Any]) -> RowVerdict:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        faults = check_conversation(prompt, "prompt", ("user",))
        faults += _check_continuation(completion, "completion")
        return RowVerdict(faults, "conversational")
    if isinstance(prompt, list) or isinstance(completion, list):
        return RowVerdict(
            [
                RowFault(
                    None, "`prompt` and `completion` must both be strings or both be message lists"
                )
            ],
            None,
        )
    return RowVerdict(
        _check_text(prompt, "prompt") + _check_text(completion, "completion"), "plain"
    )


def _check_preference(record: dict[str, Any]) -> RowVerdict:
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    values = (prompt, chosen, rejected)
    if all(isinstance(value, list) for value in values):
        faults = check_conversation(prompt, "prompt", ("user",))
        faults += _check_continuation(chosen, "chosen")
        faults += _check_continuation(rejected, "rejected")
        shape = "conversational"
    elif any(isinstance(value, list) for value in values):
        return RowVerdict(
            [
                RowFault(
                    None,
                    "`prompt`, `chosen` and `rejected` must all be strings or all be message lists",
                )
            ],
            None,
        )
    else:
        faults = _check_text(prompt, "prompt") + _check_text(chosen, "chosen")
        faults += _check_text(rejected, "rejected")
        shape = "plain"
    if not faults and chosen == rejected:
        faults.append(
            RowFault(None, "`chosen` and `rejected` are identical; the pair teaches nothing")
        )
    return RowVerdict(faults, shape)


def _check_implicit_preference(record: dict[str, Any]) -> RowVerdict:
    """``chosen``/``rejected`` without ``prompt``: trl's ``extract_prompt`` finds the prompt."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        faults = check_conversation(chosen, "chosen", ("assistant",))
        faults += check_conversation(rejected, "rejected", ("assistant",))
        shape = "conversational, implicit prompt"
    elif isinstance(chosen, str) and isinstance(rejected, str):
        faults = _check_text(chosen, "chosen") + _check_text(rejected, "rejected")
        shape = "plain, implicit prompt"
    else:
        return RowVerdict(
            [
                RowFault(
                    None, "`chosen` and `rejected` must both be strings or both be message lists"
                )
            ],
            None,
        )
    if not faults and chosen == rejected:
        faults.append(
            RowFault(None, "`chosen` and `rejected` are identical; the pair teaches nothing")
        )
    elif not faults and split_implicit_prompt(chosen, rejected)[0] in ("", []):
        faults.append(
            RowFault(
                None,
                "missing key `prompt`, and `chosen`/`rejected` share no common start "
                "to take it from",
            )
        )
    return RowVerdict(faults, shape)


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """trl 1.16's ``extract_prompt``: the longest common start is the prompt."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


def _check_prompt_only(prompt: Any) -> RowVerdict:
    if isinstance(prompt, list):
        return RowVerdict(
            check_conversation(prompt, "prompt", ("user", "assistant")), "conversational"
        )
    return RowVerdict(_check_text(prompt, "prompt"), "plain")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
