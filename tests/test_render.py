"""Rendering: literals, strictness, only the chosen path, the emit command's contract.

Fast tests: catalogue models and the analytic planner, no torch. The scripts these
produce are trained for real in ``test_emit_e2e.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from pathlib import Path

import jinja2
import jinja2.meta
import pytest
from test_golden import ruff_problems

from peftgen import chat_templates, render
from peftgen.cli import main as peftgen_main
from peftgen.errors import UserError
from peftgen.load import load_spec
from peftgen.plan import make_plan
from peftgen.report import render_plan_markdown
from peftgen.resolve import resolve

BASE_SPEC = """\
name: render-test
method: {method}
model:
  id: meta-llama/Llama-3.2-1B-Instruct
dataset:
  path: {data_path}
  format: {data_format}
hardware:
  gpu: {gpu}
precision: {precision}
"""


def _spec(tmp_path: Path, *, extra: str = "", **fields: str) -> Path:
    values = {
        "method": "sft",
        "data_path": "data/train.jsonl",
        "data_format": "messages",
        "gpu": "rtx-4090",
        "precision": "auto",
    } | fields
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml"
    path.write_text(BASE_SPEC.format(**values) + textwrap.dedent(extra), encoding="utf-8")
    return path


def _render(spec_path: Path, out: Path | None = None) -> dict[str, str]:
    """What ``emit SPEC -o OUT`` writes (OUT: ``out/`` beside the spec unless given)."""
    resolved = resolve(load_spec(spec_path))
    plan = make_plan(resolved)
    return render.render_all(
        resolved.loaded,
        plan,
        render_plan_markdown(plan, resolved),
        render.model_source(resolved),
        out or spec_path.parent / "out",
    )


# --- literals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'say "hi"',
        "it's",
        'both \' and ""',
        "back\\slash",
        "new\nline\r\t",
        "\x00\x1b\u2028",
        "ünïcödé — ✓ 😀",
        "{{ x }} {% if %}",
        '"""',
        0.0002,
        1e-05,
        -1,
        True,
        None,
        ["q_proj", "v_proj"],
        ["a" * 30, "b" * 30, "c"],
        {"k": [1, 2.5]},
    ],
)
def test_python_literal_round_trips(value: object) -> None:
    source = render.python_literal(value)
    assert ast.literal_eval(source) == value


def test_python_literal_prefers_double_quotes_like_ruff() -> None:
    assert render.python_literal("abc") == '"abc"'
    assert render.python_literal('a "quoted" word') == "'a \"quoted\" word'"


def test_python_literal_refuses_what_is_not_data() -> None:
    with pytest.raises(TypeError):
        render.python_literal(object())
    with pytest.raises(UserError):
        render.python_literal(float("inf"))


def test_identifier_refuses_code() -> None:
    assert render.identifier("numeric_answer_reward") == "numeric_answer_reward"
    for bad in ["os.system", "f()", "a b", "", "1x", "x\ny"]:
        with pytest.raises(UserError):
            render.identifier(bad)


def test_wrap_comment_keeps_every_line_within_width() -> None:
    text = "word " * 60 + "\nnot a new statement"
    wrapped = render.wrap_comment(text, indent=8)
    lines = wrapped.split("\n")
    assert len(lines) > 1
    assert all(line.lstrip().startswith("# ") for line in lines)
    assert all(len(line) + (8 if i == 0 else 0) <= 100 for i, line in enumerate(lines))


# --- environment --------------------------------------------------------------------------


def test_undefined_variable_is_an_error_naming_the_template() -> None:
    with pytest.raises(render.RenderError, match=r"merge\.py\.j2"):
        render.render_template("merge.py.j2", {})


def test_missing_template_is_an_error_naming_it() -> None:
    with pytest.raises(render.RenderError, match=r"nope\.j2"):
        render.render_template("nope.j2", {})


