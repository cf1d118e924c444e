"""Bytes of what the model holds: base weights per loading precision (bf16, LLM.int8,
NF4), LoRA adapters and full copies in their dtypes, and their gradients."""

from __future__ import annotations

import math

from peftgen import stack
from peftgen.catalog import LinearModule, linear_modules, parameter_groups
from peftgen.memory.full import full_trainable_tensors, full_weights_bytes
from peftgen.memory.parameters import (
    modules_to_save_parameter_count,
    moe_lora_shapes,
    targeted_modules,
    trainable_bias_count,
)
from peftgen.memory.profile import DTYPE_BYTES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE, AdapterDtype
from peftgen.memory.types import EstimateInput, TrainableTensors


def int8_linear_bytes(in_features: int, out_features: int) -> int:
    """LLM.int8 ``Int8Params``: int8 ``CB`` [out, in] plus one fp32 ``SCB`` scale per row."""
    return in_features * out_features + 4 * out_features


def nf4_linear_bytes(in_features: int, out_features: int, double_quant: bool) -> int:
    """bitsandbytes 4-bit (NF4 or FP4; same layout): packed nibbles + block scales.

    Packed weight: 2 values per byte. One absmax per 64-value block: fp32 without double
    quantization; with it (bitsandbytes/functional.py:938-950) uint8 codes of the
    mean-centred absmax, one fp32 absmax per 256 blocks and the fp32 mean (``offset``).
    Each module also carries its 16-entry fp32 quant map (``get_4bit_type``, :936); the
    nested 256-entry code book is one cached tensor shared by all modules (:655).
    """
    numel = in_features * out_features
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    quant_map = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + quant_map
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested_blocks + 4 + quant_map


def linear_weight_bytes(module: LinearModule, inputs: EstimateInput) -> int:
    """One module kind's weights (+ bias, kept in the load dtype) for all its instances."""
    load_bytes = DTYPE_BYTES[inputs.compute_dtype]
    if inputs.precision == "8bit":
        per = int8_linear_bytes(module.in_features, module.out_features)
    elif inputs.precision == "4bit":
        per = nf4_linear_bytes(
            module.in_features, module.out_features, inputs.bnb_4bit_use_double_quant
        )
    else:
        per = module.in_features * module.out_features * load_bytes
    bias_dtype_bytes = unquantized_weight_dtype_bytes(inputs)
    bias = module.out_features * bias_dtype_bytes if module.bias else 0
    return (per + bias) * module.count


def unquantized_weight_dtype_bytes(inputs: EstimateInput) -> int:
    """Bytes per element of embeddings, norms, head and biases: the load dtype, or fp32
    when the stack runs ``prepare_model_for_kbit_training`` on a quantized model."""
    quantized = inputs.precision in ("8bit", "4bit")
    if quantized and inputs.stack.upcast_unquantized_to_fp32:
        return 4
    return DTYPE_BYTES[inputs.compute_dtype]


def weights_bytes(inputs: EstimateInput) -> int:
    """The frozen base model on the GPU (per GPU; sharding divides it, issue 8)."""
    if inputs.finetuning == "full":
        return full_weights_bytes(inputs)
    linear = sum(linear_weight_bytes(m, inputs) for m in linear_modules(inputs.arch))
    groups = parameter_groups(inputs.arch)
    unquantized = (groups.non_linear - groups.linear_bias) * unquantized_weight_dtype_bytes(inputs)
    return linear + unquantized + model_buffer_bytes(inputs)


def model_buffer_bytes(inputs: EstimateInput) -> int:
    """Non-parameter buffers the model keeps on the GPU, where a stack has large ones
    (transformers 4.38 Llama): the ``causal_mask`` buffer of ``max_position_embeddings``²
    bools (``StackProfile.causal_mask_max_positions``) and, in every attention layer's
    ``LlamaRotaryEmbedding``, the ``_cos_cached`` / ``_sin_cached`` tables of
    [max_position_embeddings, head_dim] that 4.38 still registers "For BC"
    (``StackProfile.rope_cache_element_bytes``: their element size, 0 without them).
    FSDP moves buffers to the GPU with their unit and never shards them."""
    c = inputs.arch.config
    positions = c.max_position_embeddings
    mask = positions * positions if inputs.stack.causal_mask_max_positions else 0
    rope = 2 * positions * c.head_dim * inputs.stack.rope_cache_element_bytes
    return mask + c.num_hidden_layers * rope


