"""User-facing errors: what a person did wrong, where, and what is allowed.

One class, ``UserError``, carries every mistake of the user's (a bad spec, a missing
file, an unknown GPU). The CLI turns it into a clean message and exit code 2; any other
exception is a bug in peftgen and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field


def normalise_name(name: str) -> str:
    """Case-, space-, dash- and underscore-insensitive key: "RTX 4090" == "rtx-4090"."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def close_matches(name: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """The choices a typo most likely meant: the same name spelt another way first, then
    close matches, compared by ``normalise_name``. Every did-you-mean uses this one."""
    keyed = {normalise_name(choice): choice for choice in choices}
    wanted = normalise_name(name)
    if wanted in keyed:
        return [keyed[wanted]]
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

    def render(self) -> str:
        return "\n".join(problem.render() for problem in self.problems)

    def __str__(self) -> str:
        return self.render()


class NothingFitsError(Exception):
    """The spec is valid but no precision fits the GPU: exit code 3."""

    exit_code = 3
