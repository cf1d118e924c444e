"""One streaming pass over the dataset: structural checks, then token statistics.

Memory stays bounded whatever the file size: rows are read one at a time, at most
``MAX_RECORDED_PROBLEMS`` problems are kept (the rest are only counted), and the token
statistics keep one 32-bit integer per row (its length) so percentiles are exact, not
sketched: 10 million rows cost 40 MB.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from peftgen.catalog import find_model
from peftgen.chat_templates import FAMILIES, identify
from peftgen.check_data.rows import KEYS_BY_FORMAT, RowFault, check_row
from peftgen.check_data.sources import (
    CsvSource,
    FileSource,
    ParquetSource,
    Row,
    RowSource,
    SourceNote,
    open_source,
)
from peftgen.check_data.tokens import (
    LoadedTokenizer,
    RenderedSpan,
    RowTokenizer,
    TokenizedRow,
    TokenizerUnavailable,
    load_tokenizer,
    needs_chat_template,
    render_spans,
)
from peftgen.errors import Problem, UserError
from peftgen.spec import AnySpec

MAX_RECORDED_PROBLEMS = 1000
"""Problems kept for --json; the text report prints fewer (``MAX_PRINTED_PROBLEMS``)."""
MAX_PRINTED_PROBLEMS = 50
MAX_LENGTH_MULTIPLE = 64
"""The recommended max_length is p99 rounded up to a multiple of this (tensor-core and
kernel tile friendly, and stable against small changes in the data)."""
REPORTED_PERCENTILES: tuple[int, ...] = (50, 90, 99)

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes read, total bytes or None) as rows are read."""


@dataclass(frozen=True)
class BadRow:
    """One problem with one row, located in the user's file."""

    source: str
    line: int | None
    """1-based line the row starts on (jsonl/json/csv)."""
    index: int | None
    """0-based row index (parquet, hub)."""
    field_path: str | None
    message: str

    def to_problem(self) -> Problem:
        file = self.source if self.index is None else f"{self.source}: row {self.index}"
        return Problem(self.message, file=file, line=self.line, field_path=self.field_path)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "line": self.line,
            "row_index": self.index,
            "field": self.field_path,
            "message": self.message,
        }


@dataclass(frozen=True)
class LengthStats:
    """Token lengths over the rows that tokenized, and what ``training.max_length`` does to them."""

    rows: int
    percentiles: dict[int, int]
    """Nearest-rank percentiles: the smallest length at least p% of rows do not exceed."""
    max: int
    max_length: int
    """The spec's ``training.max_length``."""
    truncated_rows: int
    """Rows longer than ``max_length`` (SFT/DPO cut them to ``max_length``)."""
    dropped_rows: int
    """Rows with no trained token inside ``max_length``: trl drops them (without packing)."""
    recommended_max_length: int
    recommendation: str
    """Why that value."""
    prompt_only: bool = False
    """GRPO: the lengths are prompts. The script does not truncate them; the plan takes
    ``max_length`` as the longest prompt and adds ``grpo.max_completion_length``."""

    @property
    def truncated_fraction(self) -> float:
        return self.truncated_rows / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class TokenReport:
    tokenizer_source: str | None
    example_location: str | None
    example: list[RenderedSpan]
    trains_on: str
    """Which tokens carry labels, in words."""
    stats: LengthStats | None
    skipped_reason: str | None
    """Why there are no token statistics (no tokenizer, no chat template, no good row)."""


@dataclass
class DataReport:
    """Everything check-data found."""

    source: str
    method: str
    data_format: str
    rows_checked: int = 0
    bad_rows: int = 0
    problems: list[BadRow] = field(default_factory=list)
    problems_total: int = 0
    notes: list[SourceNote] = field(default_factory=list)
    shape: str | None = None
    stopped_at_limit: bool = False
    tokens: TokenReport | None = None
    empty: bool = False
    """The file (or hub split) holds no rows at all."""
    lengths: array[int] = field(default_factory=lambda: array("I"))
    """Token length of every row that tokenized (kept for exact percentiles)."""

    def add_problem(self, problem: BadRow) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_RECORDED_PROBLEMS:
            self.problems.append(problem)


