"""Spec values never become code: hostile strings either fail validation or stay literals.

Every string field of the spec gets quotes, triple quotes, backslashes, newlines, Jinja
delimiters and odd unicode. Rendering goes straight from the validated spec to the
templates with a fixed plan (the resolver would reject most of these ids before
rendering, which would leave the renderer untested). Either pydantic rejects the spec, or
both scripts parse and the literal the script holds equals the input exactly.

Text that only reaches comments and the docstring (the plan's reasons, the GPU's name) is
checked too: whatever it holds, the script's syntax tree is the same as with plain text.

Fields whose validation only lets identifier-shaped text through (``lora.target_modules``,
``lora.modules_to_save``, ``name``) draw valid-but-hostile values instead: Python
keywords and builtins, names of the script's own constants, very long names, and a share
of unicode look-alikes the pattern must refuse. Each run counts how many examples reached
the renderer and fails when too few did, so the property tests rendering, not the
validator.
"""

from __future__ import annotations

import ast
import copy
import keyword
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from ruamel.yaml import YAML

from peftgen.errors import UserError
from peftgen.load import LoadedSpec
from peftgen.plan import BREAKDOWN_KEYS, Candidate, Decision, GpuTarget, Plan
from peftgen.render import ModelSource, render_all
from peftgen.spec import SPEC_ADAPTER, from_spec_dir, is_local_dataset

SPEC_FILE = Path("specs/hostile.yaml").absolute()
OUT_DIR = Path("generated/hostile").absolute()
"""Where the hostile spec lives and where its files are written: local paths in the
scripts are relative to OUT_DIR, in the spec relative to SPEC_FILE's folder."""

HOSTILE_PIECES = [
    '"',
    "'",
    '"""',
    "'''",
    "\\",
    "\\n",
    "\n",
    "\r\n",
    "\t",
    "\x00",
    "{{ x }}",
    "{% if 1 %}",
    "{#",
    "#}",
    "{%- raw %}",
    "); import os; os.system('x'); (",
    "\u2028",
    "\u202e",
    "é",
    "😀",
    "ℕ",
    "#",
    " ",
    ".py:f",
    ".jsonl",
]
hostile_text = st.one_of(
    st.lists(st.sampled_from(HOSTILE_PIECES) | st.text(max_size=4), min_size=1, max_size=6).map(
        "".join
    ),
    st.text(min_size=1, max_size=30),
)

# Identifier-shaped values the patterns accept (MODULE_NAME_PATTERN, SPEC_NAME_PATTERN) that
# would break a script that pasted them as code: keywords, builtins, the script's own names.
CODE_WORDS = [
    *keyword.kwlist,
    *keyword.softkwlist,
    "__import__",
    "__builtins__",
    "__name__",
    "os",
    "sys",
    "eval",
    "exec",
    "print",
    "self",
    "SCRIPT_DIR",
    "MODEL_ID",
    "TARGET_MODULES",
    "main",
]
# Unicode look-alikes of valid names: the patterns are ASCII, so these must be refused.
LOOKALIKES = [
    "q_\u0440roj",  # Cyrillic er
    "\uff51_proj",  # fullwidth q
    "q_proj\u200b",  # zero-width space
    "\u212a_proj",  # Kelvin sign
    "q\u0131proj",  # dotless i
    "lm_hea\u0501",  # Cyrillic komi de
    "hostil\u0435",  # Cyrillic ie
    "\u0391",  # Greek capital alpha
]
_segment = st.one_of(
    st.sampled_from(CODE_WORDS),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,24}", fullmatch=True),
    st.integers(100, 3000).map(lambda n: "x" * n),
)
module_names = st.one_of(
    st.lists(_segment, min_size=1, max_size=3).map(".".join),
    st.lists(_segment, min_size=1, max_size=3).map(".".join),
    st.lists(_segment, min_size=1, max_size=3).map(".".join),
    st.sampled_from(LOOKALIKES),
)
spec_names = st.one_of(
    st.sampled_from([w.lower() for w in CODE_WORDS if w[0].isalpha()]),
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,99}", fullmatch=True),
    st.sampled_from(["..", "0.-_", "a" * 100, "x.py", "con", "nul"]),
    st.sampled_from([w.lower() for w in LOOKALIKES]),
)
FIELD_TEXT = {
    "lora.target_modules": module_names,
    "lora.modules_to_save": module_names,
    "name": spec_names,
}
"""Fields drawn from their valid-but-hostile strategy; every other field gets hostile_text."""
MIN_RENDERED_SHARE = 0.6
"""Of a FIELD_TEXT field's examples, the share that must pass validation and render."""

