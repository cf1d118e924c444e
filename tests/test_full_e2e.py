"""``finetuning: full`` end to end on the CPU: the emitted script trains every weight of a
tiny random Llama (SFT and DPO), the loss goes down, and what it saves is a plain
transformers model (no adapter files, no merge step)."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from warm_python import run_python

from peftgen.cli import main as peftgen_main

TIMEOUT_S = 600
STEPS = 10

CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What is the body mass index?"},
            {"role": "assistant", "content": "The BMI is 26.8."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Summarise the discharge note."},
            {"role": "assistant", "content": "Blood pressure 142/88 mmHg."},
        ]
    },
]
PREFERENCE_ROWS = [
    {"prompt": "What is the body mass index?", "chosen": "The BMI is 26.8.", "rejected": "No."},
    {"prompt": "Summarise the note.", "chosen": "Blood pressure 142/88 mmHg.", "rejected": "?"},
]


def _spec(
    tmp_path: Path,
    *,
    method: str,
    model_dir: Path,
    data_format: str,
    rows: list[dict[str, Any]],
    chat_template: str = "",
) -> Path:
    data = tmp_path / "data" / "rows.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    spec = tmp_path / "spec" / "run.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: full-{method}
            method: {method}
            finetuning: full
            model:
              id: {os.path.relpath(model_dir, spec.parent)}
            dataset:
              path: ../data/rows.jsonl
              format: {data_format}
            {chat_template}
            hardware:
              vram_gib: 4
            precision: bf16
            training:
              max_length: 64
              per_device_train_batch_size: 2
              gradient_accumulation_steps: 1
              max_steps: {STEPS}
              learning_rate: 0.001
              lr_scheduler_type: constant
              warmup_ratio: 0.0
              logging_steps: 1
              save_strategy: "no"
            """
        ),
        encoding="utf-8",
    )
    return spec


def _train(spec: Path, out: Path) -> tuple[list[float], Path]:
    assert peftgen_main(["emit", str(spec), "-o", str(out)]) == 0
    result = run_python(out / "train.py", cwd=out, timeout_s=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "trainable params:" in result.stdout and "full fine-tuning" in result.stdout
    losses = [
        float(value) for value in re.findall(r"'loss': '?([0-9.]+(?:e-?[0-9]+)?)", result.stdout)
    ]
    assert len(losses) == STEPS, result.stdout[-2000:]
    return losses, out


def _check_saved_model(emitted: Path, spec: Path, base_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    assert not (emitted / "merge.py").exists()
    script = (emitted / "train.py").read_text(encoding="utf-8")
    assert "from peft" not in script and "LoraConfig" not in script
    saved = next(p for p in (spec.parent / "outputs").iterdir() if p.is_dir())
    names = {p.name for p in saved.iterdir()}
    assert not any(name.startswith("adapter_") for name in names), names
    assert "config.json" in names and "tokenizer_config.json" in names
    trained = AutoModelForCausalLM.from_pretrained(saved)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert trained.dtype == torch.float32
    changed = [
        name
        for (name, a), (_, b) in zip(
            trained.named_parameters(), base.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    # Every weight is trained: the attention and MLP projections of every layer moved.
    assert any("mlp.down_proj" in name for name in changed)
    assert any("self_attn.q_proj" in name for name in changed)
    assert len(changed) >= len(list(base.parameters())) // 2


@pytest.mark.slow
def test_full_sft_trains_every_weight_and_saves_a_plain_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path, method="sft", model_dir=tiny_model_dir, data_format="messages", rows=CHAT_ROWS
    )
    losses, emitted = _train(spec, tmp_path / "emitted")
    assert losses[-1] < losses[0] * 0.8, losses
    _check_saved_model(emitted, spec, tiny_model_dir)


@pytest.mark.slow
def test_full_dpo_with_a_frozen_reference_copy(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        method="dpo",
        model_dir=tiny_model_dir,
        data_format="preference",
        rows=PREFERENCE_ROWS,
    )
    losses, emitted = _train(spec, tmp_path / "emitted")
    assert "copy.deepcopy(model)" in (emitted / "train.py").read_text(encoding="utf-8")
    assert losses[-1] < losses[0], losses
    _check_saved_model(emitted, spec, tiny_model_dir)


@pytest.mark.slow
def test_full_sft_installs_chatml_on_a_base_model(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    """The new ChatML tokens grow the embeddings, which train with every other weight; the
    saved model and tokenizer agree on the vocabulary and the end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_base_model_dir,
        data_format="messages",
        rows=CHAT_ROWS,
        chat_template="  chat_template: chatml",
    )
    losses, emitted = _train(spec, tmp_path / "emitted")
    assert losses[-1] < losses[0], losses
    assert "MODULES_TO_SAVE" not in (emitted / "train.py").read_text(encoding="utf-8")
    saved = next(p for p in (spec.parent / "outputs").iterdir() if p.is_dir())
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
