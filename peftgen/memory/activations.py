"""Activations of a training step: what each layer saves for backward (LoRA inputs,
attention, MLP, norms), with and without gradient checkpointing, the backward transients,
and the logits / loss path (trl's fused LM head)."""

from __future__ import annotations

from peftgen.catalog import linear_modules
from peftgen.catalog.structure import (
    LANGUAGE_MODEL,
    QK_NORM_TYPES,
    SANDWICH_NORM_TYPES,
    SDPA_REFUSED_TYPES,
)
from peftgen.memory.full import (
    full_head_extra_bytes,
    full_master_bytes,
    full_saved_bytes_per_layer,
    full_weight_gradient_transient_bytes,
)
from peftgen.memory.parameters import (
    _input_groups,
    language_linear_modules,
    moe_experts_per_layer,
    targeted_modules,
)
from peftgen.memory.profile import (
    DTYPE_BYTES,
    FUSED_HEAD_TOKEN_TILE,
    FUSED_HEAD_VOCAB_TILE,
    StackProfile,
)
from peftgen.memory.types import EstimateInput
from peftgen.memory.weights import (
    adapter_dtype,
    modules_to_save_dtype_bytes,
    unquantized_weight_dtype_bytes,
)


def tokens_per_micro_batch(inputs: EstimateInput) -> int:
    """Token positions in one training forward: DPO concatenates chosen and rejected
    (dpo_trainer.py:349-352); GRPO trains on prompt + completion rows."""
    if inputs.method == "dpo":
        return 2 * inputs.micro_batch * inputs.max_length
    if inputs.method == "grpo":
        return inputs.micro_batch * grpo_sequence_length(inputs)
    return inputs.micro_batch * inputs.max_length


def sequences_per_micro_batch(inputs: EstimateInput) -> int:
    return 2 * inputs.micro_batch if inputs.method == "dpo" else inputs.micro_batch


def sequence_length(inputs: EstimateInput) -> int:
    return grpo_sequence_length(inputs) if inputs.method == "grpo" else inputs.max_length


def grpo_sequence_length(inputs: EstimateInput) -> int:
    """GRPO rows are a prompt (bounded by ``max_length``) plus ``max_completion_length``."""
    return inputs.max_length + inputs.max_completion_length


def lora_saved_input_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """Inputs the adapted (and 8-bit) linears of one layer save for backward.

    A frozen ``nn.Linear`` or 4-bit matmul saves no input (it needs only the weight for
    the input gradient; bitsandbytes MatMul4Bit keeps ``(None, B)``,
    autograd/_functions.py:357); LLM.int8 keeps its input A (autograd/_functions.py:186).
    Each LoRA A saves its own input: with dropout the bf16 dropout output plus its bool
    mask (3 B/element); without dropout, fp32 adapters still see an autocast bf16 copy of
    the fp32-cast input (2 B/element), bf16 adapters share the layer's tensor. lora_A's
    output (r per token) is saved by lora_B; DoRA saves the base and LoRA outputs for its
    magnitude scaling.
    """
    compute = DTYPE_BYTES[inputs.compute_dtype]
    wrapped = {
        m.name
        for m in targeted_modules(inputs.arch, inputs.target_modules)
        if m.component == LANGUAGE_MODEL
    }
    fp32_adapters = adapter_dtype(inputs) == "fp32"
    total = 0
    for width, members in _input_groups(inputs):
        adapted = [m for m in members if m.name in wrapped]
        share_input = inputs.precision == "8bit" or (
            inputs.precision == "4bit" and inputs.stack.bnb_4bit_saves_input
        )
        per_module = 0
        if adapted:
            if inputs.lora_dropout > 0:
                per_module = 3
            elif fp32_adapters:
                per_module = compute
            else:
                share_input = True
        copies = len(adapted) if inputs.stack.lora_input_copy_per_module else min(len(adapted), 1)
        total += copies * per_module * tokens * width
        if share_input:
            total += compute * tokens * width
        for module in adapted:
            total += compute * tokens * inputs.lora_r
            if inputs.use_dora:
                total += 2 * compute * tokens * module.out_features
    return total


