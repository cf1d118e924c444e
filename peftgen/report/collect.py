"""Ask the planner the report's what-if questions; compute nothing here.

Every number comes from ``peftgen.plan``: the plan itself (what ``plan --json`` prints),
``estimate_candidate`` for the same spec on another GPU or with another ``max_length``,
and ``largest_fitting_max_length`` / ``largest_fitting_batch`` for the limits, the same
searches the planner's own suggestions use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from peftgen.catalog import Gpu, gpu_catalogue
from peftgen.plan import (
    Candidate,
    Plan,
    budget_bytes,
    choose_precision,
    estimate_candidate,
    estimate_input,
    largest_fitting_batch,
    largest_fitting_max_length,
    planned_precisions,
)
from peftgen.report.data import (
    ENGINES,
    GPU_COUNTS,
    CurvePoint,
    FitCell,
    GpuCountCell,
    GpuCountRow,
    GpuCountTable,
    GpuFitRow,
    PrecisionCurve,
    PrecisionLimits,
    ReportData,
    SpecSource,
    fit_status,
)
from peftgen.resolve import Resolved
from peftgen.spec import PARAMETER_SHARDING_ENGINES, LoadPrecision
from peftgen.throughput import TimeEstimate, estimate_time, spec_run_length

CURVE_MAX_LENGTHS: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
"""From short chat turns to long-context fine-tuning."""


def report_data(
    resolved: Resolved, plan: Plan, prices: Mapping[str, float] | None = None
) -> ReportData:
    """The plan plus the planner's answers for other GPUs, lengths and batch sizes.

    ``plan`` is the one ``plan`` / ``emit`` made (with any ``--gpu`` / ``--vram-gib``
    override already applied); the what-ifs use the very GPU it was made for. ``prices``:
    the user's price per GPU-hour by catalogue GPU name (the matrix then shows cost).
    """
    # Imported here: ``peftgen.render`` may import this package to write ``plan.md``.
    from peftgen.stack import PINNED_VERSIONS

    spec = resolved.loaded.spec
    gpu = plan_gpu(plan)
    precisions = [candidate.precision for candidate in plan.candidates]
    return ReportData(
        plan=plan,
        source=SpecSource(
            path=str(resolved.loaded.path),
            text=resolved.loaded.text,
            sha256=resolved.loaded.sha256,
            model_id=resolved.arch.id,  # an alias resolved to its hub id
            method=spec.method,
            precision=spec.precision,
            max_length=spec.training.max_length,
            per_device_train_batch_size=spec.training.per_device_train_batch_size,
            model_max_positions=resolved.arch.config.max_position_embeddings,
            finetuning=spec.finetuning,
            host_memory_gib=spec.hardware.host_memory_gib,
        ),
        fit_matrix=_fit_matrix(resolved, plan, prices or {}),
        length_curves=tuple(
            PrecisionCurve(
                precision,
                tuple(
                    _curve_point(resolved, precision, length, gpu) for length in CURVE_MAX_LENGTHS
                ),
            )
            for precision in precisions
        ),
        limits=tuple(
            PrecisionLimits(
                precision,
                max_length=largest_fitting_max_length(resolved, precision, gpu=gpu),
                per_device_train_batch_size=largest_fitting_batch(resolved, precision, gpu=gpu),
            )
            for precision in precisions
        ),
        versions=tuple(PINNED_VERSIONS.items()),
        spec_warnings=resolved.warnings,
        gpu_counts=_gpu_count_table(resolved, plan, gpu),
        priced=bool(prices),
    )


def plan_gpu(plan: Plan) -> Gpu:
    """The GPU the plan was made for, as the estimator takes it."""
    target = plan.gpu
    return Gpu(
        name=target.name,
        memory_bytes=target.vram_bytes,
        compute_capability=target.compute_capability or "8.0",
        bf16=target.bf16,
        flash_attention_2=target.flash_attention_2,
    )


def _curve_point(resolved: Resolved, precision: LoadPrecision, length: int, gpu: Gpu) -> CurvePoint:
    candidate = estimate_candidate(resolved, precision, {"training.max_length": length}, gpu=gpu)
    return CurvePoint(length, candidate.peak_reserved_bytes, candidate.fits)


def _chosen_time(
    spec_precision: str, candidates: Sequence[Candidate]
) -> tuple[LoadPrecision | None, TimeEstimate | None]:
    """The precision the planner would choose among ``candidates``, and its time."""
    chosen = choose_precision(spec_precision, tuple(candidates))
    for candidate in candidates:
        if candidate.precision == chosen:
            return chosen, candidate.time
    return None, None


def _fit_matrix(
    resolved: Resolved, plan: Plan, prices: Mapping[str, float]
) -> tuple[GpuFitRow, ...]:
    """The target GPU (from the plan itself), then the other catalogue GPUs by memory,
    those with identical answers (memory and time) merged into one row."""
    spec = resolved.loaded.spec
    count = spec.hardware.world_size
    run = spec_run_length(spec, resolved.loaded.path.parent)
    beta = float(getattr(getattr(spec, "grpo", None), "beta", 0.0))
    target_precision, target_time = _chosen_time(spec.precision, plan.candidates)
    target_row = GpuFitRow(
        gpu_names=(plan.gpu.name,),
        vram_bytes=plan.gpu.vram_bytes,
        budget_bytes=plan.budget_bytes,
        cells=tuple(
            FitCell(
                c.precision,
                c.peak_reserved_bytes,
                fit_status(c),
            )
            for c in plan.candidates
        ),
        is_target=True,
        time=target_time,
        time_precision=target_precision,
        price_per_hour=prices.get(plan.gpu.name),
        gpu_count=count,
    )
    headroom = resolved.loaded.spec.hardware.headroom_fraction
    groups: dict[tuple[object, ...], list[str]] = {}
    first: dict[tuple[object, ...], GpuFitRow] = {}
    for gpu in sorted(gpu_catalogue(), key=lambda g: (g.memory_bytes, g.name)):
        if gpu.name == plan.gpu.name and gpu.memory_bytes == plan.gpu.vram_bytes:
            continue
        budget = budget_bytes(gpu, headroom)
        cells = []
        candidates = []
        for precision in planned_precisions(gpu, resolved.loaded.spec):
            candidate = estimate_candidate(resolved, precision, gpu=gpu)
            time = estimate_time(estimate_input(resolved, precision, gpu=gpu), gpu, run, beta)
            candidates.append(replace(candidate, time=time))
            status = fit_status(candidate)
            cells.append(FitCell(precision, candidate.peak_reserved_bytes, status))
        chosen = _chosen_time(spec.precision, candidates)
        # GPUs that differ in speed (or in the user's price) get their own rows.
        speed = None if chosen[1] is None else round(chosen[1].step_seconds, 3)
        key = (gpu.memory_bytes, budget, tuple(cells), speed, prices.get(gpu.name))
        groups.setdefault(key, []).append(gpu.name)
        first.setdefault(
            key,
            GpuFitRow(
                (gpu.name,),
                gpu.memory_bytes,
                budget,
                tuple(cells),
                is_target=False,
                time=chosen[1],
                time_precision=chosen[0],
                price_per_hour=prices.get(gpu.name),
                gpu_count=count,
            ),
        )
    rows = [target_row]
    rows += [replace(first[key], gpu_names=tuple(names)) for key, names in groups.items()]
    return tuple(rows)


def _gpu_count_table(resolved: Resolved, plan: Plan, gpu: Gpu) -> GpuCountTable:
    """Per-GPU peaks on 1, 2, 4, 8 GPUs of the plan's kind (one node), per engine, at the
    chosen precision (else the spec's fixed one, else the smallest)."""
    spec = resolved.loaded.spec
    precision = plan.chosen_precision
    if precision is None:
        fixed = [c.precision for c in plan.candidates if c.precision == spec.precision]
        precision = fixed[0] if fixed else plan.candidates[-1].precision
    offload = spec.hardware.cpu_offload
    rows = []
    for count in GPU_COUNTS:
        engines = ("none",) if count == 1 else ENGINES
        cells = tuple(
            _gpu_count_cell(
                resolved, precision, gpu, count, engine, offload and engine not in ("none", "ddp")
            )
            for engine in engines
        )
        rows.append(GpuCountRow(count, cells))
    return GpuCountTable(precision, offload, tuple(rows))


def gpu_count_changes(
    precision: LoadPrecision, count: int, engine: str, offload: bool, gpu_bf16: bool = True
) -> dict[str, object]:
    """The spec edit behind one cell, as dotted keys: one node of ``count`` GPUs; 4-bit
    under FSDP / ZeRO-3 with the packed weights stored in the compute dtype (their
    requirement; ``resolve.default_quant_storage``'s choice)."""
    changes: dict[str, object] = {
        "precision": precision,
        "hardware.num_gpus": count,
        "hardware.num_nodes": 1,
        "hardware.distributed": engine,
        "hardware.cpu_offload": offload,
    }
    if precision == "4bit" and engine in PARAMETER_SHARDING_ENGINES:
        changes["quantization.bnb_4bit_quant_storage"] = "bfloat16" if gpu_bf16 else "float16"
    return changes


def _gpu_count_cell(
    resolved: Resolved, precision: LoadPrecision, gpu: Gpu, count: int, engine: str, offload: bool
) -> GpuCountCell:
    changes = gpu_count_changes(precision, count, engine, offload, gpu.bf16)
    refused = _refusal(resolved, changes)
    if refused is not None:
        return GpuCountCell(engine, None, None, refused)
    overrides = {k: v for k, v in changes.items() if k.startswith("hardware.")}
    candidate = estimate_candidate(resolved, precision, overrides, gpu)
    return GpuCountCell(engine, candidate.peak_reserved_bytes, fit_status(candidate))


def _refusal(resolved: Resolved, changes: dict[str, object]) -> str | None:
    """The spec's own validation message for the changed spec, or None when accepted."""
    from pydantic import ValidationError

    from peftgen.spec import SPEC_ADAPTER

    data = resolved.loaded.spec.model_dump()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    try:
        SPEC_ADAPTER.validate_python(data)
    except ValidationError as error:
        return str(error.errors()[0]["msg"]).removeprefix("Value error, ")
    return None
