"""The throughput model: seconds per optimizer step, tokens per second, hours and cost.

Pure Python, no torch, one function per term, like ``memory``. A step's work is counted
from the architecture and the method's passes:

- the matmuls of the forward (``2 x parameters`` FLOPs per token, LoRA's two thin
  matmuls per adapted module included), the backward's input gradients (the same again:
  frozen weights still pass the gradient through) and weight gradients for the trained
  tensors only (LoRA A/B, modules_to_save), and the forward again under gradient
  checkpointing (``recompute_flops_per_token``);
- attention's own matmuls for the kernel in use (causal kernels skip the masked half;
  eager computes the whole square; flash-style backward recomputes the scores);
- the dequantisation of 8/4-bit weights before each matmul (bandwidth-bound: read the
  packed weight, write and re-read a 16-bit copy, once per pass);
- DPO's chosen + rejected rows and its reference forward; GRPO's generation as a
  bandwidth-bound decode (weights + KV cache read per generated token) plus its training
  step; the optimizer update (bandwidth-bound).

Compute terms are divided by the GPU's peak dense tensor FLOP/s (``Gpu.throughput``,
datasheet figures) times an achieved-efficiency factor per path; bandwidth terms by the
datasheet memory bandwidth times the same factor. The factors are the one calibrated
part (``EFFICIENCY``): derived by ``benchmarks/throughput.py`` from public measured
throughputs, with the error on rows not used for them.

Not modelled (said in the plan's notes): communication between GPUs, CPU offload,
data loading, evaluation, checkpoint saving. The figures are for the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path as Path_
from typing import Literal

from peftgen.catalog import Gpu, linear_modules, parameter_groups
from peftgen.memory import (
    DTYPE_BYTES,
    EstimateInput,
    effective_attn_implementation,
    grpo_generation_rows,
    kv_cache_bytes,
    linear_weight_bytes,
    moe_experts_per_layer,
    moe_lora_parameter_count,
    sequence_length,
    targeted_modules,
    tokens_per_micro_batch,
    trainable_parameter_count,
    weights_bytes,
)
from peftgen.spec import AnySpec, from_spec_dir, is_local_dataset

Path = Literal["16bit", "8bit", "4bit"]

# ----------------------------------------------------------------------------- calibrated

EFFICIENCY: dict[Path, float] = {"16bit": 0.629, "8bit": 0.422, "4bit": 0.422}
"""Calibrated constants: achieved share of the datasheet peak, per loading path.