def effective_attn_implementation(inputs: EstimateInput) -> str:
    """The attention kernel that really runs: sdpa falls back to eager where refused."""
    if inputs.attn_implementation == "sdpa" and inputs.arch.config.model_type in SDPA_REFUSED_TYPES:
        return "eager"
    return inputs.attn_implementation


def attention_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """What attention saves for backward in one layer.

    sdpa / flash-attention: q, k, v (k/v at the key-value head count), the output and a
    fp32 log-sum-exp per head and token, plus the contiguous copy of the output that
    o_proj reads. Eager: k/v expanded to every head (``repeat_kv``), the fp32 softmax and
    its compute-dtype copy over (seq x seq) per head: the seq² term; soft-capped logits
    (Gemma-2, ``tanh``) keep one more compute-dtype copy.
    """
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    q_width = c.num_attention_heads * c.head_dim
    kv_width = c.num_key_value_heads * c.head_dim
    if effective_attn_implementation(inputs) == "eager":
        seq = sequence_length(inputs)
        rows = sequences_per_micro_batch(inputs)
        softcap = compute if c.extra.get("attn_logit_softcapping") else 0
        scores = rows * c.num_attention_heads * seq * seq * (4 + compute + softcap)
        return compute * tokens * (3 * q_width) + scores + fused_qkv_output_bytes(inputs, tokens)
    lse = 4 * tokens * c.num_attention_heads
    return (
        compute * tokens * (2 * q_width + 2 * kv_width)
        + lse
        + fused_qkv_output_bytes(inputs, tokens)
    )


def fused_qkv_output_bytes(inputs: EstimateInput, tokens: int) -> int:
    """The rest of a fused ``qkv_proj`` output that the saved values keep alive.

    Phi-3 slices q, k and v out of one projection (models/phi3/modeling_phi3.py:219-224);
    q and k become new tensors through the rotary embedding, but v stays a view, and the
    attention kernel saving v keeps the whole output's storage: q and k widths more per
    token than three separate projections."""
    if not any(m.name == "qkv_proj" for m in language_linear_modules(inputs.arch)):
        return 0
    c = inputs.arch.config
    width = (c.num_attention_heads + c.num_key_value_heads) * c.head_dim
    return DTYPE_BYTES[inputs.compute_dtype] * tokens * width


def sliding_window_layer_count(inputs: EstimateInput) -> int:
    """Decoder layers whose attention uses a sliding window (transformers 5.24 configs).

    Mistral and Phi-3 slide on every layer when ``sliding_window`` is set
    (models/mistral/modeling_mistral.py:355, models/phi3/modeling_phi3.py:386); Qwen2 only
    with ``use_sliding_window``; Gemma-3 on every layer but each ``sliding_window_pattern``-th
    (models/gemma3/configuration_gemma3.py:108-109)."""
    c = inputs.arch.config
    window = c.extra.get("sliding_window")
    if not window or c.extra.get("use_sliding_window") is False:
        return 0
    pattern = c.extra.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:
        return c.num_hidden_layers - c.num_hidden_layers // pattern
    return c.num_hidden_layers


def masked_attention_layer_count(inputs: EstimateInput) -> int:
    """Layers whose SDPA call gets an explicit mask instead of ``is_causal=True``.

    transformers skips the mask only when nothing but causality is needed: a sliding layer
    needs one once the keys reach the window (``kv_length >= local_attention_size``,
    masking_utils.py:286), and packed SFT rows (trl's ``bfd`` packing is padding-free:
    ``position_ids`` only, sft_trainer.py:916) get a block-causal mask on every layer
    (masking_utils.py:991-996). flash-attention takes neither (varlen / window arguments);
    eager adds its mask to the scores (counted with them)."""
    if effective_attn_implementation(inputs) != "sdpa":
        return 0
    c = inputs.arch.config
    if inputs.stack.causal_mask_max_positions:
        return c.num_hidden_layers  # transformers 4.38: every forward builds a mask
    if inputs.method == "sft" and inputs.packing:
        return c.num_hidden_layers
    window = c.extra.get("sliding_window")
    if isinstance(window, int) and sequence_length(inputs) >= window:
        return sliding_window_layer_count(inputs)
    return 0


