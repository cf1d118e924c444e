"""Render a spec and its plan into the files ``peftgen emit`` writes.

One Jinja environment for every template. It is strict (a misspelt variable is an
error, not an empty string) and never lets a spec value into the code as raw text: every
value goes through the ``py`` filter, which writes a Python literal, and every name that
becomes code (a function to import, a module to adapt) is checked against a pattern
first. So a hostile string in a spec can change what the script *does* only in the way
the same string in a hand-written literal would.

The scripts' context, a frozen ``ScriptContext``, is built here once from the spec and
the ``Plan``; the train and merge templates only lay it out and never see the spec, so
the choices (which precision, which dtype, which imports, what the comments say) are made
in one place. Every spec value is read by its field path (``_SpecValues``): one that
cannot be written into a script is a ``UserError`` naming the spec file and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import jinja2

from peftgen import chat_templates, stack
from peftgen.chat_templates import CHATML_SPECIAL_TOKENS
from peftgen.errors import UserError
from peftgen.launch import LAUNCH_FILES, launch_files
from peftgen.load import LoadedSpec
from peftgen.paths import (
    RunPaths,
    placed,
    relative_to,
    relocated_spec,
    run_paths,
)
from peftgen.plan import Candidate, Plan
from peftgen.resolve import Resolved
from peftgen.spec import (
    USER_REWARD_PATTERN,
    AnySpec,
    DpoRunSpec,
    GrpoRunSpec,
    trained_modules_to_save,
)

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Exploded lists keep `ruff format` and a reader happy once a literal gets long.
_INLINE_LIST_MAX_CHARS = 60
TRAIN_TEMPLATES: dict[str, str] = {
    "sft": "train_sft.py.j2",
    "dpo": "train_dpo.py.j2",
    "grpo": "train_grpo.py.j2",
}


class RenderError(Exception):
    """A template failed to render: a bug in peftgen, named by its template."""


# --- Python literals --------------------------------------------------------------------


def _escape_string_body(text: str, quote: str) -> str:
    """The inside of a string literal, escaped the way ``repr`` does, for ``quote``."""
    parts: list[str] = []
    for char in text:
        if char == "\\":
            parts.append("\\\\")
        elif char == quote:
            parts.append("\\" + char)
        elif char == "\n":
            parts.append("\\n")
        elif char == "\r":
            parts.append("\\r")
        elif char == "\t":
            parts.append("\\t")
        elif not char.isprintable():
            parts.append(repr(char)[1:-1])
        else:
            parts.append(char)
    return "".join(parts)


def python_string(text: str) -> str:
    """A str literal quoted as ``ruff format`` wants: double, unless single escapes less."""
    quote = "'" if text.count('"') > text.count("'") else '"'
    return quote + _escape_string_body(text, quote) + quote


def python_literal(value: object) -> str:
    """Render ``value`` as Python source that evaluates to an equal value.

    Only plain data is accepted (None, bool, int, finite float, str, and lists, tuples and
    dicts of those); anything else is a bug in the caller, not something to stringify.
    """
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError.single(f"a number in the spec is not finite: {value!r}")
        return repr(value)
    if isinstance(value, str):
        return python_string(value)
    if isinstance(value, list | tuple):
        items = [python_literal(item) for item in value]
        inline = ", ".join(items)
        if isinstance(value, tuple):
            return f"({inline},)" if len(items) == 1 else f"({inline})"
        if len(inline) > _INLINE_LIST_MAX_CHARS:
            return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
        return f"[{inline}]"
    if isinstance(value, dict):
        pairs = [f"{python_literal(key)}: {python_literal(item)}" for key, item in value.items()]
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"cannot render {type(value).__name__} as a Python literal")


def identifier(name: str) -> str:
    """``name`` if it is a plain Python identifier, else an error (it is about to become code)."""
    if not IDENTIFIER_PATTERN.match(name):
        raise UserError.single(f"{name!r} is not a Python identifier")
    return name


def comment_text(text: object) -> str:
    """Text for a ``#`` comment or the docstring: one line, no quotes that end a docstring."""
    flat = " ".join(str(text).split())
    printable = "".join(char if char.isprintable() else "?" for char in flat)
    return printable.replace("\\", "/").replace('"""', "'''")


def wrap_comment(text: object, indent: int = 0, width: int = 100) -> str:
    """``# text`` wrapped to ``width``; continuation lines start at ``indent`` columns."""
    import textwrap

    lines = textwrap.wrap(
        comment_text(text), width=width - indent - 2, break_long_words=False, break_on_hyphens=False
    )
    return ("\n" + " " * indent).join(f"# {line}" for line in lines)


def wrap_text(text: object, width: int = 100) -> str:
    """Docstring prose wrapped to ``width``."""
    import textwrap

    return "\n".join(
        textwrap.wrap(
            comment_text(text), width=width, break_long_words=False, break_on_hyphens=False
        )
    )


def wrap_bullet(text: object, indent: int = 4, width: int = 100) -> str:
    """``- text`` for the docstring, wrapped to ``width`` with a hanging indent."""
    import textwrap

    lines = textwrap.wrap(
        comment_text(text),
        width=width,
        initial_indent=" " * indent + "- ",
        subsequent_indent=" " * (indent + 2),
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines)


# --- Template environment ---------------------------------------------------------------


def _template_root() -> Traversable | Path:
    """The installed ``peftgen/_templates`` (wheel), else the checkout's ``templates/``."""
    installed = resources.files("peftgen") / "_templates"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "templates"


