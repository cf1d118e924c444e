"""The catalogues: every model entry rebuilt with transformers, every lookup path.

Each model entry is built on the meta device (no weights, milliseconds even for 72B) and
compared with the catalogue's arithmetic: total parameters against the published count,
``linear_modules`` against the real ``nn.Linear`` modules, ``parameter_groups`` against
the real parameters sorted by the module that owns them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from peftgen.catalog import (
    ModelArch,
    ParameterGroups,
    arch_from_config,
    config_dict,
    find_model,
    gpu_catalogue,
    linear_modules,
    lookup_gpu,
    lookup_model,
    model_catalogue,
    moe_target_parameters,
    normalise_name,
    parameter_groups,
)
from peftgen.errors import UserError
from tools.catalogue import DOC_PATH, render_catalogue_markdown

MODELS = model_catalogue()

# Entries whose published count is not the built model's, and why. Qwen3-0.6B and 1.7B tie
# the output head to the embedding (transformers builds one tensor), but their safetensors
# also store lm_head.weight, and the hub's count (751,632,384 / 2,031,739,904) includes it:
# published = built + vocab_size * hidden_size, exactly. Memory follows the built model.
STORED_TIED_HEAD = frozenset(
    {"Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B-Base"}
)


@cache
def _built(config_json: str) -> Any:
    # Plain imports: the train extra is part of the test install, so a missing oracle
    # fails the suite (as in CI) instead of skipping.
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def build(arch: ModelArch) -> Any:
    return _built(json.dumps(config_dict(arch), sort_keys=True))


def _component(module_name: str) -> str:
    return "vision_tower" if "vision_tower" in module_name else "language_model"


def built_linears(model: Any) -> Counter[tuple[str, str, int, int, bool]]:
    """(component, leaf name, in, out, bias) -> count, for every nn.Linear but the head."""
    from torch import nn

    head = model.get_output_embeddings()
    found: Counter[tuple[str, str, int, int, bool]] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            leaf = name.rsplit(".", 1)[-1]
            key = (_component(name), leaf, module.in_features, module.out_features)
            found[(*key, module.bias is not None)] += 1
    return found


def built_groups(model: Any) -> ParameterGroups:
    """The built model's parameters, grouped by the kind of module that owns them."""
    from torch import nn

    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    totals: Counter[str] = Counter()
    seen: set[int] = set()
    for _, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # a tied head shares the embedding's tensor
            seen.add(id(param))
            kind = type(module).__name__
            if module is head:
                group = "lm_head"
            elif isinstance(module, nn.Linear):
                group = "linear_weight" if param_name == "weight" else "linear_bias"
            elif module is embed:
                group = "embedding"
            elif "Norm" in kind:
                group = "norm"
            elif "Experts" in kind:
                group = "moe_experts"
            elif "Router" in kind:
                group = "moe_router"
            else:
                group = "vision_other"
            totals[group] += param.numel()
    return ParameterGroups(**{field: totals[field] for field in ParameterGroups.__annotations__})


@pytest.mark.parametrize("arch", MODELS, ids=[arch.id for arch in MODELS])
def test_built_model_matches_catalogue(arch: ModelArch) -> None:
    model = build(arch)
    built_total = model.num_parameters()
    expected_published = built_total
    if arch.id in STORED_TIED_HEAD:
        assert arch.config.tie_word_embeddings
        expected_published += arch.config.vocab_size * arch.config.hidden_size
    assert arch.published_parameters == expected_published
    assert type(model).__name__ in arch.config.architectures

    predicted = Counter(
        {
            (m.component, m.name, m.in_features, m.out_features, m.bias): m.count
            for m in linear_modules(arch)
        }
    )
    assert predicted == built_linears(model)
    assert parameter_groups(arch) == built_groups(model)
    assert parameter_groups(arch).total == built_total


