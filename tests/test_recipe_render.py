"""The recipe choices as the emitted files state them (fast: catalogue models, no torch).

What these choices make the trainer do is checked for real in ``test_recipe_e2e.py``;
here each choice is pinned to the spec and model that call for it, including the cases
that used to come out wrong (an alias as the model id, fp16 on a bf16 GPU, lion_32bit
without bitsandbytes in the header).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from test_render import _render

from peftgen.cli import main as peftgen_main
from peftgen.errors import UserError
from peftgen.load import load_spec
from peftgen.paths import placed, relative_to
from peftgen.resolve import resolve


def _spec(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def _constants(source: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


SFT = """\
    name: recipe
    method: sft
    model:
      id: {model}
    dataset:
      path: data/train.jsonl
      format: {fmt}
    hardware:
      gpu: {gpu}
    precision: {precision}
    """


def _sft(
    tmp_path: Path, model: str = "llama3.2-1b-instruct", fmt: str = "messages", **kw: str
) -> Path:
    values = {"gpu": "a100-80gb", "precision": "bf16"} | kw
    return _spec(tmp_path, SFT.format(model=model, fmt=fmt, **values))


def test_an_alias_becomes_the_hub_id_in_every_file(tmp_path: Path) -> None:
    files = _render(_sft(tmp_path, model='"Llama 3.2 1B Instruct"'))
    assert _constants(files["train.py"])["MODEL_ID"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert _constants(files["merge.py"])["MODEL_ID"] == "meta-llama/Llama-3.2-1B-Instruct"
    written = YAML(typ="safe").load(files["spec.yaml"])
    assert written["model"]["id"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert written["training"]["loss_on"] == "assistant"


def test_a_gated_model_says_how_to_get_access(tmp_path: Path) -> None:
    train = _render(_sft(tmp_path))["train.py"]
    assert "Gated on the hub" in train and "HF_TOKEN" in train
    open_model = _render(_sft(tmp_path, model="Qwen/Qwen2.5-0.5B-Instruct"))["train.py"]
    assert "Gated" not in open_model


def test_fp16_on_a_bf16_gpu_computes_in_fp16(tmp_path: Path) -> None:
    """The spec's fp16 wins on an A100: the plan's compute dtype, the script's dtype and its
    mixed-precision flag agree (they used to say bf16)."""
    files = _render(_sft(tmp_path, precision="fp16"))
    train = files["train.py"]
    assert "COMPUTE_DTYPE = torch.float16 if torch.cuda.is_available()" in train
    assert "dtype=COMPUTE_DTYPE" in train
    assert "fp16=torch.cuda.is_available()" in train
    assert "bf16=True" not in train
    assert "dtype=torch.float16" in files["merge.py"]


def test_lion_32bit_pins_bitsandbytes(tmp_path: Path) -> None:
    path = _sft(tmp_path)
    path.write_text(path.read_text() + "training:\n  optim: lion_32bit\n")
    assert '"bitsandbytes==0.50.2"' in _render(path)["train.py"]


def test_lion_32bit_is_refused_under_deepspeed(tmp_path: Path) -> None:
    path = _sft(tmp_path)
    text = path.read_text().replace(
        "  gpu: a100-80gb\n", "  gpu: a100-80gb\n  num_gpus: 2\n  distributed: deepspeed-zero2\n"
    )
    path.write_text(text + "training:\n  optim: lion_32bit\n")
    with pytest.raises(UserError, match="bitsandbytes"):
        load_spec(path)


@pytest.mark.parametrize(
    ("model", "trl_patches", "marked"),
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", True, False),
        ("Qwen/Qwen2.5-7B-Instruct", True, False),
        ("meta-llama/Llama-3.1-8B-Instruct", False, True),
        ("meta-llama/Llama-3.2-1B-Instruct", False, True),
    ],
)
def test_assistant_only_loss_by_template_family(
    tmp_path: Path, model: str, trl_patches: bool, marked: bool
) -> None:
    train = _render(_sft(tmp_path, model=model))["train.py"]
    assert "assistant_only_loss=True" in train
    assert ("get_training_chat_template" in train) == trl_patches
    assert ("TRAINING_CHAT_TEMPLATE = (" in train) == marked
    assert ("use_training_chat_template(tokenizer)" in train) == marked


def test_the_embedded_training_template_is_the_shipped_one(tmp_path: Path) -> None:
    from peftgen.chat_templates import FAMILIES

    train = _render(_sft(tmp_path, model="meta-llama/Llama-3.1-8B-Instruct"))["train.py"]
    embedded = _constants(train)["TRAINING_CHAT_TEMPLATE"]
    shipped = FAMILIES["llama3_1"].training
    assert isinstance(embedded, str) and shipped is not None
    import jinja2

    # Same output with the generation tags as no-ops, for a conversation with a system turn.
    env = jinja2.Environment()
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))

    def render(template: str) -> str:
        plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        plain = plain.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
        return env.from_string(plain).render(
            messages=[
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"},
            ],
            bos_token="<|begin_of_text|>",
            add_generation_prompt=False,
        )

    assert render(embedded) == render(shipped)


def test_an_unknown_chat_template_refuses_assistant_loss_with_the_way_out(tmp_path: Path) -> None:
    path = _sft(tmp_path, model="TinyLlama/TinyLlama-1.1B-Chat-v1.0", gpu="rtx-4090")
    with pytest.raises(UserError) as raised:
        resolve(load_spec(path))
    text = str(raised.value)
    assert "training.loss_on: all" in text
    path.write_text(path.read_text() + "training:\n  loss_on: all\n")
    train = _render(path)["train.py"]
    assert "assistant_only_loss=False" in train


@pytest.mark.parametrize(
    ("fmt", "loss_on", "expected"),
    [
        ("prompt_completion", None, "completion_only_loss=True"),
        ("prompt_completion", "all", "completion_only_loss=False"),
        ("messages", "all", "assistant_only_loss=False"),
        ("text", None, 'dataset_text_field="text"'),
    ],
)
def test_loss_on_maps_to_trl_options(
    tmp_path: Path, fmt: str, loss_on: str | None, expected: str
) -> None:
    path = _sft(tmp_path, fmt=fmt)
    if loss_on:
        path.write_text(path.read_text() + f"training:\n  loss_on: {loss_on}\n")
    assert expected in _render(path)["train.py"]


@pytest.mark.parametrize(
    ("fmt", "loss_on"), [("text", "assistant"), ("prompt_completion", "assistant")]
)
def test_loss_on_that_the_format_cannot_honour_is_refused(
    tmp_path: Path, fmt: str, loss_on: str
) -> None:
    path = _sft(tmp_path, fmt=fmt)
    path.write_text(path.read_text() + f"training:\n  loss_on: {loss_on}\n")
    with pytest.raises(UserError, match=r"loss_on"):
        load_spec(path)


def test_chat_models_get_conversational_rows_base_models_plain_text(tmp_path: Path) -> None:
    chat = _render(_sft(tmp_path, fmt="prompt_completion"))["train.py"]
    assert "dataset = dataset.map(as_conversation)" in chat
    assert '"completion": "assistant",' in chat  # as_conversation's roles
    base = _render(_sft(tmp_path, model="meta-llama/Llama-3.2-1B", fmt="prompt_completion"))
    assert "as_conversation" not in base["train.py"]
    assert "plain text" in base["train.py"]


def test_dpo_keeps_the_lora_dropout_the_spec_asks_for(tmp_path: Path) -> None:
    body = textwrap.dedent(
        SFT.format(
            model="llama3.2-1b-instruct", fmt="preference", gpu="a100-80gb", precision="bf16"
        )
    ).replace("method: sft", "method: dpo")
    with_dropout = _render(_spec(tmp_path, body + "lora:\n  lora_dropout: 0.1\n"))["train.py"]
    assert "disable_dropout=False" in with_dropout
    assert '"chosen": "assistant",' in with_dropout  # as_conversation's roles
    without = _render(_spec(tmp_path, body + "lora:\n  lora_dropout: 0.0\n", "b.yaml"))
    assert "disable_dropout" not in without["train.py"]


def test_tied_embeddings_trained_in_full_stay_one_tensor(tmp_path: Path) -> None:
    path = _sft(tmp_path, model="HuggingFaceTB/SmolLM2-360M", gpu="t4", precision="fp16")
    path.write_text(
        path.read_text().replace(
            "  format: messages\n", "  format: messages\n  chat_template: chatml\n"
        )
    )
    files = _render(path)
    assert "ensure_weight_tying=True" in files["train.py"]
    assert "parameter.data = parameter.data.float()" in files["train.py"]
    merge = files["merge.py"]
    assert "base.resize_token_embeddings(len(tokenizer))" in merge
    assert "merged.generation_config.eos_token_id = tokenizer.eos_token_id" in merge
    untied = _render(_sft(tmp_path, model="meta-llama/Llama-3.1-8B-Instruct"))["train.py"]
    assert "ensure_weight_tying" not in untied


def test_merge_uses_the_training_dtype_and_revision_and_warns_for_qlora(tmp_path: Path) -> None:
    path = _sft(tmp_path, precision="4bit")
    path.write_text(
        path.read_text().replace(
            "  id: llama3.2-1b-instruct\n", "  id: llama3.2-1b-instruct\n  revision: abc123\n"
        )
    )
    merge = _render(path)["merge.py"]
    assert "dtype=torch.bfloat16" in merge
    assert 'MODEL_REVISION = "abc123"' in merge and "revision=MODEL_REVISION" in merge
    assert "Caveat: the adapter was trained against the 4bit-rounded base weights" in merge


def test_paths_are_relative_to_the_spec_and_written_relative_to_the_script(
    tmp_path: Path,
) -> None:
    configs = tmp_path / "project" / "configs"
    configs.mkdir(parents=True)
    body = textwrap.dedent(
        SFT.format(model="llama3.2-1b-instruct", fmt="messages", gpu="a100-80gb", precision="bf16")
    )
    spec = _spec(configs, body + "output_dir: ../runs/first\n")
    out = tmp_path / "elsewhere" / "emitted"
    assert peftgen_main(["emit", str(spec), "-o", str(out)]) == 0
    train = (out / "train.py").read_text()
    assert (
        'DATASET_PATH = str((SCRIPT_DIR / "../../project/configs/data/train.jsonl").resolve())'
        in train
    )
    assert 'OUTPUT_DIR = str((SCRIPT_DIR / "../../project/runs/first").resolve())' in train
    written = YAML(typ="safe").load((out / "spec.yaml").read_text())
    assert written["dataset"]["path"] == "../../project/configs/data/train.jsonl"
    assert written["output_dir"] == "../../project/runs/first"


def test_paths_sharing_only_the_root_with_the_output_folder_are_written_absolute(
    tmp_path: Path,
) -> None:
    """A relative path that climbs to ``/`` (``../../../tmp/x/data/train.jsonl``) is only a
    longer absolute one; both scripts then name the files absolutely, define no unused
    SCRIPT_DIR, and the saved spec says the same. (Rendered, not written: the output folder
    is a top-level folder nothing shares.)"""
    spec = _sft(tmp_path)
    out = Path("/peftgen-elsewhere") / "run"
    files = _render(spec, out)
    data, outputs = tmp_path / "data" / "train.jsonl", tmp_path / "outputs" / "recipe"
    train, merge = _constants(files["train.py"]), _constants(files["merge.py"])
    assert train["DATASET_PATH"] == data.as_posix()
    assert train["OUTPUT_DIR"] == merge["ADAPTER_DIR"] == outputs.as_posix()
    assert "SCRIPT_DIR" not in files["train.py"] and "SCRIPT_DIR" not in files["merge.py"]
    written = YAML(typ="safe").load(files["spec.yaml"])
    assert written["dataset"]["path"] == data.as_posix()
    assert written["output_dir"] == outputs.as_posix()


@pytest.mark.parametrize(
    ("target", "anchor", "expected"),
    [
        ("/home/u/data/x.jsonl", "/home/u/runs/first", "../../data/x.jsonl"),
        ("/home/u/runs/first/data.jsonl", "/home/u/runs/first", "data.jsonl"),
        ("/srv/data/x.jsonl", "/home/u/runs/first", None),
        ("relative/x.jsonl", "/home/u/runs", None),
    ],
)
def test_relative_to_stops_at_the_filesystem_root(
    target: str, anchor: str, expected: str | None
) -> None:
    assert relative_to(Path(target), Path(anchor)) == expected
    assert placed(Path(target), Path(anchor)) == (expected or Path(target).as_posix())


def test_plan_md_and_plan_json_name_the_resolved_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    path = _sft(tmp_path, model="llama3-8b-instruct", gpu="rtx-4090")
    out = tmp_path / "out"
    assert peftgen_main(["emit", str(path), "-o", str(out)]) == 0
    assert "`meta-llama/Meta-Llama-3-8B-Instruct`" in (out / "plan.md").read_text()
    capsys.readouterr()
    assert peftgen_main(["plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == "meta-llama/Meta-Llama-3-8B-Instruct"
