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
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    Event,
    ScalarEvent,
)
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from peftgen.errors import Problem, UserError, close_matches
from peftgen.spec import SPEC_ADAPTER, AnySpec, DpoRunSpec, GrpoRunSpec, SftSpec

MAX_SPEC_BYTES = 1_048_576
"""A spec is a few KB; anything over 1 MiB is the wrong file, refused before reading."""
MAX_DEPTH = 32
"""Deepest nesting of mappings/lists accepted (a spec needs 3)."""
MAX_ALIASES = 100
"""Most ``*alias`` references accepted in one spec."""
MAX_EXPANDED_NODES = 10_000
"""Most nodes the document may hold once every alias is expanded (a spec has ~100)."""

DocPath = tuple[str | int, ...]
Position = tuple[int, int]
"""(line, column), both 1-based."""

METHOD_CLASSES: dict[str, type[SftSpec | DpoRunSpec | GrpoRunSpec]] = {
    "sft": SftSpec,
    "dpo": DpoRunSpec,
    "grpo": GrpoRunSpec,
}
METHOD_SECTIONS = ("dpo", "grpo")
"""Sections that belong to one method each."""

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}


class KeyAlias(NamedTuple):
    """Another tool's name for a spec key, accepted with a warning."""

    key: str
    canonical: tuple[str, str]
    """(section, field) the value belongs to."""
    tool: str


KEY_ALIASES: tuple[KeyAlias, ...] = (
    KeyAlias("micro_batch_size", ("training", "per_device_train_batch_size"), "axolotl"),
    KeyAlias("sequence_len", ("training", "max_length"), "axolotl"),
    KeyAlias("cutoff_len", ("training", "max_length"), "LLaMA-Factory"),
    KeyAlias("max_seq_length", ("training", "max_length"), "older trl"),
    KeyAlias("num_epochs", ("training", "num_train_epochs"), "axolotl"),
    KeyAlias("sample_packing", ("training", "packing"), "axolotl"),
    KeyAlias("lr_scheduler", ("training", "lr_scheduler_type"), "axolotl"),
    KeyAlias("optimizer", ("training", "optim"), "axolotl"),
    KeyAlias("lora_r", ("lora", "r"), "axolotl"),
    KeyAlias("lora_rank", ("lora", "r"), "LLaMA-Factory"),
    KeyAlias("lora_target_modules", ("lora", "target_modules"), "axolotl"),
    KeyAlias("base_model", ("model", "id"), "axolotl"),
    KeyAlias("model_name_or_path", ("model", "id"), "LLaMA-Factory"),
)
"""Accepted at the top level (flat configs) or inside the canonical key's own section."""


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
        path = _as_path(field_path)
        return _locate(path, self.positions, self.key_positions)

    def problem(self, field_path: str, message: str, hint: str | None = None) -> Problem:
        """A ``Problem`` located at ``field_path`` in this file, quoting its source line."""
        return _problem(self.path, self.text, self.position(field_path), field_path, message, hint)

    def warning(self, field_path: str, message: str) -> str:
        """A rendered warning located at ``field_path``."""
        return _warning(self.path, self.position(field_path), field_path, message)


def load_spec(path: Path) -> LoadedSpec:
    """Load and validate one spec file; every problem found is raised at once."""
    raw_bytes = _read_bytes(path)
    text = _decode(path, raw_bytes)
    document = _parse(path, text)
    data = document.data
    spec_warnings = _apply_key_aliases(path, text, document)
    problems = list(document.problems)
    spec: AnySpec | None = None
    if not isinstance(data, dict):
        problems.append(_top_level_problem(path, text, data, document))
    else:
        spec, validation_problems = _validate(path, text, data, document)
        # A value the reader already refused (a YAML tag, an unreadable number) was
        # replaced by null; pydantic's complaint about that null would only repeat it.
        refused = {problem.field_path for problem in document.problems}
        problems.extend(p for p in validation_problems if p.field_path not in refused)
    if problems or spec is None:
        raise UserError(_sorted(problems))
    return LoadedSpec(
        spec=spec,
        path=path,
        text=text,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        positions=document.value_positions,
        warnings=tuple(spec_warnings),
        key_positions=document.key_positions,
    )


# --- reading bytes and text ------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
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


