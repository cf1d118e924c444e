"""YAML to plain data with the position of every key and value.

The parser's event stream is checked first (depth, alias count, expanded size), so a
hostile document is refused in memory bounded by its size; then a small builder turns
ruamel's nodes into dicts and lists, refusing duplicate keys, tags and self-references,
and records ``(line, column)`` of every value and key by its document path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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

from peftgen.errors import Problem, UserError
from peftgen.load.locate import DocPath, Position, dotted_path, kind_of, located_problem
from peftgen.load.source import find_tab_problems, line_separator_problems

MAX_DEPTH = 32
"""Deepest nesting of mappings/lists accepted (a spec needs 3)."""
MAX_ALIASES = 100
"""Most ``*alias`` references accepted in one spec."""
MAX_EXPANDED_NODES = 10_000
"""Most nodes the document may hold once every alias is expanded (a spec has ~100)."""

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}


# --- YAML -> plain data with positions --------------------------------------------------------


@dataclass
class Document:
    """Plain Python data of a YAML document, plus where each key and value was written."""

    data: object = None
    value_positions: dict[DocPath, Position] = field(default_factory=dict)
    key_positions: dict[DocPath, Position] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def parse(path: Path, text: str) -> Document:
    separator_problems = line_separator_problems(path, text)
    if separator_problems:
        raise UserError(separator_problems)
    tabs = find_tab_problems(path, text)
    if tabs:
        # Tabs derail the scanner into errors about the wrong thing; name them instead.
        raise UserError(tabs)
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
    document = Document()
    if root is not None and not _is_empty_scalar(root):  # a lone `---` holds no document
        builder = _Builder(path, text, yaml, document)
        document.data = builder.build(root, ())
    return document


def _is_empty_scalar(node: Node) -> bool:
    """A value written as nothing at all (``r:``), which YAML reads as null."""
    return isinstance(node, ScalarNode) and node.value == "" and node.style is None


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
        return UserError([located_problem(path, text, where, None, message, hint)])

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

    def __init__(self, path: Path, text: str, yaml: YAML, document: Document) -> None:
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
        field_path = dotted_path(path) or None
        self.document.problems.append(
            located_problem(self.path, self.text, where, field_path, message, hint)
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
    return located_problem(path, text, where, None, f"YAML syntax error: {detail}", hint)


def _reader_problem(path: Path, text: str, error: ReaderError) -> Problem:
    position = int(error.position)
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    character = error.character
    code = ord(character) if isinstance(character, str) else int(character)
    return located_problem(
        path,
        text,
        (line, column),
        None,
        f"character U+{code:04X} is not allowed in YAML ({error.reason})",
        "remove the control character; a spec is plain text",
    )


def top_level_problem(path: Path, text: str, data: object, document: Document) -> Problem:
    if data is None and () not in document.value_positions:
        return Problem(
            "the file is empty; a spec needs at least name, method, model, dataset, hardware",
            file=str(path),
            hint="start from one of the examples in specs/",
        )
    return located_problem(
        path,
        text,
        document.value_positions.get((), (1, 1)),
        None,
        f"the top level must be a mapping of keys (name: ..., method: ...); got {kind_of(data)}",
        None,
    )
