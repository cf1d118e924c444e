"""The plan: which precision to load in, whether it fits, and what to change if not.

Result types are defined here and are the one source of truth for everything that
prints numbers (``plan`` table, ``plan --json``, script docstrings, the report): they
all read a ``Plan`` and never recompute.

Field names follow the public contract in spec-v1 (``plan --json``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pydantic import ValidationError

from peftgen.accuracy_interval import UNDER_PREDICTION_FACTOR, high_end_bytes
from peftgen.catalog import Gpu, ModelArch, gpu_catalogue, lookup_gpu
from peftgen.catalog.structure import SDPA_REFUSED_TYPES
from peftgen.chat_templates import CHATML_SPECIAL_TOKENS
from peftgen.errors import UserError
from peftgen.memory import (
    PAGED_OPTIMIZERS,
    Estimate,
    EstimateInput,
    MemoryBreakdown,
    adapter_dtype,
    base_parameter_count,
    estimate,
    grpo_generation_bytes,
    moe_experts_per_layer,
    per_gpu_parts,
    reference_weight_bytes,
    train_step_peak_parts,
    vllm_share_bytes,
)
from peftgen.overrides import apply_changes
from peftgen.resolve import Resolved, valid_with
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    STATE_SHARDING_ENGINES,
    AnySpec,
    LoadPrecision,
    full_sharded_refusal,
    trained_modules_to_save,
)
from peftgen.stack import GIB, format_gib
from peftgen.stack import compute_dtype as stack_compute_dtype
from peftgen.throughput import TimeEstimate, estimate_time, spec_run_length

BREAKDOWN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(MemoryBreakdown))
"""``MemoryBreakdown``'s keys in order, as ``plan --json`` and every table list them."""


@dataclass(frozen=True)
class Assumption:
    """Why a component has the size it has: shown in the report and the script."""

    component: str
    """Breakdown key, e.g. ``weights_bytes``."""
    text: str


@dataclass(frozen=True)
class Candidate:
    """One loading precision the planner considered."""

    precision: LoadPrecision
    fits: bool
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    breakdown: MemoryBreakdown
    managed_bytes: int = 0
    """Paged optimizer state in CUDA managed memory: outside torch's counters and the peak."""
    vllm_bytes: int = 0
    """Of ``overhead_bytes``: colocated vLLM's share of the GPU at the peak (GRPO with
    ``grpo.use_vllm: colocate``)."""
    torch_reserved_bytes: int = 0
    """What ``torch.cuda.max_memory_reserved`` would report: reserved minus the CUDA context."""
    phase: str = "train"
    """The phase that sets the peak (GRPO: ``generation`` or ``train``)."""
    communication_bytes: int = 0
    """Of ``gradient_bytes``: the distributed engine's communication buffers, per GPU."""
    gathered_weight_bytes: int = 0
    """Of ``weights_bytes``: parameters FSDP / ZeRO-3 hold unsharded at the peak, per GPU."""
    assumptions: tuple[Assumption, ...] = ()
    peak_reserved_bytes_high: int = 0
    """Upper end of the prediction interval around ``peak_reserved_bytes``: torch's share
    scaled by ``accuracy_interval.UNDER_PREDICTION_FACTOR`` (the accuracy benchmark's 90th
    percentile of measured / predicted), the CUDA context unscaled."""
    fits_high: bool = False
    """The upper end fits the budget too."""
    tight: bool = False
    """Fits at the estimate but not at the upper end of the interval."""
    load_peak_bytes: int = 0
    """The loading phase's peak per GPU (``memory.load_peak_bytes``), process figure."""
    host_memory_bytes: int = 0
    """Host RAM per node for loading and CPU offload (``memory.host_memory_bytes``)."""
    load_fits: bool = True
    """The loading peak fits the GPU budget."""
    host_fits: bool = True
    """The host memory fits ``hardware.host_memory_gib`` (True when the spec gives none)."""
    time: TimeEstimate | None = None
    """Seconds per optimizer step, tokens/s and hours (``peftgen.throughput``); None for
    a GPU without datasheet figures (``--vram-gib``)."""


@dataclass(frozen=True)
class Suggestion:
    """A change that would make the run fit (or fit better), with its numbers."""

    action: str
    """Short imperative, e.g. "turn on gradient checkpointing"."""
    detail: str
    """What it changes, with numbers, e.g. "saves 6.1 GiB: peak 19.8 GiB of 22.8 GiB"."""
    change: dict[str, Any] = field(default_factory=dict)
    """The spec edit as dotted keys, e.g. {"training.gradient_checkpointing": true}."""
    peak_reserved_bytes: int | None = None
    """Peak after the change, when the planner computed it."""
    fits: bool = False
    """The run fits the budget after this change alone."""
    peak_reserved_bytes_high: int | None = None
    """Upper end of the prediction interval after the change."""
    fits_high: bool = False
    """The upper end fits too after this change alone (no "tight" plan)."""
    precision: LoadPrecision | None = None
    """The precision the changed spec is planned in (what ``precision: auto`` would pick)."""


@dataclass(frozen=True)
class Decision:
    """A knob the planner set, and why: templates and reports print the reason."""

    knob: str
    value: Any
    reason: str


@dataclass(frozen=True)
class GpuTarget:
    name: str
    vram_bytes: int
    bf16: bool
    count: int
    compute_capability: str | None = None
    flash_attention_2: bool = False


@dataclass(frozen=True)
class Plan:
    spec: str
    gpu: GpuTarget
    budget_bytes: int
    trainable_parameters: int
    total_parameters: int
    chosen_precision: LoadPrecision | None
    fits: bool
    candidates: tuple[Candidate, ...]
    suggestions: tuple[Suggestion, ...] = ()
    warnings: tuple[str, ...] = ()
    decisions: tuple[Decision, ...] = ()
    model_id: str = ""
    """The resolved model: the catalogue's hub id for an alias, or the local folder."""
    max_length: int = 0
    """Tokens per sequence the plan sizes for (``training.length_source`` applied)."""
    micro_batch: int = 0
    """``training.per_device_train_batch_size``."""
    tight: bool = False
    """The chosen precision fits at the estimate but not at the interval's upper end."""
    interval_factor: float = UNDER_PREDICTION_FACTOR
    """The factor behind every ``peak_reserved_bytes_high``."""
    defaults: tuple[Decision, ...] = ()
    """Keys the spec left out that were filled in (``resolve.with_defaults``), with why."""
    notes: tuple[str, ...] = ()
    """What the table assumes: GRPO's phase, host memory for CPU offload."""
    full_finetuning: Candidate | None = None
    """A LoRA spec's comparison: the same run with ``finetuning: full`` in the GPU's 16-bit
    compute dtype (fp32 master weights under autocast). Never chosen; None for a full spec."""

    @property
    def chosen(self) -> Candidate | None:
        for candidate in self.candidates:
            if candidate.precision == self.chosen_precision:
                return candidate
        return None

    def to_json(self) -> dict[str, Any]:
        """The ``plan --json`` object (spec-v1 contract, plus additions)."""
        data = asdict(self)
        for candidate, raw in zip(self.candidates, data["candidates"], strict=True):
            raw["breakdown"] = asdict(candidate.breakdown)
        return data