def attention_mask_bytes(inputs: EstimateInput) -> int:
    """One layer's SDPA mask as the kernel saves it: torch converts the bool mask to a
    compute-dtype additive mask ([rows, 1, T, T], ``convert_boolean_attn_mask``) on every
    call, and the memory-efficient kernel saves that bias for backward. transformers 4.38
    (``StackProfile.causal_mask_max_positions``) hands each layer the same size: its
    advanced-indexing slice of the model's mask is already a compute-dtype copy."""
    seq = sequence_length(inputs)
    return DTYPE_BYTES[inputs.compute_dtype] * sequences_per_micro_batch(inputs) * seq * seq


def bool_attention_mask_bytes(inputs: EstimateInput) -> int:
    """The model's bool mask ([rows, 1, T, T], built once per forward and shared by the
    layers). Non-reentrant checkpointing keeps each layer's arguments for the recompute, so
    with checkpointing it lives until backward ends. transformers 4.38 builds a
    max-positions mask instead (``max_positions_causal_mask_bytes``)."""
    if not masked_attention_layer_count(inputs):
        return 0
    if inputs.stack.causal_mask_max_positions:
        return max_positions_causal_mask_bytes(inputs)
    seq = sequence_length(inputs)
    return sequences_per_micro_batch(inputs) * seq * seq


def max_positions_causal_mask_bytes(inputs: EstimateInput) -> int:
    """transformers 4.38's SDPA mask (``StackProfile.causal_mask_max_positions``):
    ``LlamaModel._update_causal_mask`` repeats the [P, P] ``causal_mask`` buffer
    (P = ``max_position_embeddings``) per row and casts it, [rows, 1, P, P] in the compute
    dtype, whatever the sequence length; every decoder layer receives it, so checkpointing
    (reentrant: ``CheckpointFunction`` saves its tensor arguments; non-reentrant: the
    recompute keeps them) holds it until backward ends. (The bool buffer itself is in
    ``model_buffer_bytes``.) The cast's temporaries (the repeated bools, the product) die
    at the forward's start."""
    positions = inputs.arch.config.max_position_embeddings
    rows = sequences_per_micro_batch(inputs)
    compute = DTYPE_BYTES[inputs.compute_dtype]
    return rows * positions * positions * compute


def mlp_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """Gated MLP: the activation's input, its output and the up projection (3 x T x I).

    MoE layers run each token through ``num_experts_per_tok`` experts of width
    ``moe_intermediate_size``.
    """
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    width = c.intermediate_size
    if c.num_local_experts:
        width = (c.moe_intermediate_size or c.intermediate_size) * (c.num_experts_per_tok or 1)
    return 3 * compute * tokens * width


def norm_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """RMSNorms of one layer; each saves its fp32-upcast input (``pow`` needs it).

    Two per layer, four in Gemma 2/3 (norms after attention and MLP too); Qwen3 and
    Gemma 3 also normalise q and k per head."""
    c = inputs.arch.config
    per = 4 if inputs.stack.norm_saves_fp32_input else DTYPE_BYTES[inputs.compute_dtype]
    norms = 4 if c.model_type in SANDWICH_NORM_TYPES else 2
    total = norms * per * tokens * c.hidden_size
    if c.model_type in QK_NORM_TYPES:
        heads = c.num_attention_heads + c.num_key_value_heads
        total += per * tokens * heads * c.head_dim
    return total


def moe_merged_expert_bytes_per_layer(inputs: EstimateInput) -> int:
    """A fused-MoE layer's experts with their LoRA merged in, as peft's ``ParamWrapper``
    builds them on every forward (a parametrization ``W + B @ A``,
    peft/tuners/lora/layer.py:2572-2598): the merged 3-D weights are what the experts'
    matmuls save for backward. fp32 adapters promote the merged weights to fp32."""
    if inputs.target_modules != "all-linear" or not moe_experts_per_layer(inputs.arch):
        return 0
    c = inputs.arch.config
    width = c.moe_intermediate_size or c.intermediate_size
    experts = moe_experts_per_layer(inputs.arch)
    element = max(DTYPE_BYTES[inputs.compute_dtype], DTYPE_BYTES[adapter_dtype(inputs)])
    return element * experts * 3 * width * c.hidden_size


