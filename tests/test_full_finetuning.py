"""``finetuning: full`` in the spec, the estimator and the planner (no torch needed except
for the meta-device parameter counts): refusals, bytes per parameter by optimizer, full >=
LoRA, the LoRA plan's comparison column, and the emitted script's shape."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from peftgen import memory
from peftgen.catalog import find_model, model_catalogue
from peftgen.cli import main
from peftgen.load import load_spec
from peftgen.memory import EstimateInput, estimate
from peftgen.plan import make_plan
from peftgen.resolve import resolve
from peftgen.spec import SPEC_ADAPTER

REPO = Path(__file__).resolve().parent.parent
FULL_SPEC = REPO / "specs" / "qwen2.5-0.5b-instruct-full.yaml"
LORA_SPEC = REPO / "specs" / "llama3.2-1b-bf16-lora.yaml"

BASE: dict[str, Any] = {
    "name": "x",
    "method": "sft",
    "finetuning": "full",
    "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
    "dataset": {"path": "rows.jsonl", "format": "messages"},
    "hardware": {"gpu": "rtx-4090"},
}


def _arch(model_id: str = "Qwen/Qwen2.5-0.5B-Instruct") -> Any:
    arch = find_model(model_id)
    assert arch is not None
    return arch


def _full(**changes: Any) -> EstimateInput:
    inputs = EstimateInput(
        arch=_arch(),
        precision="bf16",
        finetuning="full",
        target_modules=(),
        lora_dropout=0.0,
        micro_batch=2,
        max_length=1024,
    )
    return replace(inputs, **changes)


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"precision": "4bit"}, "precision", "bitsandbytes weights"),
        ({"precision": "8bit"}, "precision", "cannot be trained"),
        ({"lora": {"r": 8}}, "lora", "no `lora` section"),
        ({"quantization": {"bnb_4bit_quant_type": "fp4"}}, "quantization", "no `quantization`"),
        (
            # Sharded full fine-tuning: SFT, or DPO without a reference copy
            # (tests/test_full_sharded.py).
            {
                "method": "dpo",
                "dataset": {"path": "p.jsonl", "format": "preference"},
                "hardware": {"gpu": "a100-80gb", "num_gpus": 2, "distributed": "fsdp"},
            },
            "dpo.precompute_ref_log_probs",
            "distributed: ddp",
        ),
    ],
)
def test_full_refuses_what_it_cannot_train(extra: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as error:
        SPEC_ADAPTER.validate_python({**BASE, **extra})
    message = str(error.value)
    assert f"{field}:" in message and words in message


def test_full_grpo_reference_cannot_miss_the_chat_template_tokens() -> None:
    spec = {
        **BASE,
        "method": "grpo",
        "dataset": {"path": "p.jsonl", "format": "prompt", "chat_template": "chatml"},
        "training": {"gradient_accumulation_steps": 8},
        "grpo": {"reward_funcs": ["format"], "beta": 0.1},
    }
    with pytest.raises(ValidationError) as error:
        SPEC_ADAPTER.validate_python(spec)
    assert "dataset.chat_template:" in str(error.value)
    spec["grpo"] = {"reward_funcs": ["format"]}  # beta 0: no reference
    assert SPEC_ADAPTER.validate_python(spec).finetuning == "full"


def test_full_with_ddp_and_default_sections_is_accepted() -> None:
    spec = SPEC_ADAPTER.validate_python(
        {
            **BASE,
            "hardware": {"gpu": "a100-80gb", "num_gpus": 2, "distributed": "ddp"},
            # what emit's spec.yaml writes for a LoRA spec's defaults
            "lora": {"r": 16},
        }
    )
    assert spec.finetuning == "full"


def test_full_trains_every_parameter_with_fp32_state() -> None:
    inputs = _full()
    params = memory.base_parameter_count(inputs.arch)
    result = estimate(inputs)
    assert result.trainable_parameters == result.total_parameters == params
    assert result.weights_bytes == 4 * params
    assert result.adapter_bytes == 0
    assert result.gradient_bytes == 4 * params
    assert memory.optimizer_state_bytes(inputs) == 8 * params


@pytest.mark.parametrize(
    ("optim", "low", "high"),
    [
        ("adamw_torch", 8.0, 8.0),
        ("adamw_torch_fused", 8.0, 8.0),
        ("adamw_8bit", 2.0, 2.1),  # uint8 states + an fp32 absmax per 256
        ("lion_8bit", 1.0, 1.05),
        ("lion_32bit", 4.0, 4.0),
        ("sgd", 0.0, 0.0),
        ("adafactor", 0.0, 0.05),  # factored rows and columns
    ],
)
def test_optimizer_bytes_per_parameter(optim: str, low: float, high: float) -> None:
    inputs = _full(optim=optim)
    params = memory.base_parameter_count(inputs.arch)
    per = memory.optimizer_state_bytes(inputs) / params
    assert low <= per <= high, per


def test_paged_states_live_in_managed_memory() -> None:
    inputs = _full(optim="paged_adamw_32bit")
    params = memory.base_parameter_count(inputs.arch)
    assert memory.managed_optimizer_bytes(inputs) > 7.9 * params
    assert memory.optimizer_state_bytes(inputs) < 0.1 * params


@pytest.mark.parametrize("model_id", ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B"])
def test_optimizer_bytes_scale_with_all_parameters(model_id: str) -> None:
    small = _full(arch=_arch(model_id))
    params = memory.base_parameter_count(small.arch)
    lora = replace(small, finetuning="lora", target_modules="all-linear", lora_r=16)
    assert memory.optimizer_state_bytes(small) == 8 * params
    assert memory.optimizer_state_bytes(lora) < 0.1 * memory.optimizer_state_bytes(small)


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("model_id", ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B"])
def test_full_needs_at_least_what_lora_needs(
    method: str, checkpointing: bool, model_id: str
) -> None:
    full = _full(arch=_arch(model_id), method=method, gradient_checkpointing=checkpointing)
    lora = replace(full, finetuning="lora", target_modules="all-linear", lora_dropout=0.05)
    a, b = estimate(full), estimate(lora)
    assert a.peak_allocated_bytes > b.peak_allocated_bytes
    assert a.weights_bytes + a.gradient_bytes + a.optimizer_bytes > 3 * b.weights_bytes


def test_autocast_casts_are_saved_without_checkpointing_and_cached_with_it() -> None:
    inputs = _full(gradient_checkpointing=False)
    casts = memory.full_decoder_cast_bytes(inputs)
    params = sum(m.weight_parameters for m in memory.language_linear_modules(inputs.arch))
    assert casts == 2 * params - 2 * params % inputs.arch.config.num_hidden_layers
    # Without checkpointing every layer's casts are kept for its backward ...
    assert memory.kept_activation_bytes(inputs) > casts
    # ... with it, the forward's end still holds them in autocast's cache.
    with_gc = replace(inputs, gradient_checkpointing=True)
    assert memory.kept_activation_bytes(with_gc) < casts
    assert memory.logits_bytes(with_gc) > casts


def test_reference_copy_for_dpo_unless_precomputed() -> None:
    params = memory.base_parameter_count(_arch())
    with_reference = _full(method="dpo", reference_model=True)
    assert memory.weights_bytes(with_reference) == (4 + 2) * params
    plan_spec = {**BASE, "method": "dpo", "dataset": {"path": "r.jsonl", "format": "preference"}}
    from peftgen.plan import needs_reference_copy

    assert needs_reference_copy(SPEC_ADAPTER.validate_python(plan_spec))
    precomputed = {**plan_spec, "dpo": {"precompute_ref_log_probs": True}}
    assert not needs_reference_copy(SPEC_ADAPTER.validate_python(precomputed))
    grpo = {
        **BASE,
        "method": "grpo",
        "dataset": {"path": "r.jsonl", "format": "prompt"},
        "grpo": {"reward_funcs": ["format"]},
        "training": {"gradient_accumulation_steps": 8},
    }
    assert not needs_reference_copy(SPEC_ADAPTER.validate_python(grpo))
    grpo["grpo"] = {"reward_funcs": ["format"], "beta": 0.04}
    assert needs_reference_copy(SPEC_ADAPTER.validate_python(grpo))


@pytest.mark.parametrize(
    "arch",
    [a for a in model_catalogue() if a.config.model_type in ("llama", "qwen2")][:6],
    ids=lambda a: a.id,
)
def test_full_parameter_count_matches_transformers_on_meta(arch: Any) -> None:
    # Plain imports: the train extra is part of the test install; a missing oracle fails.
    import torch
    import transformers

    from peftgen.catalog import config_dict

    config = transformers.AutoConfig.for_model(**config_dict(arch))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert memory.trainable_parameter_count(arch, _full(arch=arch)) == sum(
        p.numel() for p in trainable
    )
    shapes = memory.full_parameter_shapes(arch)
    assert sum(r * c * n for r, c, n in shapes) == sum(p.numel() for p in trainable)
    # the matrices the 8-bit and factored rules see are the model's own
    built = sorted(p.numel() for p in trainable if p.dim() == 2)
    modelled = sorted(r * c for r, c, n in shapes if c > 1 for _ in range(n))
    assert built == modelled


def test_full_plan_has_one_candidate_and_no_comparison_column() -> None:
    plan = make_plan(resolve(load_spec(FULL_SPEC)))
    assert [c.precision for c in plan.candidates] == ["bf16"]
    assert plan.chosen_precision == "bf16" and plan.fits
    assert plan.full_finetuning is None
    assert plan.trainable_parameters == plan.total_parameters
    knobs = {d.knob: d.value for d in plan.decisions}
    assert knobs["finetuning"] == "full" and "adapter_dtype" not in knobs
    assert any(note.startswith("finetuning: full trains all") for note in plan.notes)


def test_lora_plan_shows_full_finetuning_and_never_chooses_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = make_plan(resolve(load_spec(LORA_SPEC)))
    full = plan.full_finetuning
    assert full is not None
    assert full.peak_reserved_bytes > max(c.peak_reserved_bytes for c in plan.candidates)
    assert plan.chosen_precision in {c.precision for c in plan.candidates}
    assert main(["plan", str(LORA_SPEC), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["full_finetuning"]["peak_reserved_bytes"] == full.peak_reserved_bytes
    assert data["full_finetuning"]["breakdown"]["adapter_bytes"] == 0
    assert main(["plan", str(LORA_SPEC)]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning" in out and "not chosen" in out


def test_full_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(FULL_SPEC)]) == 0
    out = capsys.readouterr().out
    assert "trainable%: 100.0000" in out
    assert "finetuning = full" in out
    assert "full fine-tuning (finetuning: full, not chosen)" not in out


def test_emitted_full_script_has_no_peft_and_no_merge(tmp_path: Path) -> None:
    assert main(["emit", str(FULL_SPEC), "-o", str(tmp_path / "out")]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "merge.py" not in names and "train.py" in names
    script = (tmp_path / "out" / "train.py").read_text(encoding="utf-8")
    assert "peft" not in script.split('"""')[0]  # the PEP 723 header
    assert "from peft" not in script and "LoraConfig" not in script
    assert "dtype=torch.float32" in script and "bf16=True" in script
    assert "trainer.save_model(OUTPUT_DIR)" in script
    # the written spec loads again
    reloaded = load_spec(tmp_path / "out" / "spec.yaml")
    assert reloaded.spec.finetuning == "full"


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_estimate_matches_one_simulated_step(checkpointing: bool, tmp_path: Path) -> None:
    """One step of the real torch / transformers / trl code on fake tensors (fp32 weights,
    CPU autocast in bf16, AdamW): the analytic peak within 5 %, and with one micro-batch per
    step no gradients during the forward."""
    from peftgen.simulate import simulate_candidate

    spec = tmp_path / "sim.yaml"
    spec.write_text(
        "name: sim\nmethod: sft\nfinetuning: full\nmodel:\n  id: HuggingFaceTB/SmolLM2-135M\n"
        "dataset:\n  path: rows.jsonl\n  format: text\nhardware:\n  gpu: rtx-4090\n"
        "precision: bf16\ntraining:\n  max_length: 1024\n  per_device_train_batch_size: 4\n"
        "  gradient_accumulation_steps: 1\n"
        f"  gradient_checkpointing: {str(checkpointing).lower()}\n",
        encoding="utf-8",
    )
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    resolved = resolve(load_spec(spec))
    plan = make_plan(resolved)
    simulated = simulate_candidate(resolved, "bf16")
    analytic = plan.candidates[0].peak_allocated_bytes
    assert abs(analytic - simulated.peak_allocated_bytes) <= 0.05 * simulated.peak_allocated_bytes
    assert simulated.phases["forward"].by_category["gradients"] == 0
