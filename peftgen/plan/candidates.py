"""One candidate per precision: its estimate, whether it fits, which one is chosen, and
the largest settings that still fit."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

from peftgen.accuracy_interval import high_end_bytes, interval_factor
from peftgen.catalog import Gpu
from peftgen.memory import (
    PAGED_OPTIMIZERS,
    Estimate,
    EstimateInput,
    adapter_dtype,
    estimate,
)
from peftgen.plan.inputs import (
    MIN_MAX_LENGTH,
    budget_bytes,
    estimate_input,
    full_finetuning_input,
    planned_precisions,
    precision_order,
)
from peftgen.plan.types import Assumption, Candidate
from peftgen.resolve import Resolved, valid_with
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    STATE_SHARDING_ENGINES,
    LoadPrecision,
    full_sharded_refusal,
)
from peftgen.stack import GIB, format_gib
from peftgen.throughput import estimate_time, spec_run_length


def candidate_from_estimate(
    precision: LoadPrecision, inputs: EstimateInput, budget: int, host_budget: int | None = None
) -> Candidate:
    """The estimate of ``inputs`` and how it fits: a candidate fits when the training peak,
    the loading peak (both per GPU) fit the budget and, when the spec gives
    ``hardware.host_memory_gib``, the host memory per node fits the host's RAM. The upper
    end of its interval takes the factor of its engine (``interval_factor``)."""
    result = estimate(inputs)
    load_fits = result.load_peak_bytes <= budget
    host_fits = host_budget is None or result.host_memory_bytes <= host_budget
    fits = result.peak_reserved_bytes <= budget and load_fits and host_fits
    factor = interval_factor(inputs.distributed in PARAMETER_SHARDING_ENGINES)
    high = high_end_bytes(result.peak_reserved_bytes, result.torch_reserved_bytes, factor)
    return Candidate(
        **{item.name: getattr(result, item.name) for item in fields(Estimate)},
        precision=precision,
        fits=fits,
        peak_reserved_bytes_high=high,
        fits_high=high <= budget and load_fits and host_fits,
        tight=fits and high > budget,
        load_fits=load_fits,
        host_fits=host_fits,
    )


def estimate_candidate(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
) -> Candidate:
    """The peak for the spec as written (or with ``overrides``) loaded in ``precision``."""
    target = gpu or resolved.gpu
    budget = budget_bytes(target, resolved.loaded.spec.hardware.headroom_fraction)
    inputs = estimate_input(resolved, precision, overrides, target)
    host_gib = getattr(resolved.loaded.spec.hardware, "host_memory_gib", None)
    host_budget = None if host_gib is None else int(host_gib * GIB)
    candidate = candidate_from_estimate(precision, inputs, budget, host_budget)
    return replace(candidate, assumptions=candidate_assumptions(inputs))


def candidate_assumptions(inputs: EstimateInput) -> tuple[Assumption, ...]:
    """Why each component has its size, in words the report and the script can print."""
    dtype = inputs.compute_dtype
    if inputs.finetuning == "full":
        return full_assumptions(inputs)
    if inputs.precision == "4bit":
        double = " + double quantization" if inputs.bnb_4bit_use_double_quant else ""
        weights = (
            f"linear layers in {inputs.bnb_4bit_quant_type.upper()}{double} (blocks of 64); "
            f"embeddings, lm_head and norms stay {dtype}"
        )
    elif inputs.precision == "8bit":
        weights = f"linear layers in LLM.int8 (int8 + fp32 row scales); the rest stays {dtype}"
    else:
        weights = f"every weight in {dtype}"
    checkpointing = (
        "gradient checkpointing: each layer keeps its input, one layer is recomputed"
        if inputs.gradient_checkpointing
        else "no checkpointing: every layer keeps its saved tensors until its backward"
    )
    if inputs.precision == "8bit" and inputs.gradient_checkpointing:
        checkpointing += "; LLM.int8 layers keep their inputs regardless"
    optimizer = f"{inputs.optim} state for the trainable parameters"
    if inputs.optim in PAGED_OPTIMIZERS:
        optimizer += " in CUDA managed memory, outside torch's counters (managed_bytes)"
    return (
        Assumption("weights_bytes", weights),
        Assumption("adapter_bytes", f"LoRA weights in {adapter_dtype(inputs)}"),
        Assumption("optimizer_bytes", optimizer),
        Assumption(
            "activation_bytes",
            f"{checkpointing}; {inputs.attn_implementation} attention; "
            f"{inputs.micro_batch} x {inputs.max_length} tokens per micro-batch",
        ),
        Assumption(
            "logits_bytes",
            "trl's fused LM head: 4096 x 32768 tiles, never the full logits",
        ),
    )


def full_assumptions(inputs: EstimateInput) -> tuple[Assumption, ...]:
    """``candidate_assumptions`` for full fine-tuning."""
    dtype = inputs.compute_dtype
    reference = f", plus a frozen {dtype} reference copy" if inputs.reference_model else ""
    checkpointing = (
        "gradient checkpointing: each layer keeps its fp32 input; autocast's cache holds every "
        "layer's weight casts until the forward ends, one recomputed layer's in backward"
        if inputs.gradient_checkpointing
        else "no checkpointing: every layer keeps its saved tensors and its weight casts until "
        "its backward"
    )
    optimizer = f"{inputs.optim} state for every parameter (fp32 masters)"
    if inputs.optim in PAGED_OPTIMIZERS:
        optimizer += " in CUDA managed memory, outside torch's counters (managed_bytes)"
    weights = f"every weight in fp32 (master weights){reference}"
    gradient = "an fp32 gradient for every parameter"
    compute = f"{dtype} autocast"
    if inputs.distributed in STATE_SHARDING_ENGINES:
        weights, gradient, optimizer, compute = full_sharded_assumption_texts(inputs)
        checkpointing = (
            "gradient checkpointing: each layer keeps its input"
            if inputs.gradient_checkpointing
            else "no checkpointing: every layer keeps its saved tensors until its backward"
        )
    return (
        Assumption("weights_bytes", weights),
        Assumption("adapter_bytes", "no adapter: full fine-tuning trains the weights"),
        Assumption("gradient_bytes", gradient),
        Assumption("optimizer_bytes", optimizer),
        Assumption(
            "activation_bytes",
            f"{compute}; {checkpointing}; {inputs.attn_implementation} attention; "
            f"{inputs.micro_batch} x {inputs.max_length} tokens per micro-batch",
        ),
        Assumption(
            "logits_bytes",
            "trl's fused LM head (4096 x 32768 tiles) plus its fp32 gradient of the whole head",
        ),
    )


def full_sharded_assumption_texts(inputs: EstimateInput) -> tuple[str, str, str, str]:
    """(weights, gradient, optimizer, compute) for full fine-tuning under FSDP / ZeRO
    (``peftgen.memory.full_fsdp_parts``, ``full_zero_parts``)."""
    dtype, world, optim = inputs.compute_dtype, inputs.world_size, inputs.optim
    if inputs.distributed == "fsdp":
        return (
            f"fp32 master shards (1/{world} of every weight) plus the gathered {dtype} root "
            "unit (embeddings, head, final norm) and two decoder layers",
            f"fp32 gradient shards (1/{world}) plus the {dtype} unsharded gradients of the "
            "root and two layers before their reduce-scatter",
            f"{optim} state of the fp32 shards (1/{world})",
            f"FSDP mixed precision: layers gathered and computed in {dtype}",
        )
    weights = (
        f"the whole model in {dtype} (DeepSpeed casts it)"
        if inputs.distributed == "deepspeed-zero2"
        else f"the {dtype} model 1/{world} per GPU plus the gathered modules"
    )
    return (
        weights,
        f"{dtype} gradient partition (1/{world}) plus the reduce buckets",
        f"DeepSpeed's fp32 master partition and its {optim} state (1/{world})",
        f"no autocast: the {dtype} module computes in {dtype}",
    )


def largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """Largest n in [low, high] with ``fits(n)``, for a monotone ``fits`` (binary search)."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def largest_fitting_max_length(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
    upper: int | None = None,
) -> int | None:
    """The longest ``training.max_length`` whose peak fits the budget (None: not even 16)."""
    spec = resolved.loaded.spec
    limit = upper or max(spec.training.max_length, resolved.arch.config.max_position_embeddings)

    def fits(length: int) -> bool:
        changed = {**(overrides or {}), "training.max_length": length}
        return estimate_candidate(resolved, precision, changed, gpu).fits

    return largest_fitting(MIN_MAX_LENGTH, limit, fits)


