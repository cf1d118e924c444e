"""Read a spec file: YAML with positions -> validated spec, or one ``UserError`` with every problem.

A person fixing a spec needs to know *where*: every problem carries ``file:line:col``
(1-based), the dotted field path, the bad value, what is allowed and, for typos, a
did-you-mean. All problems of a file are reported at once, sorted by line.

Malformed input is refused early and cheaply, before anything can grow without bound:

- files over ``MAX_SPEC_BYTES`` (1 MiB) are refused by size before they are read;
- bytes that are not UTF-8 are named by offset, line and column;
- tabs used for indentation, duplicate keys (YAML would silently keep the last one),
  an empty document, a top level that is not a mapping;
- documents nested deeper than ``MAX_DEPTH`` or whose anchors/aliases would expand to more
  than ``MAX_EXPANDED_NODES`` nodes ("billion laughs") are refused from the parser's event
  stream, which never expands an alias, so memory stays bounded by the file size.

Keys that other tools spell differently (axolotl, LLaMA-Factory, older trl) are accepted
with a warning naming the canonical key; never silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftgen.errors import Problem, UserError
from peftgen.load.aliases import KEY_ALIASES, KeyAlias, apply_key_aliases
from peftgen.load.locate import (
    DocPath,
    Position,
    as_path,
    did_you_mean,
    locate_path,
    located_problem,
    located_warning,
    sorted_problems,
)
from peftgen.load.source import MAX_SPEC_BYTES, decode, read_bytes
from peftgen.load.tree import MAX_ALIASES, MAX_DEPTH, MAX_EXPANDED_NODES, parse, top_level_problem
from peftgen.load.validation import validate
from peftgen.spec import AnySpec, set_dotted


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec plus where it came from, with the position of every key and value."""

    spec: AnySpec
    path: Path
    text: str
    sha256: str
    positions: dict[DocPath, Position] = field(default_factory=dict)
    """(line, column), 1-based, of every value by its path in the document, after aliases
    moved to their canonical keys: ``("lora", "r")``, ``("lora", "target_modules", 0)``."""
    warnings: tuple[str, ...] = ()
    """Rendered ``file:line:col: warning: ...`` lines for the CLI to print on stderr."""
    key_positions: dict[DocPath, Position] = field(default_factory=dict)
    """(line, column) of every mapping key by its path."""

    def position(self, field_path: str | DocPath) -> Position | None:
        """Where a field is written: its value (its key for a section), else the nearest
        enclosing section that is written; None for an empty document."""
        path = as_path(field_path)
        return locate_path(path, self.positions, self.key_positions)

    def problem(self, field_path: str, message: str, hint: str | None = None) -> Problem:
        """A ``Problem`` located at ``field_path`` in this file, quoting its source line."""
        return located_problem(
            self.path, self.text, self.position(field_path), field_path, message, hint
        )

    def warning(self, field_path: str, message: str) -> str:
        """A rendered warning located at ``field_path``."""
        return located_warning(self.path, self.position(field_path), field_path, message)


__all__ = [
    "KEY_ALIASES",
    "MAX_ALIASES",
    "MAX_DEPTH",
    "MAX_EXPANDED_NODES",
    "MAX_SPEC_BYTES",
    "DocPath",
    "KeyAlias",
    "LoadedSpec",
    "Position",
    "did_you_mean",
    "load_spec",
]


def load_spec(path: Path, edits: Mapping[str, Any] | None = None) -> LoadedSpec:
    """Load and validate one spec file; every problem found is raised at once.

    ``edits`` (dotted keys: ``plan --set``) are applied to the file's mapping before it is
    validated, so an edit can also repair a value the file gets wrong."""
    raw_bytes = read_bytes(path)
    text = decode(path, raw_bytes)
    document = parse(path, text)
    data = document.data
    spec_warnings = apply_key_aliases(path, text, document)
    if edits and isinstance(data, dict):
        for key, value in edits.items():
            set_dotted(data, key, value)
    problems = list(document.problems)
    spec: AnySpec | None = None
    if not isinstance(data, dict):
        problems.append(top_level_problem(path, text, data, document))
    else:
        spec, validation_problems = validate(path, text, data, document)
        # A value the reader already refused (a YAML tag, an unreadable number) was
        # replaced by null; pydantic's complaint about that null would only repeat it.
        refused = {problem.field_path for problem in document.problems}
        problems.extend(p for p in validation_problems if p.field_path not in refused)
    if problems or spec is None:
        raise UserError(sorted_problems(problems))
    return LoadedSpec(
        spec=spec,
        path=path,
        text=text,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        positions=document.value_positions,
        warnings=tuple(spec_warnings),
        key_positions=document.key_positions,
    )