def layer_saved_activation_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Everything one decoder layer keeps for its backward pass (no checkpointing)."""
    if inputs.finetuning == "full":
        return (
            norm_saved_bytes_per_layer(inputs, tokens)
            + attention_saved_bytes_per_layer(inputs, tokens)
            + mlp_saved_bytes_per_layer(inputs, tokens)
            + full_saved_bytes_per_layer(inputs, tokens)
        )
    return (
        moe_merged_expert_bytes_per_layer(inputs)
        + norm_saved_bytes_per_layer(inputs, tokens)
        + attention_saved_bytes_per_layer(inputs, tokens)
        + mlp_saved_bytes_per_layer(inputs, tokens)
        + lora_saved_input_bytes_per_layer(inputs, tokens)
    )


def backward_transient_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Short-lived tensors at the worst moment of one layer's backward: two gradients of
    the widest activation, and the dequantized weight of the largest 8/4-bit linear
    (MatMul4Bit dequantizes the whole weight to the compute dtype in forward and backward,
    autograd/_functions.py:384,446; LLM.int8 dequantizes CB in backward, :237).

    When LoRA adapts the layer, the gradient reaching the adapter's input is in the
    adapter's dtype (fp32 adapters: the fp32-cast input's gradient, then the dropout's),
    so the two gradients take the adapter's element size when it is the larger."""
    c = inputs.arch.config
    element = DTYPE_BYTES[inputs.compute_dtype]
    if targeted_modules(inputs.arch, inputs.target_modules):
        element = max(element, DTYPE_BYTES[adapter_dtype(inputs)])
    width = max(c.intermediate_size, c.num_attention_heads * c.head_dim)
    if inputs.finetuning == "full":
        return 2 * element * tokens * width + full_weight_gradient_transient_bytes(inputs)
    return 2 * element * tokens * width + dequantized_weight_transient_bytes(inputs)


def dequantized_weight_transient_bytes(inputs: EstimateInput) -> int:
    """The largest quantized linear dequantized to the compute dtype (0 when unquantized)."""
    if inputs.precision not in ("8bit", "4bit"):
        return 0
    largest = max(m.in_features * m.out_features for m in linear_modules(inputs.arch))
    return DTYPE_BYTES[inputs.compute_dtype] * largest


def kept_activation_bytes(inputs: EstimateInput) -> int:
    """Activations saved across the whole forward, alive when backward starts.

    Without checkpointing every layer's saved tensors (plus the embedding output). With
    (non-reentrant) checkpointing only each layer's input, ``T x hidden`` in the compute
    dtype. Both keep the final norm's fp32 input.
    """
    c = inputs.arch.config
    tokens = tokens_per_micro_batch(inputs)
    hidden = residual_stream_dtype_bytes(inputs) * tokens * c.hidden_size
    if inputs.gradient_checkpointing:
        kept = c.num_hidden_layers * (hidden + int8_inputs_outside_checkpoint_bytes(inputs, tokens))
        kept += bool_attention_mask_bytes(inputs)
    else:
        kept = c.num_hidden_layers * layer_saved_activation_bytes(inputs, tokens) + hidden
        kept += masked_attention_layer_count(inputs) * attention_mask_bytes(inputs)
    return kept + 4 * tokens * c.hidden_size


def residual_stream_dtype_bytes(inputs: EstimateInput) -> int:
    """Element size of the hidden states between decoder layers: the embedding weight's.

    autocast changes neither the embedding lookup nor the residual adds, and HF RMSNorm
    returns ``weight * x.to(input_dtype)``, so fp32 embeddings (the fp16 script's fp32
    trained copy of ``embed_tokens``; ``prepare_model_for_kbit_training``'s upcast) keep
    every layer's input and output in fp32; a tied ``lm_head`` copy is separate and does
    not matter here."""
    if inputs.finetuning == "full":
        return full_master_bytes(inputs)  # fp32 embeddings: an fp32 residual stream
    trained = {name.rsplit(".", 1)[-1] for name in inputs.modules_to_save}
    if "embed_tokens" in trained:
        return modules_to_save_dtype_bytes(inputs)
    return unquantized_weight_dtype_bytes(inputs)


