"""How a ``DataReport`` reads: the text report, the ``--json`` object, the progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peftgen.check_data.checker import (
    MAX_PRINTED_PROBLEMS,
    MAX_RECORDED_PROBLEMS,
    DataReport,
    LengthStats,
    ProgressCallback,
    TokenReport,
)
from peftgen.errors import Problem, printable
from peftgen.hub import TRANSFORMERS_OFFLINE_FLAGS, hub_offline

TRAINED_OPEN = "⟦"
TRAINED_CLOSE = "⟧"
EXAMPLE_MAX_CHARS = 2000
PROGRESS_MIN_BYTES = 1 << 20
"""Files smaller than this finish before a bar is worth drawing."""


def report_text(report: DataReport) -> str:
    """The human-readable summary (stdout); bad rows go to stderr as problems."""
    lines = [_summary_line(report)]
    lines += [
        f"note: {report.source}:{note.line}: {note.message}"
        if note.line
        else f"note: {note.message}"
        for note in report.notes
    ]
    if report.tokens is not None:
        lines.append("")
        lines += _token_lines(report.tokens)
    return "\n".join(lines) + "\n"


def _summary_line(report: DataReport) -> str:
    limit = " (stopped at --limit)" if report.stopped_at_limit else ""
    shape = f", {report.shape}" if report.shape else ""
    verdict = f"{report.bad_rows:,} bad" if report.bad_rows else "all good"
    if report.empty:
        verdict = "no rows"
    return (
        f"{report.source}: {report.rows_checked:,} rows checked{limit} "
        f"(method {report.method}, format {report.data_format}{shape}): {verdict}"
    )


def no_tokenizer_hint() -> str:
    """What check-data's user can do when no tokenizer loaded (its own flag: the reason
    itself is shared with plan's length_source p99, which has other remedies); skipping
    the hub is offered only to whom has not already."""
    hint = "pass --tokenizer DIR (a folder with the tokenizer files)"
    if not hub_offline(TRANSFORMERS_OFFLINE_FLAGS):
        hint += ", or set HF_HUB_OFFLINE=1 to skip the hub"
    return hint


def _skipped_text(tokens: TokenReport) -> str:
    reason = tokens.skipped_reason or "token statistics skipped"
    return f"{reason}; {no_tokenizer_hint()}" if tokens.tokenizer_source is None else reason


def _token_lines(tokens: TokenReport) -> list[str]:
    if tokens.stats is None:
        return [_skipped_text(tokens)]
    lines = [f"tokens (tokenizer {tokens.tokenizer_source})", f"  trained on: {tokens.trains_on}"]
    lines.append(
        f"  example ({tokens.example_location}) as the script tokenizes it; "
        f"trained tokens inside {TRAINED_OPEN} {TRAINED_CLOSE}:"
    )
    # The data's own text: control characters shown escaped, never sent to the terminal.
    lines += ["    " + printable(line) for line in example_text(tokens).splitlines()]
    lines += _stats_lines(tokens.stats)
    return lines


def example_text(tokens: TokenReport) -> str:
    text = "".join(
        f"{TRAINED_OPEN}{span.text}{TRAINED_CLOSE}" if span.trained else span.text
        for span in tokens.example
    )
    if len(text) > EXAMPLE_MAX_CHARS:
        text = (
            text[:EXAMPLE_MAX_CHARS] + f" ... ({len(text) - EXAMPLE_MAX_CHARS:,} more characters)"
        )
    return text


def _stats_lines(stats: LengthStats) -> list[str]:
    percentiles = "  ".join(f"p{p} {value:,}" for p, value in stats.percentiles.items())
    if stats.prompt_only:
        return [
            f"  prompt length in tokens over {stats.rows:,} rows: {percentiles}  max {stats.max:,}",
            f"  {stats.truncated_rows:,} prompts ({stats.truncated_fraction:.1%}) are longer than "
            f"training.max_length {stats.max_length:,}, which the plan takes as the longest "
            "prompt (the script does not truncate prompts; it generates up to "
            "grpo.max_completion_length more tokens)",
            f"  recommended max_length: {stats.recommended_max_length:,} ({stats.recommendation})",
        ]
    lines = [
        f"  length in tokens over {stats.rows:,} rows: {percentiles}  max {stats.max:,}",
        f"  training.max_length {stats.max_length:,} truncates {stats.truncated_rows:,} rows "
        f"({stats.truncated_fraction:.1%})",
    ]
    if stats.dropped_rows:
        lines.append(
            f"  {stats.dropped_rows:,} rows have no trained token within max_length; trl drops them"
        )
    lines.append(
        f"  recommended max_length: {stats.recommended_max_length:,} ({stats.recommendation})"
    )
    return lines


def report_json(report: DataReport) -> dict[str, Any]:
    tokens = report.tokens
    stats = tokens.stats if tokens is not None else None
    return {
        "dataset": report.source,
        "method": report.method,
        "format": report.data_format,
        "shape": report.shape,
        "rows_checked": report.rows_checked,
        "stopped_at_limit": report.stopped_at_limit,
        "bad_rows": report.bad_rows,
        "empty": report.empty,
        "problems_total": report.problems_total,
        "problems": [problem.to_json() for problem in report.problems],
        "problems_omitted": report.problems_total - len(report.problems),
        "notes": [{"line": note.line, "message": note.message} for note in report.notes],
        "tokens": None if tokens is None else _tokens_json(tokens, stats),
    }


def _tokens_json(tokens: TokenReport, stats: LengthStats | None) -> dict[str, Any]:
    return {
        "tokenizer": tokens.tokenizer_source,
        "skipped_reason": None if tokens.stats is not None else _skipped_text(tokens),
        "trained_on": tokens.trains_on,
        "example_location": tokens.example_location,
        "example": [{"text": span.text, "trained": span.trained} for span in tokens.example],
        "stats": None
        if stats is None
        else {
            "rows": stats.rows,
            **{f"p{p}": value for p, value in stats.percentiles.items()},
            "max": stats.max,
            "max_length": stats.max_length,
            "truncated_rows": stats.truncated_rows,
            "truncated_fraction": stats.truncated_fraction,
            "dropped_rows": stats.dropped_rows,
            "recommended_max_length": stats.recommended_max_length,
            "recommendation": stats.recommendation,
            "lengths_are": "prompts" if stats.prompt_only else "sequences",
        },
    }


def printed_problems(report: DataReport) -> list[Problem]:
    """The first problems as the CLI prints them, then how many more there were."""
    problems = [problem.to_problem() for problem in report.problems[:MAX_PRINTED_PROBLEMS]]
    hidden = report.problems_total - len(problems)
    if hidden > 0:
        problems.append(
            Problem(
                f"... and {hidden:,} more problems in {report.bad_rows:,} bad rows "
                f"(--json lists the first {MAX_RECORDED_PROBLEMS:,})",
                file=report.source,
            )
        )
    return problems


@contextmanager
def progress_bar(label: str) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        last_update = 0.0

        def update(bytes_read: int, total_bytes: int | None) -> None:
            nonlocal last_update
            now = time.monotonic()
            if now - last_update < 0.1 or (total_bytes or 0) < PROGRESS_MIN_BYTES:
                return
            last_update = now
            bar.update(task, completed=bytes_read, total=total_bytes)

        yield update
