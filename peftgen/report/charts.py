"""The report's two charts as inline SVG, drawn by matplotlib (the optional ``report`` extra).

matplotlib is imported inside the functions: ``plan`` and ``emit`` import this package's
neighbours but must stay light, and a missing extra should cost only the charts' command.
Output is deterministic (fixed hash salt, no dates, text kept as text) so that rendering
the same plan twice gives the same bytes and golden comparisons stay meaningful.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from peftgen.errors import UserError
from peftgen.plan import Plan
from peftgen.report.data import COMPONENTS, ReportData, precision_label
from peftgen.stack import GIB, format_gib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
COMPONENT_COLOURS: dict[str, str] = {
    "weights_bytes": "#0072B2",
    "adapter_bytes": "#E69F00",
    "gradient_bytes": "#D55E00",
    "optimizer_bytes": "#009E73",
    "activation_bytes": "#56B4E9",
    "logits_bytes": "#CC79A7",
    "overhead_bytes": "#B8B8B8",
}
PRECISION_STYLES: dict[str, tuple[str, str, str]] = {
    # precision: (colour, marker, line style) - marker and style tell them apart without colour
    "bf16": ("#0072B2", "o", "-"),
    "fp16": ("#56B4E9", "D", "-"),
    "8bit": ("#E69F00", "s", "--"),
    "4bit": ("#009E73", "^", "-."),
}
BUDGET_COLOUR = "#B2182B"
TEXT_COLOUR = "#222222"
GRID_COLOUR = "#DDDDDD"

RC_PARAMS: dict[str, Any] = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 10,
    "axes.edgecolor": "#666666",
    "axes.labelcolor": TEXT_COLOUR,
    "xtick.color": TEXT_COLOUR,
    "ytick.color": TEXT_COLOUR,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "path.simplify": False,
}


def _matplotlib_figure() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError.single(
            "the report's charts need matplotlib, which is not installed",
            hint="pip install 'peftgen[report]'",
        ) from None
    return Figure


@contextmanager
def _chart_style(hash_salt: str) -> Iterator[None]:
    import matplotlib

    # matplotlib types rc keys as a Literal of every name; ours are plain strings.
    params: Any = {**RC_PARAMS, "svg.hashsalt": hash_salt}
    with matplotlib.rc_context(params):
        yield


def _svg_text(figure: Figure, title: str) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: no XML prolog, no metadata,
    scalable, with an accessible name."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    return text.replace(
        "<svg ",
        f'<svg role="img" aria-label="{_escape_attribute(title)}" ',
        1,
    ).replace(">", f"><title>{_escape_text(title)}</title>", 1)


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attribute(text: str) -> str:
    return _escape_text(text).replace('"', "&quot;")


def _gib(value_bytes: int) -> float:
    return value_bytes / GIB


def memory_breakdown_svg(plan: Plan) -> str:
    """Stacked bars of the peak's components, one bar per precision, against the GPU."""
    figure_class = _matplotlib_figure()
    title = f"Peak GPU memory by component on {plan.gpu.name}"
    with _chart_style("peftgen-breakdown"):
        figure = figure_class(figsize=(7.6, 4.4), layout="constrained")
        axes = figure.add_subplot()
        labels = [
            precision_label(c.precision)
            + ("\n(chosen)" if c.precision == plan.chosen_precision else "")
            for c in plan.candidates
        ]
        positions = list(range(len(plan.candidates)))
        bottoms = [0.0] * len(plan.candidates)
        for key, label in COMPONENTS:
            heights = [_gib(getattr(c.breakdown, key)) for c in plan.candidates]
            axes.bar(
                positions,
                heights,
                bottom=bottoms,
                width=0.55,
                label=label,
                color=COMPONENT_COLOURS[key],
                edgecolor="white",
                linewidth=0.6,
            )
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        for position, candidate in zip(positions, plan.candidates, strict=True):
            peak_gib = _gib(candidate.peak_reserved_bytes)
            axes.annotate(
                format_gib(candidate.peak_reserved_bytes),
                (position, peak_gib),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontweight="bold",
                color=TEXT_COLOUR,
            )
        _gpu_lines(axes, plan)
        axes.set_xticks(positions, labels)
        axes.set_xlim(-0.6, len(positions) - 0.4)
        top = max(
            [_gib(plan.gpu.vram_bytes), *(_gib(c.peak_reserved_bytes) for c in plan.candidates)]
        )
        axes.set_ylim(0, top * 1.12)
        axes.set_ylabel("Peak reserved memory per GPU (GiB)")
        axes.set_xlabel("Base model loaded in")
        axes.set_title(title, loc="left", fontsize=11, color=TEXT_COLOUR)
        axes.yaxis.grid(True, color=GRID_COLOUR, linewidth=0.6)
        axes.set_axisbelow(True)
        handles, legend_labels = axes.get_legend_handles_labels()
        figure.legend(handles[::-1], legend_labels[::-1], loc="outside right center", frameon=False)
        return _svg_text(figure, title)


