"""The spec models, their JSON Schema and the generated reference.

The checked-in schema (``specs/peftgen.schema.json``) and reference (``docs/spec-reference.md``)
are generated; these tests fail when either drifts from the models.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from peftgen.load import KEY_ALIASES
from peftgen.spec import SPEC_ADAPTER, GrpoRunSpec, SftSpec, spec_json_schema
from tools.docs import (
    README_PATH,
    REFERENCE_PATH,
    REGENERATE_COMMAND,
    SCHEMA_PATH,
    readme_with_reference,
    reference_markdown,
    schema_text,
)


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "clinical-sft",
        "method": "sft",
        "model": {"id": "llama3-8b"},
        "dataset": {"path": "data.jsonl", "format": "messages"},
        "hardware": {"gpu": "rtx-4090"},
    }
    spec.update(overrides)
    return spec


def _grpo(training: dict[str, Any], grpo: dict[str, Any], **hardware: Any) -> dict[str, Any]:
    return _spec(
        method="grpo",
        dataset={"path": "prompts.jsonl", "format": "prompt"},
        hardware={"gpu": "a100-80gb", **hardware},
        training=training,
        grpo={"reward_funcs": ["format"], **grpo},
    )


def _messages(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        SPEC_ADAPTER.validate_python(data)
    return [str(error["msg"]) for error in caught.value.errors()]


def test_checked_in_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        f"{SCHEMA_PATH.name} is stale; regenerate it with `{REGENERATE_COMMAND}` "
        "(or `peftgen schema -o specs/peftgen.schema.json`)"
    )


def test_checked_in_reference_is_current() -> None:
    assert REFERENCE_PATH.read_text(encoding="utf-8") == reference_markdown(), (
        f"docs/{REFERENCE_PATH.name} is stale; regenerate it with `{REGENERATE_COMMAND}`"
    )


def test_readme_spec_reference_is_current() -> None:
    readme = README_PATH.read_text(encoding="utf-8")
    assert readme == readme_with_reference(readme), (
        f"README.md's spec reference is stale; regenerate it with `{REGENERATE_COMMAND}`"
    )


def test_reference_lists_every_field_of_every_section() -> None:
    text = reference_markdown()
    for model in (SftSpec, GrpoRunSpec):
        for name, info in model.model_fields.items():
            assert f"| `{name}` |" in text
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                for field_name in annotation.model_fields:
                    assert f"| `{field_name}` |" in text, f"{name}.{field_name}"
    for alias in KEY_ALIASES:
        assert f"| `{alias.key}` |" in text


def test_schema_is_a_discriminated_union_with_one_line_descriptions() -> None:
    schema = spec_json_schema()
    assert schema["discriminator"] == {
        "mapping": {
            "dpo": "#/$defs/DpoRunSpec",
            "grpo": "#/$defs/GrpoRunSpec",
            "sft": "#/$defs/SftSpec",
        },
        "propertyName": "method",
    }
    text = json.dumps(schema)
    assert "\\n" not in text
    lora = schema["$defs"]["LoraSpec"]  # type: ignore[index]
    assert lora["additionalProperties"] is False
    assert lora["properties"]["r"]["exclusiveMinimum"] == 0


def test_a_minimal_spec_takes_the_documented_defaults() -> None:
    spec = SPEC_ADAPTER.validate_python(_spec())
    assert isinstance(spec, SftSpec)
    assert (spec.precision, spec.lora.r, spec.lora.target_modules) == ("auto", 16, "all-linear")
    assert spec.resolved_output_dir == "outputs/clinical-sft"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora": {"lora_alpha": float("inf")}}, "Input should be a finite number"),
        ({"lora": {"target_modules": []}}, "list at least one module name"),
        ({"lora": {"target_modules": ["q_proj", "q_proj"]}}, "lists a module name twice"),
        ({"training": {"save_strategy": "best"}}, "Input should be 'no', 'steps' or 'epoch'"),
        # Without `distributed` the spec is valid: resolve fills in the recommended engine
        # (tests/test_plan_honest.py); only a written `none` is refused.
        (
            {"hardware": {"gpu": "t4", "num_gpus": 2, "distributed": "none"}},
            "distributed: 2 GPUs need",
        ),
        ({"hardware": {}}, "gpu: give `gpu` (a catalogue name) or `vram_gib`"),
        ({"dataset": {"path": "d.jsonl", "format": "preference"}}, "dataset.format: 'preference'"),
    ],
)
def test_rules_name_the_field_they_are_about(overrides: dict[str, Any], message: str) -> None:
    assert any(message in text for text in _messages(_spec(**overrides)))


def test_grpo_generation_batch_must_hold_whole_groups() -> None:
    groups_split = _grpo({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}, {})
    (message,) = _messages(groups_split)
    assert "grpo.num_generations: 8 must divide" in message and "= 2 x 1 x 2 = 4" in message
    # Two GPUs double the generation batch: 2 x 2 x 2 = 8 holds one group of 8.
    whole = _grpo(
        {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        {},
        num_gpus=2,
        distributed="ddp",
    )
    assert isinstance(SPEC_ADAPTER.validate_python(whole), GrpoRunSpec)


def test_grpo_rewards_are_checked_per_item() -> None:
    data = _grpo({}, {"reward_funcs": ["format", "rewards.py:score", "lenght"]})
    with pytest.raises(ValidationError) as caught:
        SPEC_ADAPTER.validate_python(data)
    (error,) = caught.value.errors()
    assert error["loc"] == ("grpo", "grpo", "reward_funcs", 2)
    assert "unknown reward 'lenght'" in str(error["msg"])


def test_fsdp_with_4bit_needs_bf16_storage() -> None:
    base = _spec(
        precision="4bit",
        hardware={"gpu": "a100-80gb", "num_gpus": 2, "distributed": "fsdp"},
    )
    # Left out, the storage is not refused here: resolve sets the compute dtype.
    assert SPEC_ADAPTER.validate_python(base).quantization.bnb_4bit_quant_storage == "uint8"
    base["quantization"] = {"bnb_4bit_quant_storage": "uint8"}
    (message,) = _messages(base)
    assert message.startswith("Value error, quantization.bnb_4bit_quant_storage: FSDP with 4-bit")
    base["quantization"] = {"bnb_4bit_quant_storage": "bfloat16"}
    assert SPEC_ADAPTER.validate_python(base).quantization.bnb_4bit_quant_storage == "bfloat16"
