"""What the emitted scripts train on, read from the real trainer's first collated batch.

Each case emits a script for a tiny random Llama (with a ChatML chat template, or a base
model without one), runs it unchanged in a subprocess through a small shim that wraps
``transformers.Trainer.train``: before training starts, it takes the first batch from the
trainer's own dataloader (what trl's collator hands the model) and writes, per row, the
decoded input and the decoded tokens that carry a loss (labels != -100; DPO's
``completion_mask``). The oracle is the row text of the data file, not peftgen's view of
it: a test fails if system or user text is trained, if the chat markers are missing, or
if the end-of-turn token is not trained (the model would never learn to stop).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from warm_python import run_python

from peftgen.cli import main as peftgen_main

TIMEOUT_S = 600

CAPTURE_SHIM = """
import json, os, runpy, sys
import transformers

script, out = sys.argv[1], sys.argv[2]
only = os.environ.get("CAPTURE_ONLY") == "1"
original_train = transformers.Trainer.train


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def capture(self, *args, **kwargs):
    tok = self.processing_class
    batch = next(iter(self.get_train_dataloader()))
    rows = []
    if isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"].tolist()
        if "labels" in batch:
            keep = (batch["labels"] != -100).tolist()
        else:
            keep = batch["completion_mask"].bool().tolist()
        mask = batch.get("attention_mask")
        mask = mask.bool().tolist() if mask is not None else [[True] * len(r) for r in ids]
        for row, kept, real in zip(ids, keep, mask):
            rows.append({
                "input": decode(tok, [t for t, m in zip(row, real) if m]),
                "trained": decode(tok, [t for t, k in zip(row, kept) if k]),
            })
    else:
        rows = [{"prompt": row["prompt"]} for row in batch]
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    setup = {
        "batch_tokens": int(batch["input_ids"].numel()) if isinstance(batch, dict) else None,
        "bf16": self.args.bf16,
        "fp16": self.args.fp16,
        "parameter_dtypes": sorted({str(p.dtype) for p in self.model.parameters()}),
        "chat_template": tok.chat_template,
        "train_rows": len(self.train_dataset),
    }
    with open(out + ".setup", "w", encoding="utf-8") as handle:
        json.dump(setup, handle)
    if only:
        raise SystemExit(0)
    return original_train(self, *args, **kwargs)


transformers.Trainer.train = capture
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        **extra,
    }


