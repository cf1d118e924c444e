"""GRPO's generation phase (KV cache, prefill, decode) and colocated vLLM's share of the
GPU."""

from __future__ import annotations

from peftgen.memory.activations import dequantized_weight_transient_bytes, grpo_sequence_length
from peftgen.memory.full import full_decoder_cast_bytes
from peftgen.memory.parameters import targeted_modules
from peftgen.memory.profile import DTYPE_BYTES
from peftgen.memory.types import EstimateInput
from peftgen.memory.weights import adapter_dtype


def kv_cache_bytes(inputs: EstimateInput, rows: int, positions: int) -> int:
    """Keys and values of every layer for ``rows`` sequences of ``positions`` tokens."""
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * rows * positions * compute


def grpo_generation_rows(inputs: EstimateInput) -> int:
    """Sequences generated at once: trl's generation batch is
    ``per_device_train_batch_size x steps_per_generation`` (= gradient accumulation,
    grpo_config.py:1098-1100), all passed to one ``generate`` call (grpo_trainer.py:1873)."""
    return inputs.micro_batch * inputs.gradient_accumulation_steps


def grpo_generation_bytes(inputs: EstimateInput) -> int:
    """The generation phase's peak (no gradients): the larger of the prompt's prefill and
    the last decoding step. Full fine-tuning adds autocast's cast of every decoder weight,
    cached until each forward returns (``full_decoder_cast_bytes``)."""
    peak = max(grpo_prefill_bytes(inputs), grpo_last_decode_bytes(inputs))
    if inputs.finetuning == "full":
        peak += full_decoder_cast_bytes(inputs)
    return peak


def grpo_prefill_bytes(inputs: EstimateInput) -> int:
    """Prefill of the whole generation batch: the prompt's KV cache plus one layer's
    widest moment, the gated MLP: either forming ``up_proj``'s output plus its LoRA term
    next to the activation, or ``down_proj``'s LoRA reading the product. The model stays in
    train mode during trl's ``generate`` (``unwrap_model_for_generation`` does not call
    ``eval()``), so LoRA dropout runs: an adapted ``down_proj`` casts its input to the
    adapter dtype, applies dropout (output + bool mask) and autocast copies the result back
    for the matmul, all while the product is alive. Four hidden-sized tensors come on top:
    the embedding output (the model's ``inputs_embeds`` stays referenced through its
    forward), the layer's input (the caller's ``hidden_states``), the post-attention
    residual and the norm output the MLP reads; and the dequantized weight of an 8/4-bit
    linear."""
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    rows = grpo_generation_rows(inputs)
    tokens = rows * inputs.max_length
    mlp_width = c.intermediate_size
    if c.num_local_experts:
        mlp_width = (c.moe_intermediate_size or c.intermediate_size) * (c.num_experts_per_tok or 1)
    adapted = {m.name for m in targeted_modules(inputs.arch, inputs.target_modules)}
    # act(gate) * up, with up's LoRA sum being formed: activation, base output, LoRA
    # output and its scaled copy (4 tensors) when up (or gate) is adapted, else 3.
    up_side = 4.0 if adapted & {"up_proj", "gate_proj", "gate_up_proj"} else 3.0
    down_side = 1.0
    if "down_proj" in adapted:
        adapter = DTYPE_BYTES[adapter_dtype(inputs)]
        upcast = adapter != compute
        # product + its adapter-dtype cast + dropout output and mask + autocast's copy
        copies = (adapter if upcast else 0) + (adapter + 1 if inputs.lora_dropout > 0 else 0)
        down_side = 1 + (copies + (compute if upcast else 0)) / compute
    mlp = int(max(up_side, down_side) * compute * tokens * mlp_width)
    residual = 4 * compute * tokens * c.hidden_size
    cache = kv_cache_bytes(inputs, rows, inputs.max_length)
    return cache + mlp + residual + dequantized_weight_transient_bytes(inputs)


def grpo_last_decode_bytes(inputs: EstimateInput) -> int:
    """The last decoding step: the full KV cache, one layer's keys and values twice while
    the cache grows by concatenation, and the next-token logits (compute dtype, fp32 copy,
    fp32 probabilities for sampling)."""
    c = inputs.arch.config
    rows = grpo_generation_rows(inputs)
    positions = grpo_sequence_length(inputs)
    cache = kv_cache_bytes(inputs, rows, positions)
    regrow = cache // c.num_hidden_layers
    logits = (DTYPE_BYTES[inputs.compute_dtype] + 4 + 4) * rows * c.vocab_size
    return cache + regrow + logits + dequantized_weight_transient_bytes(inputs)


#
# trl 1.16 (trl/generation/vllm_generation.py:347-368) builds ``vllm.LLM`` in the training
# process for ``vllm_mode="colocate"`` with ``gpu_memory_utilization`` (trl's default 0.3).
# vLLM's documented meaning (EngineArgs ``gpu_memory_utilization``): the fraction of the
# GPU's *total* memory this instance may use, a per-instance limit holding its own copy of
# the weights, its activation workspace and the KV cache, which fills what is left of the
# fraction; vLLM requests total x utilisation and refuses to start when less than that is
# free ("Free memory on device ... is less than desired GPU memory utilization",
# vllm-project/vllm#20305). With
# ``vllm_enable_sleep_mode`` trl puts vLLM to sleep at level 2 after every generation round
# (weights and KV cache released, :750) and wakes it for the next (:489, :704). In
# ``server`` mode vLLM runs on other GPUs (``trl vllm-serve``) and the training GPUs only
# receive completions.


def vllm_share_bytes(inputs: EstimateInput) -> int:
    """vLLM's colocated share of one GPU: ``vllm_gpu_memory_utilization`` x its memory."""
    if inputs.vllm_mode != "colocate":
        return 0
    return int(inputs.vllm_gpu_memory_utilization * inputs.gpu_memory_bytes)


def vllm_training_phase_bytes(inputs: EstimateInput) -> int:
    """What colocated vLLM holds while the policy trains: its whole share, or nothing once
    asleep (what vLLM keeps mapped while asleep, its CUDA graphs, is not modelled)."""
    if inputs.vllm_mode != "colocate" or inputs.vllm_enable_sleep_mode:
        return 0
    return vllm_share_bytes(inputs)
