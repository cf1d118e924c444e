"""Reading a spec file's bytes and text: size limit, UTF-8, characters YAML would misread.

A file over ``MAX_SPEC_BYTES`` is refused before it is read; undecodable bytes are named
by offset, line and column; tabs used for indentation and raw line/paragraph separators
(which YAML reads as line breaks that editors do not show) are refused with their line.
"""

from __future__ import annotations

from pathlib import Path

from peftgen.errors import Problem, UserError
from peftgen.load.locate import located_problem

MAX_SPEC_BYTES = 1_048_576
"""A spec is a few KB; anything over 1 MiB is the wrong file, refused before reading."""


# --- reading bytes and text ------------------------------------------------------------------


def read_bytes(path: Path) -> bytes:
    where = str(path)
    try:
        size_bytes = path.stat().st_size
        if size_bytes > MAX_SPEC_BYTES:
            raise _too_big(where, size_bytes)
        with path.open("rb") as stream:
            # Read one byte past the limit: a FIFO or device reports no size up front.
            raw_bytes = stream.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError.single(f"cannot read spec: {reason}", file=where) from None
    if len(raw_bytes) > MAX_SPEC_BYTES:
        raise _too_big(where, len(raw_bytes))
    return raw_bytes


def _too_big(where: str, size_bytes: int) -> UserError:
    return UserError(
        [
            Problem(
                f"file is {size_bytes / 1e6:.1f} MB; a spec may be at most "
                f"{MAX_SPEC_BYTES // 1024} KiB",
                file=where,
                hint="a spec is a few KB of YAML; is this the right file?",
            )
        ]
    )


def decode(path: Path, raw_bytes: bytes) -> str:
    try:
        return raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start
        line = raw_bytes.count(b"\n", 0, offset) + 1
        column = offset - (raw_bytes.rfind(b"\n", 0, offset) + 1) + 1
        readable = raw_bytes.decode("utf-8", errors="replace")
        problem = located_problem(
            path,
            readable,
            (line, column),
            None,
            f"not UTF-8: byte 0x{raw_bytes[offset]:02x} at offset {offset} "
            f"(line {line}, column {column}) is not valid UTF-8",
            "save the file as UTF-8 (most editors: 'Save with encoding')",
        )
        raise UserError([problem]) from None


LINE_SEPARATORS = {
    "\u0085": "NEXT LINE",
    "\u2028": "LINE SEPARATOR",
    "\u2029": "PARAGRAPH SEPARATOR",
}
"""Characters YAML reads as line breaks but editors, ``cat`` and diffs show inside a line:
after ``#`` they would end a comment invisibly and switch on what looks commented out."""


def line_separator_problems(path: Path, text: str) -> list[Problem]:
    problems: list[Problem] = []
    for number, line in enumerate(text.split("\n"), start=1):
        for column, character in enumerate(line, start=1):
            name = LINE_SEPARATORS.get(character)
            if name is None:
                continue
            problems.append(
                located_problem(
                    path,
                    text,
                    (number, column),
                    None,
                    f"character U+{ord(character):04X} ({name}) is not allowed in a spec: YAML "
                    "reads it as a line break that editors do not show (after `#` it would turn "
                    "the rest of a comment into a setting)",
                    "delete the character, or break the line with a plain newline",
                )
            )
    return problems


def find_tab_problems(path: Path, text: str) -> list[Problem]:
    problems: list[Problem] = []
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.lstrip(" \t")
        indent = line[: len(line) - len(stripped)]
        if "\t" in indent and stripped and not stripped.startswith("#"):
            column = indent.index("\t") + 1
            problems.append(
                located_problem(
                    path,
                    text,
                    (number, column),
                    None,
                    "tab character in the indentation; YAML indents with spaces only",
                    "replace the tab with spaces (2 per level, as in the examples)",
                )
            )
    return problems