def _spec(
    tmp_path: Path,
    *,
    method: str,
    model_dir: Path,
    data_format: str,
    rows: list[dict[str, Any]],
    extra: str = "",
    precision: str = "bf16",
    training: str = "",
    chatml: bool = False,
) -> Path:
    data = tmp_path / "data" / "rows.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    spec = tmp_path / "spec" / "run.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    model_rel = os.path.relpath(model_dir, spec.parent)
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: recipe
            method: {method}
            model:
              id: {model_rel}
            dataset:
              path: ../data/rows.jsonl
              format: {data_format}
            {"  chat_template: chatml" if chatml else ""}
            hardware:
              vram_gib: 4
            precision: {precision}
            lora:
              r: 8
              lora_alpha: 16
              lora_dropout: 0.0
            training:
              max_length: 128
              per_device_train_batch_size: 2
              gradient_accumulation_steps: 1
              max_steps: 2
              learning_rate: 0.01
              warmup_ratio: 0.0
              logging_steps: 1
              save_strategy: "no"
            """
        )
        + textwrap.indent(textwrap.dedent(training), "  ")
        + textwrap.dedent(extra),
        encoding="utf-8",
    )
    return spec


def _emit(spec: Path, out: Path) -> Path:
    assert peftgen_main(["emit", str(spec), "-o", str(out)]) == 0
    return out / "train.py"


def _run_script(
    script: Path, cwd: Path, *args: str, cold: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_python(script, *args, cwd=cwd, env=_env(**env), timeout_s=TIMEOUT_S, cold=cold)


def _first_batch(script: Path, tmp_path: Path, **env: str) -> list[dict[str, Any]]:
    """The trainer's first collated batch, decoded (``batch.json.setup``: its precision
    flags, parameter dtypes and token count); the script stops before training."""
    shim = tmp_path / "capture.py"
    shim.write_text(CAPTURE_SHIM, encoding="utf-8")
    out = tmp_path / "batch.json"
    result = run_python(
        shim, script, out, cwd=tmp_path, env=_env(CAPTURE_ONLY="1", **env), timeout_s=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows: list[dict[str, Any]] = json.loads(out.read_text(encoding="utf-8"))
    return rows


CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are a careful clinical assistant."},
            {"role": "user", "content": "What is the body mass index?"},
            {"role": "assistant", "content": "The BMI is 26.8."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Summarise the discharge note."},
            {"role": "assistant", "content": "Blood pressure 142/88 mmHg."},
            {"role": "user", "content": "And the heart rate?"},
            {"role": "assistant", "content": "76 beats per minute."},
        ]
    },
]
PROMPT_ROWS = [
    {"prompt": "What is the body mass index?", "completion": "The BMI is 26.8."},
    {"prompt": "Summarise the discharge note.", "completion": "Blood pressure 142/88 mmHg."},
]
PREFERENCE_ROWS = [
    {"prompt": "What is the body mass index?", "chosen": "The BMI is 26.8.", "rejected": "No."},
    {"prompt": "Summarise the note.", "chosen": "Blood pressure 142/88 mmHg.", "rejected": "?"},
]


def _assistant_texts(row: dict[str, Any]) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def _user_texts(row: dict[str, Any]) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] != "assistant"]


def _match(rows: list[dict[str, Any]], source: list[dict[str, Any]], key: str) -> list[Any]:
    """The source row each captured row came from (the sampler shuffles)."""
    matched = []
    for row in rows:
        hits = [s for s in source if s[key] in row["input"]]
        assert len(hits) == 1, row
        matched.append(hits[0])
    return matched


@pytest.mark.slow
def test_chat_sft_trains_the_assistant_turns_and_their_end_of_turn_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path, method="sft", model_dir=tiny_model_dir, data_format="messages", rows=CHAT_ROWS
    )
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    assert len(rows) == 2
    for row in rows:
        source = next(s for s in CHAT_ROWS if _assistant_texts(s)[-1] in row["input"])
        assert "<|im_start|>user\n" in row["input"]
        assert row["trained"] == "".join(f"{text}<|im_end|>" for text in _assistant_texts(source))
        for text in _user_texts(source):
            assert text not in row["trained"]


@pytest.fixture(scope="module")
def mistral_v3_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Mistral-7B-Instruct-v0.3's chat template (as the catalogue ships
    it) and its </s> end of turn: peftgen tokenizes with its marked copy of it."""
    from transformers import AutoTokenizer

    from peftgen.chat_templates import FAMILIES

    folder = tmp_path_factory.mktemp("mistral_v3") / "model"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = FAMILIES["mistral_v3"].original
    tokenizer.eos_token = "</s>"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_mistral_v3_rows_train_with_their_system_prompt_and_save_the_model_s_template(
    mistral_v3_model_dir: Path, tmp_path: Path
) -> None:
    """Mistral v3's own template drops the system prompt from a conversation ending with
    the answer (it adds it only to a user turn that is the last message): the row must be
    trained as inference renders it, system prompt in the last user turn; the tokenizer the
    trainer saves carries the model's own template, not the marked one."""
    from peftgen.chat_templates import FAMILIES

    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=mistral_v3_model_dir,
        data_format="messages",
        rows=CHAT_ROWS,
    )
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    system = CHAT_ROWS[0]["messages"][0]["content"]
    assert len(rows) == 2
    for row in rows:
        source = next(s for s in CHAT_ROWS if _assistant_texts(s)[-1] in row["input"])
        if source is CHAT_ROWS[0]:
            assert f"[INST] {system}\n\nWhat is the body mass index?[/INST]" in row["input"]
        for text in _assistant_texts(source):
            assert text in row["trained"]
        for text in _user_texts(source):
            assert text not in row["trained"]
        assert row["trained"].endswith("</s>")
    setup = json.loads((tmp_path / "batch.json.setup").read_text(encoding="utf-8"))
    assert setup["chat_template"] == FAMILIES["mistral_v3"].original