def test_templates_are_found_in_the_checkout() -> None:
    names = {"train_sft.py.j2", "train_dpo.py.j2", "train_grpo.py.j2", "merge.py.j2"}
    root = render._template_root()
    assert all((root / name).is_file() for name in names)


SCRIPT_TEMPLATES = ("train_sft.py.j2", "train_dpo.py.j2", "train_grpo.py.j2", "merge.py.j2")


@pytest.mark.parametrize("name", SCRIPT_TEMPLATES)
def test_script_templates_read_only_the_script_context(name: str) -> None:
    """No template sees the spec: every name it reads is a field of ``ScriptContext`` (or
    set by the template itself), so every choice is made once, in ``render``."""
    env = render.environment()
    known = {item.name for item in dataclasses.fields(render.ScriptContext)}
    known |= {"reason", "plan_value"}
    sources = [name, "train_base.py.j2", "_header.py.j2", "_training_args.py.j2"]
    sources += ["_receipt.py.j2"]
    for source in sources:
        text = env.loader.get_source(env, source)[0]  # type: ignore[union-attr]
        read = jinja2.meta.find_undeclared_variables(env.parse(text))
        assert "spec" not in read, source
        assert read <= known, (source, read - known)


def _loaded_with(spec_path: Path, section: str, **changes: object) -> tuple[object, ...]:
    """The spec's pieces with ``section`` changed past validation (what a peftgen bug or a
    future field could let through), for the renderer's own checks."""
    resolved = resolve(load_spec(spec_path))
    spec = resolved.loaded.spec
    changed = getattr(spec, section).model_copy(update=changes)
    loaded = dataclasses.replace(resolved.loaded, spec=spec.model_copy(update={section: changed}))
    return loaded, make_plan(resolved), render.model_source(resolved)


def test_a_spec_value_that_cannot_become_code_names_the_spec_and_field(tmp_path: Path) -> None:
    spec_path = _spec(tmp_path, precision="4bit")
    loaded, plan, model = _loaded_with(
        spec_path, "quantization", bnb_4bit_quant_storage="uint8; import os"
    )
    with pytest.raises(UserError) as caught:
        render.render_train_script(loaded, plan, model)  # type: ignore[arg-type]
    [problem] = caught.value.problems
    assert problem.file == str(spec_path)
    assert problem.field_path == "quantization.bnb_4bit_quant_storage"
    assert "not a Python identifier" in problem.message
    assert str(caught.value).startswith(f"{spec_path}:")


def test_a_spec_value_that_cannot_be_a_literal_names_the_spec_and_field(tmp_path: Path) -> None:
    spec_path = _spec(tmp_path, extra="training:\n  learning_rate: 0.001\n")
    loaded, plan, model = _loaded_with(spec_path, "training", learning_rate=float("inf"))
    with pytest.raises(UserError) as caught:
        render.render_all(loaded, plan, "", model, tmp_path / "out")  # type: ignore[arg-type]
    [problem] = caught.value.problems
    assert (problem.file, problem.field_path) == (str(spec_path), "training.learning_rate")
    assert "not finite" in problem.message
    # Located at the value's line in the file, quoted as load's errors are.
    assert problem.line is not None and "learning_rate: 0.001" in str(caught.value)


# --- only the chosen path -----------------------------------------------------------------


def test_bf16_script_never_mentions_bitsandbytes(tmp_path: Path) -> None:
    files = _render(_spec(tmp_path, precision="bf16"))
    for name in ("train.py", "merge.py"):
        assert "bitsandbytes" not in files[name].lower()
        assert "BitsAndBytes" not in files[name]
    assert "dtype=torch.bfloat16" in files["train.py"]
    assert "quantization_config" not in files["train.py"]
    assert "if load_in" not in files["train.py"]


