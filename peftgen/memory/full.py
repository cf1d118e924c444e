"""Full fine-tuning (``finetuning: full``): fp32 master weights under 16-bit autocast,
the per-layer weight casts, the reference copy, the gradients' lifetime."""

from __future__ import annotations

from peftgen.catalog import ModelArch, linear_modules, parameter_groups
from peftgen.catalog.structure import (
    SANDWICH_NORM_TYPES,
)
from peftgen.memory.parameters import _input_groups, base_parameter_count, language_linear_modules
from peftgen.memory.profile import DTYPE_BYTES
from peftgen.memory.types import EstimateInput, TrainableTensors

#
# ``finetuning: full`` as the emitted script runs it: the model loaded in fp32 (master
# weights), trained under accelerate's bf16 autocast (``bf16=True``; fp16 GPUs ``fp16=True``),
# so gradients and optimizer states are fp32 too. Pure bf16 weights would save half the
# weight and gradient bytes but round small AdamW updates away (lr x update << bf16's 8-bit
# mantissa), the reason the LoRA scripts keep fp32 masters for modules_to_save.
#
# What autocast adds (torch/amp/autocast_mode.py, accelerate/accelerator.py:1826-1833
# wrapping ``model.forward``): every matmul casts its fp32 weight to the compute dtype; the
# cast of a leaf parameter is cached until the outermost autocast exits (the end of the
# forward, autocast_mode.py:349 ``clear_autocast_cache``), and the matmul saves it for
# backward. Without checkpointing every layer's casts live until that layer's backward; with
# (non-reentrant) checkpointing the forward's saved tensors are dropped, but the cache still
# holds every cast until the forward returns, and each recomputed layer holds its own.


