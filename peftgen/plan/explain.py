"""The plan's prose: the decisions it made with their reasons, its warnings and notes."""

from __future__ import annotations

from peftgen.catalog import Gpu
from peftgen.catalog.structure import SDPA_REFUSED_TYPES
from peftgen.chat_templates import CHATML_SPECIAL_TOKENS
from peftgen.memory import (
    PAGED_OPTIMIZERS,
    EstimateInput,
    adapter_dtype,
    base_parameter_count,
    deepspeed_casts_trainables,
    grpo_generation_bytes,
    host_offload_bytes,
    moe_experts_per_layer,
    reference_weight_bytes,
    train_step_peak_parts,
    vllm_share_bytes,
    zero3_loads_whole_model,
)
from peftgen.plan.candidates import ONE_GPU, choose_precision, estimate_candidate
from peftgen.plan.inputs import estimate_input, precision_order, spec_precisions
from peftgen.plan.types import Candidate, Decision
from peftgen.resolve import Resolved
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    STATE_SHARDING_ENGINES,
    AnySpec,
    LoadPrecision,
    trained_modules_to_save,
)
from peftgen.stack import INT8_SHARDING_REFUSED, format_gib
from peftgen.throughput import checkpointing_extra_compute_fraction


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


def _installed_template_notes(spec: AnySpec) -> list[str]:
    """The modules a named chat template trains in full though the spec does not list them:
    its marker tokens grow the embeddings and the head (the memory table counts them)."""
    if spec.dataset.chat_template is None or spec.finetuning != "lora":
        return []
    added = [m for m in trained_modules_to_save(spec) if m not in spec.lora.modules_to_save]
    if not added:
        return []
    return [
        f"dataset.chat_template: {spec.dataset.chat_template} adds its marker tokens "
        f"({', '.join(CHATML_SPECIAL_TOKENS)}), so {' and '.join(added)} grow and are "
        "trained in full and saved with the adapter (peft's modules_to_save; the trainable "
        "parameters above count them)"
    ]


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
    notes.extend(_installed_template_notes(spec))
    hardware = spec.hardware
    if hardware.distributed in PARAMETER_SHARDING_ENGINES and "8bit" in spec_precisions(
        ("bf16", "8bit"), spec
    ):
        # DDP cannot offload; ZeRO-2 offloads the optimizer state.
        engines = "deepspeed-zero2" if hardware.cpu_offload else "ddp or deepspeed-zero2"
        notes.append(
            f"8bit: not planned under {hardware.distributed}: {INT8_SHARDING_REFUSED}; "
            f"distributed: {engines} can train it"
        )
    if hardware.cpu_offload:
        per_gpu = host_offload_bytes(inputs)
        what = (
            "optimizer state"
            if hardware.distributed == "deepspeed-zero2"
            else "parameters, gradients and optimizer state"
        )
        notes.append(
            f"hardware.cpu_offload: about {format_gib(per_gpu * hardware.num_gpus)} of host "
            f"memory per node ({hardware.num_gpus} GPUs x {format_gib(per_gpu)} of offloaded "
            f"{what} with the CPU optimizer step's temporaries), plus the loaded checkpoint"
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
        if zero3_loads_whole_model(inputs):
            how, read_by = ZERO3_WHOLE_LOADING_TEXT
        elif hardware.distributed == "deepspeed-zero3":
            how, read_by = ZERO3_INIT_LOADING_TEXT
        if spec.finetuning == "full":
            how, read_by = full_sharded_loading_text(hardware.distributed)
        notes.append(
            f"loading: peaks at {format_gib(shown.load_peak_bytes)} per GPU "
            f"(training {format_gib(shown.peak_reserved_bytes)}); {how}; host memory per node "
            f"about {host}{verdict} (the larger of loading, where {read_by}, and the "
            "offloaded state)"
        )
    return notes


def _adapter_dtype_reason(chosen: str, inputs: EstimateInput) -> str:
    if deepspeed_casts_trainables(inputs):
        return (
            f"deepspeed.initialize casts the whole model, adapters included, to "
            f"{inputs.compute_dtype}; its optimizer keeps their fp32 master copy"
        )
    if chosen not in ("8bit", "4bit"):
        return "peft upcasts LoRA weights to fp32 (autocast_adapter_dtype=True)"
    return (
        "trl 1.16 casts the trainable weights of 8/4-bit models to bf16, whose coarse steps "
        "round small updates away (measured: after 10 AdamW steps at learning rate 5e-6, "
        "88% of a bf16 lora_A's entries had not moved; in fp32 almost all had); "
        "the script casts them back to fp32"
    )


def _misfit_text(
    candidate: Candidate,
    budget: int,
    budget_text: str,
    host_limit_gib: float | None,
    would: bool = False,
) -> str:
    """What is over for a candidate that does not fit (or fits only at the estimate): each
    phase with its figure and the limit it passes (``budget_text``: "over the 22.8 GiB
    budget on ..."), so a host-RAM misfit is not worded as a GPU-memory one. ``would``:
    for a candidate ``auto`` passed over, which is not loaded."""
    peaks, loads, needs = (
        ("would peak", "would load", "would need") if would else ("peaks", "loads", "needs")
    )
    peak = f"{peaks} at {format_gib(candidate.peak_reserved_bytes)}"
    over = candidate.phases_over(budget)
    if not over and candidate.fits_high:  # not chosen for another reason: the spec's own
        return f"{peak}, fits"
    if not over:  # fits at the estimate, not at the upper end
        return f"{peak}, up to {format_gib(candidate.peak_reserved_bytes_high)}, {budget_text}"
    on_gpu = [peak] if "training" in over else []
    if "loading" in over:
        on_gpu.append(f"{loads} at {format_gib(candidate.load_peak_bytes)}")
    text = f"{' and '.join(on_gpu)}, {budget_text}" if on_gpu else f"{peak}, but"
    if "host RAM" in over:
        text += (
            f"{';' if on_gpu else ''} {needs} {format_gib(candidate.host_memory_bytes)} of "
            f"host memory per node, over the {host_limit_gib:g} GiB hardware.host_memory_gib"
        )
    return text


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
    host_limit = getattr(spec.hardware, "host_memory_gib", None)
    over_budget = f"over the {format_gib(budget)} budget on {gpu.name}"
    peaks = ", ".join(f"{c.precision} {format_gib(c.peak_reserved_bytes)}" for c in candidates)
    fixed = by_precision.get(spec.precision) if spec.precision != "auto" else None
    if chosen is None and fixed is not None:
        auto = choose_precision("auto", candidates)
        reason = (
            f"{fixed.precision} (set in the spec) "
            f"{_misfit_text(fixed, budget, over_budget, host_limit)}"
            + (f"; precision: auto would load {auto}" if auto is not None else "")
            + f" (peaks: {peaks})"
        )
    elif chosen is None and spec.precision != "auto":
        # The spec fixes a precision this GPU cannot load (bf16 on a card without it).
        reason = (
            f"{spec.precision} (set in the spec) cannot load on {gpu.name}"
            + ("" if gpu.bf16 else " (no native bfloat16)")
            + "; "
            + "; ".join(
                f"{c.precision} {_misfit_text(c, budget, 'over budget', host_limit, would=True)}"
                for c in candidates
            )
        )
    elif chosen is None:
        reason = f"{gpu.name}, {format_gib(budget)} budget: " + "; ".join(
            f"{c.precision} {_misfit_text(c, budget, 'over budget', host_limit)}"
            for c in candidates
        )
    elif spec.precision != "auto":
        reason = (
            f"precision {chosen} set in the spec; peak "
            f"{format_gib(by_precision[chosen].peak_reserved_bytes)} fits the "
            f"{format_gib(budget)} budget on {gpu.name}"
        )
    else:
        better = candidates[: [c.precision for c in candidates].index(chosen)]
        too_big = "; ".join(
            f"{c.precision} {_misfit_text(c, budget, 'over budget', host_limit, would=True)}"
            for c in better
        )
        reason = (
            f"{chosen} peaks at {format_gib(by_precision[chosen].peak_reserved_bytes)} of the "
            f"{format_gib(budget)} budget on {gpu.name}"
            + (f"; {too_big}" if too_big else "; the most faithful precision that fits")
        )
    decisions.append(Decision("precision", chosen, reason))
    compute = precision_order(gpu, spec.precision)[0]
    compute_reason = (
        "precision fp16 set in the spec"
        if spec.precision == "fp16" and gpu.bf16
        else "no hardware.gpu named: an Ampere-or-newer card (native bfloat16) is assumed"
        if gpu.architecture_assumed
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
                _adapter_dtype_reason(chosen, inputs),
            )
        )
        if spec.hardware.world_size > 1:
            decisions.append(distributed_decision(resolved, gpu, chosen_candidate))
        checkpointing = spec.training.gradient_checkpointing
        flipped = estimate_candidate(
            resolved, chosen, {"training.gradient_checkpointing": not checkpointing}, gpu
        )
        delta = abs(flipped.peak_reserved_bytes - chosen_candidate.peak_reserved_bytes)
        extra = f"{checkpointing_extra_compute_fraction(inputs):.0%}"
        decisions.append(
            Decision(
                "gradient_checkpointing",
                checkpointing,
                f"saves {format_gib(delta)} of activations for ~{extra} more compute per "
                "trained token (each layer's forward runs again in the backward)"
                if checkpointing
                else f"off: turning it on would save {format_gib(delta)} for ~{extra} more "
                "compute per trained token",
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


ZERO3_WHOLE_LOADING_TEXT = (
    "deepspeed.initialize moves the whole model to each GPU before partitioning it "
    "(transformers never uses zero.Init for a quantized model); the allocator keeps those "
    "blocks for training",
    "every process reads the model",
)
"""How QLoRA loads under ZeRO-3 in the emitted script (``memory.zero3_loads_whole_model``)."""

ZERO3_INIT_LOADING_TEXT = (
    "from_pretrained builds the model under zero.Init, each parameter partitioned as it is "
    "created (the script registers DeepSpeed's config first), and rank 0 copies the "
    "checkpoint in one module at a time",
    "rank 0 reads the checkpoint",
)
"""How a 16-bit model loads under ZeRO-3 in the emitted script
(``stack.zero3_partitions_while_loading``)."""


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
        "from_pretrained builds the fp32 model under zero.Init, each parameter partitioned as "
        "it is created (the script registers DeepSpeed's config first), and rank 0 copies the "
        "checkpoint in one module at a time",
        "rank 0 reads the checkpoint",
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