@pytest.mark.slow
def test_loss_on_all_trains_every_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_model_dir,
        data_format="messages",
        rows=CHAT_ROWS,
        training="loss_on: all\n",
    )
    for row in _first_batch(_emit(spec, tmp_path / "out"), tmp_path):
        # trl shifts nothing here: labels are the input ids, every real token is trained.
        assert row["trained"] == row["input"]


@pytest.mark.slow
def test_prompt_completion_on_a_chat_model_is_a_conversation_with_the_completion_trained(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_model_dir,
        data_format="prompt_completion",
        rows=PROMPT_ROWS,
    )
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    for row, source in zip(rows, _match(rows, PROMPT_ROWS, "prompt"), strict=True):
        assert row["input"].startswith(f"<|im_start|>user\n{source['prompt']}<|im_end|>\n")
        assert "<|im_start|>assistant\n" in row["input"]
        assert row["trained"].startswith(source["completion"] + "<|im_end|>")
        assert source["prompt"] not in row["trained"]


@pytest.mark.slow
def test_prompt_completion_on_a_base_model_stays_plain_text(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_base_model_dir,
        data_format="prompt_completion",
        rows=PROMPT_ROWS,
    )
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    for row, source in zip(rows, _match(rows, PROMPT_ROWS, "prompt"), strict=True):
        assert "<|im_start|>" not in row["input"]
        assert row["input"].startswith(source["prompt"])
        assert row["trained"] == source["completion"] + "</s>"


@pytest.mark.slow
def test_dpo_on_a_chat_model_scores_templated_completions(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path,
        method="dpo",
        model_dir=tiny_model_dir,
        data_format="preference",
        rows=PREFERENCE_ROWS,
        extra="dpo:\n  beta: 0.1\n",
    )
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    assert len(rows) == 4  # chosen and rejected of two pairs
    answers = {s["chosen"] for s in PREFERENCE_ROWS} | {s["rejected"] for s in PREFERENCE_ROWS}
    for row in rows:
        assert row["input"].startswith("<|im_start|>user\n")
        assert row["trained"].removesuffix("\n").removesuffix("<|im_end|>") in answers


