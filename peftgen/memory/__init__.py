"""The memory estimator: peak GPU bytes per component for one training run (LoRA, QLoRA or
full fine-tuning).

Pure functions, bytes in and bytes out, one per term, no torch. Each term mirrors what the
generated script really does with the pinned stack (transformers 5.24, peft 0.21.2, trl 1.16,
bitsandbytes 0.50.2, torch 2.13); the source lines each rule comes from are cited in the
docstrings (paths relative to ``site-packages``).

Mechanisms that changed between stacks (the loss path, adapter dtype, fp32 upcasts) are
switches of ``StackProfile``, whose default is the pinned stack, so older published
measurements can be reproduced by *selecting* their mechanisms rather than by fitting
constants (``benchmarks/accuracy.py``).

Per-GPU figures: every term is first computed as if one GPU held the whole run; then
``per_gpu_parts`` applies the distributed engine (``EstimateInput.distributed``): DDP adds
its gradient buckets, ZeRO-2 divides gradients and optimizer state by ``world_size``,
ZeRO-3 and FSDP divide the parameters too and add the gathered working set.

``estimate`` (here) adds the terms up at the step's peak; each module holds one part:
``profile`` (stack mechanisms and allocator constants), ``types``, ``parameters``,
``weights``, ``optimizer``, ``activations``, ``generation`` (GRPO, vLLM), ``full`` (full
fine-tuning), ``overhead`` and ``sharded`` (DDP, FSDP, ZeRO,
full fine-tuning included).
"""

from __future__ import annotations

from peftgen.memory.activations import (
    FULL_LOGITS_BYTES_PER_ENTRY,
    activation_bytes,
    attention_mask_bytes,
    backward_layer_bytes,
    effective_attn_implementation,
    fused_head_scored_tokens,
    fused_qkv_output_bytes,
    kept_activation_bytes,
    logits_bytes,
    loss_backward_bytes_per_entry,
    masked_attention_layer_count,
    max_positions_causal_mask_bytes,
    residual_stream_dtype_bytes,
    sequence_length,
    sliding_window_layer_count,
    tokens_per_micro_batch,
    train_step_peak_parts,
)
from peftgen.memory.full import (
    full_decoder_cast_bytes,
    full_gradients_released,
    full_parameter_shapes,
    reference_weight_bytes,
)
from peftgen.memory.generation import (
    grpo_generation_bytes,
    grpo_generation_rows,
    kv_cache_bytes,
    vllm_share_bytes,
    vllm_training_phase_bytes,
)
from peftgen.memory.optimizer import (
    OPTIMIZERS,
    PAGED_OPTIMIZERS,
    managed_optimizer_bytes,
    optimizer_state_bytes,
    paged_state_bytes,
)
from peftgen.memory.overhead import overhead_bytes
from peftgen.memory.parameters import (
    base_parameter_count,
    language_linear_modules,
    moe_experts_per_layer,
    moe_lora_parameter_count,
    peft_total_parameter_count,
    targeted_modules,
    trainable_parameter_count,
)
from peftgen.memory.profile import (
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    PERSISTENT_ROUNDING_FRACTION,
    TRANSIENT_FRAGMENTATION_FRACTION,
    StackProfile,
    cublas_workspace_bytes,
)
from peftgen.memory.sharded import (
    DEEPSPEED_BUCKET_ELEMENTS,
    ZERO3_MAX_LIVE_PARAMETERS,
    ZERO3_PREFETCH_BUCKET_ELEMENTS,
    allocator_sharded_reserve_bytes,
    communication_buffer_bytes,
    fsdp2_all_gather_buffer_bytes,
    fsdp_gathered_layer_units,
    fsdp_no_sync_gradient_bytes,
    fsdp_offload_copy_pool_bytes,
    full_fsdp_parts,
    full_layer_unit_bytes,
    full_root_parameters,
    full_sharded_activation_inputs,
    full_zero_parts,
    gathered_parameter_bytes,
    host_load_bytes,
    host_memory_bytes,
    host_offload_bytes,
    layer_unit_bytes,
    load_peak_bytes,
    nccl_buffer_bytes,
    per_gpu_parts,
    replicated_quant_state_bytes,
    root_unit_bytes,
    zero3_generation_gather_bytes,
    zero3_loads_whole_model,
    zero3_reuse_retained_bytes,
    zero_bucket_bytes,
)
from peftgen.memory.types import Estimate, EstimateInput, MemoryBreakdown
from peftgen.memory.weights import (
    adapter_dtype,
    deepspeed_casts_trainables,
    gradient_bytes,
    int8_linear_bytes,
    linear_weight_bytes,
    model_buffer_bytes,
    modules_to_save_dtype_bytes,
    nf4_linear_bytes,
    weights_bytes,
)


