"""Spec edits as dotted keys (``training.max_length``), applied and validated the way a
file is: the defaults ``resolve`` fills in, every suggestion the planner re-plans, and
``plan --set KEY=VALUE`` all go through ``apply_changes``.

Keys the user wrote stay the only ones pydantic counts as set (``model_fields_set``),
plus the changed ones, so rules that refuse only what was written keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from peftgen.errors import Problem, UserError, close_matches
from peftgen.spec import SPEC_ADAPTER, AnySpec


def apply_changes(spec: AnySpec, changes: Mapping[str, Any]) -> AnySpec:
    """``spec`` with each dotted key set to its value, validated anew (raises pydantic's
    ``ValidationError`` when the changed spec breaks a rule)."""
    data: dict[str, Any] = spec.model_dump(exclude_unset=True)
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
    return SPEC_ADAPTER.validate_python(data)


def unknown_key(spec: AnySpec, key: str) -> tuple[str, list[str]] | None:
    """Why ``key`` names no field of ``spec`` (message, close matches), or None when it does."""
    model: type[BaseModel] | None = type(spec)
    parts = key.split(".")
    walked: list[str] = []
    for part in parts:
        if model is None:
            return f"{'.'.join(walked)} is a value, not a section", []
        fields = model.model_fields
        if part not in fields:
            where = f"section {'.'.join(walked)}" if walked else "the spec's top level"
            prefix = ".".join(walked) + "." if walked else ""
            matches = [prefix + m for m in close_matches(part, list(fields))]
            return f"{where} has no key {part!r}", matches
        walked.append(part)
        annotation = fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    if model is not None:
        return (
            f"{key} is a section; name one of its keys, e.g. "
            f"{key}.{next(iter(model.model_fields))}",
            [],
        )
    return None


def parse_set_arguments(spec: AnySpec, arguments: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` command-line edits as dotted keys and YAML values; every malformed
    argument or unknown key is a problem naming its ``--set`` argument."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    changes: dict[str, Any] = {}
    problems: list[Problem] = []
    where: dict[str, str] = {}
    for argument in arguments:
        label = f"--set {argument}"
        key, sep, text = argument.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(
                Problem(
                    "expected KEY=VALUE with a dotted spec key",
                    file=label,
                    hint="e.g. --set training.max_length=4096 --set lora.r=32",
                )
            )
            continue
        missing = unknown_key(spec, key)
        if missing is not None:
            message, matches = missing
            hint = f"did you mean {' or '.join(repr(m) for m in matches)}?" if matches else None
            problems.append(Problem(message, file=label, field_path=key, hint=hint))
            continue
        try:
            value = YAML(typ="safe", pure=True).load(text) if text.strip() else None
        except YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).splitlines()[0]
            problems.append(
                Problem(f"the value is not YAML: {problem}", file=label, field_path=key)
            )
            continue
        changes[key] = value
        where[key] = label
    try:
        apply_changes(spec, changes)
    except ValidationError as error:
        problems.extend(_set_problems(error, where))
    if problems:
        raise UserError(problems)
    return changes


def _set_problems(error: ValidationError, where: dict[str, str]) -> list[Problem]:
    """pydantic's complaints about a ``--set`` edit, each at the argument it is about."""
    problems: list[Problem] = []
    for detail in error.errors():
        loc = [str(part) for part in detail["loc"]]
        if loc and loc[0] in ("sft", "dpo", "grpo"):
            loc = loc[1:]  # the discriminated union's tag
        message = str(detail["msg"]).removeprefix("Value error, ")
        field_path = ".".join(loc)
        prefix, sep, rest = message.partition(": ")
        if sep and " " not in prefix:
            # Cross-field rules start with the field path they are about.
            field_path = ".".join([*loc, prefix]) if loc else prefix
            message = rest
        if detail["type"] not in ("value_error", "assertion_error") and "input" in detail:
            message = f"{message}; got {detail['input']!r}"
        label = where.get(field_path) or next(
            (
                label
                for key, label in where.items()
                if key.startswith(field_path) or field_path.startswith(key)
            ),
            ", ".join(where.values()),
        )
        problems.append(Problem(message, file=label, field_path=field_path))
    return problems
