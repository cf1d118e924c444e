"""Finding a model or GPU from what the user typed.

A model id resolves, in order: a local folder holding ``config.json`` (relative to the
working directory or to the spec's folder), as transformers' ``from_pretrained`` would load
it; a catalogue id or alias (case/space/dash-insensitive); a hub id not in the catalogue,
through transformers' ``AutoConfig`` when the hub is reachable. A name that is both a
folder and a catalogue alias resolves to the folder, with a warning; one written as a path
(``./x``, ``../x``, ``/x``, ``~/x``, ``x/``) is only ever a folder. Every miss is a
``UserError`` that says how to fix it, with a did-you-mean.
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
from peftgen.stack import GIB, format_gib

DATA_DIR = Path(__file__).parent / "data"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
MAX_CONFIG_BYTES = 16 * 2**20
"""A config.json is a few KB; anything over 16 MiB is the wrong file."""


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


GPU_BRAND_WORDS = ("nvidia", "geforce", "tesla", "quadro")
"""Words nvidia-smi prints before the model on some drivers and boards and not on others
(``GeForce RTX 3090`` on older drivers, ``NVIDIA GeForce RTX 3090`` on newer ones)."""


def _gpu_keys(name: str) -> list[str]:
    """A GPU name's lookup keys: normalised, then with each leading brand word dropped."""
    key = normalise_name(name)
    keys = [key]
    stripped = True
    while stripped:
        stripped = False
        for word in GPU_BRAND_WORDS:
            if key.startswith(word) and len(key) > len(word):
                key = key[len(word) :]
                keys.append(key)
                stripped = True
    return keys


@cache
def _gpu_index() -> dict[str, Gpu]:
    index: dict[str, Gpu] = {}
    for gpu in gpu_catalogue():
        for name in (gpu.name, *gpu.aliases):
            for key in _gpu_keys(name):
                index.setdefault(key, gpu)
    return index


@cache
def _ambiguous_gpu_names() -> dict[str, tuple[Gpu, ...]]:
    """Names that mean several cards (``A100``: 40 GB or 80 GB), with the cards."""
    raw = json.loads((DATA_DIR / "gpus.json").read_text(encoding="utf-8"))
    by_name = {gpu.name: gpu for gpu in gpu_catalogue()}
    return {
        normalise_name(name): tuple(by_name[variant] for variant in variants)
        for name, variants in raw.get("ambiguous", {}).items()
        if not name.startswith("_")
    }


_MEMORY_SUFFIX = re.compile(r"(?P<digits>\d+)(?:gb|gib|g)$")


def _memory_splits(key: str) -> list[tuple[str, float]]:
    """(card key, GB) readings of a key ending in a memory size, shortest size first:
    ``rtx409024gb`` -> ``(rtx40902, 4)``, ``(rtx4090, 24)``, ..."""
    match = _MEMORY_SUFFIX.search(key)
    if match is None:
        return []
    digits, head = match["digits"], key[: match.start()]
    return [
        (head + digits[:-cut], float(digits[-cut:]))
        for cut in range(1, len(digits) + 1)
        if head + digits[:-cut]
    ]


def _same_memory(gpu: Gpu, gb: float) -> bool:
    """``gb`` is how people write this card's memory (24 for 23.99 GiB, 16 for a T4's 14.7)."""
    gib = gpu.memory_bytes / GIB
    return abs(gib - gb) <= max(1.5, 0.06 * gb)


SPEC_MEMORY_OVERRIDE = "set gpu: {gpu} and hardware.vram_gib: {gb}"
"""How a spec names a card with memory the catalogue's lacks (``lookup_gpu``'s default)."""


