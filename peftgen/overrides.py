"""Spec edits as dotted keys (``training.max_length``), applied and validated the way a
file is: the defaults ``resolve`` fills in, every suggestion the planner re-plans, and
``plan --set KEY=VALUE`` (applied to the file before it is validated: ``parse_set_edits``).

Keys the user wrote stay the only ones pydantic counts as set (``model_fields_set``),
plus the changed ones, so rules that refuse only what was written keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftgen.errors import Problem
from peftgen.spec import SPEC_ADAPTER, AnySpec, set_dotted


def apply_changes(spec: AnySpec, changes: Mapping[str, Any]) -> AnySpec:
    """``spec`` with each dotted key set to its value, validated anew (raises pydantic's
    ``ValidationError`` when the changed spec breaks a rule)."""
    data: dict[str, Any] = spec.model_dump(exclude_unset=True)
    for key, value in changes.items():
        set_dotted(data, key, value)
    return SPEC_ADAPTER.validate_python(data)


def parse_set_edits(
    arguments: list[str],
) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
    """``KEY=VALUE`` command-line edits as dotted keys and YAML values, the ``--set``
    argument of each key (to name it in a problem), and the arguments that are not edits.
    Only their form is checked here: the keys and values are validated with the file they
    edit (``load_spec(path, edits)``), so all problems are reported together."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    changes: dict[str, Any] = {}
    labels: dict[str, str] = {}
    problems: list[Problem] = []
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
        try:
            value = YAML(typ="safe", pure=True).load(text) if text.strip() else None
        except (YAMLError, ValueError) as error:
            problem = str(getattr(error, "problem", None) or error).splitlines()[0]
            if not isinstance(error, YAMLError):  # Python reads no int of over 4300 digits
                problem = "a number too long to read"
            problems.append(
                Problem(f"the value is not YAML: {problem}", file=label, field_path=key)
            )
            continue
        if _repeats_a_node(value, set()):
            problems.append(
                Problem(
                    "the value repeats a node through a YAML alias (*name); write it out",
                    file=label,
                    field_path=key,
                )
            )
            continue
        changes[key] = value
        labels[key] = label
    return changes, labels, problems


def _repeats_a_node(value: Any, seen: set[int]) -> bool:
    """A list or mapping reached twice: an alias, possibly of itself (``&a [*a]``), which the
    spec's own loader refuses and which would make every later walk of the value recurse."""
    if not isinstance(value, (list, dict)):
        return False
    if id(value) in seen:
        return True
    seen.add(id(value))
    children = value.values() if isinstance(value, dict) else value
    return any(_repeats_a_node(child, seen) for child in children)
