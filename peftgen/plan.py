"""The plan: which precision to load in, whether it fits, and what to change if not.

Result types are defined here and are the one source of truth for everything that
prints numbers (``plan`` table, ``plan --json``, script docstrings, the report): they
all read a ``Plan`` and never recompute.

Field names follow the public contract in spec-v1 (``plan --json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

LoadPrecision = Literal["bf16", "fp16", "8bit", "4bit"]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak memory per component, per GPU, in bytes.

    ``weights + adapter + gradient + optimizer + activation + logits`` is the peak of
    ``torch.cuda.max_memory_allocated``; ``overhead`` (CUDA context, cuBLAS workspace,
    allocator rounding and fragmentation) brings it to what the process reserves.
    """

    weights_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    overhead_bytes: int

    @property
    def allocated_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.adapter_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.logits_bytes
        )

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.overhead_bytes


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
    phase: str = "train"
    """The phase that sets the peak (GRPO: ``generation`` or ``train``)."""
    assumptions: tuple[Assumption, ...] = ()


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
