"""Finding a model or GPU from what the user typed.

A model id resolves, in order: a catalogue id or alias (case/space/dash-insensitive); a
local folder holding ``config.json`` (relative to the working directory or to the spec's
folder); a hub id not in the catalogue, through transformers' ``AutoConfig`` when the hub
is reachable. Every miss is a ``UserError`` that says how to fix it, with a did-you-mean.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftgen.catalog.structure import SUPPORTED_MODEL_TYPES
from peftgen.catalog.types import ArchConfig, Gpu, ModelArch
from peftgen.chat_templates import identify
from peftgen.errors import Problem, UserError, close_matches, normalise_name

DATA_DIR = Path(__file__).parent / "data"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@cache
def model_catalogue() -> tuple[ModelArch, ...]:
    raw = json.loads((DATA_DIR / "models.json").read_text(encoding="utf-8"))
    return tuple(ModelArch.model_validate(item) for item in raw["models"])


@cache
def gpu_catalogue() -> tuple[Gpu, ...]:
    raw = json.loads((DATA_DIR / "gpus.json").read_text(encoding="utf-8"))
    return tuple(Gpu.model_validate(item) for item in raw["gpus"])


@cache
def _model_index() -> dict[str, ModelArch]:
    index: dict[str, ModelArch] = {}
    for arch in model_catalogue():
        for key in (arch.id, arch.id.split("/")[-1], *arch.aliases):
            index.setdefault(normalise_name(key), arch)
    return index


@cache
def _gpu_index() -> dict[str, Gpu]:
    index: dict[str, Gpu] = {}
    for gpu in gpu_catalogue():
        for key in (gpu.name, *gpu.aliases):
            index.setdefault(normalise_name(key), gpu)
    return index


def find_model(model_id: str) -> ModelArch | None:
    """The catalogue entry for a hub id or alias (case-insensitive), or None."""
    return _model_index().get(normalise_name(model_id))


def find_gpu(name: str) -> Gpu | None:
    """The catalogue entry for a GPU name or alias (case/space/dash-insensitive), or None."""
    return _gpu_index().get(normalise_name(name))


def suggest(name: str, choices: list[str], limit: int = 3) -> list[str]:
    """Close matches for a did-you-mean."""
    return close_matches(name, choices, limit)


def model_names() -> list[str]:
    return [name for arch in model_catalogue() for name in (arch.id, *arch.aliases)]


def gpu_names() -> list[str]:
    return [name for gpu in gpu_catalogue() for name in (gpu.name, *gpu.aliases)]


def _did_you_mean(name: str, choices: list[str]) -> str | None:
    matches = suggest(name, choices)
    return f"did you mean {' or '.join(repr(m) for m in matches)}?" if matches else None


def lookup_gpu(name: str) -> Gpu:
    """The catalogue GPU for ``name``, or a ``UserError`` with a did-you-mean."""
    gpu = find_gpu(name)
    if gpu is not None:
        return gpu
    hint = _did_you_mean(name, gpu_names()) or (
        "see docs/catalogue.md for the catalogue, or omit hardware.gpu and give hardware.vram_gib"
    )
    raise UserError([Problem(f"unknown GPU {name!r}", hint=hint)])


def lookup_model(
    model_id: str, base_dir: Path, revision: str | None, trust_remote_code: bool
) -> ModelArch:
    """The architecture behind ``model_id``: catalogue, then local folder, then the hub.

    ``base_dir`` is the spec's folder, so a relative ``model.id`` works from anywhere.
    The hub is asked only for an ``org/name`` id outside the catalogue, and only when
    ``HF_HUB_OFFLINE`` is not set; transformers is imported only then.
    """
    arch = find_model(model_id)
    if arch is not None:
        return arch
    folder = _local_model_folder(model_id, base_dir)
    if folder is not None:
        return arch_from_folder(folder)
    if HUB_ID.match(model_id):
        return _arch_from_hub(model_id, revision, trust_remote_code)
    raise UserError([Problem(f"unknown model {model_id!r}", hint=_model_miss_hint(model_id))])


def _local_model_folder(model_id: str, base_dir: Path) -> Path | None:
    path = Path(model_id).expanduser()
    candidates = [path] if path.is_absolute() else [path, base_dir / path]
    for candidate in candidates:
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise UserError(
                    [
                        Problem(
                            f"model folder {str(candidate)!r} has no config.json",
                            hint="point model.id at the folder that holds the model's config.json",
                        )
                    ]
                )
            return candidate
    return None


def arch_from_folder(folder: Path) -> ModelArch:
    """A ``ModelArch`` for a local model folder (its ``config.json`` and tokenizer files)."""
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError([Problem(f"cannot read {str(config_path)!r}: {error}")]) from error
    return ModelArch(
        id=str(folder),
        display_name=folder.name,
        has_chat_template=_folder_has_chat_template(folder),
        chat_template_family=_folder_chat_template_family(folder),
        source=str(config_path),
        config=arch_from_config(raw, where=str(config_path)),
    )


def _folder_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    if not tokenizer_config.is_file():
        return False
    try:
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(settings, dict) and bool(settings.get("chat_template"))


def _folder_chat_template_family(folder: Path) -> str | None:
    """The ``peftgen.chat_templates`` family of the folder's default chat template, or None.

    Reads the template the way transformers does (``chat_template.jinja`` first, then a
    processor's ``chat_template.json``, then ``tokenizer_config.json``'s ``chat_template``,
    which may be a list of named variants) and asks ``identify`` for an exact match. A
    missing, unreadable or oddly shaped file means "unknown", never an exception: the family
    only decides whether assistant-only loss can be trained, and the caller refuses that
    with a message when it is None.
    """
    family = identify(_folder_chat_template(folder))
    return family.name if family is not None else None


def _folder_chat_template(folder: Path) -> str | dict[str, str] | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return _read_text(jinja)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        text = _read_text(path)
        try:
            settings = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            settings = None
        template = _template_value(
            settings.get("chat_template") if isinstance(settings, dict) else None
        )
        if template is not None:
            return template
    return None


def _read_text(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8") as handle:  # universal newlines, as transformers reads
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _template_value(value: object) -> str | dict[str, str] | None:
    """A ``chat_template`` setting as transformers holds it: a string, or named variants."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        variants = {
            item["name"]: item["template"]
            for item in value
            if isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str)
        }
        return variants or None
    return None


