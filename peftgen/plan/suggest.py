"""What to change when nothing fits (or the fit is tight): each change replanned, with
its numbers, ranked by how little it disrupts the spec."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from peftgen.catalog import Gpu, gpu_catalogue, lookup_gpu
from peftgen.memory import (
    PAGED_OPTIMIZERS,
    host_load_bytes,
    host_offload_bytes,
)
from peftgen.overrides import apply_changes
from peftgen.plan.candidates import (
    accepted_batch,
    choose_precision,
    estimate_candidate,
    largest_fitting,
)
from peftgen.plan.explain import bitsandbytes_optimizer_allowed
from peftgen.plan.inputs import MIN_MAX_LENGTH, estimate_input, planned_precisions
from peftgen.plan.types import Candidate, Suggestion
from peftgen.resolve import Resolved
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    STATE_SHARDING_ENGINES,
    AnySpec,
    LoadPrecision,
)
from peftgen.stack import GIB, format_gib


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
    order = planned_precisions(target, spec)
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


MIN_SAVING_BYTES = GIB // 20
"""An edit that leaves the run over the budget is listed only if it moves the peak by at
least what the plan prints (0.05 GiB rounds to 0.1): "saves 0.0 GiB, still over" is not a
suggestion. (Moving it up can be the point: keeping offloaded state on the GPUs when the
host's RAM is what does not fit.)"""


@dataclass
class _Search:
    """The suggestions made so far for one spec, GPU and reference candidate: each edit is
    replanned as the edited spec, so its verdict holds when it is applied alone."""

    resolved: Resolved
    gpu: Gpu
    base: Candidate
    made: list[Suggestion] = field(default_factory=list)

    def add(self, action: str, change: dict[str, Any], what: str) -> None:
        outcome = replan(self.resolved, self.gpu, change)
        if outcome is None or any(s.change == change for s in self.made):
            return
        if not outcome.loadable:
            return  # the precision the spec fixes cannot load here: no peak to report
        saved = self.base.peak_reserved_bytes - outcome.candidate.peak_reserved_bytes
        if not outcome.fits and abs(saved) < MIN_SAVING_BYTES:
            return  # still over, the peak where it was: nothing worth trying
        self.made.append(_suggestion(action, change, what, self.base.peak_reserved_bytes, outcome))

    def largest(self, key: str, values: list[int]) -> int | None:
        """The largest of ``values`` (ascending) for ``key`` with which the run fits: at the
        interval's upper end if any does, else at the estimate."""
        for safe in (True, False):

            def fits(index: int, safe: bool = safe) -> bool:
                outcome = replan(self.resolved, self.gpu, {key: values[index]})
                return outcome is not None and (outcome.fits_high if safe else outcome.fits)

            index = largest_fitting(0, len(values) - 1, fits)
            if index is not None:
                return values[index]
        return None


def suggest_changes(
    resolved: Resolved, gpu: Gpu, precision: LoadPrecision, candidates: tuple[Candidate, ...]
) -> list[Suggestion]:
    """Spec edits that would make the run fit (or come closer), each re-planned as the
    edited spec (so its verdict holds when it is applied alone), ranked: edits whose
    interval's upper end fits, then edits that fit at the estimate, each in order of how
    little they change (``DISRUPTION``: edits of the spec before other hardware), then the
    rest by peak. Searched lengths are multiples of 64."""
    base = next(c for c in candidates if c.precision == precision)
    search = _Search(resolved, gpu, base)
    _precision_and_memory_edits(search, candidates)
    batch_change = _micro_batch_edit(search)
    _length_edits(search)
    _vllm_edits(search)
    spec = resolved.loaded.spec
    ranks = [r for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if r < spec.lora.r]
    if ranks and spec.finetuning != "full":
        rank = search.largest("lora.r", ranks) or ranks[0]
        search.add(f"lower the LoRA rank to {rank}", {"lora.r": rank}, "fewer adapter parameters")
    combined = combined_change(resolved, gpu, batch_change)
    if combined:
        search.add("combine these changes", combined, "together")
    search.made.extend(smallest_fitting_gpu(resolved, gpu, base.peak_reserved_bytes))
    search.made.extend(smallest_fitting_gpu_count(resolved, gpu, base.peak_reserved_bytes))
    return sorted(search.made, key=lambda s: _rank(s, spec))


def _precision_and_memory_edits(search: _Search, candidates: tuple[Candidate, ...]) -> None:
    """Another precision that fits, gradient checkpointing, CPU offload (on or off), a paged 8-bit
    optimizer: the edits that keep the data as it is."""
    spec = search.resolved.loaded.spec
    training, hardware = spec.training, spec.hardware
    if spec.precision != "auto":
        # Any other precision that fits, 16-bit included: a 4-bit model is loaded whole on
        # every GPU under ZeRO-3, where a bf16 one is partitioned as it loads.
        order = [c.precision for c in candidates]
        for candidate in candidates:
            if candidate.fits and candidate.precision != spec.precision:
                smaller = spec.precision not in order or order.index(
                    candidate.precision
                ) > order.index(spec.precision)
                search.add(
                    f"load in {candidate.precision}",
                    {"precision": candidate.precision},
                    "smaller weights" if smaller else "a lower peak (weights sharded as they load)",
                )
                break
    if not training.gradient_checkpointing:
        search.add(
            "turn on gradient checkpointing",
            {"training.gradient_checkpointing": True},
            "keeps one layer's activations instead of all",
        )
    if not search.base.host_fits:
        _host_memory_edits(search)
    if hardware.distributed in STATE_SHARDING_ENGINES and not hardware.cpu_offload:
        search.add(
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
        search.add(
            "use the paged 8-bit AdamW",
            {"training.optim": "paged_adamw_8bit"},
            "optimizer state in 8 bits, paged to host memory under pressure",
        )


def _host_memory_edits(search: _Search) -> None:
    """The host's RAM is short: keep the state on the GPUs when the offloaded state is
    what does not fit (not when loading is: every process reading a quantized checkpoint
    needs that RAM with or without offload), and a machine with the RAM the run needs."""
    spec = search.resolved.loaded.spec
    hardware = spec.hardware
    limit_bytes = int((hardware.host_memory_gib or 0) * GIB)
    inputs = estimate_input(search.resolved, search.base.precision, gpu=search.gpu)
    gpus = max(1, inputs.world_size // max(1, inputs.num_nodes))
    if hardware.cpu_offload and gpus * host_offload_bytes(inputs) > limit_bytes:
        search.add(
            "keep sharded state on the GPUs (host RAM too small)",
            {"hardware.cpu_offload": False},
            "the offloaded shards need more host memory than hardware.host_memory_gib",
        )
    needed_gib = math.ceil(search.base.host_memory_bytes / GIB)
    loading = host_load_bytes(inputs, gpus) >= gpus * host_offload_bytes(inputs)
    search.add(
        f"a machine with {needed_gib} GiB of RAM per node",
        {"hardware.host_memory_gib": needed_gib},
        "loading reads the checkpoint into host memory"
        + (
            ", once per process for a quantized model"
            if inputs.precision in ("8bit", "4bit")
            else ""
        )
        if loading
        else "the offloaded state of every GPU on the node lives in host memory",
    )


def _micro_batch_edit(search: _Search) -> dict[str, Any]:
    """A smaller micro-batch with more accumulation (the same effective batch); the edit,
    for ``combined_change``, or {} when there is none."""
    resolved = search.resolved
    training = resolved.loaded.spec.training
    if training.per_device_train_batch_size <= 1:
        return {}
    effective = training.per_device_train_batch_size * training.gradient_accumulation_steps
    batches = [
        b
        for b in range(1, training.per_device_train_batch_size)
        if effective % b == 0
        and accepted_batch(resolved, b, {"training.gradient_accumulation_steps": effective // b})
    ]
    if not batches:
        return {}
    batch = search.largest("training.per_device_train_batch_size", batches) or batches[0]
    change = {
        "training.per_device_train_batch_size": batch,
        "training.gradient_accumulation_steps": effective // batch,
    }
    search.add(
        f"lower the micro-batch to {batch} and raise accumulation to {effective // batch}",
        change,
        f"same effective batch of {effective}",
    )
    return change


def _length_edits(search: _Search) -> None:
    """The longest ``max_length`` (and GRPO ``max_completion_length``) that fits."""
    spec = search.resolved.loaded.spec
    training = spec.training
    length = search.largest("training.max_length", rounded_lengths_below(training.max_length))
    if length is not None:
        search.add(
            f"shorten max_length to {length}",
            {"training.max_length": length},
            f"the longest multiple of 64 that fits (was {training.max_length})",
        )
    grpo = getattr(spec, "grpo", None)
    if grpo is None:
        return
    completion = search.largest(
        "grpo.max_completion_length", rounded_lengths_below(grpo.max_completion_length, 1)
    )
    if completion is not None:
        search.add(
            f"shorten max_completion_length to {completion}",
            {"grpo.max_completion_length": completion},
            f"the longest completion that fits (was {grpo.max_completion_length})",
        )


def _vllm_edits(search: _Search) -> None:
    """GRPO with colocated vLLM: sleep mode, a smaller share of the GPU, server mode."""
    grpo = getattr(search.resolved.loaded.spec, "grpo", None)
    if grpo is None or grpo.use_vllm != "colocate":
        return
    if not grpo.vllm_enable_sleep_mode:
        search.add(
            "let vLLM sleep while the policy trains",
            {"grpo.vllm_enable_sleep_mode": True},
            "vLLM releases its weights and KV cache between generation rounds",
        )
    shares = [
        round(0.05 * step, 2)
        for step in range(1, 20)
        if round(0.05 * step, 2) < grpo.vllm_gpu_memory_utilization
    ]
    share = largest_vllm_share(search.resolved, search.gpu, shares)
    if share is not None:
        search.add(
            f"lower vLLM's share to {share:g}",
            {"grpo.vllm_gpu_memory_utilization": share},
            "a smaller KV cache for vLLM (fewer sequences decoded at once)",
        )
    search.add(
        "run vLLM as a server on another GPU",
        {"grpo.use_vllm": "server"},
        "generation moves off the training GPU (one more GPU runs `trl vllm-serve`)",
    )


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


def _rank(suggestion: Suggestion, spec: AnySpec) -> tuple[int, int, float]:
    """Upper end fits, then fits at the estimate, each by how much the edit asks and then
    by how much of the spec's sequence lengths it keeps (a combination keeping 5760 of 8192
    tokens before a lone cut to 64: both are "shorter sequences"); then the rest by peak."""
    kept = -_length_kept(suggestion.change, spec)
    if suggestion.fits_high:
        return (0, _disruption(suggestion.change), kept)
    if suggestion.fits:
        return (1, _disruption(suggestion.change), kept)
    return (2, suggestion.peak_reserved_bytes or 0, 0.0)


def _length_kept(change: Mapping[str, Any], spec: AnySpec) -> float:
    """The smallest share of a sequence length the spec asks for that ``change`` keeps."""
    asked = {"training.max_length": spec.training.max_length}
    grpo = getattr(spec, "grpo", None)
    if grpo is not None:
        asked["grpo.max_completion_length"] = grpo.max_completion_length
    shares = [change[key] / length for key, length in asked.items() if key in change]
    return min(shares, default=1.0)


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
    "hardware.host_memory_gib": 7,
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

    index = largest_fitting(0, len(lengths) - 1, fits)
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
