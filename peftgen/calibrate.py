"""Read memory receipts and measure the planner against them (``peftgen calibrate``).

Every generated script writes ``memory_receipt.json`` next to its adapter: the peaks torch
measured on the GPU and the plan's predictions, embedded when the script was emitted. So a
receipt is self-contained: calibrating needs neither the spec nor today's planner, and it
reports how good the estimate *that ran* was.

Two metrics, each predicted against measured:

- allocated: ``peak_allocated_bytes`` vs ``torch.cuda.max_memory_allocated``;
- reserved: ``torch_reserved_bytes`` (the plan's reserved minus the CUDA context) vs
  ``torch.cuda.max_memory_reserved``, which does not see the context either;
- step_seconds (receipt version 2): the throughput model's seconds per optimizer step vs
  the mean the script's callback measured after the first (warm-up) step.

The error is ``(predicted - measured) / measured`` in percent: positive means the plan
over-predicted (safe), negative means it under-predicted (an OOM risk). Receipts written
without CUDA carry no measurements; they are listed but left out of the statistics.

Pure Python: no torch import, like the rest of the analytic path.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftgen.errors import Problem, UserError
from peftgen.stack import GIB, RECEIPT_VERSION

READABLE_VERSIONS = (1, RECEIPT_VERSION)
"""Receipt versions this peftgen reads: the one scripts write now (``stack.RECEIPT_VERSION``)
and version 1, without step times."""
MAX_SECONDS = 10**7
"""Longest plausible optimizer step (about 4 months): anything above is not a measurement."""
MAX_BYTES = 2**60
"""Largest byte count a receipt may hold (1 EiB): anything above is not a measurement."""
MAX_RECEIPT_BYTES = 16 * 2**20
"""A receipt is a few KB of JSON; a bigger file is the wrong one, refused before parsing."""
METRICS = ("allocated", "reserved", "step_seconds")


@dataclass(frozen=True)
class ReceiptRow:
    """One receipt, reduced to what calibration compares."""

    file: str
    spec_name: str
    stage: str
    optimizer_steps: int
    device_name: str
    planned_gpu: str
    precision: str
    predicted_allocated_bytes: int
    measured_allocated_bytes: int | None
    predicted_reserved_bytes: int
    """The plan's ``torch_reserved_bytes``: comparable with ``max_memory_reserved``."""
    measured_reserved_bytes: int | None
    predicted_step_seconds: float | None = None
    """The plan's seconds per optimizer step (None in version 1 receipts)."""
    predicted_step_seconds_low: float | None = None
    predicted_step_seconds_high: float | None = None
    measured_step_seconds: float | None = None
    """Mean seconds per optimizer step after warm-up (None in version 1, or too few steps)."""
    predicted_persistent_bytes: int | None = None
    """Of the plan's breakdown: weights, adapter, gradients, optimizer state (None when the
    receipt holds no readable breakdown)."""
    predicted_transient_bytes: int | None = None
    """Of the plan's breakdown: activations and logits."""

    @property
    def measured(self) -> bool:
        return (
            self.measured_allocated_bytes is not None and self.measured_reserved_bytes is not None
        )

    def error_percent(self, metric: str) -> float | None:
        """``(predicted - measured) / measured`` in percent; None without a measurement.
        Step time counts only on a GPU (a CPU run is not the planned GPU's speed)."""
        predicted, measured = self._pair(metric)
        if measured is None or predicted is None:
            return None
        if metric == "step_seconds" and not self.measured:
            return None
        return 100.0 * (predicted - measured) / measured

    def within_step_range(self) -> bool | None:
        """The measured step time lies in the plan's low-high range (None: not compared)."""
        low, high = self.predicted_step_seconds_low, self.predicted_step_seconds_high
        if self.error_percent("step_seconds") is None or low is None or high is None:
            return None
        assert self.measured_step_seconds is not None
        return low <= self.measured_step_seconds <= high

    def _pair(self, metric: str) -> tuple[float | None, float | None]:
        if metric == "allocated":
            return self.predicted_allocated_bytes, self.measured_allocated_bytes
        if metric == "step_seconds":
            return self.predicted_step_seconds, self.measured_step_seconds
        return self.predicted_reserved_bytes, self.measured_reserved_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "spec_name": self.spec_name,
            "stage": self.stage,
            "optimizer_steps": self.optimizer_steps,
            "device": self.device_name,
            "planned_gpu": self.planned_gpu,
            "precision": self.precision,
            "allocated": {
                "predicted_bytes": self.predicted_allocated_bytes,
                "measured_bytes": self.measured_allocated_bytes,
                "error_percent": self.error_percent("allocated"),
            },
            "reserved": {
                "predicted_bytes": self.predicted_reserved_bytes,
                "measured_bytes": self.measured_reserved_bytes,
                "error_percent": self.error_percent("reserved"),
            },
            "step_seconds": {
                "predicted": self.predicted_step_seconds,
                "predicted_low": self.predicted_step_seconds_low,
                "predicted_high": self.predicted_step_seconds_high,
                "measured": self.measured_step_seconds,
                "error_percent": self.error_percent("step_seconds"),
                "within_range": self.within_step_range(),
            },
        }