def int8_inputs_outside_checkpoint_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Inputs of one layer's LLM.int8 linears that survive activation checkpointing.

    ``MatMul8bitLt`` keeps its input on ``ctx.tensors`` (bitsandbytes
    autograd/_functions.py:186), not through ``save_for_backward``, so checkpointing's
    saved-tensor hooks never see it: every 8-bit layer's inputs stay alive through the
    forward even with gradient checkpointing on. One tensor per shared input.
    """
    if inputs.precision != "8bit":
        return 0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    return sum(compute * tokens * width for width, _ in _input_groups(inputs))


def backward_layer_bytes(inputs: EstimateInput) -> int:
    """What one layer's backward adds to the kept activations: its recomputed forward
    (checkpointing only) and the larger of the recompute's and the backward's transients
    (never alive together: the recomputed forward has returned before the layer's
    backward kernels run). The LM head's backward runs before any layer's, and has
    finished by then."""
    tokens = tokens_per_micro_batch(inputs)
    transient = backward_transient_bytes(inputs, tokens)
    if inputs.gradient_checkpointing:
        transient = max(transient, recompute_transient_bytes(inputs, tokens))
        mask = attention_mask_bytes(inputs) if masked_attention_layer_count(inputs) else 0
        return layer_saved_activation_bytes(inputs, tokens) + mask + transient
    return transient


def recompute_transient_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Unsaved tensors alive while a checkpointed layer's forward is recomputed, at its
    widest moment: ``down_proj``'s LoRA branch.

    The MLP's product ``act(gate) * up`` (compute dtype) is alive while ``down_proj``
    runs. peft casts it to the adapter dtype into its local ``x``, held until the module
    returns (peft/tuners/lora/layer.py:1100), and dropout writes a new tensor in that
    dtype; with fp32 adapters both are fp32 and neither is saved (lora_A saves autocast's
    compute-dtype copy, counted in ``lora_saved_input_bytes_per_layer``). bf16 adapters
    (8/4-bit models under trl) make no cast, and their dropout output is the saved input.
    """
    down = [
        m
        for m in targeted_modules(inputs.arch, inputs.target_modules)
        if m.name == "down_proj" and m.component == LANGUAGE_MODEL
    ]
    if not down:
        return 0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    adapter = DTYPE_BYTES[adapter_dtype(inputs)]
    per_element = compute
    if adapter != compute:
        per_element += adapter
        if inputs.lora_dropout > 0:
            per_element += adapter
    return per_element * tokens * down[0].in_features


def activation_bytes(inputs: EstimateInput) -> int:
    """Activations at the worst moment of the decoder layers' backward."""
    return kept_activation_bytes(inputs) + backward_layer_bytes(inputs)


def train_step_peak_parts(inputs: EstimateInput) -> tuple[int, int]:
    """(activation, logits) bytes at the training step's peak.

    Two moments compete: the LM head and loss (forward end / backward start: the kept
    activations plus ``logits_bytes``) and a decoder layer's backward (the kept
    activations plus ``backward_layer_bytes``; the head's tensors are freed by then).
    """
    kept = kept_activation_bytes(inputs)
    head = logits_bytes(inputs)
    layer = backward_layer_bytes(inputs)
    if head >= layer:
        return kept, head
    return kept + layer, 0


FULL_LOGITS_BYTES_PER_ENTRY = {
    "full_logits_fp32": 2 + 4 + 4,
    "full_logits_fp32_shifted": 4 + 4 + 4,
    "chunked_logits_fp32": 2 + 4,
    "chunked_logits_bf16": 2 + 2,
}
"""Bytes alive per (token x vocabulary entry) at the loss forward's peak, per full-logits
path. ``full_logits_fp32_shifted`` (transformers < 4.46 ``LlamaForCausalLM.forward``:
``logits = logits.float()``, ``shift_logits = logits[..., :-1, :].contiguous()``,
``CrossEntropyLoss``): the fp32 logits, their shifted copy and the log-softmax that
``cross_entropy`` saves; the compute-dtype logits die when ``logits`` is rebound to the
fp32 copy. The backward's peak is ``loss_backward_bytes_per_entry``."""


LOSS_OUTPUT_BYTES_PER_ENTRY = {"full_logits_fp32": 2, "full_logits_fp32_shifted": 4}
"""The logits the model's output holds, per full-logits fp32 path: transformers >= 4.46
returns the compute-dtype logits (the loss upcasts a copy); < 4.46 rebinds ``logits`` to
its fp32 upcast before returning it."""