def _decode(path: Path, raw_bytes: bytes) -> str:
    try:
        return raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start
        line = raw_bytes.count(b"\n", 0, offset) + 1
        column = offset - (raw_bytes.rfind(b"\n", 0, offset) + 1) + 1
        readable = raw_bytes.decode("utf-8", errors="replace")
        problem = _problem(
            path,
            readable,
            (line, column),
            None,
            f"not UTF-8: byte 0x{raw_bytes[offset]:02x} at offset {offset} "
            f"(line {line}, column {column}) is not valid UTF-8",
            "save the file as UTF-8 (most editors: 'Save with encoding')",
        )
        raise UserError([problem]) from None


# --- YAML -> plain data with positions --------------------------------------------------------


@dataclass
class _Document:
    """Plain Python data of a YAML document, plus where each key and value was written."""

    data: object = None
    value_positions: dict[DocPath, Position] = field(default_factory=dict)
    key_positions: dict[DocPath, Position] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _parse(path: Path, text: str) -> _Document:
    separator_problems = _line_separator_problems(path, text)
    if separator_problems:
        raise UserError(separator_problems)
    tab_problems = _tab_problems(path, text)
    if tab_problems:
        # Tabs derail the scanner into errors about the wrong thing; name them instead.
        raise UserError(tab_problems)
    yaml = YAML(typ="safe", pure=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_events(path, text, yaml.parse(text))
            root = yaml.compose(text)
    except MarkedYAMLError as error:
        raise UserError([_syntax_problem(path, text, error)]) from None
    except ReaderError as error:
        raise UserError([_reader_problem(path, text, error)]) from None
    except YAMLError as error:
        raise UserError.single(f"malformed YAML: {error}", file=str(path)) from None
    document = _Document()
    if root is not None and not _is_empty_scalar(root):  # a lone `---` holds no document
        builder = _Builder(path, text, yaml, document)
        document.data = builder.build(root, ())
    return document


LINE_SEPARATORS = {
    "\u0085": "NEXT LINE",
    "\u2028": "LINE SEPARATOR",
    "\u2029": "PARAGRAPH SEPARATOR",
}
"""Characters YAML reads as line breaks but editors, ``cat`` and diffs show inside a line:
after ``#`` they would end a comment invisibly and switch on what looks commented out."""


def _line_separator_problems(path: Path, text: str) -> list[Problem]:
    problems: list[Problem] = []
    for number, line in enumerate(text.split("\n"), start=1):
        for column, character in enumerate(line, start=1):
            name = LINE_SEPARATORS.get(character)
            if name is None:
                continue
            problems.append(
                _problem(
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


def _is_empty_scalar(node: Node) -> bool:
    """A value written as nothing at all (``r:``), which YAML reads as null."""
    return isinstance(node, ScalarNode) and node.value == "" and node.style is None


def _tab_problems(path: Path, text: str) -> list[Problem]:
    problems: list[Problem] = []
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.lstrip(" \t")
        indent = line[: len(line) - len(stripped)]
        if "\t" in indent and stripped and not stripped.startswith("#"):
            column = indent.index("\t") + 1
            problems.append(
                _problem(
                    path,
                    text,
                    (number, column),
                    None,
                    "tab character in the indentation; YAML indents with spaces only",
                    "replace the tab with spaces (2 per level, as in the examples)",
                )
            )
    return problems


def _check_events(path: Path, text: str, events: Iterable[Event]) -> None:
    """Refuse deep nesting and alias bombs from the event stream, before composing.

    Events never expand aliases, so this costs time and memory linear in the file size,
    while it computes the size the document *would* have with every alias expanded.
    """
    anchor_sizes: dict[str, int] = {}
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, nodes so far) per open collection
    aliases = 0
    total_nodes = 0

    def refuse(event: Event, message: str, hint: str) -> UserError:
        where = (event.start_mark.line + 1, event.start_mark.column + 1)
        return UserError([_problem(path, text, where, None, message, hint)])

    def add(size: int) -> None:
        nonlocal total_nodes
        if open_nodes:
            anchor, so_far = open_nodes[-1]
            open_nodes[-1] = (anchor, so_far + size)
        else:
            total_nodes += size

    for event in events:
        if isinstance(event, CollectionStartEvent):
            open_nodes.append((event.anchor, 1))
            if len(open_nodes) > MAX_DEPTH:
                raise refuse(
                    event,
                    f"nested more than {MAX_DEPTH} levels deep",
                    "a spec has sections of plain keys, 3 levels at most",
                )
        elif isinstance(event, CollectionEndEvent):
            anchor, size = open_nodes.pop()
            if anchor is not None:
                anchor_sizes[anchor] = size
            add(size)
        elif isinstance(event, ScalarEvent):
            if event.anchor is not None:
                anchor_sizes[event.anchor] = 1
            add(1)
        elif isinstance(event, AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_nodes):
                raise refuse(
                    event,
                    f"alias *{event.anchor} is inside its own anchor &{event.anchor}: the value "
                    "would contain itself without end",
                    f"write the values out, or point *{event.anchor} at another anchor",
                )
            aliases += 1
            if aliases > MAX_ALIASES:
                raise refuse(
                    event,
                    f"more than {MAX_ALIASES} aliases (*name)",
                    "write the values out; a spec needs few or no anchors",
                )
            add(anchor_sizes.get(event.anchor, 1))
        if total_nodes + sum(size for _, size in open_nodes) > MAX_EXPANDED_NODES:
            growth = "anchors and aliases expand this document" if aliases else "this file holds"
            raise refuse(
                event,
                f"{growth} past {MAX_EXPANDED_NODES:,} values (a spec holds about a hundred)",
                "is this the right file? write values out rather than through aliases",
            )


class _Builder:
    """Turns composed YAML nodes into plain data, recording positions and duplicate keys."""

    def __init__(self, path: Path, text: str, yaml: YAML, document: _Document) -> None:
        self.path = path
        self.text = text
        self.yaml = yaml
        self.document = document

    def build(self, node: Node, path: DocPath) -> object:
        self.document.value_positions[path] = _mark_position(node)
        if isinstance(node, MappingNode):
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != f"{_TAG}seq":
                return self._bad_tag(node, path)
            return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return self._scalar(node, path)

    def _mapping(self, node: MappingNode, path: DocPath) -> object:
        if node.tag != f"{_TAG}map":
            return self._bad_tag(node, path)
        result: dict[str, object] = {}
        first_seen: dict[str, Position] = {}
        merged: list[tuple[Node, Position]] = []
        for key_node, value_node in node.value:
            if key_node.tag == f"{_TAG}merge":
                merge_at = _mark_position(key_node)
                merged.extend((source, merge_at) for source in _merge_sources(value_node))
                continue
            if not isinstance(key_node, ScalarNode):
                self._fail(_mark_position(key_node), path, "a key must be a plain name")
                continue
            key = str(key_node.value)
            key_position = _mark_position(key_node)
            if key in first_seen:
                first_line = first_seen[key][0]
                self._fail(
                    key_position,
                    (*path, key),
                    f"duplicate key (first on line {first_line}); YAML would silently keep "
                    "only the last one",
                    f"keep one `{key}:`",
                )
                continue
            first_seen[key] = key_position
            self.document.key_positions[(*path, key)] = key_position
            result[key] = self.build(value_node, (*path, key))
            if _is_empty_scalar(value_node):
                # An empty value's mark is the next token (often the next line): point just
                # past the colon of its own key instead.
                end = key_node.end_mark
                self.document.value_positions[(*path, key)] = (end.line + 1, end.column + 2)
        for source, merge_at in merged:
            if not isinstance(source, MappingNode):
                self._fail(
                    _mark_position(source), path, "`<<:` merges a mapping (or a list of them)"
                )
                continue
            written = self._positions_under(path, result)
            extra = self._mapping(source, path)
            # Keys written here win over merged ones, and so do their positions: a problem
            # with one quotes the line it is written on, not the merged anchor's.
            self._restore_positions(path, result, written)
            if isinstance(extra, dict):
                for key, value in extra.items():
                    if key not in result:
                        # A merged key is written here as `<<:`; its value where the anchor is.
                        self.document.key_positions[(*path, key)] = merge_at
                        result[key] = value
        return result

    def _positions_under(
        self, path: DocPath, keys: dict[str, object]
    ) -> tuple[dict[DocPath, Position], dict[DocPath, Position]]:
        """The recorded positions of ``keys`` of the mapping at ``path`` and below them."""
        depth = len(path)

        def mine(doc_path: DocPath) -> bool:
            return len(doc_path) > depth and doc_path[:depth] == path and doc_path[depth] in keys

        values = {k: v for k, v in self.document.value_positions.items() if mine(k)}
        key_positions = {k: v for k, v in self.document.key_positions.items() if mine(k)}
        return values, key_positions

    def _restore_positions(
        self,
        path: DocPath,
        keys: dict[str, object],
        saved: tuple[dict[DocPath, Position], dict[DocPath, Position]],
    ) -> None:
        for table, old in zip(
            (self.document.value_positions, self.document.key_positions), saved, strict=True
        ):
            depth = len(path)
            for doc_path in [
                k for k in table if len(k) > depth and k[:depth] == path and k[depth] in keys
            ]:
                del table[doc_path]
            table.update(old)

    def _scalar(self, node: ScalarNode, path: DocPath) -> object:
        if node.tag == f"{_TAG}timestamp":
            return str(node.value)  # a date typed unquoted is meant as text (e.g. a revision)
        if node.tag not in _SCALAR_TAGS:
            return self._bad_tag(node, path)
        try:
            return self.yaml.constructor.construct_object(node, deep=True)
        except (ValueError, YAMLError):
            self._fail(_mark_position(node), path, f"cannot read the value {node.value[:40]!r}")
            return None

    def _bad_tag(self, node: Node, path: DocPath) -> object:
        self._fail(
            _mark_position(node),
            path,
            f"YAML tag {str(node.tag).replace(_TAG, '!!')} is not allowed in a spec",
            "remove the `!tag`; a spec holds plain text, numbers, true/false, lists and mappings",
        )
        return None

    def _fail(self, where: Position, path: DocPath, message: str, hint: str | None = None) -> None:
        field_path = _dotted(path) or None
        self.document.problems.append(
            _problem(self.path, self.text, where, field_path, message, hint)
        )


def _merge_sources(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    return [node]


def _mark_position(node: Node) -> Position:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _syntax_problem(path: Path, text: str, error: MarkedYAMLError) -> Problem:
    mark = error.problem_mark or error.context_mark
    where = (mark.line + 1, mark.column + 1) if mark is not None else None
    parts = [part for part in (error.context, error.problem) if part]
    detail = "; ".join(str(part) for part in parts) or "cannot parse"
    context_mark, problem_mark = error.context_mark, error.problem_mark
    if (
        context_mark is not None
        and problem_mark is not None
        and (context_mark.line != problem_mark.line)
    ):
        detail += f" (the construct starts on line {context_mark.line + 1})"
    hint = None
    if "mapping values are not allowed" in detail:
        hint = "quote a value that contains ': ', or check the indentation of this line"
    elif "found character '\\t'" in detail:
        hint = "replace the tab with spaces"
    elif "single document" in detail:
        hint = "a spec is one YAML document; remove the `---` separator and what follows"
    return _problem(path, text, where, None, f"YAML syntax error: {detail}", hint)


def _reader_problem(path: Path, text: str, error: ReaderError) -> Problem:
    position = int(error.position)
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    character = error.character
    code = ord(character) if isinstance(character, str) else int(character)
    return _problem(
        path,
        text,
        (line, column),
        None,
        f"character U+{code:04X} is not allowed in YAML ({error.reason})",
        "remove the control character; a spec is plain text",
    )


def _top_level_problem(path: Path, text: str, data: object, document: _Document) -> Problem:
    if data is None and () not in document.value_positions:
        return Problem(
            "the file is empty; a spec needs at least name, method, model, dataset, hardware",
            file=str(path),
            hint="start from one of the examples in specs/",
        )
    return _problem(
        path,
        text,
        document.value_positions.get((), (1, 1)),
        None,
        f"the top level must be a mapping of keys (name: ..., method: ...); got {_kind(data)}",
        None,
    )


# --- aliases from other tools -----------------------------------------------------------------


def _apply_key_aliases(path: Path, text: str, document: _Document) -> list[str]:
    """Move other tools' keys to their canonical place, warning for each; mutates ``document``."""
    data = document.data
    if not isinstance(data, dict):
        return []
    found: list[str] = []
    for alias in KEY_ALIASES:
        section = alias.canonical[0]
        for where in ((), (section,)):
            holder = data if not where else data.get(section)
            if not isinstance(holder, dict) or alias.key not in holder:
                continue
            found.append(_move_alias(path, text, document, alias, where))
    return found


def _move_alias(path: Path, text: str, document: _Document, alias: KeyAlias, where: DocPath) -> str:
    data = document.data
    assert isinstance(data, dict)
    section, name = alias.canonical
    old_path: DocPath = (*where, alias.key)
    new_path: DocPath = (section, name)
    holder = data if not where else data[section]
    target = data.setdefault(section, {})
    position = document.key_positions.get(old_path)
    canonical = f"{section}.{name}"
    if not isinstance(target, dict):
        return _warning(path, position, _dotted(old_path), f"{alias.tool}'s name for {canonical}")
    if name in target:
        line = document.key_positions.get(new_path, (0, 0))[0]
        document.problems.append(
            _problem(
                path,
                text,
                position,
                _dotted(old_path),
                f"{alias.tool}'s name for {canonical}, which is also given (line {line})",
                f"keep only `{name}:` in `{section}:`",
            )
        )
        holder.pop(alias.key)
        return _warning(path, position, _dotted(old_path), f"{alias.tool}'s name for {canonical}")
    target[name] = holder.pop(alias.key)
    for table in (document.value_positions, document.key_positions):
        for key in [key for key in table if key[: len(old_path)] == old_path]:
            table[(*new_path, *key[len(old_path) :])] = table.pop(key)
    return _warning(
        path,
        position,
        _dotted(old_path),
        f"{alias.tool}'s name; read as {canonical} (write `{name}:` under `{section}:`)",
    )


# --- validation and error mapping -------------------------------------------------------------


def _validate(
    path: Path, text: str, data: dict[str, Any], document: _Document
) -> tuple[AnySpec | None, list[Problem]]:
    problems: list[Problem] = []
    method = data.get("method")
    if isinstance(method, str) and method in METHOD_CLASSES:
        spec_class: type[BaseModel] = METHOD_CLASSES[method]
        candidate = data
    else:
        problems.append(_method_problem(path, text, method, document))
        # Still check everything else, as SFT minus the method-specific parts, so one
        # run shows every problem; rules that depend on the method are left out.
        spec_class = SftSpec
        candidate = {
            key: value
            for key, value in data.items()
            if key not in METHOD_SECTIONS and key != "method"
        }
        candidate["method"] = "sft"
    try:
        spec = SPEC_ADAPTER.validate_python(candidate)
    except ValidationError as error:
        errors = error.errors(include_url=False)
        if spec_class is SftSpec and candidate is not data:
            errors = [item for item in errors if not _is_cross_field(item)]
        mapper = _ErrorMapper(path, text, data, document, spec_class)
        problems.extend(mapper.problems(errors))
        return None, problems
    return (spec if not problems else None), problems


def _is_cross_field(error: ErrorDetails) -> bool:
    return error["type"] == "value_error" and len(error["loc"]) <= 1


def _method_problem(path: Path, text: str, method: object, document: _Document) -> Problem:
    choices = list(METHOD_CLASSES)
    if method is None and ("method",) not in document.value_positions:
        return _problem(
            path,
            text,
            _locate((), document.value_positions, document.key_positions),
            "method",
            f"required field is missing; one of: {', '.join(choices)}",
            "add `method: sft` (or dpo, grpo) at the top level",
        )
    return _problem(
        path,
        text,
        document.value_positions.get(("method",)),
        "method",
        f"must be one of: {', '.join(choices)}; got {_show(method)}",
        did_you_mean(method, choices),
    )


@dataclass
class _ErrorMapper:
    """Turns pydantic's error list into located, readable problems."""

    path: Path
    text: str
    data: dict[str, Any]
    document: _Document
    spec_class: type[BaseModel]

    def problems(self, errors: list[ErrorDetails]) -> list[Problem]:
        by_path: dict[DocPath, list[tuple[DocPath, ErrorDetails]]] = {}
        for error in errors:
            doc_path, union_at = self._doc_path(error["loc"][1:])
            by_path.setdefault(union_at if union_at is not None else doc_path, []).append(
                (doc_path, error)
            )
        problems: list[Problem] = []
        for group_path, group in by_path.items():
            deeper = [(p, e) for p, e in group if len(p) > len(group_path)]
            if deeper and len(deeper) < len(group):
                # A union (e.g. "all-linear" | [names]): the member that got further is
                # the one the user meant; drop the others' complaints.
                group = deeper
            if len(group) > 1 and all(p == group_path for p, _ in group):
                problems.append(self._union_problem(group_path, [e for _, e in group]))
            else:
                problems.extend(self._problem(p, e) for p, e in group)
        return problems

    def _doc_path(self, loc: tuple[int | str, ...]) -> tuple[DocPath, DocPath | None]:
        """The document path of a pydantic location, skipping union-member tags."""
        path: list[str | int] = []
        node: object = self.data
        union_at: DocPath | None = None
        for part in loc:
            if _has_child(node, part):
                node = node[part]  # type: ignore[index]
            elif isinstance(part, str) and _is_union_tag(part):
                union_at = tuple(path)
                continue
            else:
                node = None
            path.append(part)
        return tuple(path), union_at

    def _problem(self, doc_path: DocPath, error: ErrorDetails) -> Problem:
        kind = error["type"]
        if kind == "value_error":
            return self._value_error(doc_path, error)
        if kind == "extra_forbidden":
            return self._unknown_key(doc_path)
        if kind == "missing":
            return self._missing(doc_path)
        message, hint = _describe(error, self._field_info(doc_path), _dotted(doc_path[-1:]))
        return self._at(doc_path, message, hint)

    def _union_problem(self, doc_path: DocPath, errors: list[ErrorDetails]) -> Problem:
        expected = [_expected(error) for error in errors]
        value = errors[0]["input"]
        message = f"must be {' or '.join(expected)}; got {_show(value)}"
        hint = None
        choices = [c for error in errors for c in _literal_choices(error)]
        if choices:
            hint = did_you_mean(value, choices)
        wants_list = any(error["type"] == "list_type" for error in errors)
        if hint is None and wants_list and isinstance(value, str):
            hint = f"to list one item, write [{value}]"
        return self._at(doc_path, message, hint)

    def _value_error(self, doc_path: DocPath, error: ErrorDetails) -> Problem:
        message = str(error["msg"]).removeprefix("Value error, ")
        hint = None
        prefix = re.match(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): ", message)
        if prefix is not None:
            relative = tuple(prefix.group(1).split("."))
            doc_path = (*doc_path, *relative)
            message = message[prefix.end() :]
        if doc_path[:2] == ("grpo", "reward_funcs") and len(doc_path) == 3:
            hint = did_you_mean(error["input"], ["format", "length"])
        return self._at(doc_path, message, hint)

    def _unknown_key(self, doc_path: DocPath) -> Problem:
        key = str(doc_path[-1])
        parent = doc_path[:-1]
        method = self.data.get("method")
        if parent == () and key in METHOD_SECTIONS:
            shown = method if isinstance(method, str) else "?"
            return self._at(
                doc_path,
                f"the `{key}:` section is only allowed with method: {key} "
                f"(this spec has method: {shown})",
                f"remove the `{key}:` section, or set method: {key}",
                at_key=True,
            )
        fields = _model_fields(self.spec_class, parent)
        hint = did_you_mean(key, fields)
        if hint is None:
            hint = _elsewhere_hint(key, parent)
        allowed = f"; allowed here: {', '.join(fields)}" if fields else ""
        return self._at(doc_path, f"unknown key `{key}`{allowed}", hint, at_key=True)

    def _missing(self, doc_path: DocPath) -> Problem:
        dotted = _dotted(doc_path)
        if doc_path == ("grpo",):
            return self._at(
                ("method",),
                "method: grpo needs a `grpo:` section with at least `reward_funcs`",
                "add  grpo: {reward_funcs: [format]}",
                field_path="grpo",
            )
        hint = _MISSING_HINTS.get(dotted)
        problem = self._at(doc_path, "required field is missing", hint)
        if len(doc_path) == 1:
            # Located at the top of the file, which holds some other key: quote nothing.
            return replace(problem, source_line=None)
        return problem

    def _at(
        self,
        doc_path: DocPath,
        message: str,
        hint: str | None,
        *,
        at_key: bool = False,
        field_path: str | None = None,
    ) -> Problem:
        positions = self.document
        where: Position | None
        if at_key and doc_path in positions.key_positions:
            where = positions.key_positions[doc_path]
        else:
            where = _locate(doc_path, positions.value_positions, positions.key_positions)
        problem = _problem(
            self.path, self.text, where, field_path or _dotted(doc_path), message, hint
        )
        if doc_path and doc_path[:1] not in positions.value_positions:
            # Nothing of the path is written: the position is the top of the file, whose
            # line says nothing about the problem.
            return replace(problem, source_line=None)
        return problem

    def _field_info(self, doc_path: DocPath) -> Any:
        names = [part for part in doc_path if isinstance(part, str)]
        if not names or len(names) != len(doc_path):
            return None
        model = _model_at(self.spec_class, tuple(names[:-1]))
        if model is None:
            return None
        return model.model_fields.get(names[-1])


_MISSING_HINTS = {
    "name": "add e.g. `name: my-experiment` (lowercase letters, digits, . _ -)",
    "model": "add  model: {id: meta-llama/Meta-Llama-3-8B}",
    "model.id": "a catalogue id or alias (e.g. llama3-8b), a hub id, or a local folder",
    "dataset": "add  dataset: {path: data/train.jsonl, format: messages}",
    "dataset.path": "a local .jsonl/.json/.csv/.parquet file or a hub dataset id",
    "dataset.format": "one of: messages, prompt_completion, text, preference, prompt",
    "hardware": "add  hardware: {gpu: rtx-4090}  (or vram_gib: 24)",
    "grpo.reward_funcs": "e.g. reward_funcs: [format, length]",
}


def _has_child(node: object, part: str | int) -> bool:
    if isinstance(node, dict):
        return isinstance(part, str) and part in node
    if isinstance(node, list):
        return isinstance(part, int) and 0 <= part < len(node)
    return False


def _is_union_tag(part: str) -> bool:
    # pydantic names union members by their schema: "literal['all-linear']",
    # "list[constrained-str]", "function-after[...]"; field names never contain these.
    return "[" in part or "-" in part or part in {"str", "int", "float", "bool", "none"}


def _model_at(model: type[BaseModel], names: tuple[str, ...]) -> type[BaseModel] | None:
    for name in names:
        info = model.model_fields.get(name)
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _model_fields(model: type[BaseModel], parent: DocPath) -> list[str]:
    names = tuple(part for part in parent if isinstance(part, str))
    if len(names) != len(parent):
        return []
    found = _model_at(model, names)
    if found is None:
        return []
    fields = list(found.model_fields)
    if "method" in fields and "name" in fields:  # read in the order a spec is written
        fields.remove("method")
        fields.insert(fields.index("name") + 1, "method")
    return fields


def _elsewhere_hint(key: str, parent: DocPath) -> str | None:
    """Where a key that is valid in another section belongs (flat configs put all at the top)."""
    homes = []
    for spec_class in METHOD_CLASSES.values():
        for section, info in spec_class.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if key in annotation.model_fields and (section,) != parent:
                    homes.append(f"{section}.{key}")
            elif key == section and parent != ():
                homes.append(key)
    for alias in KEY_ALIASES:
        if alias.key == key:
            homes.append(".".join(alias.canonical))
    unique = list(dict.fromkeys(homes))
    if not unique:
        return None
    return f"did you mean {' or '.join(unique)}? (`{key}` belongs in another section)"


def _describe(error: ErrorDetails, info: Any, name: str) -> tuple[str, str | None]:
    """A readable message and hint for one pydantic error on a value."""
    kind = error["type"]
    value = error["input"]
    got = f"got {_show(value)}"
    ctx = error.get("ctx", {})
    if kind == "literal_error":
        choices = _literal_choices(error)
        return f"must be one of: {', '.join(choices)}; {got}", did_you_mean(value, choices)
    bound = _BOUNDS.get(kind)
    if bound is not None:
        limit = _number(ctx.get(bound[1]))
        allowed = _range_text(info, name)
        suffix = f" (allowed: {allowed})" if allowed else ""
        return f"must be {bound[0]} {limit}; {got}{suffix}", None
    if kind == "string_type" and isinstance(value, (int, float, bool)):
        return f"must be text; {got}", f"quote it: '{_show(value)}'"
    if kind == "string_pattern_mismatch":
        return _pattern_message(ctx.get("pattern", ""), value)
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return f"must not be empty; {got}", None
    if kind == "string_too_long" and ctx.get("max_length") is not None:
        length = f" ({len(value)} characters)" if isinstance(value, str) else ""
        return f"must be at most {ctx['max_length']} characters; {got}{length}", None
    if kind == "too_long" and ctx.get("max_length") is not None:
        count = f" ({len(value)} items)" if isinstance(value, list | tuple) else ""
        return f"must have at most {ctx['max_length']} items; {got}{count}", None
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}; {got}", None
    return f"{error['msg']}; {got}", None


_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}

_EXPECTED = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "list_type": "a list",
    "dict_type": "a section (a mapping of keys)",
    "model_type": "a section (a mapping of keys)",
    "model_attributes_type": "a section (a mapping of keys)",
    "string_too_long": "shorter",
    "too_long": "shorter",
}