_FIELDS = set(ArchConfig.model_fields) - {
    "model_type",
    "architectures",
    "extra",
    "text_config_model_type",
    "wrapper_extra",
}
# config.json keys that are bookkeeping, not architecture.
_IGNORED_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map", "_commit_hash"}
)
# Families whose config class ties the output head by default when config.json is silent.
_TIED_BY_DEFAULT = frozenset({"gemma2", "gemma3_text", "gemma3"})


def arch_from_config(raw: dict[str, Any], where: str = "config.json") -> ArchConfig:
    """Parse a ``config.json`` dict into an ``ArchConfig``, whatever variant it is.

    Handles the variants seen in the wild: a nested ``text_config`` (multimodal
    wrappers), ``num_experts`` for the expert count, and a missing ``head_dim`` or
    ``num_key_value_heads`` (which mean hidden_size // heads and plain multi-head).
    """
    model_type = str(raw.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            [
                Problem(
                    f"{where}: model_type {model_type!r} is not one peftgen can estimate",
                    hint=f"supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}",
                )
            ]
        )
    nested = raw.get("text_config")
    language: dict[str, Any] = dict(nested) if isinstance(nested, dict) else dict(raw)
    fields = _language_fields(language, model_type, raw)
    extra = {
        key: value
        for key, value in language.items()
        if key not in _FIELDS | _IGNORED_KEYS | {"model_type", "architectures", "num_experts"}
    }
    wrapper: dict[str, Any] = {}
    if isinstance(nested, dict):
        skip = _FIELDS | _IGNORED_KEYS | {"text_config", "model_type", "architectures"}
        wrapper = {key: value for key, value in raw.items() if key not in skip}
    try:
        return ArchConfig(
            model_type=model_type,
            architectures=list(raw.get("architectures") or []),
            extra=extra,
            text_config_model_type=str(language.get("model_type"))
            if isinstance(nested, dict)
            else None,
            wrapper_extra=wrapper,
            **fields,
        )
    except ValidationError as error:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise UserError([Problem(f"{where}: not a usable causal-LM config ({detail})")]) from error


def _language_fields(
    language: dict[str, Any], model_type: str, raw: dict[str, Any]
) -> dict[str, Any]:
    fields = {key: language[key] for key in _FIELDS if language.get(key) is not None}
    heads = fields.get("num_attention_heads")
    hidden = fields.get("hidden_size")
    if "head_dim" not in fields and isinstance(heads, int) and isinstance(hidden, int) and heads:
        fields["head_dim"] = hidden // heads
    if "num_key_value_heads" not in fields and heads is not None:
        fields["num_key_value_heads"] = heads
    if "num_local_experts" not in fields and language.get("num_experts") is not None:
        fields["num_local_experts"] = language["num_experts"]
    if "tie_word_embeddings" not in fields:
        top_level = raw.get("tie_word_embeddings")
        fields["tie_word_embeddings"] = (
            bool(top_level) if top_level is not None else model_type in _TIED_BY_DEFAULT
        )
    return fields


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def _arch_from_hub(model_id: str, revision: str | None, trust_remote_code: bool) -> ModelArch:
    if _hub_offline():
        raise UserError(
            [
                Problem(
                    f"model {model_id!r} is not in the catalogue and the hub is offline "
                    "(HF_HUB_OFFLINE is set)",
                    hint=_hub_fix_hint(model_id),
                )
            ]
        )
    try:
        from transformers import AutoConfig  # only here: the analytic path stays torch-free

        config = AutoConfig.from_pretrained(
            model_id, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # any hub, auth or parse failure means the same to the user
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            [
                Problem(
                    f"model {model_id!r} is not in the catalogue and its config could not be "
                    f"fetched: {message}",
                    hint=_hub_fix_hint(model_id),
                )
            ]
        ) from error
    return ModelArch(
        id=model_id,
        display_name=model_id.split("/")[-1],
        source=f"https://huggingface.co/{model_id} config.json (revision {revision or 'main'})",
        config=arch_from_config(config.to_dict(), where=f"{model_id} config.json"),
    )


def _hub_fix_hint(model_id: str) -> str:
    fix = (
        "download its config.json into a folder (e.g. `hf download "
        f"{model_id} config.json tokenizer_config.json --local-dir models/"
        f"{model_id.split('/')[-1]}`) and set model.id to that folder"
    )
    close = _did_you_mean(model_id, model_names())
    return f"{close} Or {fix}" if close else f"{fix}, or pick a catalogue id (docs/catalogue.md)"


def _model_miss_hint(model_id: str) -> str:
    close = _did_you_mean(model_id, model_names())
    where = "a catalogue id (docs/catalogue.md), a local folder holding config.json, or a hub id"
    return f"{close} model.id takes {where}" if close else f"model.id takes {where}"