def _match_gpu(name: str, memory_override: str = SPEC_MEMORY_OVERRIDE) -> Gpu | Problem:
    """The one catalogue card ``name`` means, or the problem with it (unknown, ambiguous,
    or a memory size the card does not have: the hint is ``memory_override``, in the
    words of the place that named the card)."""
    index, ambiguous = _gpu_index(), _ambiguous_gpu_names()
    keys = _gpu_keys(name)
    for key in keys:
        if key in index:
            return index[key]
    for key in keys:
        if key in ambiguous:
            return _ambiguous_problem(name, ambiguous[key])
    for base, gb in (split for key in keys for split in _memory_splits(key)):
        variants = [index[base]] if base in index else list(ambiguous.get(base, ()))
        if not variants:
            continue
        sized = [gpu for gpu in variants if _same_memory(gpu, gb)]
        if len(sized) == 1:
            return sized[0]
        if len(sized) > 1:
            return _ambiguous_problem(name, tuple(sized))
        sizes = ", ".join(f"{g.name} {format_gib(g.memory_bytes)}" for g in variants)
        return Problem(
            f"GPU {name!r}: no catalogue card of that kind has {gb:g} GB ({sizes})",
            hint="for a card with other memory, "
            + memory_override.format(gpu=_gpu_label(variants[0]), gb=f"{gb:g}"),
        )
    return Problem(f"unknown GPU {name!r}")


def _gpu_label(gpu: Gpu) -> str:
    return gpu.aliases[0] if gpu.aliases else gpu.name


def _ambiguous_problem(name: str, variants: tuple[Gpu, ...]) -> Problem:
    listed = "; ".join(
        f"{_gpu_label(gpu)} ({gpu.name}, {format_gib(gpu.memory_bytes)})" for gpu in variants
    )
    return Problem(
        f"GPU {name!r} is more than one card: {listed}",
        hint="name the variant (as nvidia-smi prints it, or one of the aliases above); the "
        "planner does not guess, since the smaller card may not fit the run",
    )


def find_model(model_id: str) -> ModelArch | None:
    """The catalogue entry for a hub id or alias (case-insensitive), or None."""
    return _model_index().get(normalise_name(model_id))


def find_gpu(name: str) -> Gpu | None:
    """The catalogue entry for a GPU name or alias (case/space/dash-insensitive, brand
    words optional, a matching memory size allowed), or None (unknown or ambiguous)."""
    found = _match_gpu(name)
    return found if isinstance(found, Gpu) else None


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


def lookup_gpu(
    name: str,
    instead: str | None = "omit hardware.gpu and give hardware.vram_gib",
    memory_override: str = SPEC_MEMORY_OVERRIDE,
) -> Gpu:
    """The catalogue GPU for ``name``, or a ``UserError`` with a did-you-mean; without one,
    the hint names the catalogue and ``instead``, what the place that named the GPU allows
    for a card the catalogue lacks (the spec's ``hardware.vram_gib``), and for a known card
    with other memory, ``memory_override`` (``{gpu}``, ``{gb}``)."""
    found = _match_gpu(name, memory_override)
    if isinstance(found, Gpu):
        return found
    if found.hint is not None:
        raise UserError([found])
    otherwise = f", or {instead}" if instead else ""
    if _MEMORY_SIZE.fullmatch(name.strip()) and instead:
        hint = f"that is a memory size, not a card: {instead}"
    else:
        hint = _did_you_mean(name, _same_model_number(name, gpu_names())) or (
            f"see docs/catalogue.md for the catalogue{otherwise}"
        )
    raise UserError([Problem(found.message, hint=hint)])


_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*(gb|gib)", re.IGNORECASE)
"""A GPU name that is only a memory size with its unit (``24GB``; a bare number is a model
number, ``3050``): what ``vram_gib`` is for."""


def _same_model_number(name: str, choices: list[str]) -> list[str]:
    """The choices with a number as long as each in ``name`` (its model number: ``4090``
    for ``RTX 4909``): a did-you-mean with a number of another length (``MI300X`` ->
    ``3090``) names another kind of card."""
    lengths = {len(number) for number in re.findall(r"\d+", name)}
    return [
        choice
        for choice in choices
        if lengths <= {len(number) for number in re.findall(r"\d+", choice)}
    ]


