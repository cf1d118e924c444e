"""Resolve a spec's model and GPU, and check the rules that need them.

``load`` checks what the spec alone can tell; this module adds what needs the model's
architecture or the GPU: module names that exist in the model, bf16 and FlashAttention-2
support of the card, lengths past the model's context. These are the mistakes a user
would otherwise find only after downloading 16 GB of weights, or an hour into a run.
Every problem is located at the spec line it is about, and all are reported at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftgen import chat_templates
from peftgen.catalog import (
    Gpu,
    ModelArch,
    linear_modules,
    lookup_gpu,
    lookup_model,
    moe_target_parameters,
)
from peftgen.catalog.structure import SDPA_REFUSED_TYPES
from peftgen.errors import Problem, UserError
from peftgen.load import LoadedSpec, did_you_mean
from peftgen.overrides import apply_changes
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    AnySpec,
    GrpoRunSpec,
    from_spec_dir,
    is_local_dataset,
)
from peftgen.stack import GIB, LOCAL_DATA_LOADERS, format_gib

EMBEDDING_MODULES = ("embed_tokens", "lm_head")
"""Non-linear (or output) modules peft can train in full through ``modules_to_save``."""
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
"""Compressed data files: the hint says to decompress, not to convert."""


@dataclass(frozen=True)
class AppliedDefault:
    """A value the spec left out that ``resolve`` filled in from the model or the GPU."""

    field_path: str
    """Dotted spec key, e.g. ``model.attn_implementation``."""
    value: Any
    reason: str


@dataclass(frozen=True)
class Resolved:
    """A loaded spec with its architecture and target GPU (memory override applied).

    ``loaded.spec`` is the spec with the defaults the tool knows filled in (``defaults``
    lists them); ``loaded.spec.model_dump()`` is what the run uses and spec.yaml records.
    """

    loaded: LoadedSpec
    arch: ModelArch
    gpu: Gpu
    warnings: tuple[str, ...] = ()
    """The loader's warnings and the resolver's, rendered ``file:line:col: warning: ...``."""
    defaults: tuple[AppliedDefault, ...] = ()
    """Keys the spec left out that were set from the model, the GPU or the planner."""

    @property
    def spec(self) -> AnySpec:
        return self.loaded.spec


def resolve(loaded: LoadedSpec) -> Resolved:
    """Find the model and GPU, then check the rules that need them; raise every problem."""
    problems: list[Problem] = list(_dataset_problems(loaded))
    warnings: list[str] = [
        *loaded.warnings,
        *_scaling_warnings(loaded),
        *_missing_data_warnings(loaded),
        *_unused_quantization_warnings(loaded),
    ]
    arch = _resolve_model(loaded, problems, warnings)
    gpu = _resolve_gpu(loaded, problems)
    if arch is not None:
        problems.extend(_module_problems(loaded, arch))
        problems.extend(_architecture_problems(loaded, arch))
        problems.extend(_loss_problems(loaded, arch))
        warnings.extend(_length_warnings(loaded, arch))
        warnings.extend(_chat_template_warnings(loaded, arch))
    if gpu is not None:
        problems.extend(gpu_problems(loaded, gpu))
        warnings.extend(_memory_warnings(loaded, gpu))
    if problems or arch is None or gpu is None:
        raise UserError(sorted(problems, key=lambda p: (p.line or 0, p.column or 0)))
    resolved = Resolved(loaded, arch, _with_memory_override(loaded, gpu), tuple(warnings))
    return with_defaults(resolved)


def _written(model: object, name: str) -> bool:
    """The user wrote ``name`` in this section (pydantic's ``model_fields_set``)."""
    return name in getattr(model, "model_fields_set", set())


def with_defaults(resolved: Resolved) -> Resolved:
    """Fill in what the spec left out and the tool knows: eager attention for Gemma-2,
    ``lora_dropout: 0`` on fused MoE experts, ``max_length`` no longer than the model's
    positions, the multi-GPU engine the planner recommends,
    and 4-bit storage in the compute dtype under FSDP / ZeRO-3. Only keys the user did not
    write are set; a written value that cannot run is refused by the rules above."""
    loaded, arch, gpu = resolved.loaded, resolved.arch, resolved.gpu
    spec = loaded.spec
    changes: dict[str, Any] = {}
    applied: list[AppliedDefault] = []
    if arch.config.model_type in SDPA_REFUSED_TYPES and not _written(
        spec.model, "attn_implementation"
    ):
        changes["model.attn_implementation"] = "eager"
        applied.append(
            AppliedDefault(
                "model.attn_implementation",
                "eager",
                f"transformers 5.24 has no sdpa attention for {arch.display_name} (it cannot "
                "soft-cap the attention scores); flash_attention_2 also works on Ampere or newer",
            )
        )
    if (
        _adapts_fused_experts(spec, arch)
        and not _written(spec.lora, "lora_dropout")
        and spec.lora.lora_dropout != 0
    ):
        changes["lora.lora_dropout"] = 0.0
        applied.append(
            AppliedDefault(
                "lora.lora_dropout",
                0.0,
                f"peft 0.21 adapts {arch.display_name}'s fused experts as parameters and "
                "refuses any other dropout there",
            )
        )
    positions = arch.config.max_position_embeddings
    if not _written(spec.training, "max_length") and spec.training.max_length > positions:
        changes["training.max_length"] = positions
        applied.append(
            AppliedDefault(
                "training.max_length",
                positions,
                f"{arch.display_name} has {positions} positions (max_position_embeddings); "
                f"the default {spec.training.max_length} is past them",
            )
        )
    if changes:
        spec = apply_changes(spec, changes)
    hardware = spec.hardware
    if hardware.world_size > 1 and not _written(hardware, "distributed"):
        # The planner sizes the run; imported here because it builds on this module.
        from peftgen.plan import recommended_engine

        staged = replace(resolved, loaded=replace(loaded, spec=spec))
        engine, reason = recommended_engine(staged)
        spec = apply_changes(spec, {"hardware.distributed": engine})
        applied.append(AppliedDefault("hardware.distributed", engine, reason))
    storage = default_quant_storage(spec, gpu)
    if storage is not None:
        spec = apply_changes(spec, {"quantization.bnb_4bit_quant_storage": storage})
        applied.append(
            AppliedDefault(
                "quantization.bnb_4bit_quant_storage",
                storage,
                f"{spec.hardware.distributed} shards 4-bit weights only when they are stored in "
                "the compute dtype",
            )
        )
    if not applied:
        return resolved
    return replace(resolved, loaded=replace(loaded, spec=spec), defaults=tuple(applied))


def default_quant_storage(spec: AnySpec, gpu: Gpu) -> str | None:
    """The compute dtype's storage name for 4-bit weights FSDP / ZeRO-3 must shard, when
    the spec did not write ``bnb_4bit_quant_storage``; None when nothing needs setting
    (full fine-tuning never loads 4-bit weights)."""
    if spec.hardware.distributed not in PARAMETER_SHARDING_ENGINES or spec.finetuning == "full":
        return None
    if spec.precision not in ("auto", "4bit"):
        return None
    if _written(spec.quantization, "bnb_4bit_quant_storage"):
        return None
    if spec.quantization.bnb_4bit_quant_storage != "uint8":
        return None
    return "bfloat16" if gpu.bf16 else "float16"


def valid_with(spec: AnySpec, changes: dict[str, Any]) -> AnySpec | None:
    """``spec`` with ``changes`` if the spec's rules accept the result, else None."""
    try:
        return apply_changes(spec, changes)
    except ValidationError:
        return None


def _adapts_fused_experts(spec: AnySpec, arch: ModelArch) -> bool:
    lora = spec.lora
    expert_names = {name for target in moe_target_parameters(arch) for name in target.module_names}
    listed = set() if lora.target_modules == "all-linear" else set(lora.target_modules)
    return bool(expert_names) and (
        lora.target_modules == "all-linear" or bool(listed & expert_names)
    )


def _resolve_model(
    loaded: LoadedSpec, problems: list[Problem], warnings: list[str]
) -> ModelArch | None:
    model = loaded.spec.model
    notes: list[str] = []
    try:
        arch = lookup_model(
            model.id,
            base_dir=loaded.path.parent,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            warnings=notes,
        )
    except UserError as error:
        problems.extend(_relocated(loaded, "model.id", error))
        return None
    warnings.extend(loaded.warning("model.id", note) for note in notes)
    return arch


def _dataset_problems(loaded: LoadedSpec) -> list[Problem]:
    """A local file loads as one split named ``train``; another split fails at run time."""
    dataset = loaded.spec.dataset
    if not is_local_dataset(dataset.path):
        return unloadable_data_problems(loaded)
    if dataset.split == "train":
        return []
    return [
        loaded.problem(
            "dataset.split",
            f"a local file has one split, `train`; got {dataset.split!r}",
            "remove dataset.split (hold out evaluation rows with dataset.eval_fraction)",
        )
    ]


def unloadable_data_problems(loaded: LoadedSpec) -> list[Problem]:
    """``unloadable_local_data`` for the spec, read from its folder (``check-data`` asks too)."""
    path = loaded.spec.dataset.path
    found = unloadable_local_data(path, from_spec_dir(path, loaded.path.parent))
    if found is None:
        return []
    return [loaded.problem("dataset.path", *found)]


def unloadable_local_data(path: str, file: Path) -> tuple[str, str] | None:
    """(message, hint) when ``dataset.path`` (``file``, as the spec means it) names a local
    file or folder the script cannot load. A path without a data suffix is a hub id, so the
    script would ask the hub for it; when it names a file (it exists, or is spelled as a
    path), the user meant that file: refused here rather than a hub error at run time.
    """
    spelled_as_path = path.startswith(("/", "./", "../", "~")) or "\\" in path
    if is_local_dataset(path) or not (file.is_file() or spelled_as_path):
        return None
    suffixes = ", ".join(LOCAL_DATA_LOADERS)
    if file.is_dir():
        hint = f"name one data file in that folder ({suffixes})"
    elif file.suffix.lower() in COMPRESSED_SUFFIXES:
        hint = f"decompress it to a {suffixes} file"
    else:
        hint = f"convert it to a {suffixes} file"
    message = (
        f"{path!r} is a local path, and the script loads a local data file by its suffix "
        f"({suffixes}); any other path is read as a hub dataset id"
    )
    return message, hint


def _unused_quantization_warnings(loaded: LoadedSpec) -> list[str]:
    """``quantization`` holds 4-bit settings: with a precision that never loads 4-bit they
    do nothing, which the user who wrote them should hear (not a refusal: switching the
    precision back makes them count)."""
    spec = loaded.spec
    if "quantization" not in spec.model_fields_set or spec.precision in ("auto", "4bit"):
        return []
    if spec.quantization == type(spec.quantization)():
        return []  # the defaults written out (emit's spec.yaml writes every section)
    return [
        loaded.warning(
            "quantization",
            f"4-bit settings, unused: precision {spec.precision} loads no 4-bit weights "
            "(they apply with precision: 4bit, or auto when it picks 4-bit)",
        )
    ]


def _missing_data_warnings(loaded: LoadedSpec) -> list[str]:
    """A local data file that is not there yet: planning does not need it, but the script
    reads it at that path (a warning, not a refusal: it may be written before the run)."""
    dataset = loaded.spec.dataset.path
    if not is_local_dataset(dataset):
        return []
    file = from_spec_dir(dataset, loaded.path.parent)
    if file.is_file():
        return []
    return [
        loaded.warning(
            "dataset.path",
            f"no file at {str(file)!r} (a relative path is read from the spec's folder); the "
            "script reads it there, and `peftgen check-data` checks it",
        )
    ]


def _resolve_gpu(loaded: LoadedSpec, problems: list[Problem]) -> Gpu | None:
    hardware = loaded.spec.hardware  # the spec bounds vram_gib (stack.vram_gib_problem)
    if hardware.gpu is None:
        assert hardware.vram_gib is not None  # the spec requires one of the two
        # No card named: assume a current (Ampere or newer) one with the given memory.
        return Gpu(
            name=f"GPU with {hardware.vram_gib:g} GiB",
            memory_bytes=int(hardware.vram_gib * GIB),
            compute_capability="8.0",
            bf16=True,
            flash_attention_2=True,
            architecture_assumed=True,
        )
    try:
        return lookup_gpu(hardware.gpu)
    except UserError as error:
        problems.extend(_relocated(loaded, "hardware.gpu", error))
        return None


def _relocated(loaded: LoadedSpec, field_path: str, error: UserError) -> list[Problem]:
    """The catalogue's problems (message and hint, no position) placed at ``field_path``."""
    return [loaded.problem(field_path, problem.message, problem.hint) for problem in error.problems]


def _with_memory_override(loaded: LoadedSpec, gpu: Gpu) -> Gpu:
    vram_gib = loaded.spec.hardware.vram_gib
    if vram_gib is None:
        return gpu
    return gpu.model_copy(update={"memory_bytes": int(vram_gib * GIB)})


def _module_problems(loaded: LoadedSpec, arch: ModelArch) -> list[Problem]:
    lora = loaded.spec.lora
    linear_names = list(dict.fromkeys(module.name for module in linear_modules(arch)))
    # Fused MoE experts are parameters, not nn.Linear; peft adapts them by these names.
    linear_names += [name for target in moe_target_parameters(arch) for name in target.module_names]
    problems: list[Problem] = []
    if isinstance(lora.target_modules, list):
        for index, name in enumerate(lora.target_modules):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in linear_names:
                continue
            hint: str | None = did_you_mean(leaf, linear_names)
            if leaf in EMBEDDING_MODULES:
                hint = f"to train {leaf} in full, list it in lora.modules_to_save instead"
            problems.append(
                loaded.problem(
                    f"lora.target_modules.{index}",
                    f"{arch.display_name} has no linear module {name!r}; "
                    f"its linear modules: {', '.join(linear_names)} (or use all-linear)",
                    hint,
                )
            )
    saveable = [*EMBEDDING_MODULES, *linear_names]
    for index, name in enumerate(lora.modules_to_save):
        if name.rsplit(".", 1)[-1] not in saveable:
            problems.append(
                loaded.problem(
                    f"lora.modules_to_save.{index}",
                    f"{arch.display_name} has no module {name!r} to save; "
                    f"allowed: {', '.join(saveable)}",
                    did_you_mean(name, saveable),
                )
            )
    return problems


def _architecture_problems(loaded: LoadedSpec, arch: ModelArch) -> list[Problem]:
    """Settings the pinned transformers / peft refuse for this architecture at load time."""
    spec = loaded.spec
    problems: list[Problem] = []
    if (
        arch.config.model_type in SDPA_REFUSED_TYPES
        and spec.model.attn_implementation == "sdpa"
        and _written(spec.model, "attn_implementation")
    ):
        problems.append(
            loaded.problem(
                "model.attn_implementation",
                f"transformers 5.24 has no sdpa attention for {arch.display_name} "
                "(it cannot soft-cap the attention scores)",
                "use attn_implementation: eager (the default for this model when the key is "
                "left out), or flash_attention_2 on an Ampere or newer GPU",
            )
        )
    lora = spec.lora
    if _adapts_fused_experts(spec, arch):
        if lora.lora_dropout != 0 and _written(lora, "lora_dropout"):
            problems.append(
                loaded.problem(
                    "lora.lora_dropout",
                    f"peft 0.21 adapts {arch.display_name}'s fused experts as parameters "
                    f"and refuses lora_dropout {lora.lora_dropout:g} on them",
                    "set lora.lora_dropout: 0 (the default here when the key is left out), "
                    "or list attention modules in target_modules",
                )
            )
        if lora.use_dora:
            problems.append(
                loaded.problem(
                    "lora.use_dora",
                    f"peft 0.21 has no DoRA for {arch.display_name}'s fused experts",
                    "set use_dora: false, or list attention modules in target_modules",
                )
            )
    return problems


def gpu_problems(loaded: LoadedSpec, gpu: Gpu) -> list[Problem]:
    """What the spec asks of the card that ``gpu`` cannot do (bf16, FlashAttention-2):
    checked for the spec's GPU here, and for a GPU named on the command line by the
    commands that plan for one (``--gpu``, ``--vram-gib``)."""
    spec = loaded.spec
    problems: list[Problem] = []
    if spec.precision == "bf16" and not gpu.bf16:
        problems.append(
            loaded.problem(
                "precision",
                f"{gpu.name} (compute capability {gpu.compute_capability}) has no bfloat16; "
                "bf16 needs compute capability 8.0 (Ampere) or newer",
                "use precision: fp16, or auto to let the planner choose",
            )
        )
    if spec.model.attn_implementation == "flash_attention_2" and not gpu.flash_attention_2:
        problems.append(
            loaded.problem(
                "model.attn_implementation",
                f"FlashAttention-2 has no kernels for {gpu.name} "
                f"(compute capability {gpu.compute_capability}; it needs 8.0 or newer)",
                "use attn_implementation: sdpa",
            )
        )
    return problems


RSLORA_SCALE_WARNING = 4.0
"""A judgment, not a measurement: LoRA recipes scale the update by lora_alpha / r of 1-2;
rsLoRA's lora_alpha / sqrt(r) past 4 usually means an alpha chosen for plain LoRA."""


def _scaling_warnings(loaded: LoadedSpec) -> list[str]:
    """rsLoRA divides by sqrt(r), not r (peft/tuners/lora/layer.py:278, ``update_layer``): an
    alpha copied from a plain-LoRA recipe (often 2 x r) scales the update sqrt(r) times
    more than the recipe meant, which shows as a diverging loss, not as an error."""
    lora = loaded.spec.lora
    if loaded.spec.finetuning == "full" or not lora.use_rslora:
        return []
    scale = lora.lora_alpha / math.sqrt(lora.r)
    if scale <= RSLORA_SCALE_WARNING:
        return []
    return [
        loaded.warning(
            "lora.use_rslora",
            f"the update is scaled by lora_alpha / sqrt(r) = {scale:.3g} (lora_alpha / r "
            f"would give {lora.lora_alpha / lora.r:.3g}); an alpha chosen for plain LoRA is "
            f"too large with rsLoRA: lora_alpha {math.sqrt(lora.r) * 2:.3g} gives a scale of 2",
        )
    ]


def _length_warnings(loaded: LoadedSpec, arch: ModelArch) -> list[str]:
    spec = loaded.spec
    limit = arch.config.max_position_embeddings
    warnings: list[str] = []
    # An unwritten max_length is capped at the positions (``with_defaults``).
    if spec.training.max_length > limit and _written(spec.training, "max_length"):
        warnings.append(
            loaded.warning(
                "training.max_length",
                f"{spec.training.max_length} is past {arch.display_name}'s "
                f"{limit} positions (max_position_embeddings); quality degrades past them",
            )
        )
    if isinstance(spec, GrpoRunSpec):
        total = spec.training.max_length + spec.grpo.max_completion_length
        if total > limit >= spec.training.max_length:
            warnings.append(
                loaded.warning(
                    "grpo.max_completion_length",
                    f"prompt (training.max_length) + completion = {total} tokens, past "
                    f"{arch.display_name}'s {limit} positions",
                )
            )
    return warnings


def _chat_template_warnings(loaded: LoadedSpec, arch: ModelArch) -> list[str]:
    dataset = loaded.spec.dataset
    if dataset.format != "messages" or dataset.chat_template is not None:
        return []
    if arch.has_chat_template:
        return []
    return [
        loaded.warning(
            "dataset.format",
            f"`messages` rows are rendered with the tokenizer's chat template, and "
            f"{arch.display_name}'s tokenizer has none; trl stops at the first batch. "
            "Set dataset.chat_template: chatml (or use the model's instruct variant)",
        )
    ]


def _memory_warnings(loaded: LoadedSpec, gpu: Gpu) -> list[str]:
    vram_gib = loaded.spec.hardware.vram_gib
    if loaded.spec.hardware.gpu is None or vram_gib is None:
        return []
    if vram_gib * GIB <= gpu.memory_bytes:
        return []
    return [
        loaded.warning(
            "hardware.vram_gib",
            f"{vram_gib:g} GiB is more than {gpu.name}'s {format_gib(gpu.memory_bytes)}; "
            "the plan will assume memory the card does not have",
        )
    ]


def _loss_problems(loaded: LoadedSpec, arch: ModelArch) -> list[Problem]:
    """Assistant-only loss finds the assistant turns through ``{% generation %}`` markers in
    the chat template: trl adds them to the templates it knows, peftgen to the ones it
    ships (``peftgen.chat_templates``); any other template would fail in trl, or train
    the wrong tokens, so it is refused here with the way out."""
    spec = loaded.spec
    if spec.method != "sft" or spec.dataset.format != "messages":
        return []
    if spec.resolved_loss_on != "assistant" or spec.dataset.chat_template is not None:
        return []
    if not arch.has_chat_template or arch.chat_template_family is not None:
        return []  # no template at all is the chat-template warning's case
    written = spec.training.loss_on is not None
    return [
        loaded.problem(
            "training.loss_on" if written else "dataset.format",
            f"loss on the assistant turns{'' if written else ' (the default for messages)'} "
            f"needs to find them in {arch.display_name}'s chat template, which peftgen does not "
            "know (known: " + ", ".join(sorted(chat_templates.FAMILIES)) + ")",
            "set training.loss_on: all to train on every token, or use a local model folder "
            "whose chat template has {% generation %} markers",
        )
    ]