def test_4bit_script_quantizes_as_the_spec_says(tmp_path: Path) -> None:
    extra = """\
    quantization:
      bnb_4bit_quant_type: fp4
      bnb_4bit_use_double_quant: false
    """
    train = _render(_spec(tmp_path, precision="4bit", extra=extra))["train.py"]
    assert "load_in_4bit=True" in train
    assert 'bnb_4bit_quant_type="fp4"' in train
    assert "bnb_4bit_use_double_quant=False" in train
    assert "bnb_4bit_compute_dtype=torch.bfloat16" in train
    assert '"bitsandbytes==0.50.2"' in train
    assert "load_in_8bit" not in train


def test_8bit_script(tmp_path: Path) -> None:
    train = _render(_spec(tmp_path, precision="8bit"))["train.py"]
    assert "BitsAndBytesConfig(load_in_8bit=True)" in train
    assert "load_in_4bit" not in train


def test_gpu_without_bf16_gets_fp16_and_no_tf32(tmp_path: Path) -> None:
    train = _render(_spec(tmp_path, gpu="t4", precision="4bit"))["train.py"]
    # fp16 mixed precision on CUDA; without a GPU the script computes in fp32.
    assert "bnb_4bit_compute_dtype=COMPUTE_DTYPE" in train
    assert "torch.float16 if torch.cuda.is_available() else torch.float32" in train
    assert "fp16=torch.cuda.is_available()" in train
    assert "bf16=True" not in train
    assert "tf32" not in train


def test_ampere_gets_tf32(tmp_path: Path) -> None:
    train = _render(_spec(tmp_path))["train.py"]
    assert 'torch.set_float32_matmul_precision("high")' in train


def test_lora_options_appear_only_when_set(tmp_path: Path) -> None:
    plain = _render(_spec(tmp_path))["train.py"]
    for option in ("use_dora", "use_rslora", "modules_to_save", "trust_remote_code", "revision"):
        assert option not in plain
    extra = """\
    lora:
      use_dora: true
      use_rslora: true
      target_modules: [q_proj, v_proj]
      modules_to_save: [lm_head]
    """
    custom = _render(_spec(tmp_path, extra=extra))["train.py"]
    assert "use_dora=True" in custom
    assert "use_rslora=True" in custom
    assert 'TARGET_MODULES = ["q_proj", "v_proj"]' in custom
    assert 'MODULES_TO_SAVE = ["lm_head"]' in custom


def test_trust_remote_code_only_when_asked_with_a_warning(tmp_path: Path) -> None:
    extra = "  trust_remote_code: true\n  revision: abc123\n"
    path = _spec(tmp_path)
    path.write_text(
        path.read_text().replace(
            "  id: meta-llama/Llama-3.2-1B-Instruct\n",
            "  id: meta-llama/Llama-3.2-1B-Instruct\n" + extra,
        )
    )
    files = _render(path)
    train = files["train.py"]
    assert train.count("trust_remote_code=True") == 2
    assert train.count("# WARNING: runs Python code from the model repository") == 2
    assert 'MODEL_REVISION = "abc123"' in train
    assert "trust_remote_code=True" in files["merge.py"]


def test_chatml_adds_tokens_and_trains_embeddings(tmp_path: Path) -> None:
    extra = "  chat_template: chatml\n"
    path = _spec(tmp_path)
    path.write_text(
        path.read_text().replace("  format: messages\n", "  format: messages\n" + extra)
    )
    train = _render(path)["train.py"]
    assert 'MODULES_TO_SAVE = ["embed_tokens", "lm_head"]' in train
    assert "model.resize_token_embeddings(len(tokenizer))" in train
    assert "tokenizer.chat_template = CHATML_TEMPLATE" in train
    namespace: dict[str, object] = {}
    chatml = train[train.index("CHATML_SPECIAL_TOKENS =") : train.index("\n\n\ndef main")]
    exec(chatml, namespace)  # plain literals: the templates the script installs
    # The tokenizer saves plain ChatML; the rows are tokenized with the marked copy (the data
    # file's template without its leading Jinja comment, which renders as nothing).
    assert namespace["CHATML_TEMPLATE"] == chat_templates.CHATML.original
    marked = chat_templates.CHATML.training or ""
    assert namespace["TRAINING_CHAT_TEMPLATE"] == marked[marked.index("-#}") + 3 :].lstrip()