def estimate(inputs: EstimateInput) -> Estimate:
    """Peak memory of the run, per component, per GPU.

    Parameters, gradients and optimizer state coexist with a micro-batch's activations
    from the second optimizer step on (gradients survive across accumulation steps), so
    the peak is their sum; the optimizer step's temporaries replace the (then freed)
    activations when they are larger. GRPO's peak is the larger of its generation phase
    (no gradients: the trainer sets them to None after each step) and its training phase.
    Each GPU runs its own micro-batch, so activations do not shrink with more GPUs; the
    persistent terms are split per ``per_gpu_parts``.
    """
    parts = per_gpu_parts(inputs)
    weights, adapter = parts.weights_bytes, parts.adapter_bytes
    gradient, optimizer = parts.gradient_bytes, parts.optimizer_bytes
    communication = parts.communication_bytes
    activation, logits = train_step_peak_parts(full_sharded_activation_inputs(inputs))
    phase = "train"
    vllm = vllm_training_phase_bytes(inputs)
    if inputs.method == "grpo" and inputs.vllm_mode != "none":
        share = vllm_share_bytes(inputs)
        if share > gradient + activation + logits + vllm:
            # A sleeping colocated vLLM wakes up for each generation round: its share next
            # to the training state, without gradients or training activations.
            phase, vllm = "generation", share
            communication = communication if inputs.distributed == "ddp" else 0
            gradient, activation, logits = communication, 0, 0
    generation_gather = 0
    if inputs.method == "grpo" and inputs.vllm_mode == "none":
        generation = grpo_generation_bytes(inputs)
        gather = zero3_generation_gather_bytes(inputs)
        if generation + gather > gradient + activation + logits:
            phase = "generation"
            gradient, activation, logits = 0, generation, 0
            weights, generation_gather = weights + gather, gather
            # DDP's buckets live as long as the wrapper; the other engines' buffers are
            # alive only while gradients are reduced.
            communication = communication if inputs.distributed == "ddp" else 0
            gradient = communication
    if full_gradients_released(inputs, phase):
        # Full fine-tuning, one micro-batch per step: zero_grad(set_to_none=True) frees the
        # gradients after each step, so the forward runs without them; they come back in
        # backward as the activations are freed. The peak is the forward's end, or the
        # optimizer step (every gradient and the step's temporaries, no activations).
        step = gradient - communication + parts.optimizer_step_temporary_bytes
        if activation + logits >= step:
            gradient = communication
        else:
            activation, logits = 0, 0
    optimizer += max(0, parts.optimizer_step_temporary_bytes - (activation + logits))
    gathered = parts.gathered_weight_bytes + generation_gather
    copy_out = fsdp2_all_gather_buffer_bytes(inputs)
    if copy_out > activation + logits:
        # FSDP2 unsharding the largest unit before any activation exists
        phase = "unshard"
        weights, gathered = weights + copy_out, gathered + copy_out
        activation = logits = 0
    persistent = weights + adapter + gradient + optimizer
    overhead = overhead_bytes(persistent, activation + logits, inputs) + vllm
    allocated = persistent + activation + logits
    reserve = allocator_sharded_reserve_bytes(inputs, allocated, gathered)
    nccl = nccl_buffer_bytes(inputs)
    overhead += reserve + nccl
    return Estimate(
        weights_bytes=weights,
        adapter_bytes=adapter,
        gradient_bytes=gradient,
        optimizer_bytes=optimizer,
        activation_bytes=activation,
        logits_bytes=logits,
        overhead_bytes=overhead,
        torch_reserved_bytes=allocated + overhead - inputs.stack.cuda_context_bytes - nccl - vllm,
        managed_bytes=parts.managed_bytes,
        phase=phase,
        communication_bytes=communication,
        gathered_weight_bytes=gathered,
        trainable_parameters=trainable_parameter_count(inputs.arch, inputs),
        total_parameters=peft_total_parameter_count(inputs.arch, inputs),
        load_peak_bytes=load_peak_bytes(inputs),
        host_memory_bytes=host_memory_bytes(inputs),
        sharded_reserve_bytes=reserve + nccl,
        vllm_bytes=vllm,
    )


