"""Render ``ReportData`` as HTML or Markdown through the Jinja templates.

Both formats get the same context, built here once, so their tables cannot drift apart.
Formatting (GiB with two decimals, escaping) happens in filters; no numbers are derived
here beyond differences of the plan's own figures (headroom = budget - peak).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import Environment
from markupsafe import Markup

from peftgen import __version__
from peftgen.accuracy_interval import (
    SHARDED_UNDER_PREDICTION_FACTOR,
    UNDER_PREDICTION_FACTOR,
    UNSCALED,
)
from peftgen.plan import Candidate, Plan, choose_precision
from peftgen.report.data import (
    COMPONENTS,
    ENGINES,
    FitStatus,
    ReportData,
    fit_status,
    precision_label,
)
from peftgen.stack import GIB

if TYPE_CHECKING:
    from peftgen.resolve import Resolved

ChartMode = Literal["files", "inline", "none"]
STATUS_LABELS: dict[FitStatus, str] = {"fits": "✓ fits", "tight": "⚠ tight", "no": "✗ no"}


@dataclass(frozen=True)
class MarkdownReport:
    """The Markdown text and the chart files it links to (file name -> SVG text)."""

    text: str
    charts: dict[str, str] = field(default_factory=dict)


def render_html(data: ReportData) -> str:
    """The self-contained HTML page: inline CSS and SVG, a CSP that forbids any request."""
    from peftgen.report.charts import report_charts_svg

    # matplotlib escapes the SVG's text itself; the markup is ours to inline as is.
    charts = {name: Markup(svg) for name, svg in report_charts_svg(data).items()}
    return _environment(html=True).get_template("report.html.j2").render(_context(data, charts))


def render_markdown(
    data: ReportData, charts: ChartMode = "files", chart_stem: str = "report"
) -> MarkdownReport:
    """The report as Markdown with the same tables as the HTML page.

    ``files``: charts are SVG files named ``<chart_stem>.memory.svg`` and
    ``<chart_stem>.max-length.svg``, linked relatively (GitHub and most viewers show them;
    many strip ``data:`` images). ``inline``: charts are ``data:`` URIs, for a single
    stream such as stdout. ``none``: tables only, and matplotlib is not imported.
    """
    chart_files: dict[str, str] = {}
    links = {"breakdown": "", "max_length": ""}
    if charts != "none":
        from peftgen.report.charts import report_charts_svg

        names = {"breakdown": "memory", "max_length": "max-length"}
        for key, svg in report_charts_svg(data).items():
            if charts == "files":
                file_name = f"{chart_stem}.{names[key]}.svg"
                chart_files[file_name] = svg
                links[key] = file_name
            else:
                encoded = base64.b64encode(svg.encode("utf-8")).decode("ascii")
                links[key] = f"data:image/svg+xml;base64,{encoded}"
    text = _environment(html=False).get_template("report.md.j2").render(_context(data, links))
    return MarkdownReport(text, chart_files)


def render_plan_markdown(plan: Plan, resolved: Resolved) -> str:
    """The Markdown report without charts, for ``emit -o`` to write as ``plan.md``.

    Needs no matplotlib, so emitting stays light and its output does not depend on
    whether the ``report`` extra is installed.
    """
    from peftgen.report.collect import report_data

    return render_markdown(report_data(resolved, plan), charts="none").text


def _context(data: ReportData, charts: dict[str, Any]) -> dict[str, Any]:
    plan = data.plan
    return {
        "data": data,
        "charts": charts,
        "version": __version__,
        "verdict": _verdict(
            plan, data.source.precision, data.source.finetuning, data.source.host_memory_gib
        ),
        "components": COMPONENTS,
        "candidate_status": {c.precision: fit_status(c) for c in plan.candidates},
        # What keeps a candidate out besides its training peak: "loading", "host RAM".
        "other_misfits": {
            c.precision: ", ".join(p for p in c.phases_over(plan.budget_bytes) if p != "training")
            for c in plan.candidates
        },
        "status_labels": STATUS_LABELS,
        "interval_factors": (UNDER_PREDICTION_FACTOR, SHARDED_UNDER_PREDICTION_FACTOR),
        "interval_unscaled": UNSCALED,
        "show_managed": any(c.managed_bytes for c in plan.candidates),
        "show_host": any(c.host_memory_bytes for c in plan.candidates),
        "show_phase": any(c.phase != "train" for c in plan.candidates),
        "matrix_columns": _matrix_columns(data),
        "gpu_count_engines": ENGINES,
        "length_cap": max(data.source.max_length, data.source.model_max_positions),
        "precision_reason": next((d.reason for d in plan.decisions if d.knob == "precision"), None),
        "curve_lengths": [p.max_length for p in data.length_curves[0].points]
        if data.length_curves
        else [],
        "micro_batch": data.source.per_device_train_batch_size,
        "spec_max_length": data.source.max_length,
        "trainable_line": trainable_parameters_line(
            plan.trainable_parameters, plan.total_parameters
        ),
        "assumptions": _assumption_groups(plan.candidates),
        "warnings": [*data.spec_warnings, *plan.warnings],
    }


def _matrix_columns(data: ReportData) -> list[str]:
    """Column headings of the fit matrix: ``bf16 / fp16`` where GPUs differ (no bf16 on T4)."""
    columns: list[list[str]] = []
    for row in data.fit_matrix:
        for index, cell in enumerate(row.cells):
            if index == len(columns):
                columns.append([])
            label = precision_label(cell.precision)
            if label not in columns[index]:
                columns[index].append(label)
    return [" / ".join(labels) for labels in columns]


@dataclass(frozen=True)
class Verdict:
    status: FitStatus
    shown: Candidate
    """The chosen candidate; when none is, the spec's fixed precision, else the smallest."""
    headroom_bytes: int
    """Budget minus ``shown``'s peak; negative: over the budget."""
    fixed_precision: bool
    """The spec fixed ``shown``'s precision (and it does not fit)."""
    alternative: Candidate | None
    """When the spec's fixed precision does not fit: the one ``precision: auto`` would load."""
    budget_percent: int
    action: str
    """What the headline tells the user to do, e.g. "load the base model in 4-bit"."""
    within_budget_but: str | None = None
    """When ``shown``'s training peak fits the budget but it does not fit: what does not
    (its loading peak, the host memory), so the headline is not "-3.78 GiB over"."""


