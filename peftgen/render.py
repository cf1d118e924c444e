"""Render a spec and its plan into the files ``peftgen emit`` writes.

One Jinja environment for every template. It is strict (a misspelt variable is an
error, not an empty string) and never lets a spec value into the code as raw text: every
value goes through the ``py`` filter, which writes a Python literal, and every name that
becomes code (a function to import, a module to adapt) is checked against a pattern
first. So a hostile string in a spec can change what the script *does* only in the way
the same string in a hand-written literal would.

The template context is built here from the spec and the ``Plan``; templates only lay
it out, so the choices (which precision, which dtype, what the comments say) are made in
one place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import jinja2

from peftgen.errors import UserError
from peftgen.launch import LAUNCH_FILES, launch_files
from peftgen.load import LoadedSpec
from peftgen.plan import Candidate, Plan
from peftgen.spec import (
    USER_REWARD_PATTERN,
    AnySpec,
    DpoRunSpec,
    GrpoRunSpec,
    trained_modules_to_save,
)

# The versions the generated scripts are written for and the end-to-end tests run
# (pyproject's `train` extra). PEP 723 headers pin exactly these.
PINNED_VERSIONS: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "trl": "1.16.0",
    "bitsandbytes": "0.50.2",
    "datasets": "5.2.0",
    "accelerate": "1.15.0",
}
LOCAL_DATA_LOADERS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GIB = 2**30
# Exploded lists keep `ruff format` and a reader happy once a literal gets long.
_INLINE_LIST_MAX_CHARS = 60
TRAIN_TEMPLATES: dict[str, str] = {
    "sft": "train_sft.py.j2",
    "dpo": "train_dpo.py.j2",
    "grpo": "train_grpo.py.j2",
}
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as a Jinja chat template; its markers become new special tokens."""
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


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
    env.filters["gib"] = lambda value: f"{value / GIB:.1f} GiB"
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
class RewardFunc:
    """One GRPO reward as the script refers to it."""

    name: str
    """The Python name the script binds it to."""
    builtin: bool
    path: str | None = None
    function: str | None = None


def _dataset_loader(loaded: LoadedSpec) -> str | None:
    """The ``datasets`` builder for a local file (json, csv, parquet), or None for a hub id.

    A single local file loads as one split named ``train``; any other split would fail at
    run time, so it fails here.
    """
    dataset = loaded.spec.dataset
    loader = LOCAL_DATA_LOADERS.get(Path(dataset.path).suffix.lower())
    if loader is not None and dataset.split != "train":
        raise UserError.single(
            f"a local file has one split, `train`; got {dataset.split!r} "
            "(hold out evaluation rows with dataset.eval_fraction)",
            file=str(loaded.path),
            field_path="dataset.split",
        )
    return loader


def _reward_funcs(spec: GrpoRunSpec) -> list[RewardFunc]:
    rewards: list[RewardFunc] = []
    for item in spec.grpo.reward_funcs:
        match = USER_REWARD_PATTERN.match(item)
        if match is None:
            rewards.append(RewardFunc(name=identifier(f"{item}_reward"), builtin=True))
        else:
            rewards.append(
                RewardFunc(
                    name=identifier(match["func"]),
                    builtin=False,
                    path=match["path"],
                    function=identifier(match["func"]),
                )
            )
    return rewards


def _check_generation_batch(spec: GrpoRunSpec, gpu_count: int, spec_file: Path) -> None:
    """trl refuses a generation batch that is not whole groups; say so before emitting."""
    training = spec.training
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * gpu_count
    if batch % spec.grpo.num_generations:
        raise UserError.single(
            f"per_device_train_batch_size x gradient_accumulation_steps x GPUs = {batch} "
            f"sequences per step is not a multiple of num_generations "
            f"({spec.grpo.num_generations}); trl samples whole groups",
            file=str(spec_file),
            field_path="grpo.num_generations",
        )


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
    """A Jinja chat template cut at its tags, one readable literal per line."""
    return [part for part in re.split(r"(?<=%})|(?<=}})", template) if part]