def lookup_model(
    model_id: str,
    base_dir: Path,
    revision: str | None,
    trust_remote_code: bool,
    warnings: list[str] | None = None,
) -> ModelArch:
    """The architecture behind ``model_id``: local folder, then catalogue, then the hub.

    ``base_dir`` is the spec's folder, so a relative ``model.id`` works from anywhere.
    A folder holding ``config.json`` wins over a catalogue alias of the same name, as it
    does for ``from_pretrained`` in the generated script; ``warnings`` (when given) gets a
    line saying so. The hub is asked only for an ``org/name`` id outside the catalogue, and
    only when ``HF_HUB_OFFLINE`` is not set; transformers is imported only then.
    """
    if _written_as_path(model_id):
        folder = _local_model_folder(model_id, base_dir, need_config=True)
        if folder is None:
            raise UserError(
                [
                    Problem(
                        f"model folder {model_id!r} does not exist (a relative model.id is "
                        f"read from the spec's folder {str(base_dir)!r}, never the current "
                        "directory)",
                        hint="point model.id at the folder that holds the model's config.json, "
                        "relative to the spec's folder or absolute",
                    )
                ]
            )
        return arch_from_folder(folder)
    arch = find_model(model_id)
    folder = _local_model_folder(model_id, base_dir, need_config=arch is None)
    if folder is not None:
        if arch is not None and warnings is not None:
            warnings.append(
                f"{model_id!r} is both the local folder {str(folder)!r} and the catalogue's "
                f"{arch.id}; using the folder (from_pretrained loads it too). Write "
                f"'./{model_id}' to keep the folder without this warning, or {arch.id!r} for "
                "the catalogue model"
            )
        return arch_from_folder(folder)
    if arch is not None:
        return arch
    if HUB_ID.match(model_id):
        return _arch_from_hub(model_id, revision, trust_remote_code, base_dir)
    raise UserError([Problem(f"unknown model {model_id!r}", hint=_model_miss_hint(model_id))])


def _written_as_path(model_id: str) -> bool:
    """``./x``, ``../x``, ``/x``, ``~/x``, ``x/``: a folder, never a catalogue or hub name."""
    return (
        model_id in (".", "..")
        or model_id.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or model_id.endswith(("/", "\\"))
        or Path(model_id).is_absolute()
    )


def _local_model_folder(model_id: str, base_dir: Path, need_config: bool = True) -> Path | None:
    """The folder ``model_id`` names. A folder without config.json is an error when
    ``need_config`` (nothing else could be meant), else skipped (a catalogue name is)."""
    try:
        path = Path(model_id).expanduser()
    except RuntimeError:  # ~user of a user that does not exist
        return None
    # Relative to the spec's folder, as every path in a spec is (never the working directory).
    candidates = [path] if path.is_absolute() else [base_dir / path]
    for candidate in candidates:
        try:
            is_folder = candidate.is_dir()
        except OSError:  # a name too long for the file system names no folder
            continue
        if is_folder:
            if not (candidate / "config.json").is_file():
                if not need_config:
                    continue
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
    raw = read_json_object(config_path)
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
        settings = read_json_object(tokenizer_config)
    except UserError:
        return False
    return bool(settings.get("chat_template"))


