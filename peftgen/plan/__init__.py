"""The plan: which precision to load in, whether it fits, and what to change if not.

``make_plan`` is the entry point; the package's modules each hold one job:
``types`` (result types), ``inputs`` (spec to estimator input), ``candidates`` (fit and
choice), ``explain`` (decisions, warnings, notes) and ``suggest`` (what to change).
"""

from __future__ import annotations

from peftgen.accuracy_interval import interval_evidence, interval_factor
from peftgen.memory import MemoryBreakdown
from peftgen.plan.candidates import (
    ONE_GPU,
    choose_precision,
    estimate_candidate,
    full_finetuning_candidate,
    largest_fitting_batch,
    largest_fitting_max_length,
    recommended_engine,
    with_times,
)
from peftgen.plan.explain import (
    full_and_vllm_notes,
    full_decisions,
    plan_decisions,
    plan_notes,
    plan_warnings,
)
from peftgen.plan.inputs import (
    SPEC_KEY_TO_FIELD,
    budget_bytes,
    estimate_input,
    needs_reference_copy,
    planned_precisions,
    precision_order,
    spec_precisions,
    target_gpu,
)
from peftgen.plan.suggest import DISRUPTION, changed_resolved, replan, suggest_changes
from peftgen.plan.types import (
    BREAKDOWN_KEYS,
    Assumption,
    Candidate,
    Decision,
    GpuTarget,
    Plan,
    Suggestion,
)
from peftgen.resolve import Resolved
from peftgen.spec import PARAMETER_SHARDING_ENGINES


def make_plan(
    resolved: Resolved, gpu_override: str | None = None, vram_gib_override: float | None = None
) -> Plan:
    """Estimate every precision, choose one, explain the choice, and suggest fixes."""
    spec = resolved.loaded.spec
    gpu = target_gpu(resolved, gpu_override, vram_gib_override)
    budget = budget_bytes(gpu, spec.hardware.headroom_fraction)
    order = planned_precisions(gpu, spec)
    candidates = tuple(estimate_candidate(resolved, p, gpu=gpu) for p in order)
    candidates = with_times(resolved, candidates, gpu)
    chosen = choose_precision(spec.precision, candidates)
    fits = chosen is not None
    chosen_candidate = next((c for c in candidates if c.precision == chosen), None)
    tight = chosen_candidate is not None and chosen_candidate.tight
    sharded = spec.hardware.distributed in PARAMETER_SHARDING_ENGINES
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
            architecture_assumed=gpu.architecture_assumed,
        ),
        budget_bytes=budget,
        trainable_parameters=candidates[0].trainable_parameters,
        total_parameters=candidates[0].total_parameters,
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
        interval_factor=interval_factor(sharded),
        interval_evidence=interval_evidence(sharded),
        defaults=tuple(Decision(d.field_path, d.value, d.reason) for d in resolved.defaults),
        notes=tuple(plan_notes(resolved, gpu, chosen_candidate or candidates[-1]))
        + tuple(full_and_vllm_notes(resolved, gpu, chosen_candidate or candidates[-1])),
        full_finetuning=full_finetuning_candidate(resolved, gpu),
    )


__all__ = [
    "BREAKDOWN_KEYS",
    "DISRUPTION",
    "ONE_GPU",
    "SPEC_KEY_TO_FIELD",
    "Assumption",
    "Candidate",
    "Decision",
    "GpuTarget",
    "MemoryBreakdown",
    "Plan",
    "Suggestion",
    "budget_bytes",
    "changed_resolved",
    "choose_precision",
    "estimate_candidate",
    "estimate_input",
    "largest_fitting_batch",
    "largest_fitting_max_length",
    "make_plan",
    "needs_reference_copy",
    "planned_precisions",
    "precision_order",
    "recommended_engine",
    "replan",
    "spec_precisions",
    "target_gpu",
]
