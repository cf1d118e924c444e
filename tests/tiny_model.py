"""Build a tiny random-initialised Llama and its tokenizer, offline, in a second or two.

Tests need a real model folder (``config.json``, safetensors weights, tokenizer files, a
chat template) that transformers, peft, bitsandbytes and trl load exactly as they would a
hub checkpoint, without the network. The shapes are the smallest that still exercise every
code path of a real Llama: grouped-query attention (4 heads, 2 key/value heads), several
layers, an untied output head.

Run ``python tests/tiny_model.py OUT_DIR`` to write one by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ChatML: system/user/assistant turns, and an open assistant turn for generation. The
# assistant turn ends with the eos token, so SFT teaches the model to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
"""Only the chat model knows these: a base model gets them from the script that installs
ChatML, which must then grow the embeddings."""

# Clinical-flavoured text, so the byte-level BPE learns merges that the test data uses.
TRAINING_SENTENCES = [
    "The patient is a 64-year-old man with type 2 diabetes and hypertension.",
    "Summarise the discharge note in three sentences for the general practitioner.",
    "Creatinine clearance estimates kidney function from age, weight and serum creatinine.",
    "The CHA2DS2-VASc score estimates stroke risk in atrial fibrillation.",
    "Answer: the estimated glomerular filtration rate is 58 mL/min/1.73 m2.",
    "Blood pressure 142/88 mmHg, heart rate 76 beats per minute, afebrile.",
    "Adverse events were graded with CTCAE version 5.0 in the safety population.",
    "The hazard ratio for the primary endpoint was 0.78 with a 95% confidence interval.",
    "Please report the result as JSON with the keys score and interpretation.",
    "You are a careful clinical assistant. Explain your reasoning briefly.",
    "What is the body mass index of a patient weighing 82 kg at 1.75 m?",
    "<think>Compute weight over height squared.</think> The BMI is 26.8.",
]

VOCAB_SIZE = 512
SEED = 0


def _train_tokenizer(special_tokens: list[str]) -> object:
    """A byte-level BPE tokenizer (the Llama-3 kind) trained on the sentences above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_SENTENCES * 4, trainer=trainer)
    return tokenizer


def build_tiny_llama(
    path: Path, *, with_chat_template: bool = True, tie_word_embeddings: bool = False
) -> Path:
    """Write a tiny Llama (hidden 64, 2 layers, 4 heads, 2 kv heads) and tokenizer to ``path``.

    Deterministic: the same seed gives the same weights and the same tokenizer, so a test
    that compares logits before and after training compares like with like.
    ``with_chat_template=False`` leaves the tokenizer without a template (a base model), for
    the path where the generated script installs a named one. ``tie_word_embeddings=True``
    ties the output head to the input embeddings (SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B do).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(
            BASE_SPECIAL_TOKENS + (CHATML_TOKENS if with_chat_template else [])
        ),
        bos_token="<s>",
        eos_token="<|im_end|>" if with_chat_template else "</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    if with_chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_model.py OUT_DIR")
    print(build_tiny_llama(Path(sys.argv[1])))
