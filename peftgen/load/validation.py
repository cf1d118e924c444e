"""Pydantic validation of the plain data, and every error mapped to ``file:line:col``, the
dotted field, what is allowed and a did-you-mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from peftgen.errors import Problem
from peftgen.load.aliases import KEY_ALIASES
from peftgen.load.locate import (
    DocPath,
    Position,
    did_you_mean,
    dotted_path,
    locate_path,
    located_problem,
    show_value,
)
from peftgen.load.tree import Document
from peftgen.spec import SPEC_ADAPTER, AnySpec, DpoRunSpec, GrpoRunSpec, SftSpec

METHOD_CLASSES: dict[str, type[SftSpec | DpoRunSpec | GrpoRunSpec]] = {
    "sft": SftSpec,
    "dpo": DpoRunSpec,
    "grpo": GrpoRunSpec,
}
METHOD_SECTIONS = ("dpo", "grpo")
"""Sections that belong to one method each."""


# --- validation and error mapping -------------------------------------------------------------


def validate(
    path: Path, text: str, data: dict[str, Any], document: Document
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


def _method_problem(path: Path, text: str, method: object, document: Document) -> Problem:
    choices = list(METHOD_CLASSES)
    if method is None and ("method",) not in document.value_positions:
        return located_problem(
            path,
            text,
            locate_path((), document.value_positions, document.key_positions),
            "method",
            f"required field is missing; one of: {', '.join(choices)}",
            "add `method: sft` (or dpo, grpo) at the top level",
        )
    return located_problem(
        path,
        text,
        document.value_positions.get(("method",)),
        "method",
        f"must be one of: {', '.join(choices)}; got {show_value(method)}",
        did_you_mean(method, choices),
    )


@dataclass
class _ErrorMapper:
    """Turns pydantic's error list into located, readable problems."""

    path: Path
    text: str
    data: dict[str, Any]
    document: Document
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
        message, hint = _describe(error, self._field_info(doc_path), dotted_path(doc_path[-1:]))
        return self._at(doc_path, message, hint)

    def _union_problem(self, doc_path: DocPath, errors: list[ErrorDetails]) -> Problem:
        expected = [_expected(error) for error in errors]
        value = errors[0]["input"]
        message = f"must be {' or '.join(expected)}; got {show_value(value)}"
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
        dotted = dotted_path(doc_path)
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
            where = locate_path(doc_path, positions.value_positions, positions.key_positions)
        problem = located_problem(
            self.path, self.text, where, field_path or dotted_path(doc_path), message, hint
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
    got = f"got {show_value(value)}"
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
        return f"must be text; {got}", f"quote it: '{show_value(value)}'"
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
    """The allowed values as a spec writes them (``false`` for the ``False`` of a mixed
    literal such as ``use_vllm``'s)."""
    if error["type"] != "literal_error":
        return []
    expected = str(error.get("ctx", {}).get("expected", ""))
    spelled = {"True": "true", "False": "false", "None": "null"}
    return [
        quoted or spelled[bare]
        for quoted, bare in re.findall(r"'([^']*)'|\b(True|False|None)\b", expected)
    ]


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
    got = f"got {show_value(value)}"
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