def _verdict(
    plan: Plan, requested_precision: str, finetuning: str, host_memory_gib: float | None
) -> Verdict:
    fixed = next((c for c in plan.candidates if c.precision == requested_precision), None)
    smallest = min(plan.candidates, key=lambda c: c.peak_reserved_bytes)
    shown = plan.chosen or fixed or smallest
    return Verdict(
        status=fit_status(shown) if plan.chosen is not None else "no",
        shown=shown,
        headroom_bytes=plan.budget_bytes - shown.peak_reserved_bytes,
        fixed_precision=plan.chosen is None and fixed is not None,
        alternative=_auto_choice(plan),
        budget_percent=round(100 * plan.budget_bytes / plan.gpu.vram_bytes),
        action=_action_text(shown.precision, finetuning),
        within_budget_but=_within_budget_but(shown, plan.budget_bytes, host_memory_gib),
    )


def _within_budget_but(
    candidate: Candidate, budget_bytes: int, host_memory_gib: float | None
) -> str | None:
    over = candidate.phases_over(budget_bytes)
    if not over or "training" in over:
        return None
    parts = []
    if "loading" in over:
        parts.append(f"loading peaks at {candidate.load_peak_bytes / GIB:.2f} GiB, over it")
    if "host RAM" in over:
        parts.append(
            f"it needs {candidate.host_memory_bytes / GIB:.2f} GiB of host memory per node, "
            f"over the {host_memory_gib:g} GiB hardware.host_memory_gib"
        )
    return " and ".join(parts)


def _auto_choice(plan: Plan) -> Candidate | None:
    """What ``precision: auto`` would load (the planner's own ``choose_precision``): the
    headline of a fixed precision that does not fit offers this one, so its "or auto" is
    true."""
    auto = choose_precision("auto", plan.candidates)
    return next((c for c in plan.candidates if c.precision == auto), None)