@dataclass(frozen=True)
class ErrorStatistics:
    """Error of one metric over the measured receipts, in percent."""

    count: int
    median_abs_percent: float
    max_abs_percent: float
    median_percent: float
    """Signed median: above 0 the plan tends to over-predict, below 0 to under-predict."""

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "median_abs_percent": self.median_abs_percent,
            "max_abs_percent": self.max_abs_percent,
            "median_percent": self.median_percent,
        }


@dataclass(frozen=True)
class Calibration:
    rows: tuple[ReceiptRow, ...]
    statistics: Mapping[str, ErrorStatistics | None]
    """By metric; None when no receipt was measured on a GPU."""

    @property
    def unmeasured_files(self) -> list[str]:
        return [row.file for row in self.rows if not row.measured]

    def implied_efficiency(self) -> dict[str, dict[str, float]]:
        """What the measured step times say the throughput model's efficiency factor is, per
        loading path: the calibrated factor x predicted / measured (every term of a step is
        divided by the factor), median over the GPU receipts with a step time."""
        from peftgen.throughput import EFFICIENCY

        implied: dict[str, list[float]] = {}
        for row in self.rows:
            if row.error_percent("step_seconds") is None:
                continue
            assert row.predicted_step_seconds is not None and row.measured_step_seconds
            path = "16bit" if row.precision in ("bf16", "fp16") else row.precision
            if path not in EFFICIENCY:
                continue
            ratio = row.predicted_step_seconds / row.measured_step_seconds
            implied.setdefault(path, []).append(EFFICIENCY[path] * ratio)
        return {
            path: {
                "median": statistics.median(values),
                "count": len(values),
                "calibrated": EFFICIENCY[path],  # type: ignore[index]
            }
            for path, values in sorted(implied.items())
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "receipts": [row.to_json() for row in self.rows],
            "statistics": {
                metric: (stats.to_json() if stats is not None else None)
                for metric, stats in self.statistics.items()
            },
            "excluded_without_cuda": self.unmeasured_files,
            "allocator": allocator_json(self),
            "implied_efficiency": self.implied_efficiency(),
        }


# --- Reading ------------------------------------------------------------------------------


def _field(data: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...], file: str) -> Any:
    """``data[a][b]`` for ``"a.b"``, checked to be ``kind``; a Problem names what is wrong."""
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise UserError.single(
                "missing; not a memory receipt written by a peftgen script",
                file=file,
                field_path=dotted,
            )
        value = value[part]
    # bool is an int in Python; a receipt never holds a bool where a number belongs.
    if isinstance(value, bool) or not isinstance(value, kind):
        detail = f": {value!r}" if isinstance(value, float) else ""  # NaN, Infinity, 1.5
        raise UserError.single(
            f"has the wrong type ({type(value).__name__}{detail})", file=file, field_path=dotted
        )
    return value


def _measurement(data: Mapping[str, Any], dotted: str, file: str) -> int | None:
    value = _field(data, dotted, (int, type(None)), file)
    if value is not None and not 0 < value <= MAX_BYTES:
        shown = str(value) if value <= 0 else f"a {len(str(value))}-digit number"
        raise UserError.single(
            f"must be a positive byte count (at most 2**60) or null; got {shown}",
            file=file,
            field_path=dotted,
        )
    return value  # type: ignore[no-any-return]


def _byte_count(data: Mapping[str, Any], dotted: str, file: str) -> int:
    value: int = _field(data, dotted, int, file)
    if not 0 <= value <= MAX_BYTES:
        shown = str(value) if value < 0 else f"a {len(str(value))}-digit number"
        raise UserError.single(
            f"must be a byte count from 0 to 2**60; got {shown}", file=file, field_path=dotted
        )
    return value


