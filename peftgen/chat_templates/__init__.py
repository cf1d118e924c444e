"""Chat templates peftgen knows by heart, and the training variants assistant-only loss needs.

trl 1.16 computes an SFT loss on assistant turns only (``SFTConfig(assistant_only_loss=True)``)
by asking transformers for an assistant mask (``return_assistant_tokens_mask=True``), and
transformers can only build that mask from a chat template that wraps what the assistant
says in ``{% generation %}`` / ``{% endgeneration %}``. Model repositories ship templates
without those markers. ``trl.chat_template_utils.get_training_chat_template`` swaps in a
marked copy for the families trl stores (the original Llama 3, Qwen 2.5, Qwen 3, Gemma 2,
Gemma 3, Phi-3, Phi-3.5, DeepSeek-R1-Distill, ...) and raises "patching is not supported"
for any other template: Llama 3.1 / 3.2 / 3.3, Mistral, and the plain ChatML peftgen
installs itself. For those, peftgen ships its own training template here.

Every family is data: ``data/<name>.jinja`` is the template as the model repository ships
it (a byte-identical copy of trl's stored original where trl has one), and, only for the
families trl does not patch, ``data/<name>_training.jinja`` is that template with the
markers around each assistant message's output *and* its end-of-turn token, so the model
learns to stop. A training template renders byte-identically to its original for every
conversation; only the assistant mask differs (``tests/test_chat_templates.py`` proves
both with transformers' real renderer).

This module is the facts layer only: stdlib, no peftgen imports, no torch/transformers,
so the analytic path (plan, render) can use it without the training stack installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

__all__ = [
    "CHATML",
    "CHATML_SPECIAL_TOKENS",
    "FAMILIES",
    "ChatTemplateFamily",
    "family_for_training",
    "has_generation_markers",
    "identify",
    "read_template",
]

DATA_DIR = Path(__file__).parent / "data"
"""Where the ``.jinja`` files live (shipped in the wheel as package data)."""


@dataclass(frozen=True)
class ChatTemplateFamily:
    """One chat template as a model repository ships it, and how to train on it.

    ``identify`` matches a tokenizer's template against ``original`` (and ``training``,
    and ``also_matches``) byte for byte, so a family is a fact about exact text, not about
    a model name: two checkpoints that ship the same bytes are the same family.
    """

    name: str
    """Key in ``FAMILIES`` and stem of the data files, e.g. ``llama3_1``."""
    description: str
    """Which checkpoints ship it, e.g. ``Llama 3.1 / 3.3 Instruct``."""
    original: str
    """The template as the model repository ships it."""
    training: str | None
    """peftgen's marked template (renders exactly like ``original``, but for
    ``training_change``); None when trl 1.16 patches this family itself, so the generated
    script must leave it to trl."""
    trl_patches: bool
    """trl 1.16's ``get_training_chat_template`` recognises ``original`` and returns its
    own marked copy (SFTTrainer does that by itself when ``assistant_only_loss=True``)."""
    end_of_turn: str
    """Text of the token that ends an assistant turn (what the model must learn to emit
    to stop), e.g. ``<|eot_id|>``; for templates that end it with ``eos_token``, the eos
    text of the tokenizers that ship the template (``</s>``)."""
    verified_original: bool = True
    """``original`` is known to be the shipped bytes: trl's stored copy (kept in sync by
    trl's drift check against the hub) or peftgen's own ChatML. False where peftgen
    transcribed it from third-party copies it could not check against the model
    repository; callers then rely on ``identify`` on the real tokenizer (an exact match
    proves the bytes) rather than on the catalogue's say-so."""
    source: str = ""
    """Where ``original`` comes from."""
    training_change: str | None = None
    """What ``training`` renders differently from ``original``, besides the markers, and
    why (the generated script's comment says it); None when it renders identically."""
    also_matches: tuple[str, ...] = field(default=())
    """Other spellings of ``original`` that render identically and that ``identify``
    should also recognise (e.g. ChatML with real newlines instead of ``\\n`` escapes)."""


def read_template(name: str) -> str:
    """The text of ``data/<name>.jinja`` exactly as stored (no newline translation)."""
    with (DATA_DIR / f"{name}.jinja").open(encoding="utf-8", newline="") as handle:
        return handle.read()