Derived by ``python benchmarks/throughput.py --derive`` as the median over the calibration
rows (``calibration=True`` in ``benchmarks/throughput_rows.py``) of ``ideal / measured``
seconds: 16bit from IBM fms-acceleration's Mistral-7B LoRA (HF Trainer + peft, fp16,
flash-attention 2, checkpointing) on an A100-80GB (0.546) and an L40 (0.712); 4bit from
its Mistral-7B QLoRA (bitsandbytes nf4) on the A100-80GB (0.422). 8bit has no public row
with a full configuration: an assumption, set to the 4bit factor (the dequantisation term
carries 8-bit's extra work). Full fine-tuning (``finetuning: full``) takes the 16bit
factor, an assumption: its one row, torchtune's, is held back (-20 %). Held-back rows (9,
not used here): median |error| 14.1 %, max 42.6 %; the 5 HF + peft ones median 11.4 %, max
14.1 %; torchtune's torch.compile'd LoRA recipes run 28-43 % faster than predicted (the
benchmark's table)."""

RATIO_LOW = 0.86
"""Calibrated: the smallest measured / predicted tokens/s over the benchmark's HF + peft
rows, rounded down to 0.01: the range's low end (a slower run than the estimate)."""
RATIO_HIGH = 1.14
"""Calibrated: the largest measured / predicted tokens/s over the same rows, rounded up:
the range's high end (capped at the physical bound)."""

# ----------------------------------------------------------------------------- assumptions

DECODE_STEP_OVERHEAD_SECONDS_PER_LAYER = 0.0004
"""Assumption (no public GRPO row with a full configuration yet): host-side cost of one
decoder layer in one eager ``generate`` step (kernel launches, Python), which bounds
small-model decoding below the bandwidth roofline."""

OPTIMIZER_BYTES_PER_TRAINABLE_PARAMETER = 32
"""Assumption: AdamW's update reads and writes the parameter, its gradient and two fp32
states (4 x 4 B read + 4 x 4 B written) per trainable element."""


@dataclass(frozen=True)
class RunLength:
    """How many optimizer steps the run takes, when the spec and the data say so."""

    optimizer_steps: int | None
    """None: only per-step figures can be given."""
    source: str
    """How the count was found: ``max_steps``, ``rows x epochs``, or why it is unknown."""


@dataclass(frozen=True)
class TimeEstimate:
    """One candidate's time per optimizer step and for the whole run (per the spec)."""

    tokens_per_second: float
    tokens_per_second_low: float
    tokens_per_second_high: float
    step_seconds: float
    step_seconds_low: float
    step_seconds_high: float
    tokens_per_step: int
    """Token positions trained per optimizer step over all GPUs (DPO: chosen + rejected;
    GRPO: prompt + completion rows)."""
    flops_per_token: float
    """All FLOPs of one optimizer step (every pass) per trained token."""
    peak_tflops: float
    """The GPU's datasheet dense tensor peak for the compute dtype."""
    efficiency: float
    """The path's calibrated achieved share of the peak (``EFFICIENCY``)."""
    path: Path
    optimizer_steps: int | None
    steps_source: str
    total_hours: float | None
    total_hours_low: float | None
    total_hours_high: float | None
    seconds_per_term: dict[str, float] = field(default_factory=dict)
    """One optimizer step's seconds per term (per GPU)."""


# ----------------------------------------------------------------------------- parameters


def path_of(inputs: EstimateInput) -> Path:
    """The efficiency path: a 16-bit load, LLM.int8 or 4-bit."""
    if inputs.precision == "8bit":
        return "8bit"
    return "4bit" if inputs.precision == "4bit" else "16bit"


def active_expert_fraction(inputs: EstimateInput) -> float:
    """Share of a fused MoE layer's experts each token runs through (top-k of E)."""
    experts = moe_experts_per_layer(inputs.arch)
    if not experts:
        return 0.0
    return (inputs.arch.config.num_experts_per_tok or experts) / experts


def decoder_matmul_parameters(inputs: EstimateInput) -> float:
    """Weight elements one token multiplies in the decoder layers: every linear of the
    language model, a fused MoE layer's active experts only, and the router."""
    arch = inputs.arch
    groups = parameter_groups(arch)
    linear = sum(
        m.weight_parameters for m in linear_modules(arch) if m.component == "language_model"
    )
    return linear + groups.moe_experts * active_expert_fraction(inputs) + groups.moe_router


def head_matmul_parameters(inputs: EstimateInput) -> int:
    """The output head's ``vocab x hidden`` matmul (tied or not, it is computed)."""
    c = inputs.arch.config
    return c.vocab_size * c.hidden_size


def lora_matmul_parameters(inputs: EstimateInput) -> float:
    """LoRA's A and B elements one token multiplies (``r x (in + out)`` per adapted
    module); on fused MoE experts only the active experts' share."""
    if inputs.finetuning == "full":
        return 0.0
    r = inputs.lora_r
    dense = sum(
        r * (m.in_features + m.out_features) * m.count
        for m in targeted_modules(inputs.arch, inputs.target_modules)
        if m.component == "language_model"
    )
    moe = 0.0
    if inputs.target_modules == "all-linear" and moe_experts_per_layer(inputs.arch):
        moe = moe_lora_parameter_count(inputs.arch, r) * max(active_expert_fraction(inputs), 0.0)
    return dense + moe


def trained_head(inputs: EstimateInput) -> bool:
    return "lm_head" in inputs.modules_to_save


# ----------------------------------------------------------------------------- FLOPs per token


def forward_matmul_flops_per_token(inputs: EstimateInput) -> float:
    """Forward: 2 FLOPs per weight element (multiply + add), base, head and LoRA."""
    return 2.0 * (
        decoder_matmul_parameters(inputs)
        + head_matmul_parameters(inputs)
        + lora_matmul_parameters(inputs)
    )


def backward_input_gradient_flops_per_token(inputs: EstimateInput) -> float:
    """Backward, gradient w.r.t. each matmul's input: needed through every layer, frozen
    or not (``dX = dY W``), LoRA's two matmuls included."""
    return forward_matmul_flops_per_token(inputs)


def backward_weight_gradient_flops_per_token(inputs: EstimateInput) -> float:
    """Backward, gradient w.r.t. weights: trained tensors only (LoRA A and B, a trained
    output head); frozen weights get none, which is most of LoRA's saving. Full
    fine-tuning pays it for every matmul (the embedding's is a scatter, not counted)."""
    if inputs.finetuning == "full":
        return 2.0 * (decoder_matmul_parameters(inputs) + head_matmul_parameters(inputs))
    flops = 2.0 * lora_matmul_parameters(inputs)
    if trained_head(inputs):
        flops += 2.0 * head_matmul_parameters(inputs)
    return flops


def recompute_flops_per_token(inputs: EstimateInput) -> float:
    """Gradient checkpointing runs each decoder layer's forward again in the backward
    (transformers checkpoints whole layers; the head is not recomputed)."""
    if not inputs.gradient_checkpointing:
        return 0.0
    return 2.0 * (decoder_matmul_parameters(inputs) + lora_matmul_parameters(inputs))


def attention_context(inputs: EstimateInput) -> float:
    """Key positions each query meets on average: half the sequence for kernels that skip
    the causal mask's upper triangle (flash-attention 2, sdpa's causal path), the whole
    row for eager (the square is computed, then masked)."""
    length = sequence_length(inputs)
    window = inputs.arch.config.extra.get("sliding_window")
    if (
        isinstance(window, int)
        and 0 < window < length
        and inputs.arch.config.model_type in ("mistral",)
    ):
        length = window
    if effective_attn_implementation(inputs) == "eager":
        return float(length)
    return length / 2.0


def attention_forward_flops_per_token(inputs: EstimateInput) -> float:
    """Scores (``q k^T``) and the weighted sum (``p v``): 2 x 2 FLOPs per query head
    dimension per key position per layer."""
    c = inputs.arch.config
    return (
        4.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * attention_context(inputs)
    )


def attention_training_flops_per_token(inputs: EstimateInput) -> float:
    """Forward, backward (dQ, dK, dV, dP: twice the forward, plus the scores recomputed
    by flash-style kernels: 2.5x) and the recompute under checkpointing."""
    forward = attention_forward_flops_per_token(inputs)
    backward = (2.0 if effective_attn_implementation(inputs) == "eager" else 2.5) * forward
    recompute = forward if inputs.gradient_checkpointing else 0.0
    return forward + backward + recompute


def training_flops_per_token(inputs: EstimateInput) -> float:
    """One trained token's forward + backward (+ recompute) FLOPs."""
    return (
        forward_matmul_flops_per_token(inputs)
        + backward_input_gradient_flops_per_token(inputs)
        + backward_weight_gradient_flops_per_token(inputs)
        + recompute_flops_per_token(inputs)
        + attention_training_flops_per_token(inputs)
    )


def checkpointing_extra_compute_fraction(inputs: EstimateInput) -> float:
    """How much more a trained token computes with gradient checkpointing than without:
    the recomputed forward over the rest. A LoRA step skips the frozen weights' gradients,
    so its forward is about a third of the step and recomputing it costs about half again;
    full fine-tuning pays the weight gradients, about a third again."""
    on = training_flops_per_token(replace(inputs, gradient_checkpointing=True))
    off = training_flops_per_token(replace(inputs, gradient_checkpointing=False))
    return on / off - 1.0


def reference_forward_flops_per_token(inputs: EstimateInput) -> float:
    """DPO's reference log-probs: a forward with the adapters disabled, no gradients."""
    return 2.0 * (
        decoder_matmul_parameters(inputs) + head_matmul_parameters(inputs)
    ) + attention_forward_flops_per_token(inputs)


def dora_weight_norm_flops_per_micro_batch(inputs: EstimateInput) -> float:
    """DoRA forms ``W + BA`` for its weight norm once per adapted module per forward:
    a token-independent ``2 r x in x out`` matmul (twice more under checkpointing and in
    the backward)."""
    if not inputs.use_dora:
        return 0.0
    per_pass = sum(
        2.0 * inputs.lora_r * m.in_features * m.out_features * m.count
        for m in targeted_modules(inputs.arch, inputs.target_modules)
    )
    return per_pass * (3 if inputs.gradient_checkpointing else 2)


# ----------------------------------------------------------------------------- bytes


def dequantization_bytes_per_pass(inputs: EstimateInput) -> float:
    """8/4-bit weights are dequantised to the compute dtype before each matmul: read the
    packed weight, write the 16-bit copy, and the matmul reads it back."""
    if inputs.precision not in ("8bit", "4bit"):
        return 0.0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    total = 0.0
    for module in linear_modules(inputs.arch):
        if module.component != "language_model":
            continue
        packed = linear_weight_bytes(module, inputs)
        total += packed + 2 * compute * module.weight_parameters
    return total


def weight_cast_bytes_per_pass(inputs: EstimateInput) -> float:
    """Full fine-tuning keeps fp32 master weights and autocast casts each linear's weight
    to the compute dtype for its matmul: read 4 B, write 2 B, and the matmul reads it back."""
    if inputs.finetuning != "full":
        return 0.0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    elements = decoder_matmul_parameters(inputs) + head_matmul_parameters(inputs)
    return elements * (4 + 2 * compute)


def dequantization_passes(inputs: EstimateInput) -> int:
    """Forward, backward (the input gradient needs the weight), and the recompute."""
    return 3 if inputs.gradient_checkpointing else 2


def optimizer_step_bytes(inputs: EstimateInput) -> float:
    return float(trainable_parameter_count(inputs.arch, inputs)) * (
        OPTIMIZER_BYTES_PER_TRAINABLE_PARAMETER
    )


def decode_weight_bytes(inputs: EstimateInput) -> float:
    """Bytes one generated token reads: the whole model once (quantised weights are
    dequantised too: bitsandbytes uses its dequantise + matmul path for batches > 1)."""
    return float(weights_bytes(inputs)) + dequantization_bytes_per_pass(inputs)


# ----------------------------------------------------------------------------- peaks


def peak_flops(gpu: Gpu, inputs: EstimateInput) -> float | None:
    """The datasheet's dense tensor FLOP/s for the compute dtype (fp32 accumulate)."""
    figures = gpu.throughput
    if figures is None:
        return None
    tflops = (
        figures.dense_bf16_tflops if inputs.compute_dtype == "bf16" else figures.dense_fp16_tflops
    )
    return None if tflops is None else tflops * 1e12


def memory_bandwidth(gpu: Gpu) -> float | None:
    figures = gpu.throughput
    return None if figures is None else figures.memory_bandwidth_gb_s * 1e9


# ----------------------------------------------------------------------------- per step


def tokens_per_optimizer_step(inputs: EstimateInput) -> int:
    """Token positions trained per optimizer step over all GPUs."""
    return tokens_per_micro_batch(inputs) * inputs.gradient_accumulation_steps * inputs.world_size


def step_seconds_per_term(
    inputs: EstimateInput, gpu: Gpu, grpo_beta: float = 0.0
) -> dict[str, float] | None:
    """One optimizer step's seconds per term on one GPU (each GPU runs its share)."""
    peak = peak_flops(gpu, inputs)
    bandwidth = memory_bandwidth(gpu)
    if peak is None or bandwidth is None:
        return None
    efficiency = EFFICIENCY[path_of(inputs)]
    compute_rate = peak * efficiency
    byte_rate = bandwidth * efficiency
    micro_batches = inputs.gradient_accumulation_steps
    tokens = tokens_per_micro_batch(inputs) * micro_batches
    terms = {
        "matmul": tokens
        * (
            forward_matmul_flops_per_token(inputs)
            + backward_input_gradient_flops_per_token(inputs)
            + backward_weight_gradient_flops_per_token(inputs)
        )
        / compute_rate,
        "recompute": tokens * recompute_flops_per_token(inputs) / compute_rate,
        "attention": tokens * attention_training_flops_per_token(inputs) / compute_rate,
        "dora": micro_batches * dora_weight_norm_flops_per_micro_batch(inputs) / compute_rate,
        "dequantization": micro_batches
        * dequantization_passes(inputs)
        * dequantization_bytes_per_pass(inputs)
        / byte_rate,
        "weight_cast": micro_batches
        * dequantization_passes(inputs)
        * weight_cast_bytes_per_pass(inputs)
        / byte_rate,
        "reference": 0.0,
        "generation": 0.0,
        "optimizer": optimizer_step_bytes(inputs) / byte_rate,
    }
    if inputs.method == "dpo" or (inputs.method == "grpo" and grpo_beta > 0):
        terms["reference"] = (
            tokens * reference_forward_flops_per_token(inputs) / compute_rate
            + micro_batches * dequantization_bytes_per_pass(inputs) / byte_rate
        )
    if inputs.method == "grpo":
        terms["generation"] = grpo_generation_seconds(inputs, compute_rate, byte_rate)
    return terms


def grpo_generation_seconds(inputs: EstimateInput, compute_rate: float, byte_rate: float) -> float:
    """One generation batch per optimizer step (``micro x gradient_accumulation`` rows,
    trl's ``steps_per_generation``): a compute-bound prefill of the prompts, then one
    decode step per completion token, each the slower of reading the weights and the KV
    cache (bandwidth) and its matmuls (compute), plus the host's per-layer overhead.

    With vLLM (``grpo.use_vllm``) the decode reads vLLM's own compute-dtype copy of the
    weights (no dequantisation), its CUDA graphs remove the per-layer host overhead, and
    trl pushes the merged weights to it once per step (``vllm_weight_sync_bytes``)."""
    rows = grpo_generation_rows(inputs)
    prompt = inputs.max_length
    completion = inputs.max_completion_length
    dense = decoder_matmul_parameters(inputs) + head_matmul_parameters(inputs)
    dense += lora_matmul_parameters(inputs)
    prefill = rows * prompt * 2.0 * dense / compute_rate
    mean_positions = prompt + completion / 2
    vllm = inputs.vllm_mode != "none"
    weights = vllm_weight_bytes(inputs) if vllm else decode_weight_bytes(inputs)
    decode_bytes = weights + kv_cache_bytes(inputs, rows, int(mean_positions))
    c = inputs.arch.config
    decode_flops = rows * (
        2.0 * dense
        + 4.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * mean_positions
    )
    per_token = max(decode_bytes / byte_rate, decode_flops / compute_rate)
    if vllm:
        return prefill + completion * per_token + vllm_weight_sync_bytes(inputs) / byte_rate
    per_token += DECODE_STEP_OVERHEAD_SECONDS_PER_LAYER * c.num_hidden_layers
    return prefill + completion * per_token


def vllm_weight_bytes(inputs: EstimateInput) -> float:
    """vLLM's copy of the model in the compute dtype (trl gives it merged weights)."""
    return float(parameter_groups(inputs.arch).total * DTYPE_BYTES[inputs.compute_dtype])


def vllm_weight_sync_bytes(inputs: EstimateInput) -> float:
    """Assumption: trl merges the adapters and loads every weight into vLLM once per
    optimizer step: read the base (dequantised if 8/4-bit), write vLLM's copy, ~3 model
    copies of traffic (over NCCL in server mode, where this is a lower bound)."""
    return 3.0 * vllm_weight_bytes(inputs) + dequantization_bytes_per_pass(inputs)


def step_flops(inputs: EstimateInput, grpo_beta: float = 0.0) -> float:
    """All FLOPs one GPU does in an optimizer step (every compute-bound term)."""
    micro_batches = inputs.gradient_accumulation_steps
    tokens = tokens_per_micro_batch(inputs) * micro_batches
    flops = tokens * training_flops_per_token(inputs)
    flops += micro_batches * dora_weight_norm_flops_per_micro_batch(inputs)
    if inputs.method == "dpo" or (inputs.method == "grpo" and grpo_beta > 0):
        flops += tokens * reference_forward_flops_per_token(inputs)
    return flops


# ----------------------------------------------------------------------------- the estimate


def estimate_time(
    inputs: EstimateInput,
    gpu: Gpu,
    run: RunLength | None = None,
    grpo_beta: float = 0.0,
) -> TimeEstimate | None:
    """Tokens/s, seconds per optimizer step and hours, with the calibration's range; None
    when the GPU has no datasheet figures (a ``--vram-gib`` card)."""
    terms = step_seconds_per_term(inputs, gpu, grpo_beta)
    peak = peak_flops(gpu, inputs)
    if terms is None or peak is None:
        return None
    seconds = sum(terms.values())
    tokens = tokens_per_optimizer_step(inputs)
    per_gpu_tokens = tokens / inputs.world_size
    flops_per_token = step_flops(inputs, grpo_beta) / per_gpu_tokens
    tps = tokens / seconds
    # The physical bound: no GPU does more than its peak; the range never passes it.
    bound = inputs.world_size * peak / flops_per_token
    low, high = tps * RATIO_LOW, min(tps * RATIO_HIGH, bound)
    steps = run.optimizer_steps if run is not None else None

    def hours(step: float) -> float | None:
        return None if steps is None else steps * step / 3600.0

    step_low, step_high = tokens / high, tokens / low
    return TimeEstimate(
        tokens_per_second=tps,
        tokens_per_second_low=low,
        tokens_per_second_high=high,
        step_seconds=seconds,
        step_seconds_low=step_low,
        step_seconds_high=step_high,
        tokens_per_step=tokens,
        flops_per_token=flops_per_token,
        peak_tflops=peak / 1e12,
        efficiency=EFFICIENCY[path_of(inputs)],
        path=path_of(inputs),
        optimizer_steps=steps,
        steps_source=run.source if run is not None else "unknown",
        total_hours=hours(seconds),
        total_hours_low=hours(step_low),
        total_hours_high=hours(step_high),
        seconds_per_term=terms,
    )


def run_length(
    rows: int | None,
    *,
    max_steps: int,
    num_train_epochs: float,
    sequences_per_step: int,
    eval_fraction: float = 0.0,
    rows_source: str = "",
) -> RunLength:
    """Optimizer steps of the run: ``max_steps`` when set, else the training rows (after
    the eval split) per step, rounded up, x epochs (the Trainer's own arithmetic)."""
    if max_steps > 0:
        return RunLength(max_steps, "max_steps")
    if rows is None:
        return RunLength(None, rows_source or "the dataset's row count is unknown")
    train_rows = rows - math.ceil(rows * eval_fraction) if eval_fraction > 0 else rows
    per_epoch = max(1, math.ceil(train_rows / max(1, sequences_per_step)))
    return RunLength(
        math.ceil(per_epoch * num_train_epochs),
        f"{train_rows:,} rows x {num_train_epochs:g} epochs{rows_source}",
    )


def format_duration_range(low_hours: float, high_hours: float) -> str:
    """``3.1-4.2 h``; the unit once when both ends share it, ``50 min - 1.1 h`` when not."""
    low, high = format_duration(low_hours), format_duration(high_hours)
    if low == high:
        return low
    (low_number, low_unit), (high_number, high_unit) = low.split(" ", 1), high.split(" ", 1)
    if low_unit == high_unit:
        return f"{low_number}-{high_number} {high_unit}"
    return f"{low} - {high}"


def format_duration(hours: float) -> str:
    """``42 min``, ``3.4 h``, ``2.1 days``."""
    if hours < 1:
        return f"{max(hours * 60, 0.1):.1f} min" if hours * 60 < 10 else f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


# ----------------------------------------------------------------------------- the spec's run

ROW_COUNT_MAX_BYTES = 256 * 2**20
"""Local files up to this size are counted (a line count: well under a second); larger
ones, parquet and hub datasets give per-step figures only."""


def local_dataset_rows(path: Path_) -> int | None:
    """Rows of a local ``.jsonl`` (non-blank lines), ``.json`` (a list, or ``{"data":
    [...]}``-less list only) or ``.csv`` (records) file; None when not cheap to know."""
    import csv
    import json

    try:
        if not path.is_file() or path.stat().st_size > ROW_COUNT_MAX_BYTES:
            return None
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with path.open("rb") as file:
                return sum(1 for line in file if line.strip())
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as file:
                return max(0, sum(1 for _ in csv.reader(file)) - 1)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error, RecursionError):
        return None
    return None


