"""Where a problem is: document paths, positions, the quoted source line, and the rendered
``Problem`` / warning every other loader module builds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from peftgen.errors import Problem, close_matches

DocPath = tuple[str | int, ...]
Position = tuple[int, int]
"""(line, column), both 1-based."""


# --- small helpers ----------------------------------------------------------------------------


def as_path(field_path: str | DocPath) -> DocPath:
    if isinstance(field_path, tuple):
        return field_path
    return tuple(int(part) if part.isdigit() else part for part in field_path.split("."))


def dotted_path(path: DocPath) -> str:
    return ".".join(str(part) for part in path)


def locate_path(
    path: DocPath, values: dict[DocPath, Position], keys: dict[DocPath, Position]
) -> Position | None:
    """A scalar's value position; a section's key position; else the nearest written parent."""
    for length in range(len(path), -1, -1):
        prefix = path[:length]
        value_position = values.get(prefix)
        key_position = keys.get(prefix)
        if key_position is not None and (value_position is None or _is_section(values, prefix)):
            return key_position
        if value_position is not None:
            return value_position
    return None


def _is_section(values: dict[DocPath, Position], prefix: DocPath) -> bool:
    return any(
        len(key) == len(prefix) + 1 and key[: len(prefix)] == prefix and isinstance(key[-1], str)
        for key in values
    )


def located_problem(
    path: Path,
    text: str,
    where: Position | None,
    field_path: str | None,
    message: str,
    hint: str | None,
) -> Problem:
    line, column = where if where is not None else (None, None)
    return Problem(
        message,
        file=str(path),
        line=line,
        column=column,
        field_path=field_path,
        hint=hint,
        source_line=_source_line(text, line),
    )


def _source_line(text: str, line: int | None) -> str | None:
    if line is None:
        return None
    # Lines as YAML and the positions count them: split at "\n" only (``splitlines`` also
    # breaks at U+2028, form feeds and other characters the spec may hold).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not 1 <= line <= len(lines):
        return None
    # One column per character so the caret lines up; long lines are cut; other line
    # breaks and control characters are shown as spaces so the quote stays on one line.
    shown = "".join(" " if not c.isprintable() else c for c in lines[line - 1].rstrip("\r"))
    return shown[:160]


def located_warning(path: Path, where: Position | None, field_path: str, message: str) -> str:
    line, column = where if where is not None else (None, None)
    location = Problem("", file=str(path), line=line, column=column).location()
    return f"{location}: warning: {field_path}: {message}"


def sorted_problems(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda problem: (problem.line or 0, problem.column or 0))


def did_you_mean(value: object, choices: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` for a close match, comparing case-, dash- and space-insensitively.
    A number is matched by the choices that hold it (``precision: 4`` -> ``4bit``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        digits = f"{value:g}"
        matches = [choice for choice in choices if digits in choice][:3]
    elif isinstance(value, str):
        matches = close_matches(value, choices)
    else:
        return None
    if not matches:
        return None
    return "did you mean " + " or ".join(repr(match) for match in matches) + "?"


def kind_of(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return show_value(value)


def show_value(value: object) -> str:
    """A value as the user wrote it in YAML, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        flow = "[" + ", ".join(show_value(item).strip("'") for item in value) + "]"
        return flow if len(flow) <= 60 else f"a list of {len(value)} items"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown)
    return str(value)
