"""The plan's result types: ``Plan``, ``Candidate`` (an ``Estimate`` plus its fit),
``Suggestion``, ``Decision``, ``GpuTarget``.

They are the one source of truth for everything that prints numbers (``plan`` table,
``plan --json``, script docstrings, the report): all read a ``Plan`` and never recompute.
Field names follow the public contract in spec-v1 (``plan --json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from peftgen.accuracy_interval import UNDER_PREDICTION_FACTOR
from peftgen.memory import (
    Estimate,
    MemoryBreakdown,
)
from peftgen.spec import (
    LoadPrecision,
)
from peftgen.throughput import TimeEstimate

BREAKDOWN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(MemoryBreakdown))
"""``MemoryBreakdown``'s keys in order, as ``plan --json`` and every table list them."""


@dataclass(frozen=True)
class Assumption:
    """Why a component has the size it has: shown in the report and the script."""

    component: str
    """Breakdown key, e.g. ``weights_bytes``."""
    text: str


@dataclass(frozen=True, kw_only=True)
class Candidate(Estimate):
    """One loading precision the planner considered: its ``Estimate``, and how it fits."""

    precision: LoadPrecision
    fits: bool
    """The training peak, the loading peak and the host memory all fit."""
    assumptions: tuple[Assumption, ...] = ()
    peak_reserved_bytes_high: int = 0
    """Upper end of the prediction interval around ``peak_reserved_bytes``: torch's share
    scaled by the engine's factor (``accuracy_interval.interval_factor``: the accuracy
    benchmark's 90th percentile of measured / predicted, over its sharded rows for FSDP and
    ZeRO-3); what torch's allocator does not hold unscaled (``accuracy_interval.UNSCALED``)."""
    fits_high: bool = False
    """The upper end fits the budget too."""
    tight: bool = False
    """Fits at the estimate but not at the upper end of the interval."""
    load_fits: bool = True
    """The loading peak fits the GPU budget."""
    host_fits: bool = True
    """The host memory fits ``hardware.host_memory_gib`` (True when the spec gives none)."""
    time: TimeEstimate | None = None
    """Seconds per optimizer step, tokens/s and hours (``peftgen.throughput``); None for
    a GPU without datasheet figures (``--vram-gib``)."""

    def phases_over(self, budget_bytes: int) -> tuple[str, ...]:
        """What keeps this candidate from fitting: ``training`` (its peak over the GPU
        budget), ``loading`` (the loading peak over it), ``host RAM`` (the host memory over
        ``hardware.host_memory_gib``); empty when it fits."""
        return tuple(
            phase
            for phase, is_over in (
                ("training", self.peak_reserved_bytes > budget_bytes),
                ("loading", not self.load_fits),
                ("host RAM", not self.host_fits),
            )
            if is_over
        )

    @property
    def breakdown(self) -> MemoryBreakdown:
        """The per-component figures alone, as tables and ``plan --json`` list them."""
        return MemoryBreakdown(**{key: getattr(self, key) for key in BREAKDOWN_KEYS})

    def to_json(self) -> dict[str, Any]:
        """This candidate in ``plan --json``: the spec-v1 keys first, the breakdown as one
        object, the estimator's internals (parameter counts: the plan's) left out."""
        raw = {
            "precision": self.precision,
            "fits": self.fits,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "breakdown": asdict(self.breakdown),
        }
        for item in fields(self):
            if item.name not in raw and item.name not in _CANDIDATE_JSON_OMITTED:
                raw[item.name] = _json_value(getattr(self, item.name))
        return raw


_CANDIDATE_JSON_OMITTED = frozenset(
    {*BREAKDOWN_KEYS, "trainable_parameters", "total_parameters", "sharded_reserve_bytes"}
)


def _json_value(value: Any) -> Any:
    """Nested dataclasses (assumptions, step time) as plain dicts and lists."""
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


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
    architecture_assumed: bool = False
    """No ``hardware.gpu`` named: an Ampere-or-newer card of ``vram_bytes`` is assumed."""


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
    """The factor behind every candidate's ``peak_reserved_bytes_high`` (the spec's engine:
    ``accuracy_interval.interval_factor``)."""
    interval_evidence: str = ""
    """The rows that factor is the 90th percentile of (``accuracy_interval.interval_evidence``)."""
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
        data["candidates"] = [candidate.to_json() for candidate in self.candidates]
        if self.full_finetuning is not None:
            data["full_finetuning"] = self.full_finetuning.to_json()
        return data