CONVERSATIONAL_PREFERENCE_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "You answer clinical questions briefly."},
            {"role": "user", "content": "What is the body mass index?"},
        ],
        "chosen": [{"role": "assistant", "content": "The BMI is 26.8."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {
        "prompt": [{"role": "user", "content": "Summarise the note."}],
        "chosen": [{"role": "assistant", "content": "Blood pressure 142/88 mmHg."}],
        "rejected": [{"role": "assistant", "content": "?"}],
    },
]


@pytest.mark.slow
def test_dpo_keeps_rows_that_are_conversations_already(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Preference rows whose fields hold turns (a system turn in the prompt) pass
    check-data; the script keeps them as they are (it once wrapped the list of turns as
    a user turn's content and died in apply_chat_template) and scores only the answers."""
    spec = _spec(
        tmp_path,
        method="dpo",
        model_dir=tiny_model_dir,
        data_format="preference",
        rows=CONVERSATIONAL_PREFERENCE_ROWS,
        extra="dpo:\n  beta: 0.1\n",
    )
    assert peftgen_main(["check-data", str(spec)]) == 0
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    assert len(rows) == 4
    answers = {
        turns[0]["content"]
        for row in CONVERSATIONAL_PREFERENCE_ROWS
        for turns in (row["chosen"], row["rejected"])
    }
    system = CONVERSATIONAL_PREFERENCE_ROWS[0]["prompt"][0]["content"]
    assert any(row["input"].startswith(f"<|im_start|>system\n{system}") for row in rows)
    for row in rows:
        assert row["trained"].removesuffix("\n").removesuffix("<|im_end|>") in answers
        assert system not in row["trained"]


def _grpo_spec(tmp_path: Path, model_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """A GRPO spec on ``rows``: 2 completions per prompt of up to 8 tokens, length reward."""
    return _spec(
        tmp_path,
        method="grpo",
        model_dir=model_dir,
        data_format="prompt",
        rows=rows,
        extra="grpo:\n  num_generations: 2\n  max_completion_length: 8\n  reward_funcs: [length]\n",
    )


@pytest.mark.slow
def test_grpo_prompts_on_a_chat_model_are_conversations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows_in = [{"prompt": "What is the body mass index?"}, {"prompt": "Summarise the note."}]
    spec = _grpo_spec(tmp_path, tiny_model_dir, rows_in)
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    assert rows
    for row in rows:
        assert row["prompt"][0]["role"] == "user"
        assert row["prompt"][0]["content"] in {r["prompt"] for r in rows_in}


@pytest.mark.slow
def test_grpo_smoke_steps_take_the_longest_prompts_each_step_samples(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A GRPO batch counts completions, NUM_GENERATIONS per prompt: a 1-step smoke run at
    2 completions per step samples 1 prompt, so it keeps the longest prompt alone (it kept
    2, and trained on whichever came first)."""
    rows_in = [{"prompt": "Short?"}, {"prompt": "A much longer question about the notes?"}]
    spec = _grpo_spec(tmp_path, tiny_model_dir, rows_in)
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path, PEFTGEN_SMOKE_STEPS="1")
    setup = json.loads((tmp_path / "batch.json.setup").read_text(encoding="utf-8"))
    assert setup["train_rows"] == 1
    assert {row["prompt"][0]["content"] for row in rows} == {rows_in[1]["prompt"]}


@pytest.mark.slow
def test_fp16_script_smoke_runs_on_the_cpu(tiny_base_model_dir: Path, tmp_path: Path) -> None:
    """fp16 with ChatML on a base model (fp32 copies of the embeddings): the crash case."""
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_base_model_dir,
        data_format="messages",
        rows=CHAT_ROWS,
        precision="fp16",
        chatml=True,
    )
    script = _emit(spec, tmp_path / "out")
    assert "fp16=torch.cuda.is_available()" in script.read_text(encoding="utf-8")
    result = _run_script(script, tmp_path, PEFTGEN_SMOKE_STEPS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "smoke test passed" in result.stdout
    # What the trainer was given on the CPU: no mixed precision at all (trl would turn bf16
    # on if the script left it unset), fp32 weights.
    _first_batch(script, tmp_path)
    setup = json.loads((tmp_path / "batch.json.setup").read_text(encoding="utf-8"))
    assert (setup["bf16"], setup["fp16"]) == (False, False)
    assert setup["parameter_dtypes"] == ["torch.float32"]


@pytest.mark.slow
def test_runs_from_another_directory_and_smoke_saves_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path, method="sft", model_dir=tiny_model_dir, data_format="messages", rows=CHAT_ROWS
    )
    script = _emit(spec, tmp_path / "out")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    # A fresh interpreter, as a user starts it (the other runs here fork a warm one).
    result = _run_script(script, elsewhere, cold=True, PEFTGEN_SMOKE_STEPS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    output_dir = tmp_path / "spec" / "outputs" / "recipe"  # relative to the spec's folder
    assert sorted(p.name for p in output_dir.iterdir()) == ["memory_receipt.json"]
    assert not any(elsewhere.iterdir())


@pytest.mark.slow
def test_missing_local_data_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, method="sft", model_dir=tiny_model_dir, data_format="messages", rows=CHAT_ROWS
    )
    script = _emit(spec, tmp_path / "out")
    (tmp_path / "data" / "rows.jsonl").unlink()
    result = _run_script(script, tmp_path)
    assert result.returncode == 1
    assert "dataset.path:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_model_dir,
        data_format="messages",
        rows=CHAT_ROWS * 4,
        training="max_steps: 3\n",
    )
    text = spec.read_text(encoding="utf-8").replace(
        '  save_strategy: "no"\n', "  save_strategy: steps\n  save_steps: 1\n"
    )
    text = text.replace("  max_steps: 2\n", "")
    spec.write_text(text, encoding="utf-8")
    script = _emit(spec, tmp_path / "out")
    output_dir = tmp_path / "spec" / "outputs" / "recipe"
    refused = _run_script(script, tmp_path, "--resume")
    assert refused.returncode == 1 and "no checkpoint" in refused.stderr
    first = _run_script(script, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    # save_total_limit (2 by default) kept the last two checkpoints.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    # An interruption after step 2: the last checkpoint is gone.
    shutil.rmtree(output_dir / "checkpoint-3")
    resumed = _run_script(script, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Only step 3 ran again: one loss line.
    assert resumed.stdout.count("'loss'") + resumed.stderr.count("'loss'") == 1


@pytest.mark.slow
def test_merged_chat_model_answers_and_stops(tiny_base_model_dir: Path, tmp_path: Path) -> None:
    """ChatML on a base model, trained on one memorisable exchange: the merged checkpoint
    answers a training prompt with the trained answer and stops at <|im_end|>, because the
    EOS is right in its config, generation config and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exchange = [
        {"role": "user", "content": "What is the code?"},
        {"role": "assistant", "content": "Blue 42."},
    ]
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_base_model_dir,
        data_format="messages",
        rows=[{"messages": exchange}] * 8,
        training="max_steps: 60\n",
        chatml=True,
    )
    text = spec.read_text(encoding="utf-8").replace("  max_steps: 2\n", "")
    text = text.replace("  r: 8\n", "  r: 16\n")
    spec.write_text(text, encoding="utf-8")
    script = _emit(spec, tmp_path / "out")
    trained = _run_script(script, tmp_path)
    assert trained.returncode == 0, trained.stderr[-4000:]
    merged_run = _run_script(tmp_path / "out" / "merge.py", tmp_path)
    assert merged_run.returncode == 0, merged_run.stderr[-4000:]
    merged_dir = tmp_path / "spec" / "outputs" / "recipe-merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == end
    assert model.config.eos_token_id == end
    assert model.generation_config.eos_token_id == end
    inputs = tokenizer.apply_chat_template(
        exchange[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == end, tokenizer.decode(new)
    assert len(new) < 30
    assert tokenizer.decode(new[:-1]).strip() == "Blue 42."


@pytest.mark.slow
def test_chatml_installed_on_a_base_model_trains_the_assistant_turns(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_base_model_dir,
        data_format="messages",
        rows=CHAT_ROWS,
        chatml=True,
    )
    for row in _first_batch(_emit(spec, tmp_path / "out"), tmp_path):
        source = next(s for s in CHAT_ROWS if _assistant_texts(s)[-1] in row["input"])
        assert "<|im_start|>user\n" in row["input"]
        assert row["trained"] == "".join(f"{text}<|im_end|>" for text in _assistant_texts(source))


@pytest.mark.slow
def test_text_rows_train_every_token_with_eos(tiny_base_model_dir: Path, tmp_path: Path) -> None:
    rows_in = [{"text": "The patient is a 64-year-old man."}, {"text": "Blood pressure 142/88."}]
    spec = _spec(
        tmp_path, method="sft", model_dir=tiny_base_model_dir, data_format="text", rows=rows_in
    )
    rows = _first_batch(_emit(spec, tmp_path / "out"), tmp_path)
    for row in rows:
        assert row["trained"] == row["input"]
        assert row["input"].endswith("</s>")
        assert row["input"].removesuffix("</s>") in {r["text"] for r in rows_in}


@pytest.mark.slow
def test_dpo_on_a_base_model_scores_plain_completions(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tmp_path,
        method="dpo",
        model_dir=tiny_base_model_dir,
        data_format="preference",
        rows=PREFERENCE_ROWS,
        extra="dpo:\n  beta: 0.1\n",
    )
    answers = {s["chosen"] for s in PREFERENCE_ROWS} | {s["rejected"] for s in PREFERENCE_ROWS}
    for row in _first_batch(_emit(spec, tmp_path / "out"), tmp_path):
        assert "<|im_start|>" not in row["input"]
        assert row["trained"].removesuffix("</s>") in answers


@pytest.mark.slow
def test_tied_embeddings_trained_in_full_stay_one_tensor_through_the_merge(
    tmp_path: Path,
) -> None:
    """ChatML on a tied base model: one trained copy of embeddings and head (as the plan
    counts), and the merged checkpoint is still tied."""
    import torch
    from tiny_model import build_tiny_llama
    from transformers import AutoModelForCausalLM

    from peftgen.load import load_spec
    from peftgen.plan import make_plan
    from peftgen.resolve import resolve

    model_dir = build_tiny_llama(
        tmp_path / "tied", with_chat_template=False, tie_word_embeddings=True
    )
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=model_dir,
        data_format="messages",
        rows=CHAT_ROWS,
        chatml=True,
    )
    script = _emit(spec, tmp_path / "out")
    trained = _run_script(script, tmp_path)
    assert trained.returncode == 0, trained.stderr[-4000:]
    planned = make_plan(resolve(load_spec(spec))).trainable_parameters
    assert f"trainable params: {planned:,}" in trained.stdout
    merged_run = _run_script(tmp_path / "out" / "merge.py", tmp_path)
    assert merged_run.returncode == 0, merged_run.stderr[-4000:]
    merged = AutoModelForCausalLM.from_pretrained(
        tmp_path / "spec" / "outputs" / "recipe-merged", dtype=torch.float32
    )
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_a_packed_smoke_test_fills_its_sequences(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With packing, the smoke test's rows share sequences: it takes enough of the longest
    rows to fill each sequence to max_length, the worst case the plan sizes for."""
    spec = _spec(
        tmp_path,
        method="sft",
        model_dir=tiny_model_dir,
        data_format="messages",
        rows=[
            {
                "messages": [
                    {"role": "user", "content": f"Question {index}?"},
                    {"role": "assistant", "content": f"Answer {index}."},
                ]
            }
            for index in range(60)
        ],
        training="packing: true\n",
    )
    spec.write_text(spec.read_text().replace("  max_length: 128\n", "  max_length: 64\n"))
    _first_batch(_emit(spec, tmp_path / "out"), tmp_path, PEFTGEN_SMOKE_STEPS="1")
    setup = json.loads((tmp_path / "batch.json.setup").read_text(encoding="utf-8"))
    # Two sequences of up to 64 tokens per micro-batch; two rows alone would fill one.
    assert setup["batch_tokens"] >= 0.75 * 2 * 64


IMPORT_ORDER_SHIM = """
import os, runpy, sys
import torch

seen = []
real = torch.cuda.is_available


def recording():
    seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
    return real()


torch.cuda.is_available = recording
runpy.run_path(sys.argv[1], run_name="imported")  # module level only: main() does not run
print("first CUDA query saw CUDA_VISIBLE_DEVICES =", seen[0] if seen else "no query")
"""


@pytest.mark.slow
def test_the_one_gpu_pin_is_set_before_bitsandbytes_initialises_cuda(tmp_path: Path) -> None:
    """The QLoRA script pins one GPU (trl refuses nn.DataParallel). bitsandbytes, imported by
    peft, asks CUDA for its devices on import, and CUDA reads CUDA_VISIBLE_DEVICES then: the
    pin must be in place by bitsandbytes' first query, not set after the imports."""
    script = Path(__file__).resolve().parents[1] / "generated" / "llama3-8b-clinical-qlora"
    shim = tmp_path / "shim.py"
    shim.write_text(IMPORT_ORDER_SHIM, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [shutil.which("python") or "python", str(shim), str(script / "train.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first CUDA query saw CUDA_VISIBLE_DEVICES = 0" in result.stdout, result.stdout


@pytest.mark.slow
def test_a_row_without_an_assistant_turn_stops_the_script_naming_the_rows(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """trl 1.16 stops at the first batch with "no assistant tokens ... {% generation %}",
    which blames the chat template; the script names the data's rows instead."""
    rows = [*CHAT_ROWS, {"messages": [{"role": "user", "content": "Unanswered?"}]}]
    spec = _spec(
        tmp_path, method="sft", model_dir=tiny_model_dir, data_format="messages", rows=rows
    )
    result = _run_script(_emit(spec, tmp_path / "out"), tmp_path, PEFTGEN_SMOKE_STEPS="1")
    assert result.returncode == 1
    assert "dataset.path: 1 of 3 rows have no assistant turn (the first is row 3)" in result.stderr
    assert "Traceback" not in result.stderr