# (name, description, trl patches it, end-of-turn text, original verified, source)
_TABLE: tuple[tuple[str, str, bool, str, bool, str], ...] = (
    (
        "llama3",
        "Llama 3 Instruct (Meta-Llama-3-8B/70B-Instruct)",
        True,
        "<|eot_id|>",
        True,
        "trl 1.16 trl/chat_templates/llama3.jinja",
    ),
    (
        "llama3_1",
        "Llama 3.1 Instruct; Llama 3.3 Instruct is mapped here too (believed identical)",
        False,
        "<|eot_id|>",
        True,
        "trl 1.16 trl/chat_templates/llama3_1.jinja",
    ),
    (
        "llama3_2",
        "Llama 3.2 Instruct (1B/3B)",
        False,
        "<|eot_id|>",
        True,
        "trl 1.16 trl/chat_templates/llama3_2.jinja",
    ),
    (
        "qwen2_5",
        "Qwen2.5 Instruct",
        True,
        "<|im_end|>",
        True,
        "trl 1.16 trl/chat_templates/qwen2_5.jinja",
    ),
    (
        "qwen3",
        "Qwen3 (hybrid-thinking checkpoints, not -Base, not -2507)",
        True,
        "<|im_end|>",
        True,
        "trl 1.16 trl/chat_templates/qwen3.jinja",
    ),
    (
        "gemma",
        "Gemma 2 instruction-tuned (-it); Gemma 1 ships the same template",
        True,
        "<end_of_turn>",
        True,
        "trl 1.16 trl/chat_templates/gemma.jinja",
    ),
    (
        "gemma3",
        "Gemma 3 instruction-tuned (-it)",
        True,
        "<end_of_turn>",
        True,
        "trl 1.16 trl/chat_templates/gemma3.jinja",
    ),
    (
        "phi3",
        "Phi-3 mini instruct",
        True,
        "<|end|>",
        True,
        "trl 1.16 trl/chat_templates/phi3.jinja",
    ),
    (
        "phi3_5",
        "Phi-3.5 mini instruct",
        True,
        "<|end|>",
        True,
        "trl 1.16 trl/chat_templates/phi3_5.jinja",
    ),
    (
        "deepseek_r1_distill",
        "DeepSeek-R1-Distill (Qwen and Llama checkpoints)",
        True,
        "<｜end▁of▁sentence｜>",
        True,
        "trl 1.16 trl/chat_templates/deepseek_r1_distill.jinja",
    ),
    (
        "mistral_v1",
        "Mistral tokenizer-v1 instruct template with system-message support "
        "(Mixtral-8x7B-Instruct-v0.1, Mistral-7B-Instruct-v0.2)",
        False,
        "</s>",
        False,
        "transcribed from public copies of the hub template (a vLLM log printing "
        "Mistral-7B-Instruct-v0.2's template; a hard-coded copy of "
        "Mixtral-8x7B-Instruct-v0.1's); not checked against the repository",
    ),
    (
        "mistral_v3",
        "Mistral-7B-Instruct-v0.3 (tokenizer v3, tool calling)",
        False,
        "</s>",
        False,
        "transcribed from two public copies of Mistral-7B-Instruct-v0.3's template "
        "(quoted differently, byte-identical once unquoted); not checked against the "
        "repository",
    ),
    (
        "chatml",
        "ChatML, as peftgen installs it on base models and the tiny test model ships",
        False,
        "<|im_end|>",
        True,
        "peftgen's own (the CHATML_TEMPLATE the generated scripts install)",
    ),
)

_CHATML_REAL_NEWLINES = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML with real newlines inside the Jinja string literals (as tests/tiny_model.py
writes it): renders exactly like ``chatml.jinja``'s ``\\n`` escapes."""


TRAINING_CHANGES: dict[str, str] = {
    "mistral_v3": (
        "the system message goes into the last user turn, where the model's template puts "
        "it at inference; that template adds it only when the user turn is the last message, "
        "so a training row, which ends with the answer, would train without it"
    ),
}
"""Families whose training template renders differently from the original (see
``ChatTemplateFamily.training_change``); data/README.md says the same."""


def _load() -> dict[str, ChatTemplateFamily]:
    families: dict[str, ChatTemplateFamily] = {}
    for name, description, trl_patches, end_of_turn, verified, source in _TABLE:
        families[name] = ChatTemplateFamily(
            name=name,
            description=description,
            original=read_template(name),
            training=None if trl_patches else read_template(f"{name}_training"),
            trl_patches=trl_patches,
            end_of_turn=end_of_turn,
            verified_original=verified,
            source=source,
            training_change=TRAINING_CHANGES.get(name),
            also_matches=(_CHATML_REAL_NEWLINES,) if name == "chatml" else (),
        )
    return families


FAMILIES: dict[str, ChatTemplateFamily] = _load()
"""Every family peftgen knows, by name."""

CHATML: ChatTemplateFamily = FAMILIES["chatml"]
"""peftgen's own ChatML: what the generated scripts install on a base model."""

CHATML_SPECIAL_TOKENS: tuple[str, str] = ("<|im_start|>", "<|im_end|>")
"""The special tokens a script adds with ChatML; the second ends a turn (the new eos)."""

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str | dict[str, str]) -> bool:
    """Whether ``template`` already marks assistant output with ``{% generation %}``.

    Same test as trl's ``has_generation_markers`` (whitespace-trim variants count; a dict
    of named variants is judged by its ``default``), because SFTTrainer uses trl's to
    decide whether to swap the template: peftgen must agree with it.
    """
    if isinstance(template, dict):
        template = template.get("default", "")
    return _GENERATION_MARKER.search(template) is not None


@cache
def _index() -> dict[str, ChatTemplateFamily]:
    index: dict[str, ChatTemplateFamily] = {}
    for family in FAMILIES.values():
        for text in (family.original, family.training, *family.also_matches):
            if text is not None:
                index.setdefault(text, family)
    return index


def identify(template: str | dict[str, str] | None) -> ChatTemplateFamily | None:
    """The family whose original (or training) template is exactly ``template``.

    Exact text, not a fuzzy match, because only exact bytes make the proof hold: a
    training template is known to render like *that* original, and one changed character
    elsewhere could change what the model sees. A tokenizer's template can be a string or
    a dict of named variants (transformers loads ``chat_template`` lists as a dict); a dict
    is judged by its ``default`` variant, as trl does. None for no template, a dict without
    a ``default``, or any template peftgen does not know (the caller then refuses
    assistant-only loss instead of guessing).
    """
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        return None
    return _index().get(template)


def family_for_training(name: str) -> ChatTemplateFamily:
    """``FAMILIES[name]``, with a ValueError naming the known families instead of a KeyError.

    Callers take ``name`` from the catalogue or a spec, so a miss is a data error a person
    reads: the message says what would have been accepted.
    """
    family = FAMILIES.get(name)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown chat template family {name!r}; known families: {known}")
    return family