def spec_run_length(spec: AnySpec, spec_dir: Path_ | None) -> RunLength:
    """The spec's optimizer steps: ``training.max_steps``, else the local dataset's rows
    (after ``dataset.eval_fraction``) per optimizer step x ``num_train_epochs``. GRPO
    trains ``num_generations`` completions per prompt row."""
    training = spec.training
    world = spec.hardware.world_size
    per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps * world
    grpo = getattr(spec, "grpo", None)
    prompts_per_step = per_step / grpo.num_generations if grpo is not None else per_step
    rows = None
    reason = "hub dataset: its row count is not known before download"
    if spec_dir is not None and is_local_dataset(spec.dataset.path):
        rows = local_dataset_rows(from_spec_dir(spec.dataset.path, spec_dir))
        reason = "the local dataset's rows could not be counted cheaply"
    if grpo is not None and rows is not None and training.max_steps <= 0:
        train_rows = rows - math.ceil(rows * spec.dataset.eval_fraction)
        steps = math.ceil(
            math.ceil(train_rows / max(prompts_per_step, 1e-9)) * training.num_train_epochs
        )
        return RunLength(
            steps,
            f"{train_rows:,} prompts x {training.num_train_epochs:g} epochs, "
            f"{grpo.num_generations} generations each",
        )
    return run_length(
        rows,
        max_steps=training.max_steps,
        num_train_epochs=training.num_train_epochs,
        sequences_per_step=per_step,
        eval_fraction=spec.dataset.eval_fraction,
        rows_source="" if rows is not None else reason,
    )