# --------------------------------------------------------------------------- the planner

MIN_MAX_LENGTH = 16
"""The smallest ``training.max_length`` the spec allows."""

# Spec keys a suggestion or an override may change, and the estimate field each feeds.
SPEC_KEY_TO_FIELD: dict[str, str] = {
    "training.gradient_checkpointing": "gradient_checkpointing",
    "training.optim": "optim",
    "training.per_device_train_batch_size": "micro_batch",
    "training.gradient_accumulation_steps": "gradient_accumulation_steps",
    "training.max_length": "max_length",
    "lora.r": "lora_r",
    "lora.use_dora": "use_dora",
    "lora.lora_dropout": "lora_dropout",
    "model.attn_implementation": "attn_implementation",
    "grpo.max_completion_length": "max_completion_length",
    "grpo.vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "grpo.vllm_enable_sleep_mode": "vllm_enable_sleep_mode",
    "hardware.num_gpus": "world_size",
    "hardware.num_nodes": "world_size",
    "hardware.distributed": "distributed",
    "hardware.cpu_offload": "cpu_offload",
}
"""``hardware.num_gpus`` (per node) and ``hardware.num_nodes`` both feed the world size:
their product, each taken from the override or else the spec."""


def precision_order(
    gpu: Gpu, requested: str = "auto", distributed: str = "none"
) -> tuple[LoadPrecision, ...]:
    """Candidates from the most to the least faithful: a 16-bit load (the GPU's, or the
    one the spec fixes: fp16 on a bf16 GPU is allowed), 8-bit, 4-bit. FSDP and ZeRO-3
    cannot shard LLM.int8 weights, so they skip 8-bit."""
    sixteen: LoadPrecision = "bf16" if gpu.bf16 else "fp16"
    if requested == "fp16":
        sixteen = "fp16"
    if distributed in PARAMETER_SHARDING_ENGINES:
        return (sixteen, "4bit")
    return (sixteen, "8bit", "4bit")


def budget_bytes(gpu: Gpu, headroom_fraction: float) -> int:
    """What the run may hold: GPU memory less the spec's headroom."""
    return int(gpu.memory_bytes * (1.0 - headroom_fraction))


def trained_arch(resolved: Resolved) -> ModelArch:
    """The architecture the script trains: with ``dataset.chat_template: chatml`` the two
    ChatML markers become new tokens, and ``resize_token_embeddings`` grows the vocabulary
    (embeddings, a separate head) by them."""
    arch = resolved.arch
    if resolved.loaded.spec.dataset.chat_template is None:
        return arch
    grown = arch.config.vocab_size + len(CHATML_SPECIAL_TOKENS)
    return arch.model_copy(update={"config": arch.config.model_copy(update={"vocab_size": grown})})


def estimate_input(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
) -> EstimateInput:
    """The estimator's input for the resolved spec loaded in ``precision``.

    ``overrides`` are dotted spec keys (``SPEC_KEY_TO_FIELD``), so a suggestion's
    ``change`` can be estimated before the user edits the spec.
    """
    spec = resolved.loaded.spec
    target = gpu or resolved.gpu
    lora, training = spec.lora, spec.training
    targets = (
        lora.target_modules if lora.target_modules == "all-linear" else tuple(lora.target_modules)
    )
    grpo = getattr(spec, "grpo", None)
    inputs = EstimateInput(
        arch=trained_arch(resolved),
        precision=precision,
        method=spec.method,
        compute_dtype=stack_compute_dtype(precision, target.bf16),
        bnb_4bit_quant_type=spec.quantization.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=spec.quantization.bnb_4bit_use_double_quant,
        lora_r=lora.r,
        target_modules=targets,
        use_dora=lora.use_dora,
        modules_to_save=tuple(trained_modules_to_save(spec)),
        lora_dropout=lora.lora_dropout,
        lora_bias=lora.bias,
        micro_batch=training.per_device_train_batch_size,
        max_length=training.max_length,
        gradient_checkpointing=training.gradient_checkpointing,
        packing=spec.method == "sft" and training.packing,
        attn_implementation=spec.model.attn_implementation,
        optim=training.optim,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_completion_length=grpo.max_completion_length if grpo else 256,
        world_size=spec.hardware.world_size,
        num_nodes=spec.hardware.num_nodes,
        distributed=spec.hardware.distributed,
        cpu_offload=spec.hardware.cpu_offload,
        gpu_compute_capability=target.compute_capability,
        **vllm_fields(spec, target),
    )
    if overrides:
        unknown = set(overrides) - set(SPEC_KEY_TO_FIELD)
        if unknown:
            raise KeyError(f"cannot override {sorted(unknown)}; known: {sorted(SPEC_KEY_TO_FIELD)}")
        fields = {SPEC_KEY_TO_FIELD[k]: v for k, v in overrides.items()}
        if "world_size" in fields:
            gpus = int(overrides.get("hardware.num_gpus", spec.hardware.num_gpus))
            nodes = int(overrides.get("hardware.num_nodes", spec.hardware.num_nodes))
            fields["world_size"] = gpus * nodes
        inputs = replace(inputs, **fields)
    if spec.finetuning == "full":
        inputs = as_full_finetuning(inputs, spec)
    return inputs


def as_full_finetuning(inputs: EstimateInput, spec: AnySpec) -> EstimateInput:
    """``inputs`` for ``finetuning: full``: no adapters, every weight trained (in the
    16-bit autocast dtype the input computes in), the reference copy when the method keeps
    one."""
    sixteen: LoadPrecision = "fp16" if inputs.compute_dtype == "fp16" else "bf16"
    return replace(
        inputs,
        finetuning="full",
        precision=sixteen,
        lora_r=0,
        target_modules=(),
        use_dora=False,
        modules_to_save=(),
        lora_dropout=0.0,
        lora_bias="none",
        reference_model=needs_reference_copy(spec),
    )


def vllm_fields(spec: AnySpec, gpu: Gpu) -> dict[str, Any]:
    """The estimate's vLLM inputs from ``grpo.use_vllm`` and its options."""
    grpo = getattr(spec, "grpo", None)
    if grpo is None or not grpo.use_vllm:
        return {"gpu_memory_bytes": gpu.memory_bytes}
    return {
        "vllm_mode": grpo.use_vllm,
        "vllm_gpu_memory_utilization": grpo.vllm_gpu_memory_utilization,
        "vllm_enable_sleep_mode": grpo.vllm_enable_sleep_mode,
        "gpu_memory_bytes": gpu.memory_bytes,
    }