BASE: dict[str, Any] = {
    "name": "hostile",
    "model": {"id": "org/model"},
    "dataset": {"path": "data/train.jsonl", "format": "messages"},
    "hardware": {"gpu": "rtx-4090"},
    "lora": {"target_modules": ["q_proj"]},
}
METHOD_SECTIONS: dict[str, dict[str, Any]] = {
    "sft": {"method": "sft"},
    "dpo": {"method": "dpo", "dataset": {"path": "data/train.jsonl", "format": "preference"}},
    "grpo": {
        "method": "grpo",
        "dataset": {"path": "data/train.jsonl", "format": "prompt"},
        "grpo": {"num_generations": 2, "reward_funcs": ["format", "r.py:score"]},
        "training": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1},
    },
}


def _plan(precision: str, gpu_name: str = "GPU", reason: str = "why") -> Plan:
    candidate = Candidate(
        **dict.fromkeys(BREAKDOWN_KEYS, 1),
        torch_reserved_bytes=6,
        managed_bytes=0,
        phase="train",
        communication_bytes=0,
        gathered_weight_bytes=0,
        trainable_parameters=1,
        total_parameters=2,
        precision=precision,  # type: ignore[arg-type]
        fits=True,
    )
    return Plan(
        spec="hostile",
        gpu=GpuTarget(gpu_name, 2**34, True, 1, "8.0"),
        budget_bytes=2**33,
        trainable_parameters=1,
        total_parameters=2,
        chosen_precision=precision,  # type: ignore[arg-type]
        fits=True,
        candidates=(candidate,),
        warnings=(reason,),
        decisions=(
            Decision("precision", precision, reason),
            Decision("compute_dtype", "bf16", reason),
            Decision("gradient_checkpointing", True, reason),
        ),
    )


def _render(raw: dict[str, Any], precision: str) -> dict[str, str] | None:
    """The emitted files, or None when validation rejects the spec (or emit refuses it with
    a message: an output_dir of ``/`` is the filesystem root)."""
    try:
        spec = SPEC_ADAPTER.validate_python(raw)
    except ValidationError:
        return None
    loaded = LoadedSpec(spec, SPEC_FILE, "", "0" * 64)
    try:
        return render_all(loaded, _plan(precision), "", ModelSource(spec.model.id), OUT_DIR)
    except UserError as refused:
        assert all(problem.message for problem in refused.problems)
        return None


def _script_path(node: ast.expr) -> str | None:
    """The path a ``str((SCRIPT_DIR / "rel").resolve())`` expression computes with the
    script in OUT_DIR, or None for any other expression (checked by shape, not run)."""
    match node:
        case ast.Call(
            func=ast.Name(id="str"),
            args=[
                ast.Call(
                    func=ast.Attribute(
                        value=ast.BinOp(
                            left=ast.Name(id="SCRIPT_DIR"),
                            op=ast.Div(),
                            right=ast.Constant(value=str(relative)),
                        ),
                        attr="resolve",
                    ),
                    args=[],
                )
            ],
        ):
            return os.path.realpath(OUT_DIR / relative)
    return None


def _spec_path(text: str) -> str:
    """The absolute path a spec's relative ``text`` names, as the script's ``.resolve()``
    computes it (``realpath``: POSIX's implementation-defined leading ``//`` becomes ``/``)."""
    return os.path.realpath(from_spec_dir(text, SPEC_FILE.parent))


