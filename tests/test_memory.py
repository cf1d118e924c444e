"""Properties of the memory estimator, plus hand-computed byte counts of quantized weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftgen.catalog import LinearModule, ModelArch, find_model, model_catalogue
from peftgen.load import load_spec
from peftgen.memory import (
    OPTIMIZERS,
    EstimateInput,
    StackProfile,
    activation_bytes,
    attention_mask_bytes,
    backward_layer_bytes,
    backward_transient_bytes,
    estimate,
    fused_head_scored_tokens,
    fused_qkv_output_bytes,
    grpo_prefill_bytes,
    int8_linear_bytes,
    kept_activation_bytes,
    kv_cache_bytes,
    layer_saved_activation_bytes,
    linear_weight_bytes,
    logits_bytes,
    managed_optimizer_bytes,
    masked_attention_layer_count,
    nf4_linear_bytes,
    optimizer_state_bytes,
    paged_state_bytes,
    recompute_transient_bytes,
    residual_stream_dtype_bytes,
    sliding_window_layer_count,
    weights_bytes,
)
from peftgen.plan import make_plan
from peftgen.resolve import resolve

PLAN_SPECS = Path(__file__).parent / "plan_specs"
# Language-only catalogue entries the structural properties are drawn from.
ARCHS = [a for a in model_catalogue() if a.config.text_config_model_type is None]

LLAMA3_8B = find_model("meta-llama/Meta-Llama-3-8B")
assert LLAMA3_8B is not None

inputs_strategy = st.builds(
    EstimateInput,
    arch=st.sampled_from(ARCHS),
    precision=st.sampled_from(["bf16", "fp16", "8bit", "4bit"]),
    method=st.sampled_from(["sft", "dpo", "grpo"]),
    compute_dtype=st.sampled_from(["bf16", "fp16"]),
    bnb_4bit_use_double_quant=st.booleans(),
    lora_r=st.integers(1, 256),
    target_modules=st.sampled_from(["all-linear", ("q_proj", "v_proj"), ("down_proj",)]),
    use_dora=st.booleans(),
    modules_to_save=st.sampled_from([(), ("embed_tokens", "lm_head")]),
    lora_dropout=st.sampled_from([0.0, 0.05]),
    micro_batch=st.integers(1, 16),
    max_length=st.integers(16, 16384),
    gradient_checkpointing=st.booleans(),
    attn_implementation=st.sampled_from(["sdpa", "flash_attention_2", "eager"]),
    optim=st.sampled_from(OPTIMIZERS),
    gradient_accumulation_steps=st.integers(1, 16),
    max_completion_length=st.integers(1, 2048),
)

fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(inputs_strategy)
def test_total_is_the_sum_of_the_parts(inputs: EstimateInput) -> None:
    result = estimate(inputs)
    parts = (
        result.weights_bytes,
        result.adapter_bytes,
        result.gradient_bytes,
        result.optimizer_bytes,
        result.activation_bytes,
        result.logits_bytes,
    )
    assert all(part >= 0 for part in parts)
    assert result.peak_allocated_bytes == sum(parts)
    assert result.peak_reserved_bytes == sum(parts) + result.overhead_bytes
    assert result.peak_allocated_bytes < result.torch_reserved_bytes < result.peak_reserved_bytes


@fast
@given(inputs_strategy, st.integers(1, 4096))
def test_monotone_in_max_length(inputs: EstimateInput, extra: int) -> None:
    longer = replace(inputs, max_length=inputs.max_length + extra)
    assert estimate(longer).peak_reserved_bytes >= estimate(inputs).peak_reserved_bytes


@fast
@given(inputs_strategy, st.integers(1, 8))
def test_monotone_in_batch(inputs: EstimateInput, extra: int) -> None:
    bigger = replace(inputs, micro_batch=inputs.micro_batch + extra)
    assert estimate(bigger).peak_reserved_bytes >= estimate(inputs).peak_reserved_bytes


@fast
@given(inputs_strategy, st.integers(1, 128))
def test_monotone_in_rank(inputs: EstimateInput, extra: int) -> None:
    bigger = replace(inputs, lora_r=inputs.lora_r + extra)
    assert estimate(bigger).peak_reserved_bytes >= estimate(inputs).peak_reserved_bytes


@fast
@given(inputs_strategy, st.integers(1, 16))
def test_monotone_in_parameters(inputs: EstimateInput, extra_layers: int) -> None:
    """More layers (more parameters, same shapes) never need less memory."""
    config = inputs.arch.config
    deeper_config = config.model_copy(
        update={"num_hidden_layers": config.num_hidden_layers + extra_layers}
    )
    deeper_arch = inputs.arch.model_copy(update={"config": deeper_config})
    deeper = replace(inputs, arch=deeper_arch)
    assert estimate(deeper).total_parameters > estimate(inputs).total_parameters
    assert estimate(deeper).peak_reserved_bytes >= estimate(inputs).peak_reserved_bytes


@fast
@given(inputs_strategy)
def test_gradient_checkpointing_never_raises_activations(inputs: EstimateInput) -> None:
    on = activation_bytes(replace(inputs, gradient_checkpointing=True))
    off = activation_bytes(replace(inputs, gradient_checkpointing=False))
    assert on <= off


@fast
@given(inputs_strategy)
def test_quantized_weights_are_smaller(inputs: EstimateInput) -> None:
    by_precision = {
        p: weights_bytes(replace(inputs, precision=p)) for p in ("bf16", "8bit", "4bit")
    }
    assert by_precision["4bit"] <= by_precision["8bit"] <= by_precision["bf16"]


PRECISION_RANK = {"bf16": 0, "fp16": 0, "8bit": 1, "4bit": 2}


@settings(max_examples=25, deadline=None)
@given(
    vram_gib=st.floats(4, 120),
    max_length=st.integers(256, 16384),
    batch=st.integers(1, 8),
    checkpointing=st.booleans(),
)
def test_planner_never_under_picks(
    vram_gib: float, max_length: int, batch: int, checkpointing: bool
) -> None:
    """``auto`` takes the most faithful precision whose interval's upper end fits (else the
    most faithful that fits at the estimate: a tight plan), and only one that fits."""
    resolved = resolve(load_spec(PLAN_SPECS / "llama3-8b-sft-auto.yaml"))
    spec = resolved.loaded.spec
    training = spec.training.model_copy(
        update={
            "max_length": max_length,
            "per_device_train_batch_size": batch,
            "gradient_checkpointing": checkpointing,
        }
    )
    changed = replace(
        resolved,
        loaded=replace(resolved.loaded, spec=spec.model_copy(update={"training": training})),
    )
    plan = make_plan(changed, vram_gib_override=vram_gib)
    fitting = [c.precision for c in plan.candidates if c.fits]
    if not fitting:
        assert plan.chosen_precision is None and not plan.fits
        return
    assert plan.chosen_precision is not None and plan.fits
    chosen = plan.chosen
    assert chosen is not None and chosen.fits
    safe = [c.precision for c in plan.candidates if c.fits_high]
    preferred = safe or fitting
    assert plan.chosen_precision in preferred
    assert all(PRECISION_RANK[plan.chosen_precision] <= PRECISION_RANK[p] for p in preferred)
    assert plan.tight == (not safe)


# --------------------------------------------------------------------------- exact bytes

SMALL = LinearModule("q_proj", in_features=128, out_features=64, count=1)


def test_int8_weight_bytes_by_hand() -> None:
    # 128 x 64 int8 weights + one fp32 scale per output row.
    assert int8_linear_bytes(128, 64) == 8192 + 64 * 4


def test_nf4_weight_bytes_by_hand() -> None:
    # 8192 weights: 4096 packed bytes, 128 blocks of 64 -> 128 fp32 absmax, 16-entry fp32 map.
    assert nf4_linear_bytes(128, 64, double_quant=False) == 4096 + 128 * 4 + 64


def test_nf4_double_quant_bytes_by_hand() -> None:
    # 128 uint8 absmax codes, ceil(128 / 256) = 1 fp32 nested absmax, fp32 offset, map.
    assert nf4_linear_bytes(128, 64, double_quant=True) == 4096 + 128 + 4 + 4 + 64


def test_bytes_per_parameter_match_bitsandbytes_rules() -> None:
    """NF4 is 0.5625 B/param, NF4 + double quant ~0.5159 (published rule)."""
    n = 4096 * 4096
    assert nf4_linear_bytes(4096, 4096, False) / n == pytest.approx(0.5625, abs=1e-5)
    assert nf4_linear_bytes(4096, 4096, True) / n == pytest.approx(0.5159, abs=1e-4)


def test_quantized_bias_stays_in_compute_dtype() -> None:
    biased = replace(SMALL, bias=True, count=3)
    inputs = EstimateInput(arch=LLAMA3_8B, precision="4bit")
    expected = 3 * (nf4_linear_bytes(128, 64, True) + 64 * 2)
    assert linear_weight_bytes(biased, inputs) == expected


def test_llama3_8b_weights_by_hand() -> None:
    """bf16: every parameter 2 bytes. 4-bit: linears NF4+DQ, embeddings, head, norms bf16."""
    arch: ModelArch = LLAMA3_8B
    bf16 = weights_bytes(EstimateInput(arch=arch, precision="bf16"))
    assert bf16 == 2 * 8_030_261_248
    embed_head_norms = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096
    attention = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)]
    mlp = [(4096, 14336), (4096, 14336), (14336, 4096)]
    linear_shapes = [*attention, *mlp]
    linear = 32 * sum(nf4_linear_bytes(i, o, True) for i, o in linear_shapes)
    four_bit = weights_bytes(EstimateInput(arch=arch, precision="4bit"))
    assert four_bit == linear + 2 * embed_head_norms


# --------------------------------------------------------------------------- mechanisms the
# fake-tensor simulation showed (docs/simulate.md, "Agreement with the analytic estimator")

SMOLLM2 = find_model("HuggingFaceTB/SmolLM2-135M")
assert SMOLLM2 is not None


def test_recompute_transient_by_hand() -> None:
    """down_proj's LoRA in the recomputed forward: bf16 product + fp32 cast + fp32 dropout
    output (10 B per T x intermediate) with fp32 adapters; only the product with bf16 ones."""
    tokens, width = 2048, SMOLLM2.config.intermediate_size
    bf16 = EstimateInput(arch=SMOLLM2, precision="bf16", max_length=tokens)
    assert recompute_transient_bytes(bf16, tokens) == 10 * tokens * width
    no_dropout = replace(bf16, lora_dropout=0.0)
    assert recompute_transient_bytes(no_dropout, tokens) == 6 * tokens * width
    four_bit = replace(bf16, precision="4bit")
    assert recompute_transient_bytes(four_bit, tokens) == 2 * tokens * width
    attention_only = replace(bf16, target_modules=("q_proj", "v_proj"))
    assert recompute_transient_bytes(attention_only, tokens) == 0


def test_checkpointed_layer_takes_the_larger_transient() -> None:
    inputs = EstimateInput(arch=SMOLLM2, precision="bf16", max_length=8192)
    tokens = 8192
    saved = layer_saved_activation_bytes(inputs, tokens)
    larger = max(
        recompute_transient_bytes(inputs, tokens), backward_transient_bytes(inputs, tokens)
    )
    assert recompute_transient_bytes(inputs, tokens) > backward_transient_bytes(inputs, tokens)
    assert backward_layer_bytes(inputs) == saved + larger


def test_grpo_fused_head_scores_only_completion_tokens() -> None:
    c = SMOLLM2.config
    grpo = EstimateInput(
        arch=SMOLLM2, precision="bf16", method="grpo", micro_batch=2, max_completion_length=256
    )
    scored = 2 * 256
    tile = 2 * scored * min(c.vocab_size, 32768)
    expected = 2 * scored * c.hidden_size + tile + 4 * scored * c.hidden_size + 8 * 4 * scored
    assert fused_head_scored_tokens(grpo) == scored
    assert logits_bytes(grpo) == expected
    sft = replace(grpo, method="sft")
    assert fused_head_scored_tokens(sft) == 2 * sft.max_length


GEMMA3_1B = find_model("google/gemma-3-1b-pt")
assert GEMMA3_1B is not None


def test_sliding_window_masks_by_hand() -> None:
    """Gemma-3-1b: window 512, every 6th of 26 layers is global -> 22 sliding layers; each
    saves a bf16 [rows, 1, T, T] additive mask once T reaches the window."""
    short = EstimateInput(arch=GEMMA3_1B, precision="bf16", max_length=511)
    assert masked_attention_layer_count(short) == 0
    inputs = replace(short, max_length=2048, gradient_checkpointing=False)
    assert sliding_window_layer_count(inputs) == 22
    assert masked_attention_layer_count(inputs) == 22
    assert attention_mask_bytes(inputs) == 2 * 2048 * 2048
    dpo = replace(inputs, method="dpo")
    assert attention_mask_bytes(dpo) == 2 * 2 * 2048 * 2048
    flash = replace(inputs, attn_implementation="flash_attention_2")
    assert masked_attention_layer_count(flash) == 0
    no_mask = kept_activation_bytes(replace(inputs, arch=_without_sliding_window(GEMMA3_1B)))
    assert kept_activation_bytes(inputs) - no_mask == 22 * 2 * 2048 * 2048
    checkpointed = replace(inputs, gradient_checkpointing=True)
    no_mask_gc = replace(checkpointed, arch=_without_sliding_window(GEMMA3_1B))
    assert kept_activation_bytes(checkpointed) - kept_activation_bytes(no_mask_gc) == 2048 * 2048
    assert backward_layer_bytes(checkpointed) - backward_layer_bytes(no_mask_gc) == (
        2 * 2048 * 2048
    )


def test_packed_sdpa_rows_mask_every_layer() -> None:
    packed = EstimateInput(arch=SMOLLM2, precision="bf16", max_length=1024, packing=True)
    assert sliding_window_layer_count(packed) == 0
    assert masked_attention_layer_count(packed) == SMOLLM2.config.num_hidden_layers
    assert masked_attention_layer_count(replace(packed, packing=False)) == 0


def _without_sliding_window(arch: ModelArch) -> ModelArch:
    extra = {k: v for k, v in arch.config.extra.items() if k != "sliding_window"}
    return arch.model_copy(update={"config": arch.config.model_copy(update={"extra": extra})})


def test_fused_qkv_output_kept_whole() -> None:
    """Phi-3-mini (32 heads, 32 kv heads, head_dim 96): v is a view of qkv_proj's output,
    so q and k widths (2 x 3072) stay alive per token on top of q, k, v and the output."""
    phi3 = find_model("microsoft/Phi-3-mini-4k-instruct")
    assert phi3 is not None
    inputs = EstimateInput(arch=phi3, precision="bf16", max_length=1024)
    assert fused_qkv_output_bytes(inputs, 1024) == 2 * 1024 * (32 + 32) * 96
    separate = EstimateInput(arch=SMOLLM2, precision="bf16", max_length=1024)
    assert fused_qkv_output_bytes(separate, 1024) == 0


def test_paged_optimizers_page_only_large_tensors() -> None:
    """bitsandbytes pages state buffers of parameters with >= 1e5 elements only."""
    assert paged_state_bytes(229_376, states=2, bits=8) == 2 * 229_376
    assert paged_state_bytes(229_376, states=1, bits=32) == 4 * 229_376
    assert paged_state_bytes(65_536, states=2, bits=8) == 0
    # SmolLM2 at r=16: every LoRA tensor is under 1e5 elements, nothing is paged.
    paged = EstimateInput(arch=SMOLLM2, precision="4bit", optim="paged_adamw_8bit")
    assert managed_optimizer_bytes(paged) == 0
    unpaged = optimizer_state_bytes(replace(paged, optim="adamw_8bit"))
    assert optimizer_state_bytes(paged) == unpaged
    # Llama-3-8B at r=16: down_proj's A (16 x 14336) and the B of gate/up (14336 x 16)
    # are paged; everything else and all block scales stay on the device.
    big = replace(paged, arch=LLAMA3_8B)
    assert managed_optimizer_bytes(big) == 32 * 3 * 2 * 16 * 14336
    total = optimizer_state_bytes(replace(big, optim="adamw_8bit"))
    assert optimizer_state_bytes(big) + managed_optimizer_bytes(big) == total


def test_fp32_embeddings_keep_the_residual_stream_fp32() -> None:
    """The 16-bit scripts train an fp32 copy of embed_tokens: every checkpointed layer input
    (and the final norm's input) is fp32, 4 B per token x hidden instead of 2."""
    trained = ("embed_tokens", "lm_head")
    fp16 = EstimateInput(
        arch=SMOLLM2, precision="fp16", compute_dtype="fp16", modules_to_save=trained
    )
    assert residual_stream_dtype_bytes(fp16) == 4
    assert residual_stream_dtype_bytes(replace(fp16, modules_to_save=())) == 2
    assert residual_stream_dtype_bytes(replace(fp16, precision="bf16", compute_dtype="bf16")) == 4
    assert residual_stream_dtype_bytes(replace(fp16, precision="4bit")) == 2
    upcast = replace(
        fp16,
        precision="4bit",
        modules_to_save=(),
        stack=StackProfile(upcast_unquantized_to_fp32=True),
    )
    assert residual_stream_dtype_bytes(upcast) == 4
    c = SMOLLM2.config
    tokens = fp16.max_length
    kept_fp16 = kept_activation_bytes(replace(fp16, modules_to_save=()))
    extra = c.num_hidden_layers * 2 * tokens * c.hidden_size
    assert kept_activation_bytes(fp16) - kept_fp16 == extra


def test_grpo_prefill_by_hand() -> None:
    """8 rows x 2048 prompt tokens, 4-bit, bf16 adapters: KV cache, four T x intermediate
    tensors around up_proj's LoRA sum, four hidden-sized tensors (embedding output, layer
    input, residual, norm output) and the largest dequantized weight."""
    inputs = EstimateInput(
        arch=SMOLLM2, precision="4bit", method="grpo", gradient_accumulation_steps=8
    )
    c = SMOLLM2.config
    tokens = 8 * 2048
    expected = (
        kv_cache_bytes(inputs, 8, 2048)
        + 4 * 2 * tokens * c.intermediate_size
        + 4 * 2 * tokens * c.hidden_size
        + 2 * c.hidden_size * c.intermediate_size
    )
    assert grpo_prefill_bytes(inputs) == expected