def _gpu_lines(axes: Axes, plan: Plan) -> None:
    vram_gib = _gib(plan.gpu.vram_bytes)
    budget_gib = _gib(plan.budget_bytes)
    axes.axhline(
        vram_gib,
        color=BUDGET_COLOUR,
        linewidth=1.4,
        label=f"GPU memory {format_gib(plan.gpu.vram_bytes)}",
    )
    axes.axhline(
        budget_gib,
        color=BUDGET_COLOUR,
        linewidth=1.2,
        linestyle=(0, (4, 3)),
        label=f"Budget {format_gib(plan.budget_bytes)}",
    )


def report_charts_svg(data: ReportData) -> dict[str, str]:
    """Both charts of the report, by the name the templates use."""
    return {
        "breakdown": memory_breakdown_svg(data.plan),
        "max_length": max_length_curve_svg(data),
    }


def max_length_curve_svg(data: ReportData) -> str:
    """Peak memory against ``max_length`` per precision, with GPU sizes as lines."""
    plan, curves = data.plan, data.length_curves
    spec_max_length = data.source.max_length
    model_max_positions = data.source.model_max_positions
    common_gpu_sizes_gib = data.common_gpu_sizes_gib
    figure_class = _matplotlib_figure()
    title = f"Peak GPU memory vs max_length ({plan.gpu.name})"
    with _chart_style("peftgen-max-length"):
        figure = figure_class(figsize=(7.6, 4.4), layout="constrained")
        axes = figure.add_subplot()
        lengths = sorted({point.max_length for curve in curves for point in curve.points})
        data_top = 0.0
        for curve in curves:
            colour, marker, style = PRECISION_STYLES[curve.precision]
            xs = [point.max_length for point in curve.points]
            ys = [_gib(point.peak_reserved_bytes) for point in curve.points]
            data_top = max([data_top, *ys])
            axes.plot(
                xs,
                ys,
                color=colour,
                marker=marker,
                linestyle=style,
                linewidth=1.8,
                markersize=5,
                label=precision_label(curve.precision),
            )
        target_gib = _gib(plan.budget_bytes)
        sizes = _sizes_to_show(common_gpu_sizes_gib, data_top)
        line_top = max([target_gib, *sizes])
        # Past twice the largest line the curve is clipped rather than squashing the
        # region where the decisions are made.
        top = min(max(data_top, line_top) * 1.08, 2.2 * line_top)
        for size_gib in sizes:
            axes.axhline(size_gib, color="#888888", linewidth=0.8, linestyle=":")
            axes.annotate(
                f"{size_gib} GiB",
                (1.0, size_gib),
                xycoords=("axes fraction", "data"),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="#555555",
            )
        axes.axhline(
            target_gib,
            color=BUDGET_COLOUR,
            linewidth=1.4,
            linestyle=(0, (4, 3)),
            label=f"Budget on {plan.gpu.name} ({format_gib(plan.budget_bytes)})",
        )
        right = lengths[-1] * 1.3
        if model_max_positions < lengths[-1]:
            axes.axvspan(model_max_positions, right, color="#EEEEEE", zorder=0)
            past = f"past the model's {model_max_positions:,} positions"
            _label_at_length(axes, model_max_positions, 0.02, past)
        axes.axvline(spec_max_length, color="#444444", linewidth=1.0, linestyle="--")
        _label_at_length(axes, spec_max_length, 0.08, f"spec: {spec_max_length:,}")
        axes.set_xscale("log", base=2)
        axes.set_xlim(lengths[0] / 1.3, right)
        axes.set_xticks(lengths, [_length_label(length) for length in lengths])
        axes.minorticks_off()
        axes.set_ylim(0, top)
        axes.set_xlabel("max_length (tokens per sequence, log scale)")
        axes.set_ylabel("Peak reserved memory per GPU (GiB)")
        axes.set_title(title, loc="left", fontsize=11, color=TEXT_COLOUR)
        axes.grid(True, color=GRID_COLOUR, linewidth=0.6)
        axes.set_axisbelow(True)
        axes.legend(loc="upper left", frameon=True, framealpha=0.95, edgecolor="#CCCCCC")
        return _svg_text(figure, title)


def _label_at_length(axes: Axes, length: int, height_fraction: float, text: str) -> None:
    """Small text just right of ``length``, at a fraction of the axes' height."""
    axes.annotate(
        text,
        (length, height_fraction),
        xycoords=("data", "axes fraction"),
        xytext=(4, 0),
        textcoords="offset points",
        fontsize=8,
        color="#444444",
    )


def _sizes_to_show(sizes_gib: Sequence[int], data_top_gib: float) -> list[int]:
    """The common GPU sizes up to the first one the curves stay under: the larger ones
    would only squash the chart and add nothing to the decision."""
    shown = []
    for size in sorted(sizes_gib):
        shown.append(size)
        if size >= data_top_gib:
            break
    return shown


def _length_label(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)