def needs_reference_copy(spec: AnySpec) -> bool:
    """Full fine-tuning keeps a frozen reference model: DPO unless its log-probs are
    precomputed (trl then sets ``ref_model=None`` and scores with the untrained policy
    before training, dpo_trainer.py:909), GRPO when ``beta > 0`` (grpo_trainer.py:984)."""
    dpo = getattr(spec, "dpo", None)
    if dpo is not None:
        return not dpo.precompute_ref_log_probs
    grpo = getattr(spec, "grpo", None)
    return grpo is not None and grpo.beta > 0


def full_finetuning_input(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
) -> EstimateInput:
    """The estimate's input for ``finetuning: full``, also for a LoRA spec's comparison (the
    same spec as if it said ``finetuning: full``). ``precision`` only picks the autocast
    dtype: bf16, or fp16 where the GPU lacks bf16 or the spec asks for it."""
    spec = resolved.loaded.spec
    if spec.finetuning != "full":
        full_spec = spec.model_copy(update={"finetuning": "full"})
        resolved = replace(resolved, loaded=replace(resolved.loaded, spec=full_spec))
    target = gpu or resolved.gpu
    sixteen: LoadPrecision = "bf16" if target.bf16 and precision != "fp16" else "fp16"
    return estimate_input(resolved, sixteen, overrides, gpu)


def spec_precisions(order: tuple[LoadPrecision, ...], spec: AnySpec) -> tuple[LoadPrecision, ...]:
    """The candidates the spec allows: full fine-tuning loads fp32 masters and computes in
    the 16-bit dtype (one candidate, never 8/4-bit); vLLM cannot load LLM.int8 weights."""
    if spec.finetuning == "full":
        return order[:1]
    grpo = getattr(spec, "grpo", None)
    if grpo is not None and grpo.use_vllm:
        return tuple(p for p in order if p != "8bit")
    return order