__all__ = [
    "CUDA_CONTEXT_BYTES",
    "DEEPSPEED_BUCKET_ELEMENTS",
    "DTYPE_BYTES",
    "FULL_LOGITS_BYTES_PER_ENTRY",
    "OPTIMIZERS",
    "PAGED_OPTIMIZERS",
    "PERSISTENT_ROUNDING_FRACTION",
    "TRANSIENT_FRAGMENTATION_FRACTION",
    "ZERO3_MAX_LIVE_PARAMETERS",
    "ZERO3_PREFETCH_BUCKET_ELEMENTS",
    "Estimate",
    "EstimateInput",
    "MemoryBreakdown",
    "StackProfile",
    "activation_bytes",
    "adapter_dtype",
    "attention_mask_bytes",
    "backward_layer_bytes",
    "base_parameter_count",
    "communication_buffer_bytes",
    "cublas_workspace_bytes",
    "deepspeed_casts_trainables",
    "effective_attn_implementation",
    "estimate",
    "fsdp_gathered_layer_units",
    "fsdp_no_sync_gradient_bytes",
    "fsdp_offload_copy_pool_bytes",
    "full_decoder_cast_bytes",
    "full_fsdp_parts",
    "full_layer_unit_bytes",
    "full_parameter_shapes",
    "full_root_parameters",
    "full_zero_parts",
    "fused_head_scored_tokens",
    "fused_qkv_output_bytes",
    "gathered_parameter_bytes",
    "gradient_bytes",
    "grpo_generation_bytes",
    "grpo_generation_rows",
    "host_load_bytes",
    "host_offload_bytes",
    "int8_linear_bytes",
    "kept_activation_bytes",
    "kv_cache_bytes",
    "language_linear_modules",
    "layer_unit_bytes",
    "linear_weight_bytes",
    "load_peak_bytes",
    "logits_bytes",
    "loss_backward_bytes_per_entry",
    "managed_optimizer_bytes",
    "masked_attention_layer_count",
    "max_positions_causal_mask_bytes",
    "model_buffer_bytes",
    "modules_to_save_dtype_bytes",
    "moe_experts_per_layer",
    "moe_lora_parameter_count",
    "nf4_linear_bytes",
    "optimizer_state_bytes",
    "paged_state_bytes",
    "peft_total_parameter_count",
    "per_gpu_parts",
    "reference_weight_bytes",
    "replicated_quant_state_bytes",
    "residual_stream_dtype_bytes",
    "root_unit_bytes",
    "sequence_length",
    "sliding_window_layer_count",
    "targeted_modules",
    "tokens_per_micro_batch",
    "train_step_peak_parts",
    "trainable_parameter_count",
    "vllm_share_bytes",
    "weights_bytes",
    "zero3_loads_whole_model",
    "zero3_reuse_retained_bytes",
    "zero_bucket_bytes",
]
