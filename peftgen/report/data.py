"""What the report shows, as plain data: the plan plus the planner's answers to "what if".

The report never computes a memory number itself. Every figure here is either a field of
the ``Plan`` that ``plan --json`` prints, or a ``Plan`` the same planner made for a changed
spec (another GPU, another precision, another ``max_length``). The renderers only format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from peftgen.plan import Candidate, Plan
from peftgen.spec import Distributed, LoadPrecision
from peftgen.throughput import TimeEstimate, format_duration_range

FitStatus = Literal["fits", "tight", "no"]

COMPONENTS: tuple[tuple[str, str], ...] = (
    ("weights_bytes", "Weights"),
    ("adapter_bytes", "LoRA adapters"),
    ("gradient_bytes", "Gradients"),
    ("optimizer_bytes", "Optimizer state"),
    ("activation_bytes", "Activations"),
    ("logits_bytes", "Logits and loss"),
    ("overhead_bytes", "Overhead (context, allocator)"),
)
"""Breakdown keys (``MemoryBreakdown`` fields) in stacking order, with their labels."""


def precision_label(precision: str) -> str:
    """How people say it: ``4-bit`` rather than ``4bit``."""
    return {"8bit": "8-bit", "4bit": "4-bit"}.get(precision, precision)


def fit_status(candidate: Candidate) -> FitStatus:
    """``fits`` / ``tight`` / ``no``: the planner's own verdict, never redone. Tight is the
    plan's ``tight``: fits at the estimate, not at the upper end of its prediction interval
    (``peftgen.accuracy_interval``), so the plan table and the report always agree."""
    if not candidate.fits:
        return "no"
    return "tight" if candidate.tight else "fits"


@dataclass(frozen=True)
class FitCell:
    """One GPU x precision cell of the fit matrix."""

    precision: LoadPrecision
    peak_reserved_bytes: int
    status: FitStatus


@dataclass(frozen=True)
class GpuFitRow:
    """Catalogue GPUs with the same memory and the same answer, per precision.

    GPUs that differ only in name (an RTX 4090 and an RTX A5000 both report 23.99 GiB)
    share a row, which keeps the matrix short enough to read.
    """

    gpu_names: tuple[str, ...]
    vram_bytes: int
    budget_bytes: int
    cells: tuple[FitCell, ...]
    is_target: bool
    time: TimeEstimate | None = None
    """The run's time at the precision the planner would choose on this GPU (the first
    that fits, in the spec's order); None when nothing fits or without datasheet figures."""
    time_precision: LoadPrecision | None = None
    price_per_hour: float | None = None
    """The user's price per GPU-hour (``report --price-per-hour``); never a built-in fact."""
    gpu_count: int = 1

    @property
    def hours_text(self) -> str:
        """The run's wall-clock range, or seconds per step when the step count is unknown."""
        t = self.time
        if t is None:
            return "-"
        if t.total_hours_low is None or t.total_hours_high is None:
            return f"{t.step_seconds_low:.1f}-{t.step_seconds_high:.1f} s/step"
        return format_duration_range(t.total_hours_low, t.total_hours_high)

    @property
    def cost_text(self) -> str:
        """Price x GPU-hours over the range (the spec's GPU count), or ``-``."""
        t = self.time
        if t is None or self.price_per_hour is None or t.total_hours_low is None:
            return "-"
        low = t.total_hours_low * self.gpu_count * self.price_per_hour
        high = (t.total_hours_high or t.total_hours_low) * self.gpu_count * self.price_per_hour
        return f"{low:,.2f}" if f"{low:,.2f}" == f"{high:,.2f}" else f"{low:,.2f} - {high:,.2f}"


@dataclass(frozen=True)
class CurvePoint:
    max_length: int
    peak_reserved_bytes: int
    fits: bool


@dataclass(frozen=True)
class PrecisionCurve:
    """Peak reserved memory vs ``max_length`` for one precision on the target GPU."""

    precision: LoadPrecision
    points: tuple[CurvePoint, ...]


@dataclass(frozen=True)
class PrecisionLimits:
    """The largest settings that still fit the target GPU, other knobs as in the spec.

    ``None`` means not even the smallest value fits.
    """

    precision: LoadPrecision
    max_length: int | None
    per_device_train_batch_size: int | None


GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)
"""GPU counts the report's multi-GPU table shows (one node)."""
ENGINES: tuple[str, ...] = tuple(e for e in get_args(Distributed) if e != "none")
"""The multi-GPU engines, in the spec's order."""


@dataclass(frozen=True)
class GpuCountCell:
    """The per-GPU peak of one engine on ``gpu_count`` GPUs; ``None``: the spec's rules
    refuse that engine with these settings (e.g. 8-bit under FSDP)."""

    engine: str
    """``none`` on one GPU."""
    peak_reserved_bytes: int | None
    status: FitStatus | None
    refused_because: str | None = None


@dataclass(frozen=True)
class GpuCountRow:
    gpu_count: int
    cells: tuple[GpuCountCell, ...]


@dataclass(frozen=True)
class GpuCountTable:
    """Per-GPU peak for 1, 2, 4, 8 GPUs of the target kind, per engine, at one precision
    (the chosen one, or the spec's when nothing fits)."""

    precision: LoadPrecision
    cpu_offload: bool
    """The spec's offload setting, kept for the engines that shard."""
    rows: tuple[GpuCountRow, ...]


@dataclass(frozen=True)
class SpecSource:
    """The spec as the user wrote it, shown verbatim (escaped) at the end of the report."""

    path: str
    text: str
    sha256: str
    model_id: str
    method: str
    precision: str
    """As written: ``auto`` or the one the user fixed."""
    max_length: int
    per_device_train_batch_size: int
    model_max_positions: int
    """The model's ``max_position_embeddings``: longer sequences are past what it was built for."""
    finetuning: str = "lora"
    """``lora`` or ``full`` (every weight trained)."""
    host_memory_gib: float | None = None
    """``hardware.host_memory_gib``: the host RAM the plan checked host memory against."""


@dataclass(frozen=True)
class ReportData:
    """Everything the HTML and Markdown reports show; both render from this alone."""

    plan: Plan
    source: SpecSource
    fit_matrix: tuple[GpuFitRow, ...]
    length_curves: tuple[PrecisionCurve, ...]
    limits: tuple[PrecisionLimits, ...]
    versions: tuple[tuple[str, str], ...]
    """(library, version) pairs the estimator models, e.g. ("trl", "1.16.0")."""
    spec_warnings: tuple[str, ...] = ()
    """The loader's and resolver's warnings about the spec (the plan has its own)."""
    common_gpu_sizes_gib: tuple[int, ...] = (16, 24, 40, 48, 80)
    gpu_counts: GpuCountTable | None = None
    """Per-GPU memory on 1, 2, 4, 8 GPUs (multi-GPU engines)."""
    priced: bool = False
    """The user gave a price per GPU-hour for at least one GPU: the matrix shows cost."""
