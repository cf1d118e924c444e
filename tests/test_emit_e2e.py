"""End to end: emit each method x loading, train two steps on the CPU, load what it saved.

Every combination runs the real product: ``peftgen emit -o DIR`` renders the files, then
``python train.py`` and ``python merge.py`` run as a user would run them (their own process,
hub offline; see ``warm_python`` for the pre-imported interpreter they fork from) on a tiny
random Llama. The adapter must load back with peft and change the
model's outputs (LoRA's B starts at zero, so an adapter that did not train would not), and
the merged checkpoint must load with plain transformers and agree with base + adapter.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from warm_python import run_python

from peftgen.cli import main as peftgen_main

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "specs" / "data"
TIMEOUT_S = 600

DATASETS = {
    "sft": ("clinical_sft.jsonl", "messages"),
    "dpo": ("clinical_preference.jsonl", "preference"),
    "grpo": ("clinical_prompts.jsonl", "prompt"),
}

# A user reward with spread: distinct completions score differently, so GRPO's
# group-relative advantages are non-zero and the adapter receives a gradient even though
# a random model never earns the built-in format reward.
VARIETY_REWARD = """
def variety_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(set(text))) for text in texts]
"""


def _spec_text(method: str, precision: str, model_dir: Path) -> str:
    data_file, data_format = DATASETS[method]
    method_section = {
        "sft": "",
        "dpo": "dpo:\n  beta: 0.1\n",
        "grpo": (
            "grpo:\n  num_generations: 2\n  max_completion_length: 8\n"
            "  reward_funcs: [format, length, rewards.py:variety_reward]\n"
        ),
    }[method]
    packing = "  packing: true\n" if method == "sft" else ""
    return (
        textwrap.dedent(
            f"""\
            name: tiny-{method}-{precision}
            method: {method}
            model:
              id: {model_dir.as_posix()}
            dataset:
              path: {(DATA / data_file).as_posix()}
              format: {data_format}
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
              gradient_checkpointing: true
              logging_steps: 1
              save_strategy: "no"
            """
        )
        + packing
        + method_section
        + "output_dir: adapter\n"
    )


def _run(script: Path, cwd: Path, *, cold: bool = False) -> subprocess.CompletedProcess[str]:
    return run_python(script, cwd=cwd, timeout_s=TIMEOUT_S, cold=cold)


def _logits(model: object, input_ids: object) -> object:
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()  # type: ignore[operator, attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit"])
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_emitted_scripts_train_save_and_merge(
    method: str, precision: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(_spec_text(method, precision, tiny_model_dir), encoding="utf-8")
    (tmp_path / "rewards.py").write_text(VARIETY_REWARD, encoding="utf-8")
    emitted = tmp_path / "emitted"
    assert peftgen_main(["emit", str(spec_path), "-o", str(emitted)]) == 0
    train_script = (emitted / "train.py").read_text(encoding="utf-8")
    assert ("bitsandbytes" in train_script) == (precision != "bf16")

    # One case starts a fresh interpreter as a user would; the others fork a warm one.
    cold = (method, precision) == ("sft", "bf16")
    trained = _run(emitted / "train.py", cwd=tmp_path, cold=cold)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "effective batch size: 2 sequences per optimizer step" in trained.stdout
    assert "trainable params" in trained.stdout
    adapter_dir = tmp_path / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    from safetensors import safe_open

    # The adapter trained as fp32 masters: trl casts an 8/4-bit model's trainable weights to
    # bf16, where small updates round away, and the script casts them back
    # (stack.TRAINED_COPY_DTYPE); peft keeps a 16-bit base's adapters fp32 itself.
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as saved:
        keys = [key for key in list(saved.keys()) if "lora_" in key]
        dtypes = {saved.get_tensor(key).dtype for key in keys}
    assert dtypes == {torch.float32}, dtypes

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    input_ids = tokenizer("The patient is a 64-year-old man", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _logits(base, input_ids)
    adapted = PeftModel.from_pretrained(base, adapter_dir)
    adapted_logits = _logits(adapted, input_ids)
    change = (adapted_logits - base_logits).abs().max().item()  # type: ignore[operator]
    assert change > 1e-4, f"the trained adapter leaves the logits unchanged (max diff {change})"

    merged_run = _run(emitted / "merge.py", cwd=tmp_path)
    assert merged_run.returncode == 0, merged_run.stderr[-4000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter-merged", dtype=torch.float32)
    merged_logits = _logits(merged, input_ids)
    # The merged fp16 checkpoint reproduces base + adapter up to fp16 rounding.
    assert torch.allclose(merged_logits, adapted_logits, atol=5e-2)  # type: ignore[arg-type]
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # type: ignore[arg-type]


@pytest.mark.slow
def test_chatml_on_a_base_model_grows_and_trains_the_embeddings(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    """A model without a chat template: the script installs ChatML, adds its two special
    tokens, grows the embeddings, and trains and saves embed_tokens and lm_head in full."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_text = _spec_text("sft", "bf16", tiny_base_model_dir).replace(
        "  format: messages\n", "  format: messages\n  chat_template: chatml\n"
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec_text, encoding="utf-8")
    emitted = tmp_path / "emitted"
    assert peftgen_main(["emit", str(spec_path), "-o", str(emitted)]) == 0

    trained = _run(emitted / "train.py", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-4000:]
    adapter_dir = tmp_path / "adapter"
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    saved_tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    assert len(saved_tokenizer) == len(base_tokenizer) + 2
    assert saved_tokenizer.eos_token == "<|im_end|>"
    assert saved_tokenizer.chat_template is not None
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as tensors:
        keys = list(tensors.keys())
        embed_key = next(k for k in keys if "embed_tokens" in k and "lora" not in k)
        assert any("lm_head" in k and "lora" not in k for k in keys)
        assert tensors.get_tensor(embed_key).shape[0] == len(saved_tokenizer)

    merged_run = _run(emitted / "merge.py", cwd=tmp_path)
    assert merged_run.returncode == 0, merged_run.stderr[-4000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter-merged", dtype=torch.float32)
    assert merged.get_input_embeddings().weight.shape[0] == len(saved_tokenizer)
    input_ids = saved_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute the BMI"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    assert input_ids.max().item() >= len(base_tokenizer)  # the new ChatML markers
    assert torch.isfinite(_logits(merged, input_ids)).all()  # type: ignore[call-overload]
    # embed_tokens trained in full: the base rows moved.
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir, dtype=torch.float32)
    base_rows = base.get_input_embeddings().weight
    merged_rows = merged.get_input_embeddings().weight[: base_rows.shape[0]]
    assert (merged_rows - base_rows).abs().max().item() > 1e-3