def _action_text(precision: str, finetuning: str) -> str:
    """Full fine-tuning loads fp32 master weights and computes in the 16-bit dtype: "load
    the base model in bf16" would tell the user the wrong thing."""
    if finetuning == "full":
        return (
            f"train every weight (fp32 master weights under {precision_label(precision)} autocast)"
        )
    return f"load the base model in {precision_label(precision)}"


def trainable_parameters_line(trainable: int, total: int) -> str:
    """peft 0.21's ``print_trainable_parameters()`` line, character for character."""
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


@dataclass(frozen=True)
class _AssumptionItem:
    text: str
    precisions: tuple[str, ...]


@dataclass(frozen=True)
class _AssumptionGroup:
    label: str
    items: tuple[_AssumptionItem, ...]


def _assumption_groups(candidates: tuple[Candidate, ...]) -> list[_AssumptionGroup]:
    """Assumptions per component; a text shared by several precisions is listed once, and
    one that holds for every precision carries no precision tags at all."""
    labels = dict(COMPONENTS)
    every = [candidate.precision for candidate in candidates]
    by_component: dict[str, dict[str, list[str]]] = {}
    for candidate in candidates:
        for assumption in candidate.assumptions:
            texts = by_component.setdefault(assumption.component, {})
            texts.setdefault(assumption.text, []).append(candidate.precision)
    order = [key for key, _ in COMPONENTS] + sorted(set(by_component) - set(labels))
    return [
        _AssumptionGroup(
            labels.get(key, key),
            tuple(
                _AssumptionItem(text, () if p == every else tuple(p))
                for text, p in by_component[key].items()
            ),
        )
        for key in order
        if key in by_component
    ]


def gib_text(value_bytes: int) -> str:
    """Bytes as GiB with two decimals: the one number format of the report."""
    return f"{value_bytes / GIB:.2f}"


def _bytes_span(value_bytes: int, plan_key: str) -> Markup:
    """A figure from the plan, tagged with its ``plan --json`` key for the tests."""
    return Markup('<span data-plan-key="{}" data-bytes="{}">{}</span>').format(
        plan_key, value_bytes, gib_text(value_bytes)
    )


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def markdown_text(text: object) -> str:
    """Plain text safe inside Markdown (and tables): its syntax and HTML tags escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def markdown_code(text: object) -> str:
    """An inline code span that holds any text, backticks included."""
    value = str(text).replace("\n", " ")
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}".replace("|", "\\|")


def markdown_fence(text: str, language: str) -> str:
    """A fenced code block longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}"


def yaml_value(value: object) -> str:
    """A spec value as the user would write it in YAML (JSON is valid YAML)."""
    return json.dumps(value)


@cache
def _environment(html: bool) -> Environment:
    """The emit templates' environment (strict, same loader), escaping HTML for the page."""
    # Imported here: ``peftgen.render`` may import this package to write ``plan.md``.
    from peftgen.render import environment as emit_environment

    base = emit_environment()
    environment = base.overlay(autoescape=html, trim_blocks=False, lstrip_blocks=False)
    environment.filters = {
        **base.filters,
        "gib": gib_text,
        "precision_label": precision_label,
        "yaml_value": yaml_value,
        "md": markdown_text,
        "md_code": markdown_code,
        "md_fence": markdown_fence,
    }
    environment.globals = {
        **base.globals,
        "bytes": _bytes_span if html else _bytes_plain,
        "length_limit_text": length_limit_text,
    }
    return environment


def length_limit_text(max_length: int | None, cap: int) -> str:
    """The largest fitting ``max_length``; at ``cap`` the search stopped at the model's limit."""
    if max_length is None:
        return "none fits"
    if max_length == cap:
        return f"{max_length:,} (model maximum)"
    return f"{max_length:,}"


def _bytes_plain(value_bytes: int, _plan_key: str) -> str:
    return gib_text(value_bytes)