def test_data_sources_and_eval_split(tmp_path: Path) -> None:
    for path, loader in [("d.csv", '"csv"'), ("d.parquet", '"parquet"'), ("d.json", '"json"')]:
        train = _render(_spec(tmp_path, data_path=path))["train.py"]
        assert f"load_dataset({loader}, data_files=DATASET_PATH" in train
    hub = _render(
        _spec(tmp_path, data_path="org/clinical-notes", extra="training:\n  save_strategy: steps\n")
    )["train.py"]
    assert "load_dataset(DATASET_PATH, split=DATASET_SPLIT)" in hub
    path = _spec(tmp_path)
    path.write_text(
        path.read_text().replace(
            "  format: messages\n", "  format: messages\n  eval_fraction: 0.1\n"
        )
    )
    train = _render(path)["train.py"]
    assert "dataset.train_test_split(test_size=EVAL_FRACTION, seed=SEED)" in train
    assert 'eval_strategy="steps"' in train and "eval_steps=SAVE_STEPS" in train
    assert "eval_dataset=eval_dataset" in train


def test_dpo_uses_current_trl_names(tmp_path: Path) -> None:
    extra = "dpo:\n  beta: 0.2\n  loss_type: ipo\n"
    train = _render(_spec(tmp_path, method="dpo", data_format="preference", extra=extra))[
        "train.py"
    ]
    assert 'LOSS_TYPE = ["ipo"]' in train
    assert "ref_model=None" in train
    assert "processing_class=tokenizer" in train
    assert "tokenizer=" not in train.replace("processing_class=tokenizer", "")


def test_grpo_rewards_builtin_inline_and_user_imported(tmp_path: Path) -> None:
    extra = """\
    training:
      per_device_train_batch_size: 4
      gradient_accumulation_steps: 2
    grpo:
      num_generations: 4
      reward_funcs: [format, length, rewards/mine.py:score]
    """
    train = _render(_spec(tmp_path, method="grpo", data_format="messages", extra=extra))["train.py"]
    assert "def format_reward(" in train
    assert "def length_reward(" in train
    # Relative to the spec's folder, written relative to the script's (out/ beside the spec).
    assert 'str((SCRIPT_DIR / "../rewards/mine.py").resolve()),\n            "score",' in train
    assert "dataset.map(conversation_prompt" in train
    assert "peftgen" not in train.replace("peftgen emit", "").replace("by peftgen", "")


def test_generation_batch_must_hold_whole_groups(tmp_path: Path) -> None:
    extra = """\
    training:
      per_device_train_batch_size: 3
      gradient_accumulation_steps: 1
    grpo:
      num_generations: 2
      reward_funcs: [format]
    """
    with pytest.raises(UserError, match="num_generations"):
        _render(_spec(tmp_path, method="grpo", data_format="prompt", extra=extra))


def test_variants_parse_and_pass_ruff(tmp_path: Path) -> None:
    variants = {
        "dora-eval": _spec(tmp_path, extra="lora:\n  use_dora: true\n"),
        "t4-4bit": _spec(tmp_path, gpu="t4", precision="4bit"),
        "dpo-8bit": _spec(tmp_path, method="dpo", data_format="preference", precision="8bit"),
        "grpo-user": _spec(
            tmp_path,
            method="grpo",
            data_format="messages",
            extra="grpo:\n  num_generations: 2\n  reward_funcs: [length, r.py:f]\n"
            "training:\n  per_device_train_batch_size: 2\n  gradient_accumulation_steps: 1\n",
        ),
        "hub-data": _spec(tmp_path, data_path="org/data", precision="bf16"),
    }
    out = tmp_path / "out"
    for name, spec_path in variants.items():
        for file_name, text in _render(spec_path).items():
            if file_name.endswith(".py"):
                ast.parse(text)
                (out / name).mkdir(parents=True, exist_ok=True)
                (out / name / file_name).write_text(text, encoding="utf-8")
    assert ruff_problems(out) == ""