def check_dataset(
    spec: AnySpec,
    *,
    limit: int | None = None,
    tokenizer_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> DataReport:
    """Check every row (or the first ``limit``) of the spec's dataset; never raises for bad rows."""
    source = open_source(spec.dataset.path, spec.dataset.split)
    report = DataReport(source.label, spec.method, spec.dataset.format)
    tokenizer, skipped = _tokenizer_or_reason(spec, tokenizer_dir)
    pass_state = _TokenPass(tokenizer, spec) if tokenizer is not None else None
    try:
        _check_rows(source, spec, report, pass_state, limit, progress)
    except OSError as error:  # unreadable (permissions, a device, a folder), gone mid-read
        raise UserError.single(
            f"cannot read the dataset: {error.strerror or error}", file=source.label
        ) from None
    if progress is not None:
        progress(source.bytes_read, source.total_bytes)
    if report.rows_checked == 0 and report.problems_total == 0:
        what = "file" if isinstance(source, FileSource) else "dataset"
        report.add_problem(BadRow(source.label, None, None, None, f"the {what} has no rows"))
        report.empty = True
    report.notes = list(source.notes)
    report.tokens = (
        pass_state.finish(report, spec)
        if pass_state is not None
        else TokenReport(None, None, [], "", None, skipped)
    )
    return report


def _check_rows(
    source: RowSource,
    spec: AnySpec,
    report: DataReport,
    pass_state: _TokenPass | None,
    limit: int | None,
    progress: ProgressCallback | None,
) -> None:
    first_shape_location: str | None = None
    system_refused_by = system_turn_refused_by(
        spec, pass_state.loaded if pass_state is not None else None
    )
    rows = _limited(source.rows(), limit, report)
    for row in rows:
        if progress is not None:
            progress(source.bytes_read, source.total_bytes)
        report.rows_checked += 1
        if _header_problem(source, spec, report):
            break
        faults, shape = _row_faults(row, spec, system_refused_by)
        if not faults and shape is not None:
            if report.shape is None:
                report.shape, first_shape_location = shape, _location(row)
            elif shape != report.shape:
                faults = [_shape_mismatch(shape, report.shape, first_shape_location)]
        if not faults and pass_state is not None and row.record is not None and shape is not None:
            faults = pass_state.add(row, shape, _location(row))
        if faults:
            report.bad_rows += 1
            for fault in faults:
                report.add_problem(
                    BadRow(source.label, row.line, row.index, fault.field_path, fault.message)
                )


def _limited(rows: Iterable[Row], limit: int | None, report: DataReport) -> Iterable[Row]:
    for count, row in enumerate(rows):
        if limit is not None and count >= limit:
            report.stopped_at_limit = True
            return
        yield row


def _tokenizer_or_reason(
    spec: AnySpec, tokenizer_dir: Path | None
) -> tuple[LoadedTokenizer | None, str | None]:
    try:
        loaded = load_tokenizer(
            spec.model.id,
            spec.model.revision,
            tokenizer_dir,
            spec.model.trust_remote_code,
            spec.dataset.chat_template,
        )
    except TokenizerUnavailable as reason:
        return None, f"token statistics skipped: {reason}"
    return loaded, None


SYSTEM_TURN_REFUSED = "System role not supported"
"""What a chat template that takes no system turn raises (Gemma 2's, as trl stores it)."""


def system_turn_refused_by(spec: AnySpec, tokenizer: LoadedTokenizer | None) -> str | None:
    """The chat template the script renders with, when it raises on a system turn: the
    tokenizer's own (identified by its exact text) or, with no tokenizer at hand, the one
    the catalogue records for the model; None when it takes one (or ``dataset.chat_template``
    replaces it)."""
    if spec.dataset.chat_template is not None:
        return None
    if tokenizer is not None:
        family = identify(getattr(tokenizer.tokenizer, "chat_template", None))
        label = f"the tokenizer's chat template ({family.name})" if family else ""
    else:
        arch = find_model(spec.model.id)
        name = arch.chat_template_family if arch is not None else None
        family = FAMILIES.get(name) if name is not None else None
        label = f"{arch.display_name}'s chat template" if arch is not None else ""
    if family is None or SYSTEM_TURN_REFUSED not in family.original:
        return None
    return label


def _system_turn_faults(record: dict[str, Any], refused_by: str | None) -> list[RowFault]:
    """A leading system turn the chat template would refuse at the first batch."""
    if refused_by is None:
        return []
    for key in ("messages", "prompt"):
        turns = record.get(key)
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and first.get("role") == "system":
            return [
                RowFault(
                    f"{key}[0]",
                    f"a system turn, which {refused_by} refuses ({SYSTEM_TURN_REFUSED!r}): "
                    "put its text at the start of the first user turn",
                )
            ]
    return []


def _row_faults(
    row: Row, spec: AnySpec, system_refused_by: str | None = None
) -> tuple[list[RowFault], str | None]:
    if row.record is None:
        return [RowFault(None, row.error or "unreadable row")], None
    verdict = check_row(row.record, spec.method, spec.dataset.format)
    faults = verdict.faults or _system_turn_faults(row.record, system_refused_by)
    return faults, verdict.shape


def _header_problem(source: RowSource, spec: AnySpec, report: DataReport) -> bool:
    """A CSV/parquet file that cannot hold the format: one problem at its header, not one a row."""
    if not isinstance(source, CsvSource | ParquetSource) or report.rows_checked != 1:
        return False
    needed = list(KEYS_BY_FORMAT[spec.dataset.format])
    if spec.dataset.format == "preference" and "prompt" not in source.columns:
        needed.remove("prompt")  # trl extracts an implicit prompt from chosen/rejected
    missing = [name for name in needed if name not in source.columns]
    if isinstance(source, CsvSource) and spec.dataset.format == "messages":
        message = (
            "format 'messages' needs lists of {role, content} messages, which a CSV cell "
            "cannot hold; use .jsonl, .json or .parquet"
        )
    elif missing:
        names = ", ".join(f"`{name}`" for name in missing)
        has = ", ".join(f"`{name}`" for name in source.columns) or "none"
        message = (
            f"missing column{'s' if len(missing) > 1 else ''} {names} for format "
            f"{spec.dataset.format!r}; the file has columns {has}"
        )
    else:
        return False
    line = 1 if isinstance(source, CsvSource) else None
    report.rows_checked = 0
    report.bad_rows = 1
    report.add_problem(BadRow(source.label, line, None, None, message))
    return True


def _location(row: Row) -> str:
    if row.line is not None:
        return f"line {row.line}"
    return f"row {row.index}"


def _shape_mismatch(shape: str, first_shape: str, first_location: str | None) -> RowFault:
    return RowFault(
        None,
        f"the row is {shape} but the first row ({first_location}) is {first_shape}; trl "
        "decides how to tokenize the whole dataset from its first row",
    )


class _TokenPass:
    """Token lengths and the first rendered example, collected during the structural pass."""

    def __init__(self, loaded: LoadedTokenizer, spec: AnySpec) -> None:
        self.loaded = loaded
        self.row_tokenizer = RowTokenizer(
            loaded.tokenizer,
            spec.method,
            spec.dataset.format,
            loss_on=spec.resolved_loss_on if spec.method == "sft" else "completion",
        )
        self.max_length = spec.training.max_length
        self.lengths: array[int] = array("I")
        self.dropped_rows = 0
        self.example: TokenizedRow | None = None
        self.example_location: str | None = None
        self.no_template_reason: str | None = None

    def add(self, row: Row, shape: str, location: str) -> list[RowFault]:
        assert row.record is not None
        if needs_chat_template(shape) and not self.loaded.tokenizer.chat_template:
            self.no_template_reason = _no_template_reason(self.loaded.source)
            return []
        if self.no_template_reason is not None:
            return []
        try:
            tokenized = self.row_tokenizer.tokenize(row.record, shape)
        except (TemplateError, ValueError, TypeError, KeyError) as error:
            # The chat template's raise_exception, a content it cannot concatenate, bad tools JSON.
            return [RowFault(None, f"the tokenizer rejects this row: {error}")]
        self.lengths.append(tokenized.sequence_length)
        first_trained = next(
            (index for index, trained in enumerate(tokenized.trained_mask) if trained), None
        )
        if first_trained is not None and first_trained >= self.max_length:
            self.dropped_rows += 1
        if self.example is None:
            self.example, self.example_location = tokenized, location
        return []

    def finish(self, report: DataReport, spec: AnySpec) -> TokenReport:
        report.lengths = self.lengths
        trains_on = _trains_on(spec)
        if self.no_template_reason is not None:
            return TokenReport(
                self.loaded.source, None, [], trains_on, None, self.no_template_reason
            )
        if self.example is None:
            reason = "token statistics skipped: " + (
                "there are no rows" if report.empty else "no row passed the checks"
            )
            return TokenReport(self.loaded.source, None, [], trains_on, None, reason)
        stats = length_stats(
            self.lengths,
            max_length=self.max_length,
            dropped_rows=self.dropped_rows if not spec.training.packing else 0,
            max_positions=self.loaded.max_position_embeddings,
            prompt_only=spec.method == "grpo",
        )
        spans = render_spans(self.loaded.tokenizer, self.example)
        return TokenReport(self.loaded.source, self.example_location, spans, trains_on, stats, None)


def _no_template_reason(source: str) -> str:
    return (
        f"token statistics skipped: the tokenizer at {source} has no chat template, so "
        "conversational rows cannot be rendered; use an instruct model's tokenizer, or set "
        "dataset.chat_template so the script installs one"
    )


def _trains_on(spec: AnySpec) -> str:
    """Which tokens carry labels in the generated script (``training.loss_on``)."""
    if spec.method == "grpo":
        return "no dataset token: GRPO trains on the completions it generates"
    if spec.method == "dpo":
        return "the chosen and rejected completions (the prompt is masked)"
    loss_on = spec.resolved_loss_on
    if loss_on == "assistant":
        return "the assistant turns and their end-of-turn token (training.loss_on: assistant)"
    if loss_on == "completion":
        return "the completion only (training.loss_on: completion)"
    if spec.dataset.format == "text":
        return "every token (language modelling on the text, eos appended)"
    return "every token, prompts and user turns included (training.loss_on: all)"


def nearest_rank_percentile(sorted_lengths: Any, percentile: float) -> int:
    """The smallest value with at least ``percentile``% of the values at or below it."""
    count = len(sorted_lengths)
    if count == 0:
        raise ValueError("no lengths")
    rank = max(1, math.ceil(percentile / 100 * count))
    return int(sorted_lengths[rank - 1])


def _sorted(lengths: array[int]) -> Any:
    """Sorted lengths; numpy (present with transformers) sorts 4 bytes a row in place."""
    try:
        import numpy as np
    except ImportError:
        return sorted(lengths)
    values = np.frombuffer(lengths, dtype=np.uint32).copy()
    values.sort()
    return values


def length_stats(
    lengths: array[int],
    *,
    max_length: int,
    dropped_rows: int,
    max_positions: int | None,
    prompt_only: bool = False,
) -> LengthStats:
    ordered = _sorted(lengths)
    percentiles = {p: nearest_rank_percentile(ordered, p) for p in REPORTED_PERCENTILES}
    truncated = len(lengths) - _count_at_most(ordered, max_length)
    recommended = max(
        MAX_LENGTH_MULTIPLE,
        math.ceil(percentiles[99] / MAX_LENGTH_MULTIPLE) * MAX_LENGTH_MULTIPLE,
    )
    reason = f"p99 ({percentiles[99]}) rounded up to a multiple of {MAX_LENGTH_MULTIPLE}"
    if max_positions is not None and recommended > max_positions:
        recommended = max_positions
        reason += f", capped at the model's context length ({max_positions})"
    return LengthStats(
        rows=len(lengths),
        percentiles=percentiles,
        max=int(ordered[-1]),
        max_length=max_length,
        truncated_rows=truncated,
        dropped_rows=dropped_rows,
        recommended_max_length=recommended,
        recommendation=reason,
        prompt_only=prompt_only,
    )


def _count_at_most(ordered: Any, bound: int) -> int:
    low, high = 0, len(ordered)
    while low < high:
        middle = (low + high) // 2
        if ordered[middle] <= bound:
            low = middle + 1
        else:
            high = middle
    return low


def measured_length_percentile(
    spec: AnySpec,
    percentile: float = 99.0,
    *,
    tokenizer_dir: Path | None = None,
    limit: int | None = None,
) -> int:
    """The ``percentile``-th token length of the spec's dataset, tokenized as the script will.

    For a planner that sizes activations by the data instead of ``training.max_length``
    (spec field ``training.length_source: p99``). For SFT/DPO the
    result never exceeds ``max_length`` (longer rows are truncated to it); for GRPO it is
    the prompt length, which the script does not truncate. Needs a tokenizer; raises a
    ``UserError`` when the data is bad or no tokenizer is at hand.
    """
    report = check_dataset(spec, limit=limit, tokenizer_dir=tokenizer_dir)
    if report.problems_total:
        raise UserError(
            [problem.to_problem() for problem in report.problems[:MAX_PRINTED_PROBLEMS]]
        )
    tokens = report.tokens
    if tokens is None or tokens.stats is None:
        reason = tokens.skipped_reason if tokens is not None else None
        raise UserError.single(
            f"p99 measures the data's token lengths with the model's tokenizer, which is not "
            f"at hand ({(reason or '').removeprefix('token statistics skipped: ')})",
            field_path="training.length_source",
            hint="set length_source: max_length, or make the tokenizer available (model.id a "
            "local folder, or the hub reachable)",
        )
    measured = nearest_rank_percentile(_sorted(report.lengths), percentile)
    return measured if spec.method == "grpo" else min(measured, spec.training.max_length)