def _seconds(data: Mapping[str, Any], dotted: str, file: str) -> float | None:
    """A positive, finite number of seconds, or null; absent counts as null."""
    parent, _, key = dotted.rpartition(".")
    holder = _field(data, parent, Mapping, file)
    if key not in holder:
        return None
    value = _field(data, dotted, (int, float, type(None)), file)
    if value is not None and not (0 < value <= MAX_SECONDS):  # NaN fails both comparisons
        raise UserError.single(
            f"must be a positive number of seconds (at most {MAX_SECONDS:g}) or null; got "
            f"{value!r}",
            file=file,
            field_path=dotted,
        )
    return None if value is None else float(value)


def read_receipt(path: Path) -> ReceiptRow:
    """One receipt file as a row; a missing file, bad JSON or a foreign file is a UserError."""
    file = str(path)
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_RECEIPT_BYTES + 1)
    except FileNotFoundError:
        raise UserError.single("no such file", file=file) from None
    except OSError as error:
        raise UserError.single(f"cannot read it: {error.strerror or error}", file=file) from None
    if len(raw) > MAX_RECEIPT_BYTES:
        raise UserError.single(
            f"over {MAX_RECEIPT_BYTES // 2**20} MiB; a receipt is a few KB of JSON", file=file
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError.single(
            f"not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})", file=file
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError.single(
            f"not valid JSON: {error.msg}", file=file, line=error.lineno, column=error.colno
        ) from None
    except RecursionError:
        raise UserError.single("not a memory receipt: JSON nested too deeply", file=file) from None
    except ValueError:  # an integer past Python's 4300-digit limit
        raise UserError.single(
            "not a memory receipt: it holds a number with more than 4300 digits", file=file
        ) from None
    if not isinstance(data, dict):
        raise UserError.single("not a memory receipt (expected a JSON object)", file=file)
    version = _field(data, "receipt_version", int, file)
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise UserError.single(
            f"receipt version {version} is not supported (this peftgen reads {readable})",
            file=file,
            field_path="receipt_version",
        )
    timed = version >= 2
    return ReceiptRow(
        file=file,
        spec_name=_field(data, "spec_name", str, file),
        stage=_field(data, "stage", str, file),
        optimizer_steps=_field(data, "optimizer_steps", int, file),
        device_name=_field(data, "device.name", str, file),
        planned_gpu=_field(data, "predicted.gpu", str, file),
        precision=_field(data, "predicted.precision", str, file),
        predicted_allocated_bytes=_byte_count(data, "predicted.peak_allocated_bytes", file),
        measured_allocated_bytes=_measurement(data, "measured.max_memory_allocated_bytes", file),
        predicted_reserved_bytes=_byte_count(data, "predicted.torch_reserved_bytes", file),
        measured_reserved_bytes=_measurement(data, "measured.max_memory_reserved_bytes", file),
        predicted_step_seconds=_seconds(data, "predicted.step_seconds", file) if timed else None,
        predicted_step_seconds_low=(
            _seconds(data, "predicted.step_seconds_low", file) if timed else None
        ),
        predicted_step_seconds_high=(
            _seconds(data, "predicted.step_seconds_high", file) if timed else None
        ),
        measured_step_seconds=_seconds(data, "measured.step_seconds", file) if timed else None,
        predicted_persistent_bytes=_breakdown_sum(data, PERSISTENT_KEYS),
        predicted_transient_bytes=_breakdown_sum(data, TRANSIENT_KEYS),
    )


PERSISTENT_KEYS = ("weights_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes")
TRANSIENT_KEYS = ("activation_bytes", "logits_bytes")


def _breakdown_sum(data: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    """The sum of ``predicted.breakdown_bytes[key]`` over ``keys``; None unless every one is
    a byte count (the breakdown only informs the allocator lines: never a reason to refuse
    a receipt)."""
    predicted = data.get("predicted")
    breakdown = predicted.get("breakdown_bytes") if isinstance(predicted, Mapping) else None
    if not isinstance(breakdown, Mapping):
        return None
    values = [breakdown.get(key) for key in keys]
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_BYTES for v in values
    ):
        return None
    return sum(values)  # type: ignore[arg-type]


def _statistics(rows: Sequence[ReceiptRow], metric: str) -> ErrorStatistics | None:
    errors = [error for row in rows if (error := row.error_percent(metric)) is not None]
    if not errors:
        return None
    absolute = [abs(error) for error in errors]
    return ErrorStatistics(
        count=len(errors),
        median_abs_percent=statistics.median(absolute),
        max_abs_percent=max(absolute),
        median_percent=statistics.median(errors),
    )


def calibrate_receipts(paths: Sequence[Path]) -> Calibration:
    """Read every receipt (reporting all bad files at once) and compute the error statistics."""
    rows: list[ReceiptRow] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            rows.append(read_receipt(path))
        except UserError as error:
            problems.extend(error.problems)
    if problems:
        raise UserError(problems)
    return Calibration(
        rows=tuple(rows), statistics={metric: _statistics(rows, metric) for metric in METRICS}
    )


# --- Presentation -------------------------------------------------------------------------


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def table_rows(calibration: Calibration) -> list[list[str]]:
    """The table ``calibrate`` prints, as text cells (header first)."""
    header = [
        "receipt",
        "spec",
        "device",
        "precision",
        "steps",
        "alloc pred GiB",
        "alloc meas GiB",
        "alloc err",
        "resv pred GiB",
        "resv meas GiB",
        "resv err",
        "step pred s",
        "step meas s",
        "step err",
    ]
    body = [
        [
            row.file,
            row.spec_name,
            row.device_name,
            row.precision,
            str(row.optimizer_steps),
            _gib(row.predicted_allocated_bytes),
            _gib(row.measured_allocated_bytes),
            _percent(row.error_percent("allocated")),
            _gib(row.predicted_reserved_bytes),
            _gib(row.measured_reserved_bytes),
            _percent(row.error_percent("reserved")),
            _secs(row.predicted_step_seconds),
            _secs(row.measured_step_seconds),
            _percent(row.error_percent("step_seconds")),
        ]
        for row in calibration.rows
    ]
    return [header, *body]


def summary_lines(calibration: Calibration) -> list[str]:
    """Error statistics per metric, and a note on receipts left out of them."""
    lines: list[str] = []
    for metric in METRICS:
        stats = calibration.statistics[metric]
        if stats is None and metric == "step_seconds":
            lines.append("step_seconds: no GPU receipt with a step time (version 2); no statistics")
            continue
        if stats is None:
            lines.append(f"{metric}: no receipt measured on a GPU; no statistics")
            continue
        if metric == "step_seconds":
            inside = [r.within_step_range() for r in calibration.rows]
            compared = [flag for flag in inside if flag is not None]
            lines.append(
                f"step_seconds: median |error| {stats.median_abs_percent:.1f}%, max |error| "
                f"{stats.max_abs_percent:.1f}%, median error {stats.median_percent:+.1f}% over "
                f"{stats.count} receipt(s); {sum(compared)} of {len(compared)} inside the "
                "plan's range"
            )
            for path, implied in calibration.implied_efficiency().items():
                lines.append(
                    f"  the receipts imply a {path} efficiency of {implied['median']:.3f} "
                    f"(calibrated {implied['calibrated']:g}, {implied['count']:g} receipt(s); "
                    "peftgen.throughput.EFFICIENCY)"
                )
            continue
        lines.append(
            f"{metric}: median |error| {stats.median_abs_percent:.1f}%, max |error| "
            f"{stats.max_abs_percent:.1f}%, median error {stats.median_percent:+.1f}% "
            f"over {stats.count} receipt(s)"
        )
    unmeasured = calibration.unmeasured_files
    if unmeasured:
        lines.append(
            f"left out of the statistics (written without CUDA, nothing measured): "
            f"{', '.join(unmeasured)}"
        )
    lines.append("error = (predicted - measured) / measured: + over-predicts, - under-predicts")
    return lines


# --- Allocator constants ------------------------------------------------------------------


def _architecture(device_name: str) -> str | None:
    """The compute capability of the GPU a receipt ran on, from the catalogue; None for a
    GPU the catalogue does not know."""
    from peftgen.catalog import find_gpu

    gpu = find_gpu(device_name)
    return gpu.compute_capability if gpu is not None else None


def implied_fragmentation(row: ReceiptRow) -> float | None:
    """The ``TRANSIENT_FRAGMENTATION_FRACTION`` a measured receipt implies: what torch
    reserved beyond what it allocated, less the cuBLAS workspace of the receipt's
    architecture and the assumed rounding of long-lived tensors, over the plan's short-lived
    bytes. None without a measurement or a breakdown."""
    from peftgen.memory import PERSISTENT_ROUNDING_FRACTION, cublas_workspace_bytes

    if (
        row.measured_allocated_bytes is None
        or row.measured_reserved_bytes is None
        or row.predicted_persistent_bytes is None
        or not row.predicted_transient_bytes
    ):
        return None
    free = row.measured_reserved_bytes - row.measured_allocated_bytes
    free -= cublas_workspace_bytes(_architecture(row.device_name))
    free -= int(PERSISTENT_ROUNDING_FRACTION * row.predicted_persistent_bytes)
    return free / row.predicted_transient_bytes


def allocator_json(calibration: Calibration) -> dict[str, Any]:
    """Each allocator constant of ``peftgen.memory``, what it rests on, and per GPU
    architecture what the measured receipts imply for it."""
    from peftgen.memory import (
        CUDA_CONTEXT_BYTES,
        PERSISTENT_ROUNDING_FRACTION,
        TRANSIENT_FRAGMENTATION_FRACTION,
        cublas_workspace_bytes,
    )

    by_architecture: dict[str, list[float]] = {}
    for row in calibration.rows:
        implied = implied_fragmentation(row)
        if implied is not None:
            architecture = _architecture(row.device_name) or "unknown"
            by_architecture.setdefault(architecture, []).append(implied)
    architectures = sorted(
        {_architecture(row.device_name) or "unknown" for row in calibration.rows if row.measured}
    )
    return {
        "cuda_context_bytes": {
            "value": CUDA_CONTEXT_BYTES,
            "basis": "assumption",
            "receipts_imply": None,
            "why_not": "outside torch's counters, which are all a receipt records",
        },
        "cublas_workspace_bytes": {
            "basis": "torch source (CublasHandlePool.cpp), per architecture",
            "by_architecture": {
                arch: cublas_workspace_bytes(None if arch == "unknown" else arch)
                for arch in architectures
            },
        },
        "persistent_rounding_fraction": {
            "value": PERSISTENT_ROUNDING_FRACTION,
            "basis": "assumption",
            "receipts_imply": None,
            "why_not": "a receipt's one reserved-minus-allocated figure cannot split it from "
            "fragmentation; it is taken as given below",
        },
        "transient_fragmentation_fraction": {
            "value": TRANSIENT_FRAGMENTATION_FRACTION,
            "basis": "assumption",
            "receipts_imply": {
                arch: {
                    "count": len(values),
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
                for arch, values in sorted(by_architecture.items())
            },
        },
    }


def allocator_lines(calibration: Calibration) -> list[str]:
    """The allocator constants and what the measured receipts imply, as text."""
    facts = allocator_json(calibration)
    mib = 2**20
    context = facts["cuda_context_bytes"]["value"] / mib
    lines = [
        "allocator constants (peftgen/memory/) and what the measured receipts imply:",
        f"  CUDA context {context:.0f} MiB: an assumption; receipts cannot check it (torch's "
        "counters do not see it)",
    ]
    from peftgen.memory import cublas_workspace_bytes

    workspace = facts["cublas_workspace_bytes"]["by_architecture"]
    shown = ", ".join(f"{arch} {size / mib:.1f} MiB" for arch, size in workspace.items())
    lines.append(
        f"  cuBLAS + cuBLASLt workspace: from torch's source, "
        f"{cublas_workspace_bytes('9.0') / mib:.1f} MiB on compute capability 9.0, "
        f"{cublas_workspace_bytes('8.0') / mib:.1f} MiB on every other"
        f"{f' (here: {shown})' if shown else ''}"
    )
    rounding = facts["persistent_rounding_fraction"]["value"]
    lines.append(
        f"  rounding of long-lived tensors {rounding:.0%}: an assumption, taken as given "
        "(one receipt cannot separate it from fragmentation)"
    )
    fragmentation = facts["transient_fragmentation_fraction"]
    implied = fragmentation["receipts_imply"]
    if not implied:
        lines.append(
            f"  fragmentation of short-lived tensors {fragmentation['value']:.0%}: an "
            "assumption; no measured receipt with a breakdown to check it"
        )
    for arch, stats in implied.items():
        lines.append(
            f"  fragmentation of short-lived tensors {fragmentation['value']:.0%} (an "
            f"assumption): receipts on compute capability {arch} imply "
            f"{stats['median']:.1%} (median of {stats['count']}, {stats['min']:.1%} to "
            f"{stats['max']:.1%})"
        )
    return lines