def build_context(loaded: LoadedSpec, plan: Plan) -> dict[str, Any]:
    """Everything the templates read: spec values, plan numbers and the choices they imply."""
    spec = loaded.spec
    candidate = plan.chosen or _forced_candidate(spec, plan)
    precision = candidate.precision
    bf16 = plan.gpu.bf16
    compute_dtype = "bfloat16" if bf16 else "float16"
    loader = _dataset_loader(loaded)
    training = spec.training
    # bitsandbytes: k-bit loading, or an 8-bit / paged optimizer.
    uses_bnb = (
        precision in ("8bit", "4bit")
        or "8bit" in training.optim
        or training.optim.startswith("paged_")
    )
    # The plan's decisions by knob, flattened for comments: templates quote the reasons.
    reasons = {decision.knob: comment_text(decision.reason) for decision in plan.decisions}
    values = {decision.knob: comment_text(decision.value) for decision in plan.decisions}
    context: dict[str, Any] = {
        "spec": spec,
        "method": spec.method,
        "spec_name": spec.name,
        "spec_sha256": loaded.sha256,
        "plan": plan,
        "gpu_name": comment_text(plan.gpu.name),
        "gpu_count": plan.gpu.count,
        "distributed": spec.hardware.distributed,
        "fits": plan.fits,
        "candidate": candidate,
        "breakdown_rows": _breakdown_rows(candidate),
        "breakdown_keys": BREAKDOWN_LABELS,
        "precision": precision,
        "compute_dtype": compute_dtype,
        "mixed_precision_flag": "bf16" if bf16 else "fp16",
        "tf32": _ampere_or_newer(plan.gpu.compute_capability),
        "pinned": {
            name: version
            for name, version in PINNED_VERSIONS.items()
            if name != "bitsandbytes" or uses_bnb
        },
        "data_loader": loader,
        "data_path": spec.dataset.path,
        "modules_to_save": trained_modules_to_save(spec),
        "chatml_tokens": list(CHATML_SPECIAL_TOKENS),
        "output_dir": spec.resolved_output_dir,
        "merged_dir": spec.resolved_output_dir.rstrip("/") + "-merged",
        "precision_text": _precision_text(spec, precision, compute_dtype),
        "eval_strategy": "steps" if training.save_strategy == "steps" else "epoch",
        "chatml_template_lines": _split_template(CHATML_TEMPLATE),
        "reason": lambda knob: reasons.get(knob, ""),
        "plan_value": lambda knob: values.get(knob, ""),
        "warnings": [comment_text(text) for text in plan.warnings],
    }
    if isinstance(spec, GrpoRunSpec):
        _check_generation_batch(spec, plan.gpu.count, loaded.path)
        rewards = _reward_funcs(spec)
        context["rewards"] = rewards
        context["builtin_rewards"] = [
            item for item in spec.grpo.reward_funcs if item in ("format", "length")
        ]
        context["user_rewards"] = any(not reward.builtin for reward in rewards)
        # The length reward peaks halfway to the generation limit: long enough to
        # reason, short of truncation.
        context["length_target_tokens"] = max(1, spec.grpo.max_completion_length // 2)
    if isinstance(spec, DpoRunSpec):
        context["dpo_loss_types"] = [spec.dpo.loss_type]
    return context


# --- Public entry points -------------------------------------------------------------------


def render_train_script(loaded: LoadedSpec, plan: Plan) -> str:
    return render_template(TRAIN_TEMPLATES[loaded.spec.method], build_context(loaded, plan))


def render_all(loaded: LoadedSpec, plan: Plan, plan_markdown: str) -> dict[str, str]:
    """Every file ``emit -o DIR`` writes, by file name, in a fixed order.

    ``plan_markdown`` is the VRAM report's Markdown (``peftgen.report``), rendered by the
    caller, which holds the resolved architecture the report's tables need."""
    context = build_context(loaded, plan)
    return {
        "train.py": render_template(TRAIN_TEMPLATES[loaded.spec.method], context),
        "merge.py": render_template("merge.py.j2", context),
        # The VRAM report's Markdown, without charts: the same tables `peftgen report` shows.
        "plan.md": plan_markdown,
        "spec.yaml": resolved_spec_yaml(loaded),
        # accelerate_config.yaml, ds_config.json, launch.sh for a distributed spec.
        **launch_files(loaded.spec, plan),
    }


def _yaml_string(representer: Any, value: str) -> Any:
    """Printable ASCII as ruamel likes it; anything else double-quoted, where YAML escapes
    line and paragraph separators (``\\x85``, ``\\u2028``) that a plain scalar would fold."""
    style = None if re.fullmatch(r"[\x20-\x7e]*", value) else '"'
    return representer.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def resolved_spec_yaml(loaded: LoadedSpec) -> str:
    """The spec with every default filled in, as YAML: what the script was rendered from."""
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
    fields = loaded.spec.model_dump(mode="json")
    # name and method first, as people write them; the rest in the models' order.
    ordered = {"name": fields.pop("name"), "method": fields.pop("method"), **fields}
    yaml.dump(ordered, buffer)
    header = (
        f"# The spec {comment_text(loaded.path.as_posix())} (sha256 {loaded.sha256})\n"
        "# with every default filled in: the values train.py was rendered from.\n"
    )
    return header + buffer.getvalue()


OUTPUT_FILES = ("train.py", "merge.py", "plan.md", "spec.yaml", *LAUNCH_FILES)


def write_output_dir(directory: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` into ``directory`` all at once, or not at all.

    The files go into a fresh folder beside ``directory`` that is then renamed into place,
    so an interrupted or failed emit never leaves a half-written folder. An existing
    folder is replaced only when it holds nothing but files emit writes: anything else in
    it might be the user's, and is not ours to delete.
    """
    import shutil
    import tempfile

    directory = directory.resolve()
    if directory.exists():
        if not directory.is_dir():
            raise UserError.single("exists and is not a folder", file=str(directory))
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise UserError.single(
                f"the folder holds files emit did not write ({', '.join(foreign[:5])}); "
                "choose a new or empty folder",
                file=str(directory),
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    backup: Path | None = None
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if directory.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            directory.rename(backup / directory.name)
        staging.rename(directory)
    except BaseException:
        if backup is not None and not directory.exists():
            (backup / directory.name).rename(directory)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