class _TraversableLoader(jinja2.BaseLoader):
    """Loads templates from a ``Traversable``, so a zipped wheel works as well as a folder."""

    def __init__(self, root: Traversable | Path) -> None:
        self.root = root

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        source = self.root / template
        if not source.is_file():
            raise jinja2.TemplateNotFound(template)
        return source.read_text(encoding="utf-8"), template, lambda: True


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=_TraversableLoader(_template_root()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["py"] = python_literal
    env.filters["ident"] = identifier
    env.filters["comment"] = comment_text
    env.filters["wrap_comment"] = wrap_comment
    env.filters["wrap_bullet"] = wrap_bullet
    env.filters["wrap_text"] = wrap_text
    # Four significant digits: a tiny model's step is a few milliseconds, never "0.0".
    env.filters["significant"] = lambda value: float(f"{value:.4g}")
    env.filters["gib"] = stack.format_gib
    return env


def render_template(name: str, context: Mapping[str, Any]) -> str:
    """Render one template; any Jinja failure becomes a ``RenderError`` naming it."""
    try:
        return environment().get_template(name).render(context)
    except UserError:
        raise
    except jinja2.TemplateError as error:
        where = f"{name}:{error.lineno}" if isinstance(error, jinja2.TemplateSyntaxError) else name
        raise RenderError(f"template {where}: {error}") from error


# --- Context ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What the script needs to know about the resolved model, beyond the spec."""

    id: str
    """The hub id the spec's ``model.id`` resolved to (an alias becomes the catalogue id)."""
    local_dir: Path | None = None
    """The local model folder, when ``model.id`` names one."""
    has_chat_template: bool = False
    chat_template_family: str | None = None
    """A key of ``peftgen.chat_templates.FAMILIES`` (None: unknown or none)."""
    tied_embeddings: bool = False


def model_source(resolved: Resolved) -> ModelSource:
    """The resolved model as the scripts need it."""
    arch = resolved.arch
    folder = Path(arch.id)
    local = folder.is_dir() and (folder / "config.json").is_file()
    return ModelSource(
        id=arch.id,
        local_dir=folder if local else None,
        has_chat_template=arch.has_chat_template,
        chat_template_family=arch.chat_template_family,
        tied_embeddings=arch.config.tie_word_embeddings,
    )


@dataclass(frozen=True)
class RewardFunc:
    """One GRPO reward as the script refers to it."""

    name: str
    """The Python name the script binds it to."""
    builtin: bool
    path_expr: str | None = None
    """Python source for the reward file's path (a literal, or one joined to SCRIPT_DIR)."""
    function: str | None = None


@dataclass(frozen=True)
class ChatFormat:
    """How the script turns rows into what trl trains on, and which tokens carry the loss."""

    conversational: bool
    """Rows are (or are converted to) lists of role/content messages, rendered with the
    chat template; False: plain text, no template."""
    convert_rows: bool
    """prompt_completion / preference / prompt strings become user / assistant messages."""
    install_chatml: bool
    """The spec's dataset.chat_template: chatml is installed on a base model."""
    loss_on: str
    training_template_lines: list[str] | None
    """peftgen's marked version of the model's chat template, when trl cannot patch it."""
    trl_patches_template: bool
    """trl swaps in its own marked template (get_training_chat_template) for tokenizing."""
    family_description: str | None
    training_change: str | None
    """How the marked template renders differently from the model's, and why."""


def _dataset_loader(loaded: LoadedSpec) -> str | None:
    """The ``datasets`` builder for a local file (json, csv, parquet), or None for a hub id.
    (A local file has one split, ``train``: resolve refuses any other.)"""
    return stack.LOCAL_DATA_LOADERS.get(Path(loaded.spec.dataset.path).suffix.lower())


def _path_expr(target: Path, anchor_dir: Path | None) -> str:
    """Python source for ``target``: joined to SCRIPT_DIR when the script's folder is known
    and shares a folder with it (the script then runs from any directory and moves with its
    files), else the absolute path (``paths.relative_to``)."""
    relative = relative_to(target, anchor_dir) if anchor_dir is not None else None
    if relative is None:
        return python_literal(target.as_posix())
    return f"str((SCRIPT_DIR / {python_literal(relative)}).resolve())"


def _upcast_reason(
    quantized: bool, modules_to_save: bool, upcasts: bool, compute_dtype: str
) -> str | None:
    """The comment over the script's fp32 cast of its trained copies, or None without one:
    trl's bf16 trainables of an 8/4-bit model, or a 16-bit base's ``modules_to_save``
    (``compute_dtype``: the torch name)."""
    if not upcasts or not (quantized or modules_to_save):
        return None
    fp16 = compute_dtype == "float16"
    if quantized:
        return (
            "Cast trl's bf16 trainable weights back to fp32: small updates round away in bf16"
            + (", and fp16 mixed precision needs fp32 masters." if fp16 else ".")
        )
    return (
        "fp32 master weights for the full copies (MODULES_TO_SAVE start as copies of the "
        f"{compute_dtype} base layers): in 16 bits small updates round away"
        + (", and fp16 mixed precision refuses fp16 trainable weights." if fp16 else ".")
    )


def _joins_script_dir(files: list[Path | None], anchor_dir: Path | None) -> bool:
    """Whether a script naming these files joins any to SCRIPT_DIR (``_path_expr``), so
    it needs the constant."""
    if anchor_dir is None:
        return False
    return any(path is not None and relative_to(path, anchor_dir) is not None for path in files)


def _reward_funcs(
    values: _SpecValues, spec: GrpoRunSpec, paths: RunPaths, anchor_dir: Path | None
) -> list[RewardFunc]:
    rewards: list[RewardFunc] = []
    for index, item in enumerate(spec.grpo.reward_funcs):
        where = f"grpo.reward_funcs.{index}"
        match = USER_REWARD_PATTERN.match(item)
        if match is None:
            rewards.append(
                RewardFunc(name=values.identifier(where, f"{item}_reward"), builtin=True)
            )
        else:
            function = values.identifier(where, match["func"])
            rewards.append(
                RewardFunc(
                    name=function,
                    builtin=False,
                    path_expr=_path_expr(paths.reward_files[match["path"]], anchor_dir),
                    function=function,
                )
            )
    return rewards


def _chat_format(spec: AnySpec, model: ModelSource) -> ChatFormat:
    """Conversational rows for any model with a chat template (its own, or the ChatML the
    spec installs); plain text for a base model. Loss tokens as ``training.loss_on`` says."""
    install_chatml = spec.dataset.chat_template is not None
    templated = model.has_chat_template or install_chatml
    fmt = spec.dataset.format
    conversational = fmt == "messages" or (templated and fmt != "text")
    family_name = "chatml" if install_chatml else model.chat_template_family
    family = chat_templates.FAMILIES.get(family_name) if family_name else None
    loss_on = spec.resolved_loss_on
    marked_lines: list[str] | None = None
    trl_patches = False
    if spec.method == "sft" and loss_on == "assistant" and family is not None:
        if family.trl_patches:
            trl_patches = True
        elif family.training is not None:
            marked_lines = _split_template(family.training)
    return ChatFormat(
        conversational=conversational,
        convert_rows=conversational and fmt != "messages",
        install_chatml=install_chatml,
        loss_on=loss_on,
        training_template_lines=marked_lines,
        trl_patches_template=trl_patches,
        family_description=family.description if family else None,
        training_change=family.training_change if family and marked_lines else None,
    )


LOSS_TEXT: dict[str, str] = {
    "assistant": "the assistant turns only (system and user text are context, not targets)",
    "completion": "the completions only (prompts are context, not targets)",
    "all": "every token",
    "dpo": "the chosen vs rejected completions (the prompt is context)",
    "grpo": "the sampled completions, weighted by their group-relative rewards",
}


def _loss_text(method: str, loss_on: str) -> str:
    return LOSS_TEXT[loss_on if method == "sft" else method]


def _format_text(chat: ChatFormat) -> str:
    if not chat.conversational:
        return "plain text (the model has no chat template)"
    template = (
        "the ChatML template this script installs"
        if chat.install_chatml
        else ("the model's own chat template")
    )
    converted = (
        ", prompts as user turns and answers as assistant turns" if chat.convert_rows else ""
    )
    return f"conversations rendered with {template}{converted}, as at inference"


BREAKDOWN_LABELS: tuple[tuple[str, str], ...] = (
    ("weights_bytes", "weights"),
    ("adapter_bytes", "LoRA adapter"),
    ("gradient_bytes", "gradients"),
    ("optimizer_bytes", "optimizer state"),
    ("activation_bytes", "activations"),
    ("logits_bytes", "logits / loss"),
    ("overhead_bytes", "CUDA context, allocator"),
)


def _breakdown_rows(candidate: Candidate) -> list[tuple[str, int]]:
    return [(label, getattr(candidate.breakdown, key)) for key, label in BREAKDOWN_LABELS]


def _tf32_reason(plan: Plan) -> str:
    """The TF32 line's comment: a fact about the named GPU, or what is assumed without one."""
    if plan.gpu.architecture_assumed:
        return (
            "no hardware.gpu named, so an Ampere-or-newer card with tensor cores for them is "
            "assumed; remove this line on an older card"
        )
    return f"the {comment_text(plan.gpu.name)} has tensor cores for them (Ampere or newer)"


def _ampere_or_newer(compute_capability: str | None) -> bool:
    if compute_capability is None:
        return False
    major = int(compute_capability.split(".")[0])
    return major >= 8


def _forced_candidate(spec: AnySpec, plan: Plan) -> Candidate:
    """What ``emit --force`` renders when nothing fits: the spec's precision, else the smallest."""
    for candidate in plan.candidates:
        if candidate.precision == spec.precision:
            return candidate
    return min(plan.candidates, key=lambda c: c.peak_reserved_bytes)


def _precision_text(spec: AnySpec, precision: str, compute_dtype: str) -> str:
    if precision == "4bit":
        quant = spec.quantization
        double = ", double quantization" if quant.bnb_4bit_use_double_quant else ""
        quant_type = quant.bnb_4bit_quant_type.upper()
        return f"4-bit ({quant_type}{double}, {compute_dtype} compute) + LoRA (QLoRA)"
    if precision == "8bit":
        return f"8-bit (LLM.int8, {compute_dtype} compute) + LoRA"
    return f"{compute_dtype} + LoRA"


def _split_template(template: str) -> list[str]:
    """A Jinja chat template cut at its tags, one readable literal per line. Jinja comments
    (``{#- ... -#}``, which render as nothing) are left out of the script."""
    template = re.sub(r"\{#.*?(?:-#\}\s*|#\})", "", template, flags=re.DOTALL)
    lines: list[str] = []
    for part in re.split(r"(?<=%})|(?<=}})", template):
        lines.extend(_short_pieces(part))
    return lines


def _short_pieces(text: str, max_literal_chars: int = 92) -> list[str]:
    """``text`` cut after spaces into pieces whose literals fit a line (the script joins
    adjacent literals back into the same string)."""
    pieces: list[str] = []
    current = ""
    for word in re.split(r"(?<= )", text):
        if current and len(python_literal(current + word)) > max_literal_chars:
            pieces.append(current)
            current = ""
        current += word
    if current:
        pieces.append(current)
    return pieces


def _import_line(module: str, names: list[str]) -> str:
    """``from module import a, b`` as ruff formats it: one line, or one name per line."""
    line = f"from {module} import {', '.join(names)}"
    if len(line) <= 100:
        return line
    return f"from {module} import (\n" + "".join(f"    {name},\n" for name in names) + ")"


# --- The script context: the typed view the templates lay out ---------------------------


class _SpecValues:
    """Reads the spec values that become part of a script, each by its field path, so a
    value that cannot be written into the script is a ``UserError`` naming the spec file
    and the field (as a spec error from ``peftgen.load`` does), never a template error."""

    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded

    def error(self, field_path: str, message: str) -> UserError:
        return UserError([self.loaded.problem(field_path, message)])

    def literal(self, field_path: str) -> Any:
        """The value at ``field_path`` (``training.learning_rate``, ``grpo.reward_funcs.0``),
        checked to be writable as a Python literal."""
        value: Any = self.loaded.spec
        for part in field_path.split("."):
            value = value[int(part)] if part.isdigit() else getattr(value, part)
        try:
            python_literal(value)
        except UserError as error:
            message = "; ".join(problem.message for problem in error.problems)
            raise self.error(field_path, f"cannot be written into the script: {message}") from None
        except TypeError as error:
            raise self.error(field_path, f"cannot be written into the script: {error}") from None
        return value

    def identifier(self, field_path: str, name: str | None = None) -> str:
        """``name`` (default: the value at ``field_path``), which becomes a name in the code."""
        text = self.literal(field_path) if name is None else name
        if not isinstance(text, str) or not IDENTIFIER_PATTERN.match(text):
            raise self.error(
                field_path, f"{text!r} is not a Python identifier (it becomes code in the script)"
            )
        return text


@dataclass(frozen=True)
class ModelView:
    """How the scripts load the model."""

    id_expr: str
    """Python source for MODEL_ID (a literal, or a path joined to SCRIPT_DIR)."""
    id_text: str
    """The model as the docstring names it."""
    is_local: bool
    gated: bool
    revision: str | None
    trust_remote_code: bool
    attn_implementation: str


@dataclass(frozen=True)
class DataView:
    """Where the rows come from, their format, and the evaluation split."""

    loader: str | None
    """The ``datasets`` builder of a local file (json, csv, parquet); None: a hub dataset."""
    path_expr: str
    split: str
    format: str
    evaluate: bool
    """A share of the rows is held out for evaluation (``dataset.eval_fraction > 0``)."""
    eval_fraction: float
    eval_strategy: str


@dataclass(frozen=True)
class LoraView:
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: str | list[str]
    bias: str
    use_dora: bool
    use_rslora: bool


@dataclass(frozen=True)
class QuantizationView:
    """``BitsAndBytesConfig``'s 4-bit options."""

    quant_type: str
    use_double_quant: bool
    quant_storage: str
    """A ``torch`` dtype name, checked to be an identifier."""


@dataclass(frozen=True)
class TrainingView:
    """The trainer configuration's constants, as the spec sets them."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: float
    max_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    optim: str
    seed: int
    logging_steps: int
    save_strategy: str
    save_steps: int | None
    """Only with ``save_strategy: steps``."""
    save_total_limit: int | None
    """Only when checkpoints are saved and a limit is set."""
    report_to: str | list[str]
    gradient_checkpointing: bool
    max_length: int
    packing: bool


@dataclass(frozen=True)
class DpoView:
    beta: float
    loss_types: list[str]
    precompute_ref_log_probs: bool
    copies_reference: bool
    """Full fine-tuning without precomputed log-probs: the script passes a frozen copy."""
    keeps_lora_dropout: bool
    """LoRA with dropout: ``disable_dropout=False`` (trl would zero it)."""


@dataclass(frozen=True)
class GrpoView:
    num_generations: int
    max_completion_length: int
    beta: float
    temperature: float
    rewards: list[RewardFunc]
    builtin_rewards: list[str]
    user_rewards: bool
    length_target_tokens: int
    reference_in_compute_dtype: bool
    """Full fine-tuning with ``beta > 0``: trl's reference loads in the compute dtype."""
    vllm_kwargs: dict[str, Any]
    vllm_comment: str
    vllm_requirement: str
    """The header's vLLM requirement (``stack.VLLM_REQUIREMENT``), quoted in the docstring."""
    vllm_server: bool
    vllm_serve_command: str


@dataclass(frozen=True)
class ScriptContext:
    """Everything ``train.py`` and ``merge.py`` are rendered from, decided once here from
    the spec and the plan. The templates receive its fields (and ``reason`` /
    ``plan_value``) and only lay them out; they never see the spec."""

    method: str
    title: str
    spec_name: str
    spec_sha256: str
    receipt_version: int
    dependencies: list[str]
    """PEP 723 requirements of train.py (``name==version``)."""
    merge_dependencies: list[str]
    receipt_libraries: tuple[str, ...]
    """The packages whose installed versions the memory receipt records."""
    stdlib_imports: list[str]
    library_imports: list[str]
    gpu_name: str
    gpu_count: int
    planned_gpu: str
    gpu_memory_bytes: int
    budget_bytes: int
    distributed: str
    fits: bool
    candidate: Candidate
    breakdown_rows: list[tuple[str, int]]
    predicted_breakdown: list[tuple[str, int]]
    """The chosen candidate's breakdown by ``MemoryBreakdown`` field, for the receipt."""
    precision: str
    precision_text: str
    quantized: bool
    compute_dtype: str
    """``torch.<name>`` of the compute dtype."""
    dtype_expr: str
    """Python source for the compute dtype (``COMPUTE_DTYPE`` in the fp16 script)."""
    fp16: bool
    tf32: bool
    tf32_reason: str
    """Why TF32 is on: the named card's tensor cores, or an assumed one's."""
    full: bool
    script_dir: bool
    """train.py names a local path relative to its own folder (``SCRIPT_DIR``)."""
    merge_script_dir: bool
    """merge.py does (its model folder, adapter or merged folder)."""
    fsdp_adapter_key_fix: bool
    """``stack.peft_misses_adapter_keys_under_fsdp``: the script patches peft's key prefixes."""
    fsdp_fp32_buffers: bool
    """``stack.fsdp_rounds_buffers``: the script keeps FSDP's buffers (RoPE) in fp32."""
    model: ModelView
    data: DataView
    output_dir_expr: str
    merged_dir_expr: str
    merge_host_bytes: int
    lora: LoraView | None
    quantization: QuantizationView | None
    training: TrainingView
    modules_to_save: list[str]
    ensure_weight_tying: bool
    upcast_reason: str | None
    """Why the script casts its trained copies to fp32 after building the trainer
    (``stack.TRAINED_COPY_DTYPE``); None where it does not (DeepSpeed, nothing to cast)."""
    training_args_before_load: bool
    """The training arguments come before ``from_pretrained`` (ZeRO-3's zero.Init:
    ``stack.zero3_partitions_while_loading``)."""
    chat: ChatFormat
    loss_text: str
    format_text: str
    chatml_tokens: list[str]
    chatml_template_lines: list[str]
    warnings: list[str]
    reasons: Mapping[str, str]
    """The plan's decisions by knob: why (comment text)."""
    plan_values: Mapping[str, str]
    """The plan's decisions by knob: what."""
    dpo: DpoView | None = None
    grpo: GrpoView | None = None
    full_summary: str = ""
    """Full fine-tuning: how the engine keeps the fp32 masters (the docstring)."""
    full_load_comment: str = ""
    """Full fine-tuning: the comment on the load call's fp32 dtype."""

    def reason(self, knob: str) -> str:
        return self.reasons.get(knob, "")

    def plan_value(self, knob: str) -> str:
        return self.plan_values.get(knob, "")

    def template_vars(self) -> dict[str, Any]:
        """The names a template sees: every field, and the two lookups."""
        names = {item.name: getattr(self, item.name) for item in fields(self)}
        return names | {"reason": self.reason, "plan_value": self.plan_value}


METHOD_TITLES: dict[str, str] = {
    "sft": "Supervised fine-tuning (SFT)",
    "dpo": "Direct preference optimisation (DPO)",
    "grpo": "Group relative policy optimisation (GRPO)",
}
MERGE_LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def _stdlib_imports(spec: AnySpec, full: bool) -> list[str]:
    """train.py's standard-library imports, sorted as ruff's isort wants them."""
    modules = {"argparse", "json", "os", "time"}
    names = {("importlib", "metadata"), ("pathlib", "Path")}
    if isinstance(spec, DpoRunSpec) and full and not spec.dpo.precompute_ref_log_probs:
        modules.add("copy")
    if isinstance(spec, GrpoRunSpec):
        if any(USER_REWARD_PATTERN.match(item) for item in spec.grpo.reward_funcs):
            modules.add("importlib.util")
            names.add(("collections.abc", "Callable"))
        if "format" in spec.grpo.reward_funcs:
            modules.add("re")
    return [f"import {module}" for module in sorted(modules)] + [
        f"from {module} import {name}" for module, name in sorted(names)
    ]


def _library_imports(spec: AnySpec, precision: str, chat: ChatFormat, full: bool) -> list[str]:
    """train.py's imports of the training stack, one statement each."""
    trainer = spec.method.upper()
    transformers_names = [
        "AutoModelForCausalLM",
        "AutoTokenizer",
        *(["BitsAndBytesConfig"] if precision in ("8bit", "4bit") else []),
        *(["PreTrainedTokenizerBase"] if chat.training_template_lines else []),
        "TrainerCallback",
    ]
    return [
        "import torch",
        "from accelerate import PartialState",
        "from datasets import Dataset, load_dataset",
        *([] if full else ["from peft import LoraConfig"]),
        _import_line("transformers", transformers_names),
        "from transformers.trainer_utils import get_last_checkpoint",
        f"from trl import {trainer}Config, {trainer}Trainer",
    ]


def _model_view(
    values: _SpecValues, model: ModelSource, paths: RunPaths, anchor_dir: Path | None
) -> ModelView:
    if paths.model_dir:
        shown = placed(paths.model_dir, anchor_dir)
        id_expr, id_text = _path_expr(paths.model_dir, anchor_dir), shown + " (a local folder)"
    else:
        id_expr, id_text = python_literal(model.id), model.id
    return ModelView(
        id_expr=id_expr,
        id_text=comment_text(id_text),
        is_local=paths.model_dir is not None,
        gated=stack.is_gated(model.id),
        revision=values.literal("model.revision"),
        trust_remote_code=values.literal("model.trust_remote_code"),
        attn_implementation=values.literal("model.attn_implementation"),
    )


def _data_view(
    values: _SpecValues, loaded: LoadedSpec, paths: RunPaths, anchor_dir: Path | None
) -> DataView:
    spec = loaded.spec
    return DataView(
        loader=_dataset_loader(loaded),
        path_expr=_path_expr(paths.dataset_file, anchor_dir)
        if paths.dataset_file
        else python_literal(values.literal("dataset.path")),
        split=values.literal("dataset.split"),
        format=spec.dataset.format,
        evaluate=spec.dataset.eval_fraction > 0,
        eval_fraction=values.literal("dataset.eval_fraction"),
        eval_strategy="steps" if spec.training.save_strategy == "steps" else "epoch",
    )


def _lora_view(values: _SpecValues) -> LoraView:
    return LoraView(
        r=values.literal("lora.r"),
        lora_alpha=values.literal("lora.lora_alpha"),
        lora_dropout=values.literal("lora.lora_dropout"),
        target_modules=values.literal("lora.target_modules"),
        bias=values.literal("lora.bias"),
        use_dora=values.literal("lora.use_dora"),
        use_rslora=values.literal("lora.use_rslora"),
    )


def _quantization_view(values: _SpecValues) -> QuantizationView:
    return QuantizationView(
        quant_type=values.literal("quantization.bnb_4bit_quant_type"),
        use_double_quant=values.literal("quantization.bnb_4bit_use_double_quant"),
        quant_storage=values.identifier("quantization.bnb_4bit_quant_storage"),
    )


def _training_view(values: _SpecValues, spec: AnySpec) -> TrainingView:
    training = spec.training
    saves = training.save_strategy != "no"
    return TrainingView(
        per_device_train_batch_size=values.literal("training.per_device_train_batch_size"),
        gradient_accumulation_steps=values.literal("training.gradient_accumulation_steps"),
        num_train_epochs=values.literal("training.num_train_epochs"),
        max_steps=values.literal("training.max_steps"),
        learning_rate=values.literal("training.learning_rate"),
        lr_scheduler_type=values.literal("training.lr_scheduler_type"),
        warmup_ratio=values.literal("training.warmup_ratio"),
        optim=values.literal("training.optim"),
        seed=values.literal("training.seed"),
        logging_steps=values.literal("training.logging_steps"),
        save_strategy=values.literal("training.save_strategy"),
        save_steps=values.literal("training.save_steps")
        if training.save_strategy == "steps"
        else None,
        save_total_limit=values.literal("training.save_total_limit") if saves else None,
        report_to=values.literal("training.report_to"),
        gradient_checkpointing=training.gradient_checkpointing,
        max_length=values.literal("training.max_length"),
        packing=values.literal("training.packing"),
    )


def _dpo_view(values: _SpecValues, spec: DpoRunSpec, full: bool) -> DpoView:
    return DpoView(
        beta=values.literal("dpo.beta"),
        loss_types=[values.literal("dpo.loss_type")],
        precompute_ref_log_probs=spec.dpo.precompute_ref_log_probs,
        copies_reference=full and not spec.dpo.precompute_ref_log_probs,
        keeps_lora_dropout=not full and spec.lora.lora_dropout > 0,
    )


def _grpo_view(
    values: _SpecValues,
    spec: GrpoRunSpec,
    model: ModelSource,
    paths: RunPaths,
    anchor_dir: Path | None,
    full: bool,
) -> GrpoView:
    grpo = spec.grpo
    rewards = _reward_funcs(values, spec, paths, anchor_dir)
    served = model.local_dir.as_posix() if model.local_dir else model.id
    return GrpoView(
        num_generations=values.literal("grpo.num_generations"),
        max_completion_length=values.literal("grpo.max_completion_length"),
        beta=values.literal("grpo.beta"),
        temperature=values.literal("grpo.temperature"),
        rewards=rewards,
        builtin_rewards=[item for item in grpo.reward_funcs if item in stack.BUILTIN_REWARDS],
        user_rewards=any(not reward.builtin for reward in rewards),
        # The length reward peaks halfway to the generation limit: long enough to
        # reason, short of truncation.
        length_target_tokens=max(1, grpo.max_completion_length // 2),
        reference_in_compute_dtype=full and grpo.beta > 0,
        vllm_kwargs=grpo_vllm_kwargs(spec),
        vllm_comment={
            "colocate": "trl's colocate mode: vLLM shares this GPU",
            "server": "a `trl vllm-serve` process on other GPUs; start it before training",
        }.get(str(grpo.use_vllm), ""),
        vllm_requirement=stack.VLLM_REQUIREMENT,
        vllm_server=grpo.use_vllm == "server",
        vllm_serve_command=comment_text(
            f"CUDA_VISIBLE_DEVICES={spec.hardware.world_size} trl vllm-serve --model {served} "
            f"--host {grpo.vllm_server_host} --port {grpo.vllm_server_port} "
            f"--gpu_memory_utilization {grpo.vllm_gpu_memory_utilization:g}"
        ),
    )


def script_context(
    loaded: LoadedSpec, plan: Plan, model: ModelSource, anchor_dir: Path | None = None
) -> ScriptContext:
    """The context train.py and merge.py are rendered from: spec values, plan numbers and
    the choices they imply.

    ``anchor_dir`` is the folder the scripts are written to (``emit -o``): local paths are
    then written relative to it; None (stdout) writes them absolute.
    """
    spec = loaded.spec
    values = _SpecValues(loaded)
    candidate = plan.chosen or _forced_candidate(spec, plan)
    precision = candidate.precision
    quantized = precision in ("8bit", "4bit")
    full = spec.finetuning == "full"
    dtype = stack.compute_dtype(precision, plan.gpu.bf16)
    compute_dtype = stack.TORCH_DTYPE_NAMES[dtype]
    fp16 = dtype == "fp16"
    paths = run_paths(spec, loaded.path.parent, model.local_dir)
    chat = _chat_format(spec, model)
    # Full fine-tuning trains every weight: nothing to list for peft.
    modules_to_save = [] if full else trained_modules_to_save(spec)
    # fp32 master weights for trained copies (stack.TRAINED_COPY_DTYPE): the script casts
    # where they start in 16 bits, full copies of a 16-bit base's layers, or trl's bf16 on
    # an 8/4-bit model. Full fine-tuning loads in fp32 already.
    fp32_copies = stack.script_upcasts_trained_copies(spec.hardware.distributed)
    pinned = {
        name: version
        for name, version in stack.PINNED_VERSIONS.items()
        if (name != "bitsandbytes" or stack.uses_bitsandbytes(precision, spec.training.optim))
        and (name != "peft" or not full)
    }
    grpo = (
        _grpo_view(values, spec, model, paths, anchor_dir, full)
        if isinstance(spec, GrpoRunSpec)
        else None
    )
    vllm = [stack.VLLM_REQUIREMENT] if grpo is not None and grpo.vllm_kwargs else []
    if spec.hardware.distributed.startswith("deepspeed"):
        pinned["deepspeed"] = stack.ENGINE_VERSIONS["deepspeed"]
    model_view = _model_view(values, model, paths, anchor_dir)
    data_view = _data_view(values, loaded, paths, anchor_dir)
    if not paths.output_dir.name:  # `/`, `../../..` up to it: no name to merge beside
        raise values.error("output_dir", "is the filesystem root; name a folder for the run")
    merged_dir = paths.output_dir.with_name(paths.output_dir.name + "-merged")
    output_dir_expr = _path_expr(paths.output_dir, anchor_dir)
    merged_dir_expr = _path_expr(merged_dir, anchor_dir)
    train_files = [paths.model_dir, paths.dataset_file, paths.output_dir]
    train_files += list(paths.reward_files.values())
    merge_files = [paths.model_dir, paths.output_dir, merged_dir]
    breakdown_rows = _breakdown_rows(candidate)
    # The plan's decisions by knob, flattened for comments: templates quote the reasons.
    reasons = {decision.knob: comment_text(decision.reason) for decision in plan.decisions}
    full_texts = {"full_summary": "", "full_load_comment": ""}
    if full:
        breakdown_rows = [row for row in breakdown_rows if row[0] != "LoRA adapter"]
        full_texts = _full_engine_context(
            spec.hardware.distributed, compute_dtype, reasons.get("compute_dtype", "")
        )
        precision_text = full_texts.pop("precision_text")
    else:
        precision_text = _precision_text(spec, precision, compute_dtype)
    return ScriptContext(
        method=spec.method,
        title=f"{METHOD_TITLES[spec.method]} {'of every weight' if full else 'with LoRA'}",
        spec_name=spec.name,
        spec_sha256=loaded.sha256,
        receipt_version=stack.RECEIPT_VERSION,
        dependencies=[f"{name}=={version}" for name, version in pinned.items()] + vllm,
        merge_dependencies=[f"{name}=={stack.PINNED_VERSIONS[name]}" for name in MERGE_LIBRARIES],
        receipt_libraries=tuple(pinned),
        stdlib_imports=_stdlib_imports(spec, full),
        library_imports=_library_imports(spec, precision, chat, full),
        gpu_name=comment_text(plan.gpu.name),
        gpu_count=plan.gpu.count,
        planned_gpu=plan.gpu.name,
        gpu_memory_bytes=plan.gpu.vram_bytes,
        budget_bytes=plan.budget_bytes,
        distributed=spec.hardware.distributed,
        fits=plan.fits,
        candidate=candidate,
        breakdown_rows=breakdown_rows,
        predicted_breakdown=[
            (key, getattr(candidate.breakdown, key)) for key, _ in BREAKDOWN_LABELS
        ],
        precision=precision,
        precision_text=precision_text,
        **full_texts,
        quantized=quantized,
        compute_dtype=compute_dtype,
        dtype_expr="COMPUTE_DTYPE" if fp16 else f"torch.{compute_dtype}",
        # fp16 autocast is CUDA-only: the script falls back to fp32 without a GPU.
        fp16=fp16,
        tf32=_ampere_or_newer(plan.gpu.compute_capability),
        tf32_reason=_tf32_reason(plan),
        full=full,
        script_dir=_joins_script_dir(train_files, anchor_dir),
        merge_script_dir=_joins_script_dir(merge_files, anchor_dir),
        fsdp_adapter_key_fix=stack.peft_misses_adapter_keys_under_fsdp(
            spec.hardware.distributed, spec.finetuning
        ),
        fsdp_fp32_buffers=stack.fsdp_rounds_buffers(spec.hardware.distributed),
        model=model_view,
        data=data_view,
        output_dir_expr=output_dir_expr,
        merged_dir_expr=merged_dir_expr,
        # merge.py holds the whole model in the compute dtype on the CPU.
        merge_host_bytes=plan.total_parameters * 2,
        lora=None if full else _lora_view(values),
        quantization=_quantization_view(values) if precision == "4bit" else None,
        training=_training_view(values, spec),
        modules_to_save=modules_to_save,
        # peft unties tied embeddings when both are saved in full, unless told to keep them
        # one tensor (a copy each would double the memory and untie the merged model).
        ensure_weight_tying=stack.shares_tied_copy(model.tied_embeddings, modules_to_save),
        upcast_reason=_upcast_reason(quantized, bool(modules_to_save), fp32_copies, compute_dtype),
        training_args_before_load=stack.zero3_partitions_while_loading(
            spec.hardware.distributed, precision
        ),
        # trl casts the trainable weights of 8/4-bit models to bf16, which an fp16 GPU lacks.
        chat=chat,
        loss_text=_loss_text(spec.method, chat.loss_on),
        format_text=_format_text(chat),
        chatml_tokens=list(CHATML_SPECIAL_TOKENS),
        chatml_template_lines=_split_template(chat_templates.CHATML.original),
        warnings=[comment_text(text) for text in plan.warnings],
        reasons=reasons,
        plan_values={decision.knob: comment_text(decision.value) for decision in plan.decisions},
        dpo=_dpo_view(values, spec, full) if isinstance(spec, DpoRunSpec) else None,
        grpo=grpo,
    )


def _full_engine_context(engine: str, dtype: str, why: str) -> dict[str, str]:
    """How full fine-tuning keeps its fp32 masters under the spec's engine, for the
    docstring (``full_summary``, ``precision_text``) and the load call (``full_load_comment``):
    autocast over fp32 weights on one GPU and DDP, FSDP's mixed precision over fp32 shards,
    DeepSpeed's bf16 module with its own fp32 master copy (``peftgen.memory``, section "full
    fine-tuning, sharded")."""
    why = f" ({why})" if why else ""
    rounding = "16-bit weights would round small updates away."
    if engine == "fsdp":
        return {
            "full_summary": (
                f"FSDP shards the fp32 master weights, gradients and optimizer state over the "
                f"GPUs and gathers each layer in {dtype} to compute: {rounding}"
            ),
            "precision_text": (
                f"fp32 (master weights sharded by FSDP), computed in {dtype}: full fine-tuning"
            ),
            "full_load_comment": (
                f"fp32 master weights: FSDP shards them and gathers each layer in {dtype}"
                f"{why} to compute; gradients and optimizer state are kept as fp32 shards."
            ),
        }
    if engine.startswith("deepspeed"):
        return {
            "full_summary": (
                f"DeepSpeed trains the model in {dtype} and keeps an fp32 master copy and the "
                f"optimizer state, sharded over the GPUs: {rounding}"
            ),
            "precision_text": (
                f"fp32; DeepSpeed computes in {dtype}, keeps fp32 masters: full fine-tuning"
            ),
            "full_load_comment": (
                f"Loaded in fp32; DeepSpeed casts the model to {dtype}{why} and steps its own "
                "fp32 master copy of the weights (with the optimizer state, sharded)."
            ),
        }
    return {
        "full_summary": (
            f"fp32 master weights, gradients and optimizer state under 16-bit autocast: {rounding}"
        ),
        "precision_text": (
            f"fp32 (master weights), trained under {dtype} autocast: full fine-tuning"
        ),
        "full_load_comment": (
            f"fp32 master weights: the trainer computes under {dtype} autocast{why}, and "
            "gradients and optimizer state stay fp32."
        ),
    }


def grpo_vllm_kwargs(spec: GrpoRunSpec) -> dict[str, Any]:
    """The GRPOConfig keyword arguments for ``grpo.use_vllm`` (trl/trainer/grpo_config.py
    names; nothing when generation stays with ``model.generate``)."""
    grpo = spec.grpo
    if not grpo.use_vllm:
        return {}
    kwargs: dict[str, Any] = {"use_vllm": True, "vllm_mode": grpo.use_vllm}
    if grpo.use_vllm == "colocate":
        kwargs["vllm_gpu_memory_utilization"] = grpo.vllm_gpu_memory_utilization
        kwargs["vllm_enable_sleep_mode"] = grpo.vllm_enable_sleep_mode
    else:
        kwargs["vllm_server_host"] = grpo.vllm_server_host
        kwargs["vllm_server_port"] = grpo.vllm_server_port
    return kwargs


# --- Public entry points -------------------------------------------------------------------


def _render_script(loaded: LoadedSpec, name: str, context: ScriptContext) -> str:
    """One script; a user error raised while rendering names the spec file."""
    try:
        return render_template(name, context.template_vars())
    except UserError as error:
        problems = [replace(p, file=p.file or loaded.path.as_posix()) for p in error.problems]
        raise UserError(problems) from None


def render_train_script(loaded: LoadedSpec, plan: Plan, model: ModelSource) -> str:
    """train.py for stdout: local paths absolute, so it runs wherever it is saved."""
    context = script_context(loaded, plan, model)
    return _render_script(loaded, TRAIN_TEMPLATES[loaded.spec.method], context)


def render_all(
    loaded: LoadedSpec, plan: Plan, plan_markdown: str, model: ModelSource, output_dir: Path
) -> dict[str, str]:
    """Every file ``emit -o DIR`` writes, by file name, in a fixed order; local paths are
    written relative to ``output_dir``.

    ``plan_markdown`` is the VRAM report's Markdown (``peftgen.report``), rendered by the
    caller, which holds the resolved architecture the report's tables need."""
    anchor = Path(os.path.abspath(output_dir))
    context = script_context(loaded, plan, model, anchor)
    # Full fine-tuning saves the model itself: there is no adapter to merge.
    merge = {} if context.full else {"merge.py": _render_script(loaded, "merge.py.j2", context)}
    return {
        "train.py": _render_script(loaded, TRAIN_TEMPLATES[loaded.spec.method], context),
        **merge,
        # The VRAM report's Markdown, without charts: the same tables `peftgen report` shows.
        "plan.md": plan_markdown,
        "spec.yaml": resolved_spec_yaml(loaded, model, anchor),
        # accelerate_config.yaml, ds_config.json, launch.sh for a distributed spec.
        **launch_files(loaded.spec, plan),
    }


YAML_1_1_BOOLEANS = frozenset(["y", "yes", "n", "no", "on", "off", "true", "false"])
"""Words YAML 1.1 readers (PyYAML, many editors' tools) read as booleans; YAML 1.2, which
peftgen reads, keeps ``save_strategy: no`` a string. Written quoted, the value is the same
in both."""


def _yaml_string(representer: Any, value: str) -> Any:
    """Printable ASCII as ruamel likes it, quoted where YAML 1.1 would read a boolean;
    anything else double-quoted, where YAML escapes line and paragraph separators
    (``\\x85``, ``\\u2028``) that a plain scalar would fold."""
    style = None if re.fullmatch(r"[\x20-\x7e]*", value) else '"'
    if style is None and value.lower() in YAML_1_1_BOOLEANS:
        style = "'"
    return representer.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def resolved_spec_yaml(loaded: LoadedSpec, model: ModelSource, anchor_dir: Path) -> str:
    """The spec with every default filled in and the model resolved, as YAML: what the
    script was rendered from. Its local paths are relative to ``anchor_dir``, the folder it
    is written to, so it is a spec that resolves to the same files."""
    from io import StringIO

    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    # No line folding: ruamel's folded double-quoted scalars can turn a break after an
    # escape (``\x1F``) into a space, which would change the value on reload.
    yaml.width = 1 << 20
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    yaml.representer.add_representer(str, _yaml_string)
    buffer = StringIO()
    spec = loaded.spec
    paths = run_paths(spec, loaded.path.parent, model.local_dir)
    relocated = relocated_spec(spec, paths, model.id, anchor_dir)
    fields = relocated.model_dump(mode="json")
    fields["training"]["loss_on"] = spec.resolved_loss_on if spec.method == "sft" else None
    if spec.finetuning == "full":
        # Nothing to configure there, and full fine-tuning refuses the sections.
        fields.pop("lora")
        fields.pop("quantization")
    # name and method first, as people write them; the rest in the models' order.
    ordered = {"name": fields.pop("name"), "method": fields.pop("method"), **fields}
    yaml.dump(ordered, buffer)
    header = (
        f"# The spec {comment_text(loaded.path.as_posix())} (sha256 {loaded.sha256})\n"
        "# with every default filled in: the values train.py was rendered from. Its paths\n"
        "# are relative to this folder (absolute where they share no folder with it).\n"
    )
    return header + buffer.getvalue()


EMITTED_MANIFEST = ".peftgen-emitted.json"
"""What emit wrote into the folder, by file, as sha256 digests: a later emit that finds a
file changed since (an edited train.py) refuses rather than overwrite the edit."""
OUTPUT_FILES = ("train.py", "merge.py", "plan.md", "spec.yaml", *LAUNCH_FILES, EMITTED_MANIFEST)


def _sha256(text: bytes) -> str:
    import hashlib

    return hashlib.sha256(text).hexdigest()


def emitted_manifest(files: Mapping[str, str]) -> str:
    """``EMITTED_MANIFEST``'s text for ``files`` (written as UTF-8 bytes, as emit writes them)."""
    digests = {name: _sha256(text.encode("utf-8")) for name, text in sorted(files.items())}
    return json.dumps({"written_by": "peftgen emit", "sha256": digests}, indent=2) + "\n"


def _edited_since_emit(target: Path) -> list[str]:
    """The files emit wrote into ``target`` that have changed since (by the folder's
    manifest; a folder without one, from an older peftgen, has no record to compare)."""
    try:
        record = json.loads((target / EMITTED_MANIFEST).read_text(encoding="utf-8"))
        digests = dict(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    edited = []
    for name, digest in sorted(digests.items()):
        if name not in OUTPUT_FILES:  # only emit's own names, never a path elsewhere
            continue
        path = target / str(name)
        if path.is_file() and not path.is_symlink() and _sha256(path.read_bytes()) != digest:
            edited.append(str(name))
    return edited


def write_output_dir(
    directory: Path, files: Mapping[str, str], overwrite_edits: bool = False
) -> None:
    """Write ``files`` into ``directory`` all at once, or not at all.

    The files go into a fresh folder beside ``directory`` that is then renamed into place,
    so an interrupted or failed emit (a full disk, a permission) never leaves a half-written
    folder. An existing folder is replaced only when it holds nothing but the plain files
    emit writes: anything else in it (another file, a link, a folder named ``plan.md``)
    might be the user's, and is not ours to delete; of the old folder only emit's files are
    removed. Nor is a file emit wrote and the user edited since (``EMITTED_MANIFEST``), unless
    ``overwrite_edits``. A new folder gets the permissions the user's umask gives (``mkdtemp``
    makes 0700), a replaced one keeps its own. Every OS error is a ``UserError`` naming the
    folder.
    """
    import contextlib
    import errno
    import shutil
    import tempfile

    def refuse(message: str) -> UserError:
        return UserError.single(message, file=str(directory))

    def reason(error: OSError) -> str:
        friendly = {
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "the file system is read-only",
            errno.ENOTDIR: "a parent of it is a file, not a folder",
        }.get(error.errno or 0, error.strerror or str(error))
        if error.errno == errno.ENOENT and target.parent.is_dir():
            return f"{target.parent} does not accept new files or folders"
        where = f" ({error.filename})" if error.filename else ""
        return friendly + where

    target = directory.resolve()
    try:
        if target.exists():
            if not target.is_dir():
                raise refuse("exists and is not a folder; give a new or an emitted folder")
            foreign = sorted(
                f"{entry.name} (a folder)" if entry.is_dir() else entry.name
                for entry in target.iterdir()
                if entry.name not in OUTPUT_FILES or entry.is_symlink() or not entry.is_file()
            )
            if foreign:
                raise refuse(
                    f"the folder holds what emit did not write ({', '.join(foreign[:5])}); "
                    "choose a new or empty folder (nothing was written or deleted)"
                )
            edited = [] if overwrite_edits else _edited_since_emit(target)
            if edited:
                raise UserError.single(
                    f"{', '.join(edited)}: changed since emit wrote the folder; emitting would "
                    "lose the edits (nothing was written or deleted)",
                    file=str(directory),
                    hint="carry the change into the spec, or move the file out of the folder, "
                    "then emit again; --overwrite-edits replaces it",
                )
        for parent in target.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise refuse(f"{parent} is a file, not a folder; nothing was written")
                break
        umask = os.umask(0)
        os.umask(umask)
        mode = target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~umask
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise refuse(f"cannot write the folder: {reason(error)}; nothing was written") from None
    backup: Path | None = None
    try:
        for name, text in {**files, EMITTED_MANIFEST: emitted_manifest(files)}.items():
            (staging / name).write_text(text, encoding="utf-8")
        os.chmod(staging, mode)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(backup / target.name)
        staging.rename(target)
    except BaseException as error:
        if backup is not None and not target.exists():
            (backup / target.name).rename(target)
            with contextlib.suppress(OSError):
                backup.rmdir()
        shutil.rmtree(staging, ignore_errors=True)  # only what this call wrote
        if isinstance(error, OSError):
            message = f"cannot write the folder: {reason(error)}; nothing was written or deleted"
            raise refuse(message) from None
        raise
    if backup is not None:
        # The old folder held emit's files only (checked above): remove those, by name.
        old = backup / target.name
        for name in OUTPUT_FILES:
            path = old / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        for folder in (old, backup):
            with contextlib.suppress(OSError):  # something new appeared: leave it be
                folder.rmdir()