def test_mixtral_experts_and_router_are_not_linear() -> None:
    arch = find_model("mixtral-8x7b")
    assert arch is not None
    names = {module.name for module in linear_modules(arch)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    groups = parameter_groups(arch)
    # 32 layers x 8 experts x 3 matrices of 4096 x 14336: the bulk of Mixtral, unquantizable.
    assert groups.moe_experts == 32 * 8 * 3 * 4096 * 14336
    assert groups.moe_experts > 0.9 * groups.total


def test_peft_all_linear_adapts_mixtral_experts_as_modelled() -> None:
    """peft 0.21 maps all-linear onto Mixtral's fused experts and router (target_parameters)."""
    import peft
    import torch
    import transformers

    raw = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 3,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
    }
    arch = ModelArch(id="tiny", display_name="tiny", source="test", config=arch_from_config(raw))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config_dict(arch))
    )
    rank = 4
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear"))
    lora_by_target: Counter[str] = Counter()
    for name, param in adapted.named_parameters():
        if ".lora_" in name:
            owner = name.split(".lora_")[0].removesuffix(".base_layer")
            lora_by_target[owner.rsplit(".", 1)[-1]] += param.numel()
    expected = Counter(
        {m.name: rank * (m.in_features + m.out_features) * m.count for m in linear_modules(arch)}
    )
    targets = {t.name.removesuffix(".weight"): t for t in moe_target_parameters(arch)}
    # peft nests gate_up_proj and down_proj wrappers on the one ``experts`` module
    expected["experts"] = sum(
        targets[n].lora_parameters(rank) for n in ("gate_up_proj", "down_proj")
    )
    expected["gate"] = targets["gate"].lora_parameters(rank)
    assert lora_by_target == expected


def test_gemma3_multimodal_includes_vision_tower_linears() -> None:
    arch = find_model("gemma-3-4b-it")
    assert arch is not None
    vision = [m for m in linear_modules(arch) if m.component == "vision_tower"]
    assert {m.name for m in vision} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert all(m.count == 27 and m.bias for m in vision)


@pytest.mark.parametrize("arch", MODELS, ids=[arch.id for arch in MODELS])
def test_config_round_trips_through_arch_from_config(arch: ModelArch) -> None:
    assert arch_from_config(config_dict(arch)) == arch.config


def test_catalogues_validate_and_are_large_enough() -> None:
    assert len(MODELS) >= 30
    assert len(gpu_catalogue()) >= 30
    assert len({arch.config.model_type for arch in MODELS}) >= 8


@pytest.mark.parametrize("arch", MODELS, ids=[arch.id for arch in MODELS])
def test_model_names_are_unambiguous(arch: ModelArch) -> None:
    for name in (arch.id, arch.id.split("/")[-1], *arch.aliases):
        found = find_model(name)
        assert found is not None and found.id == arch.id, name


def test_gpu_names_are_unambiguous() -> None:
    owners: dict[str, set[str]] = {}
    for gpu in gpu_catalogue():
        for name in (gpu.name, *gpu.aliases):
            owners.setdefault(normalise_name(name), set()).add(gpu.name)
    assert {key: names for key, names in owners.items() if len(names) > 1} == {}


def test_gpu_flags_follow_compute_capability() -> None:
    for gpu in gpu_catalogue():
        ampere_or_newer = float(gpu.compute_capability) >= 8.0
        assert gpu.bf16 == ampere_or_newer, gpu.name
        assert gpu.flash_attention_2 == ampere_or_newer, gpu.name
        assert gpu.source, gpu.name


def test_gpu_spec_example_value() -> None:
    assert lookup_gpu("rtx-4090").memory_bytes == 25757220864


@pytest.mark.parametrize("typed", ["RTX 4090", "rtx_4090", "4090", "NVIDIA GeForce RTX 4090"])
def test_gpu_lookup_is_forgiving(typed: str) -> None:
    assert lookup_gpu(typed).name == "NVIDIA GeForce RTX 4090"


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("llama3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("LLAMA 3 8B", "meta-llama/Meta-Llama-3-8B"),
        ("meta-llama/meta-llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("Qwen2.5_7B_Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("mixtral", "mistralai/Mixtral-8x7B-v0.1"),
    ],
)
def test_model_lookup_is_forgiving(typed: str, expected: str, tmp_path: Path) -> None:
    assert lookup_model(typed, tmp_path, None, False).id == expected


def test_unknown_gpu_suggests_close_names() -> None:
    with pytest.raises(UserError) as caught:
        lookup_gpu("rtx 4900")
    problem = caught.value.problems[0]
    assert "rtx 4900" in problem.message
    assert problem.hint is not None and "4090" in problem.hint
    assert problem.line is None and problem.file is None


@pytest.mark.parametrize(
    ("typed", "hint"),
    [
        # An AMD card is not a 3090: no did-you-mean with another model number.
        ("MI300X", "see docs/catalogue.md for the catalogue, or omit hardware.gpu"),
        ("24GB", "that is a memory size, not a card: omit hardware.gpu and give"),
        ("RTX 4909", "did you mean 'rtx-4090'"),
    ],
)
def test_gpu_hints_name_what_the_user_meant(typed: str, hint: str) -> None:
    with pytest.raises(UserError) as caught:
        lookup_gpu(typed)
    said = caught.value.problems[0].hint
    assert said is not None and said.startswith(hint), said