def largest_fitting_batch(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
    upper: int = 4096,
) -> int | None:
    """The largest ``per_device_train_batch_size`` the spec accepts whose peak fits (None:
    no accepted size fits). GRPO accepts only sizes whose generation batch holds whole
    groups of ``num_generations``."""

    def fits(batch: int) -> bool:
        changed = {**(overrides or {}), "training.per_device_train_batch_size": batch}
        return estimate_candidate(resolved, precision, changed, gpu).fits

    batch = largest_fitting(1, upper, fits)
    while batch is not None and not accepted_batch(resolved, batch, overrides):
        batch = batch - 1 if batch > 1 else None
    return batch


def accepted_batch(
    resolved: Resolved, batch: int, overrides: Mapping[str, Any] | None = None
) -> bool:
    """The spec's own rule for a micro-batch size (GRPO: whole generation groups)."""
    spec = resolved.loaded.spec
    grpo = getattr(spec, "grpo", None)
    if grpo is None:
        return True
    accumulation = (overrides or {}).get(
        "training.gradient_accumulation_steps", spec.training.gradient_accumulation_steps
    )
    generation_batch = batch * spec.hardware.world_size * int(accumulation)
    groups: int = grpo.num_generations
    return generation_batch % groups == 0


def with_times(
    resolved: Resolved, candidates: tuple[Candidate, ...], gpu: Gpu
) -> tuple[Candidate, ...]:
    """Each candidate with its time estimate (``peftgen.throughput``) for the spec's run."""
    spec = resolved.loaded.spec
    run = spec_run_length(spec, resolved.loaded.path.parent)
    grpo_beta = float(getattr(getattr(spec, "grpo", None), "beta", 0.0))
    return tuple(
        replace(
            c,
            time=estimate_time(estimate_input(resolved, c.precision, gpu=gpu), gpu, run, grpo_beta),
        )
        for c in candidates
    )


