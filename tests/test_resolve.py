"""Rules that need the architecture or the GPU, located at the spec line they are about."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftgen.errors import UserError
from peftgen.load import load_spec
from peftgen.resolve import Resolved, resolve
from peftgen.stack import GIB

REPO = Path(__file__).resolve().parents[1]
SPEC = f"""\
name: clinical-lora
method: sft
model:
  id: llama3-8b-instruct
dataset:
  path: {REPO / "specs" / "data" / "clinical_sft.jsonl"}
  format: messages
hardware:
  gpu: rtx-4090
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _resolve(tmp_path: Path, text: str) -> Resolved:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return resolve(load_spec(path))


def _problems(tmp_path: Path, text: str) -> list[tuple[int | None, str | None, str]]:
    with pytest.raises(UserError) as caught:
        _resolve(tmp_path, text)
    return [(p.line, p.field_path, p.message) for p in caught.value.problems]


def test_resolves_catalogue_model_and_gpu(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, SPEC)
    assert resolved.arch.id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert resolved.gpu.name == "NVIDIA GeForce RTX 4090"
    assert resolved.spec is resolved.loaded.spec
    assert resolved.warnings == ()


def test_vram_override_replaces_the_catalogue_memory(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, SPEC.replace("gpu: rtx-4090", "gpu: rtx-4090\n  vram_gib: 20"))
    assert resolved.gpu.memory_bytes == 20 * GIB
    assert resolved.gpu.bf16


def test_memory_alone_assumes_a_current_card(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, SPEC.replace("gpu: rtx-4090", "vram_gib: 12.5"))
    assert resolved.gpu.memory_bytes == int(12.5 * GIB)
    assert resolved.gpu.bf16 and resolved.gpu.flash_attention_2


def test_override_above_the_card_warns(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, SPEC.replace("gpu: rtx-4090", "gpu: rtx-4090\n  vram_gib: 48"))
    (warning,) = resolved.warnings
    assert ":10:13: warning: hardware.vram_gib: 48 GiB is more than NVIDIA GeForce RTX 4090" in (
        warning
    )


def test_target_modules_accept_dotted_suffixes_and_refuse_unknown_names(tmp_path: Path) -> None:
    ok = SPEC + "lora:\n  target_modules: [self_attn.q_proj, mlp.down_proj]\n"
    assert _resolve(tmp_path, ok).spec.lora.target_modules == ["self_attn.q_proj", "mlp.down_proj"]
    bad = SPEC + "lora:\n  target_modules:\n    - q_proj\n    - query_key_value\n"
    ((line, field_path, message),) = _problems(tmp_path, bad)
    assert (line, field_path) == (13, "lora.target_modules.1")
    assert "has no linear module 'query_key_value'" in message


def test_all_problems_of_resolution_come_together(tmp_path: Path) -> None:
    text = SPEC.replace("gpu: rtx-4090", "gpu: t4") + (
        "precision: bf16\nlora:\n  target_modules: [q_prj]\n  modules_to_save: [embeddings]\n"
    )
    text = text.replace(
        "  id: llama3-8b-instruct\n",
        "  id: llama3-8b-instruct\n  attn_implementation: flash_attention_2\n",
    )
    problems = _problems(tmp_path, text)
    assert [(line, field) for line, field, _ in problems] == [
        (5, "model.attn_implementation"),
        (11, "precision"),
        (13, "lora.target_modules.0"),
        (14, "lora.modules_to_save.0"),
    ]


def test_unknown_model_and_gpu_are_both_located(tmp_path: Path) -> None:
    text = SPEC.replace("llama3-8b-instruct", "llama-9-8b").replace("rtx-4090", "rtx-9090")
    problems = _problems(tmp_path, text)
    assert [(line, field) for line, field, _ in problems] == [(4, "model.id"), (9, "hardware.gpu")]


def test_length_past_the_model_context_warns(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, SPEC + "training:\n  max_length: 16384\n")
    (warning,) = resolved.warnings
    assert ":11:15: warning: training.max_length: 16384 is past" in warning
    assert "8192 positions" in warning