def test_a_known_card_with_other_memory_is_told_in_the_words_of_the_place_that_named_it() -> None:
    with pytest.raises(UserError) as caught:
        lookup_gpu("RTX 4090 48GB", memory_override="give --gpu {gpu} --vram-gib {gb}")
    said = caught.value.problems[0].hint
    assert said == "for a card with other memory, give --gpu rtx-4090 --vram-gib 48"


def test_unknown_model_suggests_close_names(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        lookup_model("llama3-8x", tmp_path, None, False)
    hint = caught.value.problems[0].hint
    assert hint is not None and "'llama3-8b'" in hint


def test_offline_hub_id_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as caught:
        lookup_model("meta-llama/Meta-Llama-3-8X", tmp_path, None, False)
    problem = caught.value.problems[0]
    assert "offline" in problem.message
    assert problem.hint is not None
    assert "config.json" in problem.hint and "model.id" in problem.hint
    assert "meta-llama/Meta-Llama-3-8B" in problem.hint
    # The download lands where model.id, read from the spec's folder, looks (tmp_path is
    # outside the working directory, so the command names it absolutely).
    assert f"--local-dir {tmp_path.resolve() / 'models' / 'Meta-Llama-3-8X'}`" in problem.hint
    assert "set model.id: models/Meta-Llama-3-8X (relative to the spec's folder)" in problem.hint


def _write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_local_folder_is_relative_to_the_spec_dir_never_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = find_model("qwen2.5-0.5b")
    assert arch is not None
    _write_config(tmp_path / "models" / "mine", config_dict(arch))
    from_spec_dir = lookup_model("models/mine", tmp_path, None, False)
    assert from_spec_dir.config == arch.config
    assert from_spec_dir.source.endswith("config.json")
    # The same spec read from another working directory finds the same folder, and a
    # folder that only the working directory holds is not what the spec names.
    monkeypatch.chdir(tmp_path / "models")
    assert lookup_model("models/mine", tmp_path, None, False).config == arch.config
    with pytest.raises(UserError, match="unknown model 'mine'"):
        lookup_model("mine", tmp_path / "elsewhere", None, False)


def test_local_folder_chat_template_detection(
    tiny_model_dir: Path, tiny_base_model_dir: Path
) -> None:
    chat = lookup_model(str(tiny_model_dir), Path.cwd(), None, False)
    base = lookup_model(str(tiny_base_model_dir), Path.cwd(), None, False)
    assert chat.has_chat_template and not base.has_chat_template
    assert chat.config.model_type == "llama"


def test_local_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no config\.json"):
        lookup_model("empty", tmp_path, None, False)


def test_config_variants_are_normalised() -> None:
    bare = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16",
    }
    config = arch_from_config(bare)
    assert (config.head_dim, config.num_key_value_heads) == (32, 8)
    assert config.tie_word_embeddings is False
    assert "torch_dtype" not in config.extra
    moe = arch_from_config({**bare, "model_type": "mixtral", "num_experts": 4})
    assert moe.num_local_experts == 4
    gemma = arch_from_config({**bare, "model_type": "gemma2", "head_dim": 64})
    assert gemma.tie_word_embeddings is True and gemma.head_dim == 64


def test_nested_text_config_is_read() -> None:
    arch = find_model("gemma-3-12b")
    assert arch is not None
    nested = config_dict(arch)
    assert "text_config" in nested and "hidden_size" not in nested
    parsed = arch_from_config(nested)
    assert (parsed.hidden_size, parsed.text_config_model_type) == (3840, "gemma3_text")
    assert parsed.wrapper_extra["vision_config"]["num_hidden_layers"] == 27


def test_unsupported_model_type_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"not one peftgen can estimate"):
        arch_from_config({"model_type": "gpt2", "n_embd": 768})


def test_catalogue_doc_is_current() -> None:
    expected = render_catalogue_markdown()
    current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    assert current == expected, "docs/catalogue.md is stale: run python -m tools.catalogue"


def test_catalogue_does_not_import_torch() -> None:
    code = (
        "import sys, pathlib, peftgen.catalog as c;"
        "c.lookup_model('llama3-8b', pathlib.Path('.'), None, False);"
        "c.linear_modules(c.find_model('mixtral'));"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