def _expected(error: ErrorDetails) -> str:
    if error["type"] == "literal_error":
        return " or ".join(repr(choice) for choice in _literal_choices(error))
    return _EXPECTED.get(error["type"], str(error["msg"]))


def _literal_choices(error: ErrorDetails) -> list[str]:
    if error["type"] != "literal_error":
        return []
    return re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))


def _range_text(info: Any, name: str) -> str | None:
    """``0 <= lora_dropout < 1`` from a field's annotated bounds, when it has two."""
    if info is None:
        return None
    lower = upper = None
    for item in info.metadata:
        for attribute, symbol in (("gt", "<"), ("ge", "<=")):
            if getattr(item, attribute, None) is not None:
                lower = f"{_number(getattr(item, attribute))} {symbol} {name}"
        for attribute, symbol in (("lt", "<"), ("le", "<=")):
            if getattr(item, attribute, None) is not None:
                upper = f" {symbol} {_number(getattr(item, attribute))}"
    if lower is None or upper is None:
        return None
    return lower + upper


def _number(value: object) -> str:
    """1.0 -> "1", 2e-4 -> "0.0002": bounds as a person writes them."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _pattern_message(pattern: str, value: object) -> tuple[str, str | None]:
    got = f"got {_show(value)}"
    if pattern.startswith("^[a-z0-9]"):
        suggestion = re.sub(r"[^a-z0-9._-]+", "-", str(value).lower()).strip("-._")
        hint = f"e.g. {suggestion!r}" if suggestion else None
        return (
            f"must be lowercase letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit; {got}",
            hint,
        )
    if pattern.startswith("^[A-Za-z_]"):
        return f"must be a module name such as q_proj or self_attn.q_proj; {got}", None
    return f"must match {pattern}; {got}", None


# --- small helpers ----------------------------------------------------------------------------


def _as_path(field_path: str | DocPath) -> DocPath:
    if isinstance(field_path, tuple):
        return field_path
    return tuple(int(part) if part.isdigit() else part for part in field_path.split("."))


def _dotted(path: DocPath) -> str:
    return ".".join(str(part) for part in path)


def _locate(
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


def _problem(
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


def _warning(path: Path, where: Position | None, field_path: str, message: str) -> str:
    line, column = where if where is not None else (None, None)
    location = Problem("", file=str(path), line=line, column=column).location()
    return f"{location}: warning: {field_path}: {message}"


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda problem: (problem.line or 0, problem.column or 0))


def did_you_mean(value: object, choices: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` for a close match, comparing case-, dash- and space-insensitively."""
    if not isinstance(value, str):
        return None
    matches = close_matches(value, choices)
    if not matches:
        return None
    return "did you mean " + " or ".join(repr(match) for match in matches) + "?"


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _show(value)


def _show(value: object) -> str:
    """A value as the user wrote it in YAML, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        flow = "[" + ", ".join(_show(item).strip("'") for item in value) + "]"
        return flow if len(flow) <= 60 else f"a list of {len(value)} items"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown)
    return str(value)
