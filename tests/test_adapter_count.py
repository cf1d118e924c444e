"""The estimator's parameter counts equal what peft itself reports.

For every distinct architecture config in the catalogue (base and instruct checkpoints
share one), the model transformers builds from the config is instantiated on the meta
device (no memory, no weights), wrapped by peft's ``get_peft_model``, and peft's
``get_nb_trainable_parameters`` (what ``print_trainable_parameters`` prints) is compared
with ``peftgen.memory``. The counts depend on the config alone, so one entry per config
covers every entry. torch, transformers and peft are imported when a test runs, not at
collection, and plainly: the train extra is part of the test install, so a missing one
fails the suite instead of skipping the oracle.
"""

from __future__ import annotations

from typing import Any

import pytest

from peftgen.catalog import ModelArch, config_dict, model_catalogue
from peftgen.memory import EstimateInput, peft_total_parameter_count, trainable_parameter_count

CATALOGUE = model_catalogue()
DISTINCT = list({arch.config.model_dump_json(): arch for arch in reversed(CATALOGUE)}.values())[
    ::-1
]
"""One catalogue entry per distinct config (the first that has it), in catalogue order."""
FIRST_FEW = CATALOGUE[:3]


def hf_config(arch: ModelArch) -> Any:
    """The transformers config the catalogue entry describes."""
    import transformers

    return transformers.AutoConfig.for_model(**config_dict(arch))


def peft_counts(arch: ModelArch, **lora_kwargs: Any) -> tuple[int, int]:
    """(trainable, all) parameters as peft counts them for a meta-device model."""
    import peft
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(arch))
    config = peft.LoraConfig(r=lora_kwargs.pop("r", 16), **lora_kwargs)
    # peft 0.21.2 skips ensure_weight_tying under low_cpu_mem_usage.
    low_memory = not config.ensure_weight_tying
    wrapped = peft.get_peft_model(model, config, low_cpu_mem_usage=low_memory)
    trainable, total = wrapped.get_nb_trainable_parameters()
    return int(trainable), int(total)


def ours(arch: ModelArch, **kwargs: Any) -> tuple[int, int]:
    inputs = EstimateInput(arch=arch, precision="bf16", **kwargs)
    return trainable_parameter_count(arch, inputs), peft_total_parameter_count(arch, inputs)


def test_distinct_configs_cover_the_catalogue() -> None:
    configs = {arch.config.model_dump_json() for arch in CATALOGUE}
    assert {arch.config.model_dump_json() for arch in DISTINCT} == configs
    assert len(DISTINCT) == len(configs) < len(CATALOGUE)


@pytest.mark.parametrize("arch", DISTINCT, ids=lambda a: a.id)
def test_all_linear_matches_peft(arch: ModelArch) -> None:
    expected = peft_counts(arch, r=16, target_modules="all-linear")
    assert ours(arch, lora_r=16, target_modules="all-linear") == expected


@pytest.mark.parametrize("arch", DISTINCT, ids=lambda a: a.id)
def test_listed_modules_match_peft(arch: ModelArch) -> None:
    from peftgen.catalog import linear_modules

    names = tuple(m.name for m in linear_modules(arch))
    listed = (names[0], names[-1])
    expected = peft_counts(arch, r=8, target_modules=list(listed))
    assert ours(arch, lora_r=8, target_modules=listed) == expected


@pytest.mark.parametrize("arch", FIRST_FEW, ids=lambda a: a.id)
def test_dora_matches_peft(arch: ModelArch) -> None:
    expected = peft_counts(arch, r=16, target_modules="all-linear", use_dora=True)
    assert ours(arch, lora_r=16, target_modules="all-linear", use_dora=True) == expected


@pytest.mark.parametrize("arch", FIRST_FEW, ids=lambda a: a.id)
def test_modules_to_save_matches_peft(arch: ModelArch) -> None:
    saved = ["embed_tokens", "lm_head"]
    # As the emitted script configures it: one trained copy of tied embeddings.
    expected = peft_counts(
        arch,
        r=16,
        target_modules="all-linear",
        modules_to_save=saved,
        ensure_weight_tying=arch.config.tie_word_embeddings,
    )
    got = ours(arch, lora_r=16, target_modules="all-linear", modules_to_save=tuple(saved))
    assert got == expected


def test_llama3_8b_matches_peft_printout() -> None:
    """The figure every QLoRA tutorial prints for Llama-3-8B, r=16, all-linear."""
    from peftgen.catalog import find_model

    arch = find_model("meta-llama/Meta-Llama-3-8B")
    assert arch is not None
    assert ours(arch, lora_r=16, target_modules="all-linear") == (41_943_040, 8_072_204_288)