def _constants(source: str) -> dict[str, Any]:
    """Top-level NAME = literal assignments of a script; a path joined to SCRIPT_DIR
    becomes the absolute path it computes."""
    values: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                path = _script_path(node.value)
                if path is not None:
                    values[target.id] = path
                    continue
                try:
                    values[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return values


def _constant(constants: dict[str, Any], name: str) -> Any:
    """A constant by name, or a key of a dict constant (``RECEIPT.spec_name``)."""
    head, *keys = name.split(".")
    value = constants[head]
    for key in keys:
        value = value[key]
    return value


def _load_reward_args(source: str) -> list[tuple[Any, ...]]:
    calls = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "load_reward"
        ):
            path = _script_path(node.args[0])
            if path is None and isinstance(node.args[0], ast.Constant):
                # written absolute: the file shares no folder with the script's below "/"
                path = os.path.realpath(node.args[0].value)
            calls.append((path, *(ast.literal_eval(arg) for arg in node.args[1:])))
    return calls


def _with(raw: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = result
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return result


# field path -> (value built from the hostile text, the script constant that must hold it)
FIELDS = {
    "model.id": (lambda s: s, "MODEL_ID"),
    "model.revision": (lambda s: s, "MODEL_REVISION"),
    "dataset.path": (lambda s: s, "DATASET_PATH"),
    "output_dir": (lambda s: s, "OUTPUT_DIR"),
    "name": (lambda s: s, "RECEIPT.spec_name"),
    "lora.target_modules": (lambda s: [s], "TARGET_MODULES"),
    "lora.modules_to_save": (lambda s: [s], "MODULES_TO_SAVE"),
    "hardware.gpu": (lambda s: s, None),
}


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_hostile_string_fields_stay_literals(method: str, field: str) -> None:
    reached: Counter[str] = Counter()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=FIELD_TEXT.get(field, hostile_text), precision=st.sampled_from(["bf16", "4bit"]))
    def check(text: str, precision: str) -> None:
        reached["examples"] += 1
        if _renders_as_literal(method, field, text, precision):
            reached["rendered"] += 1
            event("rendered")
        else:
            event("refused by validation")

    check()
    if field in FIELD_TEXT:
        share = reached["rendered"] / reached["examples"]
        assert share >= MIN_RENDERED_SHARE, f"{field}: only {share:.0%} reached the renderer"


def _renders_as_literal(method: str, field: str, text: str, precision: str) -> bool:
    """False when validation refuses the value; else the checks hold (or an assertion fails)."""
    build, constant = FIELDS[field]
    raw = _with(BASE | METHOD_SECTIONS[method], field, build(text))
    files = _render(raw, precision)
    if files is None:
        return False
    train = _constants(files["train.py"])
    merge = _constants(files["merge.py"])
    if constant is not None:
        assert _as_path(field, _constant(train, constant)) == _expected(field, build(text))
    if field == "output_dir":
        assert os.path.realpath(merge["ADAPTER_DIR"]) == _spec_path(text)
    if field == "model.revision":
        assert "revision=MODEL_REVISION" in files["train.py"]
    written = SPEC_ADAPTER.validate_python(YAML(typ="safe").load(files["spec.yaml"]))
    original = SPEC_ADAPTER.validate_python(raw)
    # The written spec names the same files, relative to its own folder (OUT_DIR).
    assert _spec_path(original.resolved_output_dir) == os.path.realpath(
        from_spec_dir(written.resolved_output_dir, OUT_DIR)
    )
    if is_local_dataset(original.dataset.path):
        assert _spec_path(original.dataset.path) == os.path.realpath(
            from_spec_dir(written.dataset.path, OUT_DIR)
        )
    else:
        assert written.dataset.path == original.dataset.path
    assert written.model == original.model
    assert written.lora == original.lora
    assert written.name == original.name
    return True


def _as_path(field: str, value: Any) -> Any:
    """A local path constant as the file it names (``realpath``): written relative to the
    script it is already resolved (``_script_path``); written absolute (it shares no folder
    with the script's below "/") it is the literal."""
    local = field == "output_dir" or (field == "dataset.path" and is_local_dataset(value))
    return os.path.realpath(value) if local and isinstance(value, str) else value