# --- the emit command ------------------------------------------------------------------------


def test_emit_prints_only_the_script_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = _spec(tmp_path)
    assert peftgen_main(["emit", str(spec_path)]) == 0
    captured = capsys.readouterr()
    ast.parse(captured.out)
    assert captured.out.startswith("# /// script\n")
    # Printed, the script does not know its folder: local paths are absolute.
    assert "SCRIPT_DIR" not in captured.out
    assert (
        f"DATASET_PATH = {str((tmp_path / 'data/train.jsonl').resolve())!r}"
        in captured.out.replace('"', "'")
    )


def test_emit_to_folder_writes_all_files(tmp_path: Path) -> None:
    spec_path = _spec(tmp_path)
    out = tmp_path / "emitted"
    assert peftgen_main(["emit", str(spec_path), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".peftgen-emitted.json",  # what emit wrote, so a later emit keeps a user's edits
        "merge.py",
        "plan.md",
        "spec.yaml",
        "train.py",
    ]
    # The written spec (paths relative to its folder) renders the same script again, but
    # for its hash and its own name in the docstring.
    resolved_spec = out / "spec.yaml"
    again = _render(resolved_spec, out)["train.py"]
    original = (out / "train.py").read_text()
    sha = load_spec(spec_path).sha256
    assert sha in original
    assert again == original.replace(sha, load_spec(resolved_spec).sha256)
    # Emitting again replaces the folder's files.
    assert peftgen_main(["emit", str(spec_path), "-o", str(out)]) == 0


def test_emit_refuses_a_folder_holding_other_files(tmp_path: Path) -> None:
    out = tmp_path / "emitted"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert peftgen_main(["emit", str(_spec(tmp_path)), "-o", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_failed_write_leaves_no_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "emitted"
    calls = {"n": 0}
    original = Path.write_text

    def failing_write_text(self: Path, *args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(UserError, match="disk full"):
        render.write_output_dir(out, {"train.py": "a", "merge.py": "b", "plan.md": "c"})
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "emitted"
    render.write_output_dir(out, {"train.py": "old"})
    original = Path.write_text

    def failing_write_text(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(UserError, match="nothing was written or deleted"):
        render.write_output_dir(out, {"train.py": "new"})
    monkeypatch.setattr(Path, "write_text", original)
    assert (out / "train.py").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["emitted"]


def test_emit_refuses_when_nothing_fits_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec(tmp_path)
    path.write_text(path.read_text().replace("  gpu: rtx-4090\n", "  vram_gib: 0.5\n"))
    assert peftgen_main(["emit", str(path)]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--force" in captured.err
    assert peftgen_main(["emit", str(path), "--force"]) == 0
    forced = capsys.readouterr().out
    ast.parse(forced)
    assert "does NOT fit" in forced


def test_local_file_with_another_split_is_refused(tmp_path: Path) -> None:
    path = _spec(tmp_path)
    path.write_text(
        path.read_text().replace("  format: messages\n", "  format: messages\n  split: test\n")
    )
    with pytest.raises(UserError, match=r"dataset\.split"):
        _render(path)


def test_emit_never_imports_the_training_stack(tmp_path: Path) -> None:
    """The analytic path stays light: rendering needs no torch, transformers or trl."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from peftgen.cli import main\n"
        f"code = main(['emit', {str(_spec(tmp_path))!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') "
        "if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "0 []"


def test_the_emitted_spec_reads_the_same_in_a_yaml_1_1_reader() -> None:
    """PyYAML (YAML 1.1) reads a plain ``no`` as False; peftgen (YAML 1.2) as "no". The
    emitted spec.yaml quotes such words, so both read the spec train.py came from."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    written = (repo / "generated" / "tiny-cpu-sft" / "spec.yaml").read_text(encoding="utf-8")
    assert "save_strategy: 'no'" in written
    assert yaml.safe_load(written)["training"]["save_strategy"] == "no"