def candidate_from_estimate(
    precision: LoadPrecision, result: Estimate, budget: int, host_budget: int | None = None
) -> Candidate:
    """A candidate fits when the training peak, the loading peak (both per GPU) fit the
    budget and, when the spec gives ``hardware.host_memory_gib``, the host memory per node
    fits the host's RAM."""
    breakdown = MemoryBreakdown(**{key: getattr(result, key) for key in BREAKDOWN_KEYS})
    load_fits = result.load_peak_bytes <= budget
    host_fits = host_budget is None or result.host_memory_bytes <= host_budget
    fits = result.peak_reserved_bytes <= budget and load_fits and host_fits
    high = high_end_bytes(result.peak_reserved_bytes, result.torch_reserved_bytes)
    return Candidate(
        precision=precision,
        fits=fits,
        peak_reserved_bytes_high=high,
        fits_high=high <= budget and load_fits and host_fits,
        tight=fits and high > budget,
        load_peak_bytes=result.load_peak_bytes,
        host_memory_bytes=result.host_memory_bytes,
        load_fits=load_fits,
        host_fits=host_fits,
        peak_allocated_bytes=result.peak_allocated_bytes,
        peak_reserved_bytes=result.peak_reserved_bytes,
        breakdown=breakdown,
        managed_bytes=result.managed_bytes,
        vllm_bytes=result.vllm_bytes,
        phase=result.phase,
        torch_reserved_bytes=result.torch_reserved_bytes,
        communication_bytes=result.communication_bytes,
        gathered_weight_bytes=result.gathered_weight_bytes,
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
    candidate = candidate_from_estimate(precision, estimate(inputs), budget, host_budget)
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


def _largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
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

    return _largest_fitting(MIN_MAX_LENGTH, limit, fits)


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

    batch = _largest_fitting(1, upper, fits)
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


def make_plan(
    resolved: Resolved, gpu_override: str | None = None, vram_gib_override: float | None = None
) -> Plan:
    """Estimate every precision, choose one, explain the choice, and suggest fixes."""
    spec = resolved.loaded.spec
    gpu = target_gpu(resolved, gpu_override, vram_gib_override)
    budget = budget_bytes(gpu, spec.hardware.headroom_fraction)
    order = spec_precisions(precision_order(gpu, spec.precision, spec.hardware.distributed), spec)
    candidates = tuple(estimate_candidate(resolved, p, gpu=gpu) for p in order)
    candidates = with_times(resolved, candidates, gpu)
    chosen = choose_precision(spec.precision, candidates)
    first = estimate(estimate_input(resolved, order[0], gpu=gpu))
    fits = chosen is not None
    chosen_candidate = next((c for c in candidates if c.precision == chosen), None)
    tight = chosen_candidate is not None and chosen_candidate.tight
    suggestions: tuple[Suggestion, ...] = ()
    if not fits or tight:
        # The precision whose edits are suggested: the fixed one when this GPU can load it
        # (bf16 fixed in the spec is impossible on a GPU without bf16: then the smallest).
        fallback = spec.precision if spec.precision in order else order[-1]
        reference = chosen or fallback
        made = suggest_changes(resolved, gpu, reference, candidates)
        # A tight plan fits already: only what makes the upper end fit is worth listing.
        suggestions = tuple(s for s in made if s.fits_high) if tight else tuple(made)
    return Plan(
        spec=spec.name,
        gpu=GpuTarget(
            name=gpu.name,
            vram_bytes=gpu.memory_bytes,
            bf16=gpu.bf16,
            count=spec.hardware.world_size,
            compute_capability=gpu.compute_capability,
            flash_attention_2=gpu.flash_attention_2,
        ),
        budget_bytes=budget,
        trainable_parameters=first.trainable_parameters,
        total_parameters=first.total_parameters,
        chosen_precision=chosen,
        fits=fits,
        candidates=candidates,
        suggestions=suggestions,
        warnings=tuple(plan_warnings(resolved, gpu, chosen)),
        decisions=tuple(
            full_decisions(spec, plan_decisions(resolved, gpu, budget, candidates, chosen))
        ),
        model_id=resolved.arch.id,
        max_length=spec.training.max_length,
        micro_batch=spec.training.per_device_train_batch_size,
        tight=tight,
        defaults=tuple(Decision(d.field_path, d.value, d.reason) for d in resolved.defaults),
        notes=tuple(plan_notes(resolved, gpu, chosen_candidate or candidates[-1]))
        + tuple(full_and_vllm_notes(resolved, gpu, chosen_candidate or candidates[-1])),
        full_finetuning=full_finetuning_candidate(resolved, gpu),
    )


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


def full_decisions(spec: AnySpec, decisions: list[Decision]) -> list[Decision]:
    """Full fine-tuning has no adapter to choose a dtype for; it says how it trains instead."""
    if spec.finetuning != "full":
        return decisions
    kept = [d for d in decisions if d.knob != "adapter_dtype"]
    how = (
        "fp32 master weights, gradients and optimizer state under 16-bit autocast"
        if spec.hardware.distributed not in STATE_SHARDING_ENGINES
        else f"fp32 master weights and optimizer state sharded by {spec.hardware.distributed}"
    )
    kept.append(
        Decision(
            "finetuning",
            "full",
            f"every weight trained: {how} (16-bit weights would round small AdamW updates away)",
        )
    )
    return kept


def full_finetuning_candidate(resolved: Resolved, gpu: Gpu) -> Candidate | None:
    """A LoRA spec's run as ``finetuning: full`` would need it (never chosen): the seed's
    "small model: full fine-tuning or LoRA" answered by numbers. None when the spec is full
    already or full fine-tuning is not planned for its method under its engine
    (``peftgen.spec.full_sharded_refusal``)."""
    spec = resolved.loaded.spec
    if spec.finetuning == "full" or full_sharded_refusal(spec) is not None:
        return None
    sixteen: LoadPrecision = "bf16" if gpu.bf16 else "fp16"
    budget = budget_bytes(gpu, spec.hardware.headroom_fraction)
    inputs = full_finetuning_input(resolved, sixteen, gpu=gpu)
    candidate = candidate_from_estimate(sixteen, estimate(inputs), budget)
    return replace(candidate, assumptions=candidate_assumptions(inputs))


def full_and_vllm_notes(resolved: Resolved, gpu: Gpu, shown: Candidate) -> list[str]:
    """What full fine-tuning and vLLM generation add to the table."""
    spec = resolved.loaded.spec
    notes: list[str] = []
    inputs = estimate_input(resolved, shown.precision, gpu=gpu)
    if spec.finetuning == "full":
        reference = (
            f"; weights include a frozen {inputs.compute_dtype} reference copy "
            f"({format_gib(reference_weight_bytes(inputs))})"
            if inputs.reference_model
            else ""
        )
        notes.append(
            f"finetuning: full trains all {shown_parameters(resolved):,} parameters: "
            f"{full_engine_text(inputs)}{reference}"
        )
    grpo = getattr(spec, "grpo", None)
    if grpo is not None and grpo.use_vllm == "colocate":
        share = vllm_share_bytes(inputs)
        asleep = (
            "asleep during training (sleep level 2: weights and KV cache released), awake "
            "for each generation round next to the weights and optimizer state"
            if grpo.vllm_enable_sleep_mode
            else "held through training as well (vllm_enable_sleep_mode: false)"
        )
        notes.append(
            f"grpo.use_vllm: colocate: vLLM takes {grpo.vllm_gpu_memory_utilization:g} x "
            f"{format_gib(gpu.memory_bytes)} = {format_gib(share)} of the GPU for its own "
            f"weights and KV cache, {asleep}; the table shows the {shown.phase} phase (vLLM "
            f"{format_gib(shown.vllm_bytes)} in overhead)"
        )
    if grpo is not None and grpo.use_vllm == "server":
        notes.append(
            "grpo.use_vllm: server: generation runs on a separate `trl vllm-serve` process on "
            "its own GPU(s), not counted here; start it first, e.g. `CUDA_VISIBLE_DEVICES="
            f"{spec.hardware.num_gpus} trl vllm-serve --model {resolved.arch.id} "
            f"--host {grpo.vllm_server_host} --port {grpo.vllm_server_port}`, then train on "
            f"GPUs 0-{spec.hardware.num_gpus - 1}"
            if spec.hardware.num_gpus > 1
            else "grpo.use_vllm: server: generation runs on a separate `trl vllm-serve` "
            "process on its own GPU(s), not counted here; start it first, e.g. "
            f"`CUDA_VISIBLE_DEVICES=1 trl vllm-serve --model {resolved.arch.id} --host "
            f"{grpo.vllm_server_host} --port {grpo.vllm_server_port}`, then train with "
            "CUDA_VISIBLE_DEVICES=0"
        )
    return notes


def shown_parameters(resolved: Resolved) -> int:
    return base_parameter_count(resolved.arch)


def plan_notes(resolved: Resolved, gpu: Gpu, shown: Candidate) -> list[str]:
    """What the table's numbers assume that the table cannot show: which GRPO phase sets
    the peak, and how much host memory CPU offload needs."""
    spec = resolved.loaded.spec
    notes: list[str] = []
    inputs = estimate_input(resolved, shown.precision, gpu=gpu)
    if spec.method == "grpo" and inputs.vllm_mode == "none":
        generation = grpo_generation_bytes(inputs)
        activation, logits = train_step_peak_parts(inputs)
        other = "training" if shown.phase == "generation" else "generation"
        rows = spec.training.per_device_train_batch_size * spec.training.gradient_accumulation_steps
        notes.append(
            f"grpo: the table shows the {shown.phase} phase, the larger of the two for "
            f"{shown.precision} (generation: KV cache and activations of {rows} rows, "
            f"{format_gib(generation)}, no gradients; training: activations and logits "
            f"{format_gib(activation + logits)} plus gradients); the {other} phase peaks lower"
        )
    hardware = spec.hardware
    if hardware.cpu_offload:
        kept = per_gpu_parts(replace(inputs, cpu_offload=False))
        moved = per_gpu_parts(inputs)
        names = ("weights_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes")
        per_gpu = sum(getattr(kept, n) - getattr(moved, n) for n in (*names, "managed_bytes"))
        what = (
            "optimizer state"
            if hardware.distributed == "deepspeed-zero2"
            else "parameters, gradients and optimizer state"
        )
        notes.append(
            f"hardware.cpu_offload: about {format_gib(per_gpu * hardware.num_gpus)} of host "
            f"memory per node ({hardware.num_gpus} GPUs x {format_gib(per_gpu)} of offloaded "
            f"{what}), plus "
            "the CPU optimizer step's temporaries and the loaded checkpoint"
        )
    if hardware.distributed in PARAMETER_SHARDING_ENGINES or shown.host_memory_bytes:
        host = format_gib(shown.host_memory_bytes)
        limit = getattr(hardware, "host_memory_gib", None)
        verdict = (
            ""
            if limit is None
            else f" of the {limit:g} GiB hardware.host_memory_gib"
            + ("" if shown.host_fits else ": does NOT fit")
        )
        how = "the checkpoint is read into host memory and each unit sharded while it is wrapped"
        read_by = "a quantized model is read by every process"
        if spec.finetuning == "full":
            how, read_by = full_sharded_loading_text(hardware.distributed)
        notes.append(
            f"loading: peaks at {format_gib(shown.load_peak_bytes)} per GPU "
            f"(training {format_gib(shown.peak_reserved_bytes)}); {how}; host memory per node "
            f"about {host}{verdict} (the larger of loading, where {read_by}, and the "
            "offloaded state)"
        )
    return notes


def full_sharded_loading_text(engine: str) -> tuple[str, str]:
    """How a fully fine-tuned model is loaded under FSDP / ZeRO-3, and who reads it
    (``peftgen.memory.full_sharded_load_transient_bytes``, ``full_sharded_host_load_bytes``)."""
    if engine == "fsdp":
        return (
            "rank 0 reads the fp32 checkpoint into host memory (cpu_ram_efficient_loading) "
            "and each unit is sharded in fp32 while it is wrapped",
            "the fp32 checkpoint is read by rank 0 only",
        )
    return (
        "every process reads the fp32 checkpoint, and deepspeed.initialize moves the whole "
        "bf16 model to each GPU before partitioning it (the script loads the model before "
        "DeepSpeed's config is registered, so there is no zero.Init)",
        "every process reads the fp32 checkpoint",
    )


def full_engine_text(inputs: EstimateInput) -> str:
    """What full fine-tuning keeps per GPU under the input's engine, in words."""
    optim = inputs.optim
    dtype = inputs.compute_dtype
    world = inputs.world_size
    if inputs.distributed == "fsdp":
        return (
            f"FSDP shards the fp32 master weights, fp32 gradients and fp32 {optim} state "
            f"1/{world} per GPU; each unit is gathered in {dtype} (FSDP mixed precision, "
            f"the layers compute in {dtype}) and its {dtype} gradient reduce-scattered, "
            "then kept as an fp32 shard"
        )
    if inputs.distributed in ("deepspeed-zero2", "deepspeed-zero3"):
        weights = (
            f"the {dtype} weights whole on every GPU"
            if inputs.distributed == "deepspeed-zero2"
            else f"the {dtype} weights 1/{world} per GPU plus the gathered modules"
        )
        return (
            f"DeepSpeed casts the model to {dtype} ({weights}) and keeps its fp32 master "
            f"copy, the fp32 {optim} state and the {dtype} gradients 1/{world} per GPU; no "
            f"autocast: the layers compute in {dtype}"
        )
    return (
        f"fp32 master weights, fp32 gradients and fp32 {optim} state, under {dtype} "
        "autocast (each matmul casts its weight; the casts are saved for backward)"
    )


def target_gpu(resolved: Resolved, gpu_name: str | None, vram_gib: float | None) -> Gpu:
    """The spec's GPU, or the one named on the command line, with memory overridden."""
    gpu = resolved.gpu
    if gpu_name is not None:
        try:
            gpu = lookup_gpu(gpu_name)
        except UserError as error:
            raise UserError(
                [replace(p, field_path="--gpu", file=None) for p in error.problems]
            ) from None
    if vram_gib is not None:
        from peftgen.catalog.lookup import vram_gib_problem

        problem = vram_gib_problem(vram_gib)
        if problem is not None:
            raise UserError.single(problem, field_path="--vram-gib")
        gpu = gpu.model_copy(update={"memory_bytes": int(vram_gib * GIB)})
    return gpu


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


def _adapter_dtype_reason(chosen: str, gpu: Gpu) -> str:
    if chosen not in ("8bit", "4bit"):
        return "peft upcasts LoRA weights to fp32 (autocast_adapter_dtype=True)"
    if not gpu.bf16:
        return (
            f"trl 1.16 casts the trainable weights of 8/4-bit models to bf16, which {gpu.name} "
            "lacks (emulated kernels, coarse updates); the script casts them back to fp32"
        )
    return "trl casts trainable parameters of 8/4-bit models to bf16"


def plan_decisions(
    resolved: Resolved,
    gpu: Gpu,
    budget: int,
    candidates: tuple[Candidate, ...],
    chosen: LoadPrecision | None,
) -> list[Decision]:
    """Each knob the plan sets, with a reason carrying the plan's numbers."""
    spec = resolved.loaded.spec
    by_precision = {c.precision: c for c in candidates}
    decisions: list[Decision] = []
    peaks = ", ".join(f"{c.precision} {format_gib(c.peak_reserved_bytes)}" for c in candidates)
    if chosen is None:
        reason = f"nothing fits the {format_gib(budget)} budget on {gpu.name} (peaks: {peaks})"
    elif spec.precision != "auto":
        reason = (
            f"precision {chosen} set in the spec; peak "
            f"{format_gib(by_precision[chosen].peak_reserved_bytes)} fits the "
            f"{format_gib(budget)} budget on {gpu.name}"
        )
    else:
        better = candidates[: [c.precision for c in candidates].index(chosen)]
        too_big = "; ".join(
            f"{c.precision} would peak at {format_gib(c.peak_reserved_bytes)}" for c in better
        )
        reason = (
            f"{chosen} peaks at {format_gib(by_precision[chosen].peak_reserved_bytes)} of the "
            f"{format_gib(budget)} budget on {gpu.name}"
            + (
                f"; {too_big}, over budget"
                if too_big
                else "; the most faithful precision that fits"
            )
        )
    decisions.append(Decision("precision", chosen, reason))
    compute = precision_order(gpu, spec.precision)[0]
    compute_reason = (
        "precision fp16 set in the spec"
        if spec.precision == "fp16" and gpu.bf16
        else f"{gpu.name} {'supports' if gpu.bf16 else 'lacks'} native bfloat16"
        f" (compute capability {gpu.compute_capability})"
    )
    decisions.append(Decision("compute_dtype", compute, compute_reason))
    if chosen is not None:
        chosen_candidate = by_precision[chosen]
        inputs = estimate_input(resolved, chosen, gpu=gpu)
        decisions.append(
            Decision(
                "adapter_dtype",
                adapter_dtype(inputs),
                _adapter_dtype_reason(chosen, gpu),
            )
        )
        if spec.hardware.world_size > 1:
            decisions.append(distributed_decision(resolved, gpu, chosen_candidate))
        checkpointing = spec.training.gradient_checkpointing
        flipped = estimate_candidate(
            resolved, chosen, {"training.gradient_checkpointing": not checkpointing}, gpu
        )
        delta = abs(flipped.peak_reserved_bytes - chosen_candidate.peak_reserved_bytes)
        decisions.append(
            Decision(
                "gradient_checkpointing",
                checkpointing,
                f"saves {format_gib(delta)} of activations for ~30% more compute"
                if checkpointing
                else f"off: turning it on would save {format_gib(delta)}",
            )
        )
    return decisions


def plan_warnings(resolved: Resolved, gpu: Gpu, chosen: LoadPrecision | None) -> list[str]:
    """Traps the spec walks into on this GPU; each says what to do instead."""
    spec = resolved.loaded.spec
    warnings: list[str] = []
    if spec.precision == "bf16" and not gpu.bf16:
        warnings.append(
            f"precision: bf16 is set in the spec but {gpu.name} has no bfloat16; "
            "use fp16, 8bit or 4bit (or auto)"
        )
    if spec.model.attn_implementation == "flash_attention_2" and not gpu.flash_attention_2:
        warnings.append(
            f"model.attn_implementation: flash_attention_2 has no kernels for {gpu.name} "
            f"(compute capability {gpu.compute_capability}); use sdpa"
        )
    if spec.training.optim in PAGED_OPTIMIZERS:
        warnings.append(
            f"training.optim: {spec.training.optim} keeps its states in CUDA managed memory, "
            "invisible to torch.cuda.max_memory_allocated/reserved (nvidia-smi shows them); "
            "the plan lists them as managed_bytes outside the peak"
        )
    if (
        moe_experts_per_layer(resolved.arch)
        and spec.lora.target_modules == "all-linear"
        and spec.lora.lora_dropout > 0
    ):
        warnings.append(
            "lora.lora_dropout: peft 0.21 adapts the fused MoE experts of all-linear through "
            "ParamWrapper, which refuses lora_dropout != 0 (peft/tuners/lora/layer.py:2366); "
            "set lora_dropout: 0 or list the attention modules"
        )
    if moe_experts_per_layer(resolved.arch) and spec.lora.target_modules == "all-linear":
        warnings.append(
            "lora.target_modules: all-linear on a fused-MoE model also adapts every expert; "
            "peft merges B @ A into the experts' weights on each forward, a weight-sized "
            "tensor per layer kept for backward (DoRA is refused there)"
        )
    if (
        spec.model.attn_implementation == "eager"
        and resolved.arch.config.model_type not in SDPA_REFUSED_TYPES
    ):
        warnings.append(
            "model.attn_implementation: eager materialises (seq x seq) attention scores per "
            "head; sdpa computes the same without them"
        )
    warnings.extend(distributed_warnings(resolved))
    if spec.method == "grpo":
        warnings.append(
            "grpo: the estimate takes training.max_length as the prompt length, so each row "
            "is max_length + grpo.max_completion_length tokens"
        )
    if not spec.training.packing and spec.method == "sft":
        warnings.append(
            "training.packing: off, so batches pad to their longest row; the plan assumes "
            "rows as long as training.max_length"
        )
    return warnings


@dataclass(frozen=True)
class Replanned:
    """What the planner makes of a changed spec: the candidate it would load (the closest
    when none fits) and whether the run fits, at the estimate and at the upper end."""

    candidate: Candidate
    fits: bool
    fits_high: bool
    loadable: bool = True
    """The spec's fixed precision exists on the GPU (bf16 does not on a T4)."""


def changed_resolved(resolved: Resolved, change: Mapping[str, Any]) -> Resolved | None:
    """``resolved`` with the spec edit ``change`` (dotted keys) applied and validated as
    the file would be; None when the spec's rules refuse the edited spec."""
    try:
        spec = apply_changes(resolved.loaded.spec, change)
    except ValidationError:
        return None
    gpu = resolved.gpu
    if "hardware.gpu" in change:
        gpu = lookup_gpu(str(change["hardware.gpu"]))
        if spec.hardware.vram_gib is not None:
            gpu = gpu.model_copy(update={"memory_bytes": int(spec.hardware.vram_gib * GIB)})
    return replace(resolved, loaded=replace(resolved.loaded, spec=spec), gpu=gpu)


def replan(resolved: Resolved, gpu: Gpu, change: Mapping[str, Any]) -> Replanned | None:
    """Plan the spec with ``change`` applied, on ``gpu`` (or the GPU the change names),
    choosing the precision as ``make_plan`` does; None when the edited spec is invalid."""
    other = changed_resolved(resolved, change)
    if other is None:
        return None
    target = other.gpu if "hardware.gpu" in change else gpu
    spec = other.loaded.spec
    order = spec_precisions(
        precision_order(target, spec.precision, spec.hardware.distributed), spec
    )
    candidates = tuple(estimate_candidate(other, p, gpu=target) for p in order)
    chosen = choose_precision(spec.precision, candidates)
    if chosen is None:
        if spec.precision in order:
            closest = next(c for c in candidates if c.precision == spec.precision)
        else:
            closest = min(candidates, key=lambda c: c.peak_reserved_bytes)
        loadable = spec.precision == "auto" or spec.precision in order
        return Replanned(closest, False, False, loadable)
    candidate = next(c for c in candidates if c.precision == chosen)
    return Replanned(candidate, True, candidate.fits_high)


def suggest_changes(
    resolved: Resolved, gpu: Gpu, precision: LoadPrecision, candidates: tuple[Candidate, ...]
) -> list[Suggestion]:
    """Spec edits that would make the run fit (or come closer), each re-planned as the
    edited spec (so its verdict holds when it is applied alone), ranked: edits whose
    interval's upper end fits, then edits that fit at the estimate, each in order of how
    little they change (``DISRUPTION``: edits of the spec before other hardware), then the
    rest by peak. Searched lengths are multiples of 64."""
    spec = resolved.loaded.spec
    training = spec.training
    base = next(c for c in candidates if c.precision == precision)
    made: list[Suggestion] = []

    def add(action: str, change: dict[str, Any], what: str) -> None:
        outcome = replan(resolved, gpu, change)
        if outcome is None or any(s.change == change for s in made):
            return
        if not outcome.loadable:
            return  # the precision the spec fixes cannot load here: no peak to report
        made.append(_suggestion(action, change, what, base.peak_reserved_bytes, outcome))

    def largest(key: str, values: list[int], extra: Mapping[str, Any] | None = None) -> int | None:
        """The largest of ``values`` (ascending) for ``key`` with which the run fits: at the
        interval's upper end if any does, else at the estimate."""
        for safe in (True, False):

            def fits(index: int, safe: bool = safe) -> bool:
                outcome = replan(resolved, gpu, {**(extra or {}), key: values[index]})
                return outcome is not None and (outcome.fits_high if safe else outcome.fits)

            index = _largest_fitting(0, len(values) - 1, fits)
            if index is not None:
                return values[index]
        return None

    if spec.precision not in ("auto", "4bit"):
        for candidate in candidates:
            if candidate.fits and candidate.precision != spec.precision:
                add(
                    f"load in {candidate.precision}",
                    {"precision": candidate.precision},
                    "smaller weights",
                )
                break
    if not training.gradient_checkpointing:
        add(
            "turn on gradient checkpointing",
            {"training.gradient_checkpointing": True},
            "keeps one layer's activations instead of all",
        )
    hardware = spec.hardware
    if hardware.cpu_offload and not base.host_fits:
        add(
            "keep sharded state on the GPUs (host RAM too small)",
            {"hardware.cpu_offload": False},
            "the offloaded shards need more host memory than hardware.host_memory_gib",
        )
    if hardware.distributed in STATE_SHARDING_ENGINES and not hardware.cpu_offload:
        add(
            "offload sharded state to host memory",
            {"hardware.cpu_offload": True, "training.optim": "adamw_torch"}
            if training.optim != "adamw_torch"
            else {"hardware.cpu_offload": True},
            "the optimizer steps on the CPU"
            + (
                "; parameters and gradients wait there"
                if hardware.distributed != "deepspeed-zero2"
                else ""
            ),
        )
    if bitsandbytes_optimizer_allowed(spec) and training.optim not in (
        *PAGED_OPTIMIZERS,
        "adamw_8bit",
        "adamw_bnb_8bit",
    ):
        add(
            "use the paged 8-bit AdamW",
            {"training.optim": "paged_adamw_8bit"},
            "optimizer state in 8 bits, paged to host memory under pressure",
        )
    effective = training.per_device_train_batch_size * training.gradient_accumulation_steps
    batch_change: dict[str, Any] = {}
    if training.per_device_train_batch_size > 1:
        batches = [
            b
            for b in range(1, training.per_device_train_batch_size)
            if effective % b == 0
            and accepted_batch(
                resolved, b, {"training.gradient_accumulation_steps": effective // b}
            )
        ]
        batch = None
        if batches:
            batch = largest(
                "training.per_device_train_batch_size",
                batches,
            )
        batch = batch or (batches[0] if batches else None)
        if batch is not None:
            batch_change = {
                "training.per_device_train_batch_size": batch,
                "training.gradient_accumulation_steps": effective // batch,
            }
            add(
                f"lower the micro-batch to {batch} and raise accumulation to {effective // batch}",
                batch_change,
                f"same effective batch of {effective}",
            )
    length = largest("training.max_length", rounded_lengths_below(training.max_length))
    if length is not None:
        add(
            f"shorten max_length to {length}",
            {"training.max_length": length},
            f"the longest multiple of 64 that fits (was {training.max_length})",
        )
    grpo = getattr(spec, "grpo", None)
    if grpo is not None:
        completion = largest(
            "grpo.max_completion_length", rounded_lengths_below(grpo.max_completion_length, 1)
        )
        if completion is not None:
            add(
                f"shorten max_completion_length to {completion}",
                {"grpo.max_completion_length": completion},
                f"the longest completion that fits (was {grpo.max_completion_length})",
            )
    if grpo is not None and grpo.use_vllm == "colocate":
        if not grpo.vllm_enable_sleep_mode:
            add(
                "let vLLM sleep while the policy trains",
                {"grpo.vllm_enable_sleep_mode": True},
                "vLLM releases its weights and KV cache between generation rounds",
            )
        shares = [
            round(0.05 * step, 2)
            for step in range(1, 20)
            if round(0.05 * step, 2) < grpo.vllm_gpu_memory_utilization
        ]
        share = largest_vllm_share(resolved, gpu, shares)
        if share is not None:
            add(
                f"lower vLLM's share to {share:g}",
                {"grpo.vllm_gpu_memory_utilization": share},
                "a smaller KV cache for vLLM (fewer sequences decoded at once)",
            )
        add(
            "run vLLM as a server on another GPU",
            {"grpo.use_vllm": "server"},
            "generation moves off the training GPU (one more GPU runs `trl vllm-serve`)",
        )
    ranks = [r for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if r < spec.lora.r]
    if ranks and spec.finetuning != "full":
        rank = largest("lora.r", ranks) or ranks[0]
        add(f"lower the LoRA rank to {rank}", {"lora.r": rank}, "fewer adapter parameters")
    combined = combined_change(resolved, gpu, batch_change)
    if combined:
        add("combine these changes", combined, "together")
    made.extend(smallest_fitting_gpu(resolved, gpu, base.peak_reserved_bytes))
    made.extend(smallest_fitting_gpu_count(resolved, gpu, base.peak_reserved_bytes))
    return sorted(made, key=_rank)


def largest_vllm_share(resolved: Resolved, gpu: Gpu, shares: list[float]) -> float | None:
    """The largest of ``shares`` (ascending) for ``grpo.vllm_gpu_memory_utilization`` with
    which the run fits: at the interval's upper end if any does, else at the estimate."""
    outcomes = [
        (share, replan(resolved, gpu, {"grpo.vllm_gpu_memory_utilization": share}))
        for share in reversed(shares)
    ]
    for safe in (True, False):
        for share, outcome in outcomes:
            if outcome is not None and (outcome.fits_high if safe else outcome.fits):
                return share
    return None


def _rank(suggestion: Suggestion) -> tuple[int, int]:
    if suggestion.fits_high:
        return (0, _disruption(suggestion.change))
    if suggestion.fits:
        return (1, _disruption(suggestion.change))
    return (2, suggestion.peak_reserved_bytes or 0)


def _suggestion(
    action: str, change: dict[str, Any], what: str, base_peak: int, outcome: Replanned
) -> Suggestion:
    after = outcome.candidate
    saved = base_peak - after.peak_reserved_bytes
    verdict = "fits" if outcome.fits_high else "fits, tight" if outcome.fits else "still over"
    saving = f"saves {format_gib(saved)}, " if saved > 0 else ""
    return Suggestion(
        action=action,
        detail=(
            f"{what}: {saving}peak {format_gib(after.peak_reserved_bytes)} in {after.precision}, "
            f"up to {format_gib(after.peak_reserved_bytes_high)} ({verdict})"
        ),
        change=change,
        peak_reserved_bytes=after.peak_reserved_bytes,
        fits=outcome.fits,
        peak_reserved_bytes_high=after.peak_reserved_bytes_high,
        fits_high=outcome.fits_high,
        precision=after.precision,
    )


def rounded_lengths_below(current: int, smallest: int = MIN_MAX_LENGTH) -> list[int]:
    """Lengths a suggestion may propose below ``current``, ascending: multiples of 64 (the
    shapes kernels like), or every length from ``smallest`` when ``current`` is under 128."""
    multiples = list(range(64, current, 64))
    return multiples or list(range(smallest, current))


DISRUPTION = {
    "precision": 0,
    "quantization.bnb_4bit_quant_storage": 0,
    "training.gradient_checkpointing": 1,
    "training.optim": 2,
    "training.per_device_train_batch_size": 3,
    "training.gradient_accumulation_steps": 3,
    "training.max_length": 4,
    "grpo.max_completion_length": 4,
    "lora.r": 5,
    "hardware.cpu_offload": 6,
    "hardware.gpu": 7,
    "hardware.vram_gib": 7,
    "hardware.num_gpus": 7,
    "hardware.distributed": 7,
}
"""How much an edit asks of the user (0: nothing but speed or numerics). Edits of the
spec come before other hardware: a shorter max_length or a smaller micro-batch is free, a
bigger GPU is not. A combination counts as its most demanding edit."""


def _disruption(change: Mapping[str, Any]) -> int:
    return max(DISRUPTION.get(key, len(DISRUPTION)) for key in change)


def combined_change(resolved: Resolved, gpu: Gpu, batch_change: dict[str, Any]) -> dict[str, Any]:
    """Checkpointing, the paged 8-bit optimizer and the smaller micro-batch together, and
    when that is not enough the longest ``max_length`` (a multiple of 64) that fits with
    all of them. Empty when it adds nothing to one edit alone."""
    training = resolved.loaded.spec.training
    change: dict[str, Any] = dict(batch_change)
    if not training.gradient_checkpointing:
        change["training.gradient_checkpointing"] = True
    if bitsandbytes_optimizer_allowed(resolved.loaded.spec) and training.optim not in (
        PAGED_OPTIMIZERS
    ):
        change["training.optim"] = "paged_adamw_8bit"
    if not change:
        return {}
    outcome = replan(resolved, gpu, change)
    if outcome is not None and outcome.fits_high:
        return change
    lengths = rounded_lengths_below(training.max_length)

    def fits(index: int) -> bool:
        found = replan(resolved, gpu, {**change, "training.max_length": lengths[index]})
        return found is not None and found.fits_high

    index = _largest_fitting(0, len(lengths) - 1, fits)
    return {**change, "training.max_length": lengths[index]} if index is not None else change


def smallest_fitting_gpu(resolved: Resolved, current: Gpu, base_peak: int) -> list[Suggestion]:
    """The catalogue GPU with the least memory on which the spec fits (at the interval's
    upper end if one does within the catalogue, else at the estimate)."""
    spec = resolved.loaded.spec
    first_point: Suggestion | None = None
    for gpu in sorted(gpu_catalogue(), key=lambda g: g.memory_bytes):
        if gpu.memory_bytes <= current.memory_bytes:
            continue
        change: dict[str, Any] = {"hardware.gpu": gpu.aliases[0] if gpu.aliases else gpu.name}
        if spec.hardware.vram_gib is not None:
            change["hardware.vram_gib"] = None
        outcome = replan(resolved, current, change)
        if outcome is None or not outcome.fits:
            continue
        made = _suggestion(f"use a {gpu.name}", change, "more memory", base_peak, outcome)
        if outcome.fits_high:
            return [made]
        first_point = first_point or made
    return [first_point] if first_point else []


MAX_SUGGESTED_GPUS = 64
"""The largest GPU count the planner tries when one GPU (or the spec's count) is too small."""


ONE_GPU = {
    "hardware.num_gpus": 1,
    "hardware.num_nodes": 1,
    "hardware.distributed": "none",
    "hardware.cpu_offload": False,
}
"""Overrides that turn a distributed spec back into a single-GPU run."""


def distributed_decision(resolved: Resolved, gpu: Gpu, chosen: Candidate) -> Decision:
    """The engine, with the per-GPU numbers it leads to and what one GPU would need."""
    hardware = resolved.loaded.spec.hardware
    single = estimate_candidate(resolved, chosen.precision, ONE_GPU, gpu)
    parts = [f"weights {format_gib(chosen.breakdown.weights_bytes)}"]
    if chosen.gathered_weight_bytes:
        parts[0] += f" (of which {format_gib(chosen.gathered_weight_bytes)} gathered unsharded)"
    parts.append(
        f"gradients {format_gib(chosen.breakdown.gradient_bytes)}"
        + (
            f" (of which {format_gib(chosen.communication_bytes)} communication buffers)"
            if chosen.communication_bytes
            else ""
        )
    )
    parts.append(f"optimizer {format_gib(chosen.breakdown.optimizer_bytes)}")
    offload = "; sharded state offloaded to host memory" if hardware.cpu_offload else ""
    reason = (
        f"{hardware.world_size} GPUs, per GPU: {', '.join(parts)}; peak "
        f"{format_gib(chosen.peak_reserved_bytes)} per GPU against "
        f"{format_gib(single.peak_reserved_bytes)} on one GPU{offload}"
    )
    return Decision("distributed", hardware.distributed, reason)


def bitsandbytes_optimizer_allowed(spec: AnySpec) -> bool:
    """The spec refuses 8-bit / paged optimizers under DeepSpeed and with CPU offload, so
    no suggestion proposes one there."""
    hardware = spec.hardware
    return not hardware.distributed.startswith("deepspeed") and not hardware.cpu_offload


def distributed_warnings(resolved: Resolved) -> list[str]:
    """What the per-GPU figures assume about the engine, in the plan's words."""
    hardware = resolved.loaded.spec.hardware
    warnings: list[str] = []
    if hardware.distributed == "ddp":
        warnings.append(
            f"hardware.distributed: ddp replicates the whole run on each of {hardware.world_size} "
            "GPUs; the per-GPU figures add DDP's bucketed copy of the trainable gradients"
        )
    elif hardware.distributed != "none":
        warnings.append(
            f"hardware.distributed: {hardware.distributed} over {hardware.world_size} GPUs: the "
            "figures are per GPU; the overhead includes NCCL's own buffers (outside torch's "
            "allocator) and the blocks the allocator keeps from loading"
        )
    if hardware.cpu_offload:
        warnings.append(
            "hardware.cpu_offload: sharded parameters, gradients and optimizer state live in "
            "host memory (each node needs RAM for its GPUs' shards); steps are slower"
        )
    return warnings


def smallest_fitting_gpu_count(resolved: Resolved, gpu: Gpu, base_peak: int) -> list[Suggestion]:
    """The fewest GPUs of the named kind on which FSDP (the spec's engine when it shards
    parameters already) fits, each count re-planned as the edited spec.

    A 4-bit load under FSDP needs its packed weights stored in the compute dtype, so
    the suggested change sets that too when the spec keeps uint8.
    """
    spec = resolved.loaded.spec
    hardware = spec.hardware
    engine = hardware.distributed if hardware.distributed in PARAMETER_SHARDING_ENGINES else "fsdp"
    first_point: Suggestion | None = None
    for count in range(hardware.num_gpus + 1, MAX_SUGGESTED_GPUS + 1):
        change: dict[str, Any] = {"hardware.num_gpus": count, "hardware.distributed": engine}
        if (
            spec.precision in ("auto", "4bit")
            and spec.quantization.bnb_4bit_quant_storage == "uint8"
        ):
            change["quantization.bnb_4bit_quant_storage"] = "bfloat16" if gpu.bf16 else "float16"
        outcome = replan(resolved, gpu, change)
        if outcome is None or not outcome.fits:
            continue
        made = _suggestion(
            f"use {count} x {gpu.name} with {engine}", change, "per GPU", base_peak, outcome
        )
        if outcome.fits_high:
            return [made]
        first_point = first_point or made
    return [first_point] if first_point else []


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
    order = precision_order(gpu, spec.precision, "none")
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