def full_parameter_shapes(arch: ModelArch) -> list[tuple[int, int, int]]:
    """(rows, cols, how many) of every parameter tensor of the built model, for the
    per-tensor optimizer rules (8-bit states for tensors of 4096+ elements, Adafactor's
    factored rows and columns): linear weights and biases, embeddings, the untied head, the
    norms (1-D), fused MoE experts and routers, and the rest of a vision tower."""
    c = arch.config
    groups = parameter_groups(arch)
    shapes: list[tuple[int, int, int]] = []
    for module in linear_modules(arch):
        shapes.append((module.out_features, module.in_features, module.count))
        if module.bias:
            shapes.append((module.out_features, 1, module.count))
    shapes.append((c.vocab_size, c.hidden_size, 1))
    if groups.lm_head:
        shapes.append((c.vocab_size, c.hidden_size, 1))
    norm_vectors, rest = divmod(groups.norm, c.hidden_size)
    shapes.append((c.hidden_size, 1, norm_vectors))
    if rest:
        shapes.append((rest, 1, 1))
    if groups.moe_experts:
        per_layer = groups.moe_experts // c.num_hidden_layers
        shapes.append((per_layer // c.hidden_size, c.hidden_size, c.num_hidden_layers))
    if groups.moe_router:
        shapes.append((groups.moe_router // c.num_hidden_layers, 1, c.num_hidden_layers))
    if groups.vision_other:
        shapes.append((groups.vision_other, 1, 1))
    return [shape for shape in shapes if shape[0] * shape[1] * shape[2]]


def full_master_bytes(inputs: EstimateInput) -> int:
    """Bytes per element of the trained weights: fp32 masters, or the compute dtype when
    the stack trains in pure 16 bits (``StackProfile.full_master_weights``)."""
    if inputs.stack.full_master_weights == "fp32":
        return 4
    return DTYPE_BYTES[inputs.compute_dtype]


def full_autocast(inputs: EstimateInput) -> bool:
    """fp32 masters run under autocast, which casts each weight per matmul."""
    return inputs.stack.full_master_weights == "fp32"


def full_trainable_tensors(inputs: EstimateInput) -> TrainableTensors:
    """Every parameter, in the master dtype (what the optimizer steps)."""
    arch = inputs.arch
    shapes = tuple(full_parameter_shapes(arch))
    return TrainableTensors({full_master_bytes(inputs): base_parameter_count(arch)}, shapes)


def reference_weight_bytes(inputs: EstimateInput) -> int:
    """The frozen reference copy full fine-tuning keeps for DPO (no
    ``precompute_ref_log_probs``) and GRPO (``beta > 0``): the script loads it in the compute
    dtype (trl would load it in the policy's fp32, dpo_trainer.py:924, grpo_trainer.py:1002)."""
    if inputs.finetuning != "full" or not inputs.reference_model:
        return 0
    return DTYPE_BYTES[inputs.compute_dtype] * base_parameter_count(inputs.arch)


def full_weights_bytes(inputs: EstimateInput) -> int:
    """Master weights of every parameter, plus the reference copy if any."""
    master = full_master_bytes(inputs) * base_parameter_count(inputs.arch)
    return master + reference_weight_bytes(inputs)


def full_layer_linear_parameters(inputs: EstimateInput) -> int:
    """Weight elements of one decoder layer's linears (what autocast casts per layer)."""
    total = sum(m.weight_parameters for m in language_linear_modules(inputs.arch))
    return total // inputs.arch.config.num_hidden_layers


def full_weight_cast_bytes_per_layer(inputs: EstimateInput) -> int:
    """One layer's autocast weight casts: every linear weight in the compute dtype (none
    when the weights are in the compute dtype already)."""
    if not full_autocast(inputs):
        return 0
    return DTYPE_BYTES[inputs.compute_dtype] * full_layer_linear_parameters(inputs)


def full_decoder_cast_bytes(inputs: EstimateInput) -> int:
    """Every decoder layer's weight casts: what autocast's cache holds at a forward's end."""
    return inputs.arch.config.num_hidden_layers * full_weight_cast_bytes_per_layer(inputs)


def full_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """What training every weight adds to a layer's saved tensors (beyond the attention,
    MLP and norm rules the LoRA estimate shares).

    - The weight casts (``full_weight_cast_bytes_per_layer``): each matmul saves its
      compute-dtype weight for the input gradient.
    - Each linear saves its input for the weight gradient. The residual stream is fp32
      (fp32 embeddings; RMSNorm returns ``weight * x.to(input_dtype)``), so q/k/v and
      gate/up each save their own autocast copy of the fp32 norm output (autocast caches
      only leaf parameters); o_proj reads the attention output (counted by the attention
      rule); down_proj saves ``act(gate) * up``.
    - Each norm's trainable ``weight * x`` saves the fp32 normalised ``x``.
    """
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    total = full_weight_cast_bytes_per_layer(inputs)
    for width, members in _input_groups(inputs):
        names = {m.name for m in members}
        if names & {"o_proj", "dense"}:
            continue
        # Pure 16-bit: the members share the norm's output (no autocast copies).
        copies = len(members) if full_autocast(inputs) else 1
        total += copies * compute * tokens * width
    norms = 4 if c.model_type in SANDWICH_NORM_TYPES else 2
    total += norms * full_master_bytes(inputs) * tokens * c.hidden_size
    return total


def full_gradients_released(inputs: EstimateInput, phase: str) -> bool:
    """No gradients at the forward's end: full fine-tuning with one micro-batch per optimizer
    step (the Trainer's ``zero_grad`` sets them to None after each step; with accumulation
    they survive into the next micro-batch). LoRA's gradients are small: not split there.
    DeepSpeed keeps its gradient partition between steps (ZeRO-3's flat gradient buffer is
    allocated once, stage3.py ``grad_partitions_flat_buffer``): not released there."""
    return (
        inputs.finetuning == "full"
        and inputs.gradient_accumulation_steps == 1
        and phase == "train"
        and not inputs.distributed.startswith("deepspeed")
    )


def full_weight_gradient_transient_bytes(inputs: EstimateInput) -> int:
    """The largest linear's weight gradient as its backward makes it: the compute-dtype
    matmul result, then autocast's cast back to the fp32 master (``ToCopyBackward``)
    before it is accumulated into ``.grad``."""
    largest = max(m.in_features * m.out_features for m in language_linear_modules(inputs.arch))
    upcast = 4 if full_autocast(inputs) else 0
    return (DTYPE_BYTES[inputs.compute_dtype] + upcast) * largest


def full_head_extra_bytes(inputs: EstimateInput, tokens: int) -> int:
    """At the LM head (forward end / backward start) under full fine-tuning: the fused
    head's fp32 gradient buffer of the whole head (chunked_logprob.py:410, kept fp32: the
    weight is fp32), the head's input in fp32 rather than the compute dtype, and with
    checkpointing every layer's weight cast still in autocast's cache (without it they are
    in the kept activations already)."""
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    # fp32 buffer, cast to a 16-bit weight's dtype on return
    head = (4 + (0 if full_autocast(inputs) else compute)) * c.vocab_size * c.hidden_size
    hidden = (full_master_bytes(inputs) - compute) * tokens * c.hidden_size
    cache = full_decoder_cast_bytes(inputs) if inputs.gradient_checkpointing else 0
    return head + hidden + cache
