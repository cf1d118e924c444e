"""The VRAM advisor report: the plan as a page a researcher can read in a minute.

``report_data`` gathers the plan and the planner's what-if answers; ``render_html`` and
``render_markdown`` only format that data, so the page and ``plan --json`` cannot
disagree. Charts need matplotlib (the ``report`` extra); ``render_plan_markdown`` leaves
them out and needs nothing beyond the core install, which is why ``emit`` uses it.
"""

from __future__ import annotations

from peftgen.report.collect import report_data
from peftgen.report.data import ReportData
from peftgen.report.document import (
    MarkdownReport,
    render_html,
    render_markdown,
    render_plan_markdown,
)

__all__ = [
    "MarkdownReport",
    "ReportData",
    "render_html",
    "render_markdown",
    "render_plan_markdown",
    "report_data",
]
