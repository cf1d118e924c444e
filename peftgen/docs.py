"""Generate the spec's JSON Schema and its Markdown reference from the pydantic models.

Both are checked in (``specs/peftgen.schema.json``, ``docs/spec-reference.md``) so editors
and readers find them without running peftgen; both are generated, never hand-edited, so
they cannot drift from the models: a test fails when either is stale.

Regenerate both with ``python -m peftgen.docs``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from peftgen.load import KEY_ALIASES, MAX_ALIASES, MAX_DEPTH, MAX_EXPANDED_NODES, MAX_SPEC_BYTES
from peftgen.spec import spec_json_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "specs" / "peftgen.schema.json"
REFERENCE_PATH = REPO_ROOT / "docs" / "spec-reference.md"
REGENERATE_COMMAND = "python -m peftgen.docs"

# Sections in the order a spec is written; method-only sections last.
TOP_LEVEL_ORDER = (
    "name",
    "method",
    "model",
    "dataset",
    "hardware",
    "precision",
    "quantization",
    "lora",
    "training",
    "output_dir",
    "dpo",
    "grpo",
)
METHOD_ONLY = {"dpo": "dpo", "grpo": "grpo"}


def schema_text() -> str:
    """The JSON Schema as written to ``specs/peftgen.schema.json`` (stable key order)."""
    return json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"


def reference_markdown() -> str:
    """``docs/spec-reference.md``: every field with its type, allowed values, default, meaning."""
    schema = spec_json_schema()
    defs: dict[str, Any] = schema["$defs"]  # type: ignore[assignment]
    top, required = _top_level_properties(defs)
    lines = [
        "# Spec reference (spec v1)",
        "",
        f"<!-- Generated from peftgen/spec.py by `{REGENERATE_COMMAND}`; do not edit. -->",
        "",
        "Every key a spec may hold. Unknown keys are errors (a misspelt key that were ignored "
        "would surface as a wrong run hours later). Start a spec with",
        "`# yaml-language-server: $schema=peftgen.schema.json` (with the path to",
        "`specs/peftgen.schema.json`) and editors with the YAML language server complete and "
        "check it as you type.",
        "",
        "## Top level",
        "",
        *_table(top, required, defs),
    ]
    for name in TOP_LEVEL_ORDER:
        reference = top.get(name, {}).get("$ref")
        if reference is None:
            continue
        definition = defs[reference.rsplit("/", 1)[-1]]
        lines += ["", f"## `{name}`", ""]
        if name in METHOD_ONLY:
            needed = "required" if name in required else "optional"
            lines += [f"Only with `method: {METHOD_ONLY[name]}` ({needed} there).", ""]
        lines += [
            _clean(definition.get("description", "")),
            "",
            *_table(definition["properties"], set(definition.get("required", [])), defs),
        ]
    lines += ["", *_aliases_section(), "", *_limits_section()]
    return "\n".join(lines) + "\n"


def _top_level_properties(defs: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Properties of the three method variants merged, in writing order."""
    merged: dict[str, Any] = {}
    required: set[str] = set()
    for variant in ("SftSpec", "DpoRunSpec", "GrpoRunSpec"):
        merged.update(defs[variant]["properties"])
        required.update(defs[variant].get("required", []))
    method = {
        "enum": ["sft", "dpo", "grpo"],
        "type": "string",
        "description": _clean(merged["method"].get("description", "")),
    }
    merged["method"] = method
    ordered = {name: merged[name] for name in TOP_LEVEL_ORDER if name in merged}
    ordered.update({name: value for name, value in merged.items() if name not in ordered})
    return ordered, required


def _table(properties: dict[str, Any], required: set[str], defs: dict[str, Any]) -> list[str]:
    rows = [
        "| key | type and allowed values | default | description |",
        "|---|---|---|---|",
    ]
    for name, prop in properties.items():
        description = _clean(prop.get("description", ""))
        if "$ref" in prop and not description:
            description = _clean(defs[prop["$ref"].rsplit("/", 1)[-1]].get("description", ""))
        default = "**required**" if name in required else _default(prop)
        if name in METHOD_ONLY and name in required:
            default = f"**required** with method: {METHOD_ONLY[name]}"
        rows.append(
            f"| `{name}` | {_escape(_type_text(prop))} | {_escape(default)} | "
            f"{_escape(description)} |"
        )
    return rows


def _type_text(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        section = prop["$ref"].rsplit("/", 1)[-1]
        return f"section ({section})"
    if "anyOf" in prop:
        return " or ".join(_type_text(member) for member in prop["anyOf"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{value}`" for value in prop["enum"])
    kind = prop.get("type")
    if kind == "array":
        text = f"list of {_type_text(prop.get('items', {}))}"
        if prop.get("minItems"):
            text += f" (at least {prop['minItems']})"
        return text
    names = {"integer": "integer", "number": "number", "boolean": "true/false", "null": "null"}
    text = names.get(str(kind), "text")
    constraints = _constraints(prop)
    return f"{text} ({constraints})" if constraints else text


def _constraints(prop: dict[str, Any]) -> str:
    parts = []
    low = _bound(prop, "minimum", "<=") or _bound(prop, "exclusiveMinimum", "<")
    high = _bound(prop, "maximum", "<=") or _bound(prop, "exclusiveMaximum", "<")
    if low or high:
        lower = f"{low[0]} {low[1]} " if low else ""
        upper = f" {high[1]} {high[0]}" if high else ""
        parts.append(f"{lower}x{upper}")
    if "pattern" in prop:
        parts.append(f"matching `{prop['pattern']}`")
    if prop.get("maxLength"):
        parts.append(f"at most {prop['maxLength']} characters")
    return ", ".join(parts)


def _bound(prop: dict[str, Any], key: str, symbol: str) -> tuple[str, str] | None:
    if key not in prop:
        return None
    value = prop[key]
    return (f"{value:g}" if isinstance(value, float) else str(value), symbol)


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return ""
    value = prop["default"]
    if isinstance(value, dict):
        return "(defaults below)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(item) for item in value) + "]`"
    return f"`{value}`"


def _aliases_section() -> list[str]:
    lines = [
        "## Other tools' key names",
        "",
        "Accepted at the top level or in the canonical key's section, each with a warning that "
        "names the key to write instead:",
        "",
        "| key | read as | from |",
        "|---|---|---|",
    ]
    for alias in KEY_ALIASES:
        lines.append(f"| `{alias.key}` | `{'.'.join(alias.canonical)}` | {alias.tool} |")
    return lines


def _limits_section() -> list[str]:
    return [
        "## Limits on the file",
        "",
        "Refused with a message (exit code 2) before they can cost time or memory:",
        "",
        f"- larger than {MAX_SPEC_BYTES // 1024} KiB (checked by size, before reading);",
        "- not UTF-8, tabs in the indentation, duplicate keys, more than one YAML document;",
        f"- nested deeper than {MAX_DEPTH} levels, more than {MAX_ALIASES} aliases, or more "
        f"than {MAX_EXPANDED_NODES:,} values once aliases are expanded;",
        "- YAML tags (`!!python/...`, `!custom`): a spec holds plain values only.",
    ]


def _clean(text: str) -> str:
    return " ".join(text.split())


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    """Write the schema and the reference into the checkout."""
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    REFERENCE_PATH.write_text(reference_markdown(), encoding="utf-8")
    for path in (SCHEMA_PATH, REFERENCE_PATH):
        print(f"wrote {path.relative_to(REPO_ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
