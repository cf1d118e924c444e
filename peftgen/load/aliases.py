"""Keys that other tools spell differently (axolotl, LLaMA-Factory, older trl): accepted with
a warning naming the canonical key, never silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from peftgen.load.locate import DocPath, dotted_path, located_problem, located_warning
from peftgen.load.tree import Document


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


# --- aliases from other tools -----------------------------------------------------------------


def apply_key_aliases(path: Path, text: str, document: Document) -> list[str]:
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


def _move_alias(path: Path, text: str, document: Document, alias: KeyAlias, where: DocPath) -> str:
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
        return located_warning(
            path, position, dotted_path(old_path), f"{alias.tool}'s name for {canonical}"
        )
    if name in target:
        line = document.key_positions.get(new_path, (0, 0))[0]
        document.problems.append(
            located_problem(
                path,
                text,
                position,
                dotted_path(old_path),
                f"{alias.tool}'s name for {canonical}, which is also given (line {line})",
                f"keep only `{name}:` in `{section}:`",
            )
        )
        holder.pop(alias.key)
        return located_warning(
            path, position, dotted_path(old_path), f"{alias.tool}'s name for {canonical}"
        )
    target[name] = holder.pop(alias.key)
    for table in (document.value_positions, document.key_positions):
        for key in [key for key in table if key[: len(old_path)] == old_path]:
            table[(*new_path, *key[len(old_path) :])] = table.pop(key)
    return located_warning(
        path,
        position,
        dotted_path(old_path),
        f"{alias.tool}'s name; read as {canonical} (write `{name}:` under `{section}:`)",
    )