def loss_backward_bytes_per_entry(stack: StackProfile) -> int:
    """Bytes per (token x vocabulary entry) when the fp32 cross-entropy's backward peaks
    (0 for the chunked and fused paths: not modelled here).

    ``cross_entropy`` is ``log_softmax`` + ``nll_loss``. ``NllLossBackward0`` returns a
    dense fp32 gradient of the log-softmax's shape (``nll_loss_backward``: zeros, then the
    target entries), and ``LogSoftmaxBackward0`` allocates its own output
    (``_log_softmax_backward_data(grad_output, output, dim, dtype)``) while its saved
    result and that incoming gradient are alive: 4 + 4 + 4 B, whether the logits were
    shifted (transformers < 4.46) or the labels (>= 4.46, loss/loss_utils.py
    ``ForCausalLMLoss``). A loop that still holds the model's output
    (``StackProfile.loss_output_held``: fsdp_qlora's train.py) keeps its logits alive too
    (``LOSS_OUTPUT_BYTES_PER_ENTRY``). Measured on torch's own autograd over fake tensors
    (``tests/test_sharded.py::test_shifted_loss_backward_peak_matches_torch_autograd``,
    ``test_plain_fp32_loss_backward_peak_matches_torch_autograd``)."""
    if stack.loss_path not in LOSS_OUTPUT_BYTES_PER_ENTRY:
        return 0
    held = LOSS_OUTPUT_BYTES_PER_ENTRY[stack.loss_path] if stack.loss_output_held else 0
    return 4 + 4 + 4 + held


def logits_bytes(inputs: EstimateInput) -> int:
    """The LM head and loss at their peak, per the stack's loss path.

    ``fused_lm_head`` (trl 1.16): the compact hidden states (one copy), one
    [4096 x 32768] compute-dtype tile (forward's buffer, freed before backward allocates
    its own; the Triton kernels fold each tile in place), the fp32
    gradient of the hidden states and a handful of fp32 per-token statistics
    (trl/kernels/chunked_logprob.py:340-349, 406-415). The full-logits paths cost their
    bytes per token x vocabulary entry (``StackProfile.loss_path``).
    """
    c = inputs.arch.config
    tokens = tokens_per_micro_batch(inputs)
    compute = DTYPE_BYTES[inputs.compute_dtype]
    if inputs.stack.loss_path in FULL_LOGITS_BYTES_PER_ENTRY:
        forward = FULL_LOGITS_BYTES_PER_ENTRY[inputs.stack.loss_path]
        per_entry = max(forward, loss_backward_bytes_per_entry(inputs.stack))
        return per_entry * tokens * c.vocab_size
    tokens = fused_head_scored_tokens(inputs)
    tile = compute * min(tokens, FUSED_HEAD_TOKEN_TILE) * min(c.vocab_size, FUSED_HEAD_VOCAB_TILE)
    fused = compute * tokens * c.hidden_size + tile + 4 * tokens * c.hidden_size + 8 * 4 * tokens
    if inputs.finetuning == "full":
        return fused + full_head_extra_bytes(inputs, tokens)
    return fused + trained_head_gradient_bytes(inputs)


def fused_head_scored_tokens(inputs: EstimateInput) -> int:
    """Tokens the fused LM head projects: on CUDA only positions with a label
    (``hidden_states[mask]``, trl/trainer/utils.py:1642-1648). GRPO masks the prompt
    (``labels[:, :-logits_to_keep] = -100``, grpo_trainer.py:1496, with ``logits_to_keep``
    the completion length, :2504), so only ``max_completion_length`` tokens per row are
    scored; SFT and DPO score every position of a full-length row."""
    if inputs.method == "grpo":
        return inputs.micro_batch * inputs.max_completion_length
    return tokens_per_micro_batch(inputs)


def trained_head_gradient_bytes(inputs: EstimateInput) -> int:
    """A trained ``lm_head`` (``modules_to_save``) gets its gradient from the fused head's
    backward as an fp32 buffer of the whole head (chunked_logprob.py:411-412), cast to the
    weight's dtype on return: 4 + 2 bytes per head parameter, on top of ``.grad``."""
    if "lm_head" not in {name.rsplit(".", 1)[-1] for name in inputs.modules_to_save}:
        return 0
    c = inputs.arch.config
    return (4 + DTYPE_BYTES[inputs.compute_dtype]) * c.vocab_size * c.hidden_size