def adapter_dtype(inputs: EstimateInput) -> AdapterDtype:
    """Dtype of LoRA A/B: the compute dtype under DeepSpeed (its module cast); on quantized
    models the stack's (the pinned script casts trl's bf16 back to fp32,
    ``stack.TRAINED_COPY_DTYPE``), else peft's fp32 upcast."""
    if deepspeed_casts_trainables(inputs):
        return inputs.compute_dtype
    if inputs.precision in ("8bit", "4bit"):
        return inputs.stack.quantized_adapter_dtype
    return inputs.stack.unquantized_adapter_dtype


def deepspeed_casts_trainables(inputs: EstimateInput) -> bool:
    """DeepSpeed casts the whole module to the 16-bit compute dtype: LoRA adapters, DoRA
    magnitudes and full copies train in it, whatever peft, trl or the script made them
    (``StackProfile.deepspeed_casts_module``)."""
    return (
        inputs.distributed.startswith("deepspeed")
        and inputs.stack.deepspeed_casts_module
        and inputs.compute_dtype in ("bf16", "fp16")
    )


def trainable_tensors(inputs: EstimateInput, include_biases: bool = True) -> TrainableTensors:
    """Every trainable tensor with its dtype: LoRA A/B, DoRA magnitudes (fp32: peft's
    autocast, and trl skips them in its bf16 cast), modules_to_save copies (load dtype;
    bf16 under trl's quantized cast; fp32 in the fp16 script, which upcasts every
    trainable tensor) and trainable biases; under DeepSpeed all of them in the compute
    dtype (``deepspeed_casts_trainables``)."""
    if inputs.finetuning == "full":
        return full_trainable_tensors(inputs)
    arch = inputs.arch
    lora_bytes = DTYPE_BYTES[adapter_dtype(inputs)]
    copy_bytes = modules_to_save_dtype_bytes(inputs)
    magnitude_bytes = DTYPE_BYTES[inputs.compute_dtype] if deepspeed_casts_trainables(inputs) else 4
    numel_by_bytes: dict[int, int] = {}
    shapes: list[tuple[int, int, int]] = []

    def add(size: int, rows: int, cols: int, times: int) -> None:
        numel_by_bytes[size] = numel_by_bytes.get(size, 0) + rows * cols * times
        shapes.append((rows, cols, times))

    for module in targeted_modules(arch, inputs.target_modules):
        add(lora_bytes, inputs.lora_r, module.in_features, module.count)
        add(lora_bytes, module.out_features, inputs.lora_r, module.count)
        if inputs.use_dora:
            add(magnitude_bytes, module.out_features, 1, module.count)
    if inputs.target_modules == "all-linear":
        for rows, cols in moe_lora_shapes(arch, inputs.lora_r):
            add(lora_bytes, rows, cols, arch.config.num_hidden_layers)
    mts = modules_to_save_parameter_count(arch, inputs.modules_to_save)
    if mts:
        add(copy_bytes, mts // arch.config.hidden_size, arch.config.hidden_size, 1)
    biases = trainable_bias_count(arch, inputs) if include_biases else 0
    if biases:
        add(copy_bytes, biases, 1, 1)
    return TrainableTensors(numel_by_bytes, tuple(shapes))


def modules_to_save_dtype_bytes(inputs: EstimateInput) -> int:
    """Element size of the trained full copies (and trainable biases): fp32, where the
    script upcasts every trainable tensor (16-bit master weights round small updates away,
    and the fp16 gradient scaler refuses fp16 parameters): ``stack.TRAINED_COPY_DTYPE``.
    DeepSpeed casts them to the compute dtype (``deepspeed_casts_trainables``)."""
    if deepspeed_casts_trainables(inputs):
        return DTYPE_BYTES[inputs.compute_dtype]
    return DTYPE_BYTES[stack.TRAINED_COPY_DTYPE]


def adapter_bytes(inputs: EstimateInput) -> int:
    """Trainable parameters' own storage (LoRA, DoRA magnitudes, modules_to_save copies);
    trainable base biases are already in ``weights_bytes``."""
    if inputs.finetuning == "full":
        return 0  # the trained weights are the weights
    tensors = trainable_tensors(inputs, include_biases=False)
    return sum(size * n for size, n in tensors.numel_by_bytes.items())


def gradient_bytes(inputs: EstimateInput) -> int:
    """``.grad`` of every trainable tensor, in the parameter's dtype; kept across micro-batches."""
    tensors = trainable_tensors(inputs)
    return sum(size * n for size, n in tensors.numel_by_bytes.items())