def test_messages_on_a_model_without_chat_template_warns(tmp_path: Path) -> None:
    base = SPEC.replace("llama3-8b-instruct", "meta-llama/Meta-Llama-3-8B")
    (warning,) = _resolve(tmp_path, base).warnings
    assert "warning: dataset.format: `messages` rows are rendered with the tokenizer's" in warning
    with_template = base.replace("format: messages", "format: messages\n  chat_template: chatml")
    assert _resolve(tmp_path, with_template).warnings == ()


def test_loader_warnings_are_carried(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, SPEC + "lora_rank: 8\n")
    assert resolved.spec.lora.r == 8
    (warning,) = resolved.warnings
    assert "warning: lora_rank: LLaMA-Factory's name; read as lora.r" in warning


def test_local_model_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    text = SPEC.replace("llama3-8b-instruct", str(tiny_model_dir))
    resolved = _resolve(tmp_path, text + "lora:\n  target_modules: [q_proj, v_proj]\n")
    assert resolved.arch.config.hidden_size > 0


def test_rslora_with_a_plain_lora_alpha_warns(tmp_path: Path) -> None:
    """alpha = 2r, the plain-LoRA habit, scales rsLoRA's update by 2 sqrt(r): 16 at r 64."""
    risky = _resolve(tmp_path, SPEC + "lora:\n  r: 64\n  lora_alpha: 128\n  use_rslora: true\n")
    (warning,) = risky.warnings
    assert "warning: lora.use_rslora: the update is scaled by lora_alpha / sqrt(r) = 16" in warning
    assert (
        "lora_alpha / r would give 2" in warning and "lora_alpha 16 gives a scale of 2" in warning
    )
    calm = _resolve(tmp_path, SPEC + "lora:\n  r: 64\n  lora_alpha: 16\n  use_rslora: true\n")
    assert calm.warnings == ()
    plain = _resolve(tmp_path, SPEC + "lora:\n  r: 64\n  lora_alpha: 128\n")
    assert plain.warnings == ()


@pytest.mark.parametrize(
    ("name", "make", "hint"),
    [
        ("notes.txt", "file", "convert it to a .jsonl"),
        ("rows.jsonl.gz", "file", "decompress it to a .jsonl"),
        ("./corpus", "folder", "name one data file in that folder"),
        ("./missing.tsv", None, "convert it to a .jsonl"),
    ],
)
def test_a_local_path_the_script_cannot_load_is_refused_not_sent_to_the_hub(
    tmp_path: Path, name: str, make: str | None, hint: str
) -> None:
    target = tmp_path / name
    if make == "file":
        target.write_text("a line\n", encoding="utf-8")
    elif make == "folder":
        target.mkdir()
    text = SPEC.replace(str(REPO / "specs" / "data" / "clinical_sft.jsonl"), name)
    with pytest.raises(UserError) as caught:
        _resolve(tmp_path, text)
    (problem,) = caught.value.problems
    assert (problem.line, problem.field_path) == (6, "dataset.path")
    assert "any other path is read as a hub dataset id" in problem.message
    assert problem.hint is not None and problem.hint.startswith(hint)


def test_a_hub_id_that_is_no_local_file_stays_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "bigbio").mkdir()  # a folder of that owner's name does not make it local
    text = SPEC.replace(str(REPO / "specs" / "data" / "clinical_sft.jsonl"), "bigbio/med_qa")
    assert _resolve(tmp_path, text).spec.dataset.path == "bigbio/med_qa"


def test_4bit_settings_with_a_precision_that_loads_no_4bit_weights_warn(tmp_path: Path) -> None:
    quantization = "quantization:\n  bnb_4bit_quant_type: fp4\n"
    (warning,) = _resolve(tmp_path, SPEC + "precision: bf16\n" + quantization).warnings
    assert ":11:1: warning: quantization: 4-bit settings, unused: precision bf16" in warning
    for precision in ("4bit", "auto"):
        assert _resolve(tmp_path, SPEC + f"precision: {precision}\n" + quantization).warnings == ()


def test_the_default_quantization_section_emit_writes_out_does_not_warn(tmp_path: Path) -> None:
    """emit's spec.yaml writes every section, quantization's defaults included: fed back
    in with precision bf16 it must not warn about settings nobody chose."""
    defaults = "quantization:\n  bnb_4bit_quant_type: nf4\n  bnb_4bit_use_double_quant: true\n"
    assert _resolve(tmp_path, SPEC + "precision: bf16\n" + defaults).warnings == ()