def full_finetuning_candidate(resolved: Resolved, gpu: Gpu) -> Candidate | None:
    """A LoRA spec's run as ``finetuning: full`` would need it (never chosen): the seed's
    "small model: full fine-tuning or LoRA" answered by numbers. None when the spec is full
    already or full fine-tuning is not planned for its method under its engine
    (``peftgen.spec.full_sharded_refusal``)."""
    spec = resolved.loaded.spec
    if spec.finetuning == "full" or full_sharded_refusal(spec) is not None:
        return None
    sixteen = precision_order(gpu, spec.precision)[0]  # the spec's fixed fp16 is kept
    budget = budget_bytes(gpu, spec.hardware.headroom_fraction)
    inputs = full_finetuning_input(resolved, sixteen, gpu=gpu)
    candidate = candidate_from_estimate(sixteen, inputs, budget)
    return replace(candidate, assumptions=candidate_assumptions(inputs))


def choose_precision(requested: str, candidates: tuple[Candidate, ...]) -> LoadPrecision | None:
    """``auto``: the first (most faithful) candidate whose interval's upper end fits, else
    the first that fits at the estimate (a tight plan); a fixed precision: itself, if it
    fits. None when nothing acceptable fits."""
    if requested == "auto":
        for candidate in candidates:
            if candidate.fits_high:
                return candidate.precision
    for candidate in candidates:
        if requested in ("auto", candidate.precision) and candidate.fits:
            return candidate.precision
    return None


ONE_GPU = {
    "hardware.num_gpus": 1,
    "hardware.num_nodes": 1,
    "hardware.distributed": "none",
    "hardware.cpu_offload": False,
}
"""Overrides that turn a distributed spec back into a single-GPU run."""


def recommended_engine(resolved: Resolved) -> tuple[str, str]:
    """The engine for a multi-GPU spec that names none, and why: ``ddp`` when the run fits
    one GPU (at the interval's upper end: DDP replicates it, plus gradient buckets), else
    the first sharding engine the spec's rules accept, FSDP first (it shards parameters
    too); ``ddp`` again when none is accepted (the plan then says what to change)."""
    spec = resolved.loaded.spec
    gpu = resolved.gpu
    world = spec.hardware.world_size
    # One GPU's plan, by the estimator directly: the edited spec itself may break a rule
    # that holds for the whole world only (GRPO's generation groups).
    order = planned_precisions(gpu, spec, "none")
    singles = tuple(estimate_candidate(resolved, p, ONE_GPU, gpu) for p in order)
    chosen = choose_precision(spec.precision, singles)
    one = next((c for c in singles if c.precision == chosen), None) or singles[-1]
    ddp_ok = valid_with(spec, {"hardware.distributed": "ddp"}) is not None
    if one.fits_high and ddp_ok:
        return "ddp", (
            f"the run fits one {gpu.name} ({one.precision} peaks at "
            f"{format_gib(one.peak_reserved_bytes)}, up to "
            f"{format_gib(one.peak_reserved_bytes_high)}), so "
            f"each of the {world} GPUs holds a replica and DDP only averages gradients"
        )
    too_big = (
        f"one {gpu.name} is too small ({one.precision} peaks at up to "
        f"{format_gib(one.peak_reserved_bytes_high)})"
        if not one.fits_high
        else "ddp cannot run this spec"
    )
    from peftgen.resolve import default_quant_storage

    for engine in ("fsdp", "deepspeed-zero3", "deepspeed-zero2"):
        change: dict[str, Any] = {"hardware.distributed": engine}
        trial = valid_with(spec, change)
        storage = default_quant_storage(trial, gpu) if trial is not None else None
        if storage is not None:
            change["quantization.bnb_4bit_quant_storage"] = storage
        if valid_with(spec, change) is None:
            continue
        what = (
            "parameters, gradients and optimizer state"
            if engine != "deepspeed-zero2"
            else "gradients and optimizer state"
        )
        return engine, f"{too_big}; {engine} shards {what} over the {world} GPUs"
    return "ddp", f"{too_big}, and no sharding engine can run this spec; ddp replicates it"