def read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON file that must hold an object (config.json, tokenizer_config.json).

    Every way it can be wrong is a ``UserError`` naming the file: unreadable, too big, not
    UTF-8, not JSON, nested too deep or with a number too long to read, not an object.
    """
    where = str(path)

    def refuse(reason: str, hint: str | None = None) -> UserError:
        return UserError([Problem(f"{where}: {reason}", hint=hint)])

    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise refuse(f"cannot read it: {error.strerror or error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise refuse(f"over {MAX_CONFIG_BYTES // 2**20} MiB; a config is a few KB of JSON")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise refuse(
            f"not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})",
            "save it as UTF-8; JSON files are UTF-8",
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        where_in = f"line {error.lineno}, column {error.colno}"
        raise refuse(f"not valid JSON: {error.msg} ({where_in})") from None
    except RecursionError:
        raise refuse("not a usable config: nested too deeply to read") from None
    except ValueError:  # an integer past Python's 4300-digit limit
        raise refuse("not a usable config: it holds a number too long to read") from None
    if not isinstance(data, dict):
        raise refuse(f"must hold a JSON object ({{...}}); got {_json_kind(data)}")
    return data


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "a number"


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
        config = ArchConfig(
            model_type=model_type,
            architectures=raw.get("architectures") or [],
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
    inconsistent = _inconsistency(config)
    if inconsistent is not None:
        raise UserError(
            [
                Problem(
                    f"{where}: {inconsistent}; transformers cannot build this model",
                    hint="is this config.json edited by hand? compare it with the model's own",
                )
            ]
        )
    return config


def _inconsistency(config: ArchConfig) -> str | None:
    """The first pair of config fields that contradict each other, in words, or None."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if kv_heads > heads:
        return f"num_key_value_heads ({kv_heads}) is more than num_attention_heads ({heads})"
    if heads % kv_heads:
        return (
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    if config.hidden_size % heads:
        return (
            f"hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads ({heads})"
        )
    if config.head_dim % 2:
        return f"head_dim ({config.head_dim}) is odd; rotary position embeddings need it even"
    experts, per_token = config.num_local_experts, config.num_experts_per_tok
    if experts is not None and per_token is not None and per_token > experts:
        return f"num_experts_per_tok ({per_token}) is more than the {experts} experts"
    return None


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


def _arch_from_hub(
    model_id: str, revision: str | None, trust_remote_code: bool, base_dir: Path
) -> ModelArch:
    from peftgen.hub import TRANSFORMERS_OFFLINE_FLAGS, hub_offline

    if hub_offline(TRANSFORMERS_OFFLINE_FLAGS):
        raise UserError(
            [
                Problem(
                    f"model {model_id!r} is not in the catalogue and the hub is offline "
                    "(HF_HUB_OFFLINE is set)",
                    hint=_hub_fix_hint(model_id, base_dir),
                )
            ]
        )
    from peftgen.hub import hub_unreachable, quick_timeouts

    unreachable = hub_unreachable()
    if unreachable is not None:
        raise UserError(
            [
                Problem(
                    f"model {model_id!r} is not in the catalogue and the hub cannot be reached "
                    f"({unreachable}); set HF_HUB_OFFLINE=1 to skip the hub when offline",
                    hint=_hub_fix_hint(model_id, base_dir),
                )
            ]
        )
    try:
        from transformers import AutoConfig  # only here: the analytic path stays torch-free
    except ImportError:
        raise UserError(
            [
                Problem(
                    f"model {model_id!r} is not in the catalogue; fetching a hub model's config "
                    "needs transformers: pip install 'peftgen[train]'",
                    hint=_hub_fix_hint(model_id, base_dir),
                )
            ]
        ) from None
    try:
        with quick_timeouts():
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
                    hint=_hub_fix_hint(model_id, base_dir),
                )
            ]
        ) from error
    raw = config.to_dict()
    if not isinstance(raw, dict):
        raise UserError([Problem(f"{model_id} config.json: must hold a JSON object")])
    return ModelArch(
        id=model_id,
        display_name=model_id.split("/")[-1],
        source=f"https://huggingface.co/{model_id} config.json (revision {revision or 'main'})",
        config=arch_from_config(raw, where=f"{model_id} config.json"),
    )


def _hub_fix_hint(model_id: str, base_dir: Path) -> str:
    """Download into a folder beside the spec and name it as the spec names paths: the
    command's folder as the shell sees it (from the working directory), model.id's
    relative to the spec's folder, so the two meet wherever the user runs peftgen."""
    folder = f"models/{model_id.split('/')[-1]}"
    target = base_dir.resolve() / folder
    try:
        shown = os.path.relpath(target)
    except ValueError:  # another drive (Windows)
        shown = str(target)
    if shown.startswith(".."):
        shown = str(target)
    fix = (
        "download its config.json into a folder (e.g. `hf download "
        f"{model_id} config.json tokenizer_config.json --local-dir {shown}`) and set "
        f"model.id: {folder} (relative to the spec's folder)"
    )
    close = _did_you_mean(model_id, model_names())
    return f"{close} Or {fix}" if close else f"{fix}, or pick a catalogue id (docs/catalogue.md)"


def _model_miss_hint(model_id: str) -> str:
    close = _did_you_mean(model_id, model_names())
    where = "a catalogue id (docs/catalogue.md), a local folder holding config.json, or a hub id"
    return f"{close} model.id takes {where}" if close else f"model.id takes {where}"