def _expected(field: str, value: Any) -> Any:
    """What the script's constant holds for the spec's ``value``: local paths become
    absolute (the script joins them to its folder), anything else stays as written."""
    if field == "output_dir" or (field == "dataset.path" and is_local_dataset(value)):
        return _spec_path(value)
    return value


@settings(max_examples=80, deadline=None)
@given(text=hostile_text)
def test_hostile_hub_split_stays_literal(text: str) -> None:
    raw = _with(BASE | METHOD_SECTIONS["sft"], "dataset", {"path": "org/data", "format": "text"})
    files = _render(_with(raw, "dataset.split", text), "bf16")
    if files is not None:
        assert _constants(files["train.py"])["DATASET_SPLIT"] == text


@settings(max_examples=80, deadline=None)
@given(text=hostile_text)
def test_hostile_reward_path_stays_literal(text: str) -> None:
    item = f"{text}.py:score"
    files = _render(_with(BASE | METHOD_SECTIONS["grpo"], "grpo.reward_funcs", [item]), "4bit")
    if files is not None:
        assert _load_reward_args(files["train.py"]) == [(_spec_path(f"{text}.py"), "score")]


@settings(max_examples=80, deadline=None)
@given(text=hostile_text, method=st.sampled_from(sorted(METHOD_SECTIONS)))
def test_hostile_plan_text_only_reaches_comments(text: str, method: str) -> None:
    spec = SPEC_ADAPTER.validate_python(BASE | METHOD_SECTIONS[method])
    loaded = LoadedSpec(spec, SPEC_FILE, "", "0" * 64)
    model = ModelSource(spec.model.id)
    plain = render_all(loaded, _plan("4bit"), "", model, OUT_DIR)
    hostile = render_all(loaded, _plan("4bit", gpu_name=text, reason=text), "", model, OUT_DIR)
    for name in ("train.py", "merge.py"):
        plain_tree, hostile_tree = ast.parse(plain[name]), ast.parse(hostile[name])
        # The docstring may quote the text, and the memory receipt's predicted gpu holds the
        # GPU's name as a literal; everything else must be identical.
        assert _code_without_planned_gpu(plain_tree) == _code_without_planned_gpu(hostile_tree)
    assert _planned_gpu(ast.parse(hostile["train.py"])) == text


def _receipt(tree: ast.Module) -> tuple[ast.stmt, dict[str, Any]]:
    """The memory receipt's fixed part (``RECEIPT = {...}``) and its value."""
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "RECEIPT" for target in statement.targets
        ):
            return statement, ast.literal_eval(statement.value)
    raise AssertionError("no RECEIPT in the script")


def _code_without_planned_gpu(tree: ast.Module) -> str:
    if not any(isinstance(s, ast.ClassDef) and s.name == "MemoryReceipt" for s in tree.body):
        return ast.dump(ast.Module(tree.body[1:], []))  # merge.py: no receipt
    statement, receipt = _receipt(tree)
    receipt["predicted"]["gpu"] = None
    body = [s for s in tree.body[1:] if s is not statement]
    return ast.dump(ast.Module(body, [])) + repr(receipt)


def _planned_gpu(tree: ast.Module) -> object:
    return _receipt(tree)[1]["predicted"]["gpu"]


KNOWN_HOSTILE = 'q"\'\\ {{ x }} {% if 1 %} """ \u2028 \x85 \u202e 😀 ); import os #'


@pytest.mark.parametrize("field", ["model.id", "model.revision", "dataset.path", "output_dir"])
def test_a_known_hostile_value_renders_as_its_literal(field: str) -> None:
    """Guards the property test against passing by rejecting everything."""
    constant = FIELDS[field][1]
    for method in METHOD_SECTIONS:
        files = _render(_with(BASE | METHOD_SECTIONS[method], field, KNOWN_HOSTILE), "4bit")
        assert files is not None
        assert _constant(_constants(files["train.py"]), constant) == _expected(field, KNOWN_HOSTILE)
