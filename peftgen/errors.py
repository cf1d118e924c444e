"""User-facing errors: what a person did wrong, where, and what is allowed.

One class, ``UserError``, carries every mistake of the user's (a bad spec, a missing
file, an unknown GPU). The CLI turns it into a clean message and exit code 2; any other
exception is a bug in peftgen and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace


def printable(text: str) -> str:
    """``text`` for a terminal: each control or other unprintable character as its Python
    escape (``\\x1b``), so a crafted file name or receipt field cannot move the cursor,
    recolour or retitle the user's terminal."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def normalise_name(name: str) -> str:
    """Case-, space-, dash- and underscore-insensitive key: "RTX 4090" == "rtx-4090"."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


CHOICE_SYNONYMS: dict[str, str] = {
    # dataset.format: the names other tools and trl's docs give these row shapes.
    "chat": "messages",
    "conversation": "messages",
    "conversations": "messages",
    "conversational": "messages",
    "sharegpt": "messages",
    "completion": "prompt_completion",
    "instruction": "prompt_completion",
    "alpaca": "prompt_completion",
    "dpo": "preference",
    "pairwise": "preference",
    "chosenrejected": "preference",
    "raw": "text",
    "plaintext": "text",
    # method: other trainers' names, for the supported method of the same kind (a reward
    # signal: GRPO; preference pairs: DPO), not the closest spelling (ppo -> dpo).
    "ppo": "grpo",
    "rlhf": "grpo",
    "rloo": "grpo",
    "reinforce": "grpo",
    "orpo": "dpo",
    "ipo": "dpo",
    "simpo": "dpo",
    # precision: the quantization or dtype a user names instead of the load.
    "nf4": "4bit",
    "fp4": "4bit",
    "int4": "4bit",
    "qlora": "4bit",
    "int8": "8bit",
    "llmint8": "8bit",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    # hardware.distributed
    "single": "none",
    "singlegpu": "none",
    # keys: other tools' names (peft's config, trl's and transformers' older arguments)
    "rank": "r",
    "lorarank": "r",
    "lr": "learning_rate",
    "seqlen": "max_length",
    "cutofflen": "max_length",
    "contextlength": "max_length",
    "batchsize": "per_device_train_batch_size",
    "microbatchsize": "per_device_train_batch_size",
    "gradaccum": "gradient_accumulation_steps",
    "gradientaccumulation": "gradient_accumulation_steps",
    "epochs": "num_train_epochs",
    "gpus": "num_gpus",
    "nodes": "num_nodes",
}
"""Words people write for a spec choice or key, normalised (``normalise_name``): offered
only when the word they stand for is among the field's choices (or the mapping's keys)."""


def close_matches(name: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """The choices a typo most likely meant, compared by ``normalise_name``: the same name
    spelt another way; a common synonym (``CHOICE_SYNONYMS``); choices that contain the
    name or that it contains (``zero3`` for ``deepspeed-zero3``), shortest first; then
    close spellings. Every did-you-mean uses this one."""
    keyed = {normalise_name(choice): choice for choice in choices}
    wanted = normalise_name(name)
    if wanted in keyed:
        return [keyed[wanted]]
    synonym = normalise_name(CHOICE_SYNONYMS.get(wanted, ""))
    if synonym in keyed:
        return [keyed[synonym]]
    if len(wanted) >= 3:
        nested = [key for key in keyed if len(key) >= 3 and (wanted in key or key in wanted)]
        if nested:
            return [keyed[key] for key in sorted(nested, key=len)[:limit]]
    hits = difflib.get_close_matches(wanted, list(keyed), n=limit, cutoff=0.6)
    return [keyed[hit] for hit in hits]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input, located as precisely as we can."""

    message: str
    """What is wrong and what is allowed, e.g. "must be > 0; got 0"."""
    file: str | None = None
    line: int | None = None
    """1-based line in ``file``."""
    column: int | None = None
    """1-based column in ``file``."""
    field_path: str | None = None
    """Dotted path of the field, e.g. ``lora.r``."""
    hint: str | None = None
    """A did-you-mean or a fix, shown after the message."""
    source_line: str | None = None
    """The text of ``line`` in ``file``, quoted under the message with a caret at ``column``."""

    def location(self) -> str:
        """``file:line:col`` as far as it is known."""
        parts = [self.file or "<spec>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def render(self) -> str:
        """One line (plus an optional hint line) a person can act on."""
        where = self.location()
        field_part = f" {self.field_path}:" if self.field_path else ""
        text = f"{where}:{field_part} {self.message}"
        if self.source_line is not None and self.line is not None:
            gutter = " " * len(str(self.line))
            text += f"\n  {self.line} | {self.source_line}"
            if self.column is not None:
                text += f"\n  {gutter} | {' ' * (self.column - 1)}^"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


@dataclass
class UserError(Exception):
    """The user's input is wrong. Carries every problem found, not just the first."""

    problems: list[Problem] = field(default_factory=list)
    exit_code: int = 2

    def __post_init__(self) -> None:
        super().__init__(self.render())

    @classmethod
    def single(cls, message: str, **where: str | int | None) -> UserError:
        return cls([Problem(message, **where)])  # type: ignore[arg-type]

    def render(self, unlocated: str | None = None) -> str:
        """Every problem; those that no file locates (a command-line option's) are said to
        be ``unlocated``'s (``peftgen plan``), not the spec's."""
        problems = self.problems
        if unlocated is not None:
            problems = [p if p.file else replace(p, file=unlocated) for p in problems]
        return "\n".join(problem.render() for problem in problems)

    def __str__(self) -> str:
        return self.render()


class NothingFitsError(Exception):
    """The spec is valid but no precision fits the GPU: exit code 3."""

    exit_code = 3
