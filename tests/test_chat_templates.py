"""peftgen.chat_templates: the shipped templates are what they claim, checked by the real stack.

The oracles are independent of the implementation: transformers' own
``apply_chat_template`` renders the original and the training template (the strings must
be identical) and computes the assistant mask (what it covers must be each assistant
message as the model writes it plus the end-of-turn token, spelled out here per family);
trl's own ``is_chat_template_stop_token_trained`` and ``get_training_chat_template`` say
whether the stop token is trained and whether trl patches a family itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from peftgen.catalog.lookup import arch_from_folder, model_catalogue
from peftgen.chat_templates import (
    CHATML,
    FAMILIES,
    family_for_training,
    has_generation_markers,
    identify,
)

if TYPE_CHECKING:  # transformers is imported by the tests that use it, not at collection
    from transformers import PreTrainedTokenizerFast

# ChatML exactly as the generated scripts install it on a base model: Jinja string literals
# with backslash-n escapes (peftgen.render's CHATML_TEMPLATE at the time of writing).
CHATML_WITH_ESCAPES = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same ChatML with real newlines inside the literals, as tests/tiny_model.py writes it.
CHATML_WITH_NEWLINES = CHATML_WITH_ESCAPES.replace("\\n", "\n")

# Families peftgen must ship a training template for: trl 1.16 cannot patch them.
EXPECTED_OWN_TRAINING = {"llama3_1", "llama3_2", "mistral_v1", "mistral_v3", "chatml"}
# Families trl 1.16's get_training_chat_template patches itself.
EXPECTED_TRL_PATCHED = {
    "llama3",
    "qwen2_5",
    "qwen3",
    "gemma",
    "gemma3",
    "phi3",
    "phi3_5",
    "deepseek_r1_distill",
}

# What the model writes for one assistant message, end-of-turn token included: exactly the
# text the assistant mask must cover. Written from each template's documented format.
ASSISTANT_TEXT: dict[str, Callable[[str], str]] = {
    "llama3_1": lambda content: content.strip() + "<|eot_id|>",
    "llama3_2": lambda content: content.strip() + "<|eot_id|>",
    # "[/INST]" is followed by a space the tokenizer merges into the first content token.
    "mistral_v1": lambda content: " " + content + "</s>",
    "mistral_v3": lambda content: " " + content.strip() + "</s>",
    "chatml": lambda content: content + "<|im_end|>",
}
END_OF_TURN = {
    "llama3": "<|eot_id|>",
    "llama3_1": "<|eot_id|>",
    "llama3_2": "<|eot_id|>",
    "qwen2_5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "phi3": "<|end|>",
    "phi3_5": "<|end|>",
    "deepseek_r1_distill": "<｜end▁of▁sentence｜>",
    "mistral_v1": "</s>",
    "mistral_v3": "</s>",
    "chatml": "<|im_end|>",
}

LLAMA3_TOKENS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
MISTRAL_TOKENS = [
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]
# Per family: bos, eos and the special tokens the template writes.
SPECIAL_TOKENS: dict[str, tuple[str, str, list[str]]] = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3_TOKENS),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3_TOKENS),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3_TOKENS),
    "mistral_v1": ("<s>", "</s>", MISTRAL_TOKENS),
    "mistral_v3": ("<s>", "</s>", MISTRAL_TOKENS),
    "chatml": ("<s>", "<|im_end|>", ["<s>", "<|im_start|>", "<|im_end|>"]),
    "qwen2_5": ("<|endoftext|>", "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "qwen3": ("<|endoftext|>", "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "gemma": ("<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "gemma3": ("<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "phi3": (
        "<s>",
        "<|endoftext|>",
        ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    ),
    "phi3_5": (
        "<s>",
        "<|endoftext|>",
        ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    ),
    "deepseek_r1_distill": (
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
    ),
}

SYSTEM = {"role": "system", "content": "You are a careful clinical assistant."}
PROBES: list[tuple[str, list[dict[str, Any]], bool]] = [
    (
        "system-user-assistant",
        [
            SYSTEM,
            {"role": "user", "content": "What is the body mass index at 82 kg and 1.75 m?"},
            {"role": "assistant", "content": "The BMI is 26.8."},
        ],
        False,
    ),
    (
        "multi-turn",
        [
            {"role": "user", "content": "Summarise the discharge note."},
            {"role": "assistant", "content": "The patient is a 64-year-old man."},
            {"role": "user", "content": "Report the result as JSON."},
            {"role": "assistant", "content": '{"score": 2, "interpretation": "moderate"}'},
        ],
        False,
    ),
    (
        "no-system-whitespace",
        [
            {"role": "user", "content": "Blood pressure 142/88 mmHg?"},
            {"role": "assistant", "content": "Stage 2 hypertension.\nRecheck in a week."},
        ],
        False,
    ),
    (
        "system-multi-turn",
        [
            SYSTEM,
            {"role": "user", "content": "Creatinine clearance?"},
            {"role": "assistant", "content": "It estimates kidney function."},
            {"role": "user", "content": "From what?"},
            {"role": "assistant", "content": "Age, weight and serum creatinine."},
        ],
        False,
    ),
    (
        "generation-prompt",
        [
            SYSTEM,
            {"role": "user", "content": "What is the hazard ratio?"},
            {"role": "assistant", "content": "It was 0.78."},
            {"role": "user", "content": "With what confidence interval?"},
        ],
        True,
    ),
]

TOOL = {
    "type": "function",
    "function": {
        "name": "bmi",
        "description": "Body mass index.",
        "parameters": {
            "type": "object",
            "properties": {"weight": {"type": "number"}, "height": {"type": "number"}},
            "required": ["weight", "height"],
        },
    },
}
TOOL_PROBE = [
    {"role": "user", "content": "BMI at 82 kg and 1.75 m?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "abc123XYZ",
                "type": "function",
                "function": {"name": "bmi", "arguments": {"weight": 82, "height": 1.75}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "bmi", "content": "26.8"},
    {"role": "assistant", "content": "The BMI is 26.8."},
]
TOOL_FAMILIES = {"llama3_1", "llama3_2", "mistral_v3"}

CORPUS = [
    "You are a careful clinical assistant. What is the body mass index?",
    "The BMI is 26.8. Stage 2 hypertension. Recheck in a week.",
    'Report the result as JSON: {"score": 2, "interpretation": "moderate"}',
    "Creatinine clearance estimates kidney function from age, weight and serum creatinine.",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 system user assistant",
]


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer that knows ``family``'s special tokens (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, specials = SPECIAL_TOKENS[family]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", *dict.fromkeys([bos, eos, *specials])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _render(
    tokenizer: PreTrainedTokenizerFast,
    template: str,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
    **extra: Any,
) -> str:
    rendered = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        date_string="26 Jul 2024",
        **extra,
    )
    assert isinstance(rendered, str)
    return rendered


def _masked_runs(
    tokenizer: PreTrainedTokenizerFast,
    template: str,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
) -> list[str]:
    """The decoded text of each contiguous run of tokens under the assistant mask."""
    output = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=generation_prompt,
        date_string="26 Jul 2024",
    )
    runs: list[list[int]] = []
    previous = 0
    for token_id, masked in zip(output["input_ids"], output["assistant_masks"], strict=True):
        if masked and not previous:
            runs.append([])
        if masked:
            runs[-1].append(token_id)
        previous = masked
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


TRAINED = sorted(name for name, family in FAMILIES.items() if family.training is not None)


def test_family_set_is_what_trl_leaves_to_peftgen() -> None:
    assert set(TRAINED) == EXPECTED_OWN_TRAINING
    assert {name for name, f in FAMILIES.items() if f.trl_patches} == EXPECTED_TRL_PATCHED
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.trl_patches == (family.training is None)
        assert family.end_of_turn == END_OF_TURN[name]
    assert CHATML is FAMILIES["chatml"]


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize(
    ("probe", "messages", "generation_prompt"), PROBES, ids=[p[0] for p in PROBES]
)
def test_training_template_renders_like_original_and_masks_assistant_turns(
    name: str, probe: str, messages: list[dict[str, Any]], generation_prompt: bool
) -> None:
    family = FAMILIES[name]
    assert family.training is not None
    tokenizer = _tokenizer(name)
    original = _render(tokenizer, family.original, messages, generation_prompt)
    training = _render(tokenizer, family.training, messages, generation_prompt)
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if system is None or system in original:
        assert training == original
    else:
        # The original drops the system prompt from a conversation ending with the answer
        # (Mistral v3 places it in the user turn only when that turn is the last message).
        assert name == "mistral_v3"
    # Trained as the model sees it at inference: the system prompt is in the text, and the
    # text extends the prompt the original renders for the last answer.
    assert system is None or system in training
    if messages[-1]["role"] == "assistant":
        prompt = _render(tokenizer, family.original, messages[:-1], True)
        assert training.startswith(prompt)
    expected = [
        ASSISTANT_TEXT[name](message["content"])
        for message in messages
        if message["role"] == "assistant"
    ]
    assert _masked_runs(tokenizer, family.training, messages, generation_prompt) == expected
    # The original has no markers, so transformers masks nothing (why peftgen ships these).
    assert _masked_runs(tokenizer, family.original, messages, generation_prompt) == []


@pytest.mark.parametrize("name", sorted(TOOL_FAMILIES))
def test_training_template_renders_tool_calls_like_original(name: str) -> None:
    family = FAMILIES[name]
    assert family.training is not None
    tokenizer = _tokenizer(name)
    for tools in ([TOOL], None):
        original = _render(tokenizer, family.original, TOOL_PROBE, False, tools=tools)
        training = _render(tokenizer, family.training, TOOL_PROBE, False, tools=tools)
        assert training == original
        assert "bmi" in original
    runs = _masked_runs(tokenizer, family.training, TOOL_PROBE, False)
    # The tool call and the final answer are the model's; each run ends on the stop token.
    assert len(runs) == 2
    assert '"bmi"' in runs[0]
    assert runs[1] == ASSISTANT_TEXT[name]("The BMI is 26.8.")
    assert all(run.endswith(family.end_of_turn) for run in runs)


@pytest.mark.parametrize("name", TRAINED)
def test_trl_says_the_stop_token_is_trained(name: str) -> None:
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    family = FAMILIES[name]
    tokenizer = _tokenizer(name)
    assert is_chat_template_stop_token_trained(tokenizer, chat_template=family.training)
    assert not is_chat_template_stop_token_trained(tokenizer, chat_template=family.original)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trl_patch_claim_holds_for_pinned_trl(name: str) -> None:
    from trl.chat_template_utils import (
        get_training_chat_template,
        is_chat_template_stop_token_trained,
    )

    family = FAMILIES[name]
    tokenizer = _tokenizer(name)
    tokenizer.chat_template = family.original
    if family.trl_patches:
        patched = get_training_chat_template(tokenizer)
        assert patched is not None
        assert has_generation_markers(patched)
        # What SFTTrainer will train with also teaches the model to stop.
        assert is_chat_template_stop_token_trained(tokenizer, chat_template=patched)
    else:
        with pytest.raises(ValueError, match="patching is not supported"):
            get_training_chat_template(tokenizer)
        # With peftgen's training template installed, trl has nothing left to patch.
        assert family.training is not None
        tokenizer.chat_template = family.training
        assert get_training_chat_template(tokenizer) is None


def test_trl_originals_are_byte_identical_copies() -> None:
    import trl

    stored = Path(trl.__file__).parent / "chat_templates"
    for name in sorted(EXPECTED_TRL_PATCHED | {"llama3_1", "llama3_2"}):
        assert FAMILIES[name].original.encode() == (stored / f"{name}.jinja").read_bytes(), name
        assert FAMILIES[name].verified_original


def test_chatml_is_peftgens_own() -> None:
    assert CHATML.original == CHATML_WITH_ESCAPES
    assert identify(CHATML_WITH_ESCAPES) is CHATML
    # tests/tiny_model.py spells the newlines out; same rendering, so the same family.
    assert identify(CHATML_WITH_NEWLINES) is CHATML
    tokenizer = _tokenizer("chatml")
    for _, messages, generation_prompt in PROBES:
        assert _render(tokenizer, CHATML_WITH_NEWLINES, messages, generation_prompt) == _render(
            tokenizer, CHATML_WITH_ESCAPES, messages, generation_prompt
        )


def test_identify() -> None:
    seen: set[str] = set()
    for family in FAMILIES.values():
        assert identify(family.original) is family
        assert not has_generation_markers(family.original)
        assert family.original not in seen  # no two families share bytes
        seen.add(family.original)
        if family.training is not None:
            assert identify(family.training) is family
            assert has_generation_markers(family.training)
        assert identify({"default": family.original, "tool_use": "x"}) is family
    assert identify(None) is None
    assert identify({"tool_use": FAMILIES["llama3_1"].original}) is None
    assert identify("{% for message in messages %}{{ message['content'] }}{% endfor %}") is None
    # One changed byte is a different template.
    assert identify(FAMILIES["llama3_1"].original + " ") is None
    assert identify(FAMILIES["mistral_v3"].original.rstrip("\n")) is None


def test_has_generation_markers_agrees_with_trl() -> None:
    from trl.chat_template_utils import has_generation_markers as trl_has_markers

    samples = [
        "{% generation %}x{% endgeneration %}",
        "{%- generation -%}x{%- endgeneration %}",
        "{%-generation%}x{% endgeneration %}",
        "no markers {{ generation }}",
        CHATML.original,
        *(f.training for f in FAMILIES.values() if f.training is not None),
    ]
    for sample in samples:
        assert has_generation_markers(sample) == trl_has_markers(sample), sample
    assert has_generation_markers({"default": "{% generation %}{% endgeneration %}"})


def test_family_for_training() -> None:
    assert family_for_training("llama3_1") is FAMILIES["llama3_1"]
    with pytest.raises(ValueError, match=r"known families: .*chatml.*llama3_1"):
        family_for_training("llama4")


def test_analytic_import_pulls_in_no_training_stack() -> None:
    code = (
        "import sys, peftgen.chat_templates as c; assert c.FAMILIES;"
        "bad = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_files_are_package_data() -> None:
    import peftgen.chat_templates as package

    data = Path(package.__file__).parent / "data"
    names = {path.name for path in data.glob("*.jinja")}
    for family in FAMILIES.values():
        assert f"{family.name}.jinja" in names
        assert (f"{family.name}_training.jinja" in names) == (family.training is not None)
    assert (data / "README.md").is_file()


def test_catalogue_families_are_known_and_only_on_chat_models() -> None:
    expected = {
        "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
        "meta-llama/Llama-3.1-8B-Instruct": "llama3_1",
        "meta-llama/Llama-3.3-70B-Instruct": "llama3_1",
        "meta-llama/Llama-3.2-1B-Instruct": "llama3_2",
        "Qwen/Qwen2.5-7B-Instruct": "qwen2_5",
        "Qwen/Qwen3-8B": "qwen3",
        "google/gemma-2-9b-it": "gemma",
        "google/gemma-3-1b-it": "gemma3",
        "microsoft/Phi-3-mini-4k-instruct": "phi3",
        "microsoft/Phi-3.5-mini-instruct": "phi3_5",
        "mistralai/Mistral-7B-Instruct-v0.3": "mistral_v3",
        "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistral_v1",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "deepseek_r1_distill",
        "meta-llama/Meta-Llama-3-8B": None,
        "Qwen/Qwen3-8B-Base": None,
    }
    by_id = {arch.id: arch for arch in model_catalogue()}
    for model_id, family in expected.items():
        assert by_id[model_id].chat_template_family == family, model_id
    for arch in by_id.values():
        if arch.chat_template_family is not None:
            assert arch.has_chat_template, arch.id
            assert arch.chat_template_family in FAMILIES, arch.id


def _folder(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("files", "family"),
    [
        ({"chat_template__jinja": CHATML_WITH_ESCAPES}, "chatml"),
        ({"chat_template__jinja": FAMILIES["llama3_2"].original}, "llama3_2"),
        (
            {"tokenizer_config__json": json.dumps({"chat_template": FAMILIES["qwen3"].original})},
            "qwen3",
        ),
        (
            {
                "tokenizer_config__json": json.dumps(
                    {
                        "chat_template": [
                            {"name": "default", "template": FAMILIES["mistral_v3"].original},
                            {"name": "tool_use", "template": "x"},
                        ]
                    }
                )
            },
            "mistral_v3",
        ),
        ({"chat_template__json": json.dumps({"chat_template": CHATML_WITH_NEWLINES})}, "chatml"),
        ({"chat_template__jinja": "{{ messages }}"}, None),
        ({"tokenizer_config__json": "{not json"}, None),
        ({"tokenizer_config__json": json.dumps({"chat_template": 3})}, None),
        ({"tokenizer_config__json": json.dumps(["odd"])}, None),
        ({"chat_template__json": "[1, 2]"}, None),
        ({}, None),
    ],
)
def test_local_folder_family(tmp_path: Path, files: dict[str, str], family: str | None) -> None:
    arch = arch_from_folder(_folder(tmp_path, **files))
    assert arch.chat_template_family == family


def test_local_folder_unreadable_template(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe not utf-8")
    assert arch_from_folder(folder).chat_template_family is None


def test_tiny_model_is_chatml(tiny_model_dir: Path, tiny_base_model_dir: Path) -> None:
    assert arch_from_folder(tiny_model_dir).chat_template_family == "chatml"
    assert arch_from_folder(tiny_base_model_dir).chat_template_family is None
