"""The VRAM report: every example renders in both formats, its numbers are the plan's,
it is byte-stable, self-contained, and escapes what it shows."""

from __future__ import annotations

import difflib
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, fields, replace
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from markupsafe import escape
from ruamel.yaml import YAML

from peftgen.cli import main
from peftgen.errors import UserError
from peftgen.load import load_spec
from peftgen.plan import Assumption, MemoryBreakdown, make_plan
from peftgen.report import render_html, render_markdown, render_plan_markdown, report_data
from peftgen.report.document import markdown_code, markdown_fence, markdown_text
from peftgen.resolve import resolve

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "specs").rglob("*.yaml"))
GIB = 2**30
BREAKDOWN_KEYS = tuple(f.name for f in fields(MemoryBreakdown))


def test_there_are_example_specs() -> None:
    assert len(SPECS) >= 5, SPECS


def spec_id(path: Path) -> str:
    return str(path.relative_to(REPO / "specs"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Specs name their data and local models relative to the repository root."""
    monkeypatch.chdir(REPO)


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def plan_json(spec: Path, *extra: str) -> dict[str, Any]:
    code, out = run_cli("plan", str(spec), "--json", *extra)
    assert code in (0, 3), code
    data: dict[str, Any] = json.loads(out)
    return data


def gib(value_bytes: int) -> str:
    return f"{value_bytes / GIB:.2f}"


class _Elements(HTMLParser):
    """Every element's attributes and text, plus table rows by table id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tagged: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._open: list[dict[str, str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.start_tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.start_tags.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        if "data-plan-key" in attributes or "data-bytes" in attributes:
            attributes["_text"] = ""
            self.tagged.append(attributes)
            self._open.append(attributes)
        else:
            self._open.append({})

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None
        if tag not in ("meta", "br", "input") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for attributes in self._open:
            if "_text" in attributes:
                attributes["_text"] += data


def parse_html(text: str) -> _Elements:
    parser = _Elements()
    parser.feed(text)
    return parser


def lookup(plan: dict[str, Any], key: str) -> Any:
    """``chosen.x`` / ``candidates.<precision>.a.b`` / ``a.b`` in the plan JSON."""
    parts = key.split(".")
    if parts[0] == "chosen":
        node: Any = next(
            c for c in plan["candidates"] if c["precision"] == plan["chosen_precision"]
        )
        parts = parts[1:]
    elif parts[0] == "candidates":
        node = next(c for c in plan["candidates"] if c["precision"] == parts[1])
        parts = parts[2:]
    else:
        node = plan
    for part in parts:
        node = node[part]
    return node


def expected_status(candidate: dict[str, Any]) -> str:
    """What ``plan --json`` says of a candidate: the report must say the same."""
    if not candidate["fits"]:
        return "no"
    return "tight" if candidate["tight"] else "fits"


def render_to(tmp_path: Path, spec: Path, fmt: str, *extra: str) -> Path:
    output = tmp_path / f"report.{fmt}"
    code, _ = run_cli("report", str(spec), "--format", fmt, "-o", str(output), *extra)
    assert code == 0
    return output


@dataclass(frozen=True)
class Rendered:
    """One example's ``plan --json`` and its report in both formats, made once per session."""

    plan: dict[str, Any]
    html: str
    page: _Elements
    markdown: str
    directory: Path


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Rendered]:
    @cache
    def render(spec: Path) -> Rendered:
        directory = tmp_path_factory.mktemp(spec.stem)
        plan = plan_json(spec)
        html_text = render_to(directory, spec, "html").read_text(encoding="utf-8")
        markdown = render_to(directory, spec, "md").read_text(encoding="utf-8")
        return Rendered(plan, html_text, parse_html(html_text), markdown, directory)

    return render


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_html_numbers_are_plan_json_numbers(
    spec: Path, rendered: Callable[[Path], Rendered]
) -> None:
    plan, page = rendered(spec).plan, rendered(spec).page
    keyed = [e for e in page.tagged if "data-plan-key" in e]
    shown_keys = set()
    for element in keyed:
        key = element["data-plan-key"]
        shown_keys.add(key)
        if key == "trainable_line":
            trainable, total = plan["trainable_parameters"], plan["total_parameters"]
            assert element["_text"] == (
                f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / total:.4f}"
            )
        elif "data-bytes" in element:
            value = lookup(plan, key)
            assert int(element["data-bytes"]) == value, key
            assert element["_text"].strip() == gib(value), key
        else:
            assert element["data-value"] == json.dumps(lookup(plan, key)), key
    # Every component of every candidate is on the page, not just some.
    for candidate in plan["candidates"]:
        p = candidate["precision"]
        for field in (
            *(f"breakdown.{k}" for k in BREAKDOWN_KEYS),
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "load_peak_bytes",
            *(["host_memory_bytes"] if candidate["host_memory_bytes"] else []),
            "fits",
        ):
            assert f"candidates.{p}.{field}" in shown_keys
    assert {"budget_bytes", "gpu.vram_bytes", "trainable_parameters"} <= shown_keys
    if plan["chosen_precision"]:
        assert "chosen.peak_reserved_bytes" in shown_keys


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_fit_matrix_is_plan_json_for_each_gpu(
    spec: Path, rendered: Callable[[Path], Rendered]
) -> None:
    plan, page = rendered(spec).plan, rendered(spec).page
    cells = [e for e in page.tagged if "data-gpu" in e]
    gpus = {cell["data-gpu"] for cell in cells}
    assert plan["gpu"]["name"] in gpus and len(gpus) > 1
    for gpu in gpus:
        if gpu != plan["gpu"]["name"] and run_cli("plan", str(spec), "--gpu", gpu)[0] == 2:
            # plan --gpu refuses what the spec asks of a card this one lacks (its bf16), as
            # validate does; the matrix still shows the run in the card's own 16-bit dtype.
            first = next(c for c in cells if c["data-gpu"] == gpu)
            assert first["data-precision"] == "fp16" and "(fp16)" in first["_text"], first
            continue
        gpu_plan = plan if gpu == plan["gpu"]["name"] else plan_json(spec, "--gpu", gpu)
        for cell in (c for c in cells if c["data-gpu"] == gpu):
            candidate = lookup(gpu_plan, f"candidates.{cell['data-precision']}")
            assert int(cell["data-bytes"]) == candidate["peak_reserved_bytes"], (gpu, cell)
            assert cell["data-status"] == expected_status(candidate)
            assert gib(candidate["peak_reserved_bytes"]) in cell["_text"]


def test_fit_matrix_plans_the_spec_fixed_fp16_on_every_gpu(tmp_path: Path) -> None:
    """``precision: fp16`` on a bf16 GPU is the spec's choice: every row of the matrix
    plans fp16 as ``plan --gpu`` does (it once planned bf16 there, which the spec does not
    allow, and showed no time)."""
    spec = with_changes(
        REPO / "specs" / "llama3.2-1b-bf16-lora.yaml", tmp_path, {"precision": "fp16"}
    )
    page = parse_html(render_to(tmp_path, spec, "html").read_text(encoding="utf-8"))
    plan_gpu = plan_json(spec)["gpu"]["name"]
    cells = [e for e in page.tagged if "data-gpu" in e]
    sixteen_bit = {c["data-precision"] for c in cells} - {"8bit", "4bit"}
    assert cells and sixteen_bit == {"fp16"}
    shown = next(c for c in cells if c["data-precision"] == "fp16" and c["data-gpu"] != plan_gpu)
    other = plan_json(spec, "--gpu", shown["data-gpu"])
    fp16 = lookup(other, "candidates.fp16")
    assert int(shown["data-bytes"]) == fp16["peak_reserved_bytes"]


def with_changes(spec: Path, tmp_path: Path, changes: dict[str, Any]) -> Path:
    """A copy of ``spec`` with dotted keys changed, for asking ``plan --json`` what-ifs."""
    yaml = YAML()
    document = yaml.load(spec.read_text(encoding="utf-8"))
    # The copy lives elsewhere: the files the spec names relative to its folder, absolute.
    for section, key in (("model", "id"), ("dataset", "path")):
        value = document.get(section, {}).get(key)
        if isinstance(value, str) and (spec.parent / value).exists():
            document[section][key] = str((spec.parent / value).resolve())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = document
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in changes.items())
    path = tmp_path / f"{spec.stem}-{name}.yaml"
    with path.open("w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    return path


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_curve_and_limits_are_plan_json_for_changed_specs(
    spec: Path, tmp_path: Path, rendered: Callable[[Path], Rendered]
) -> None:
    plan, page = rendered(spec).plan, rendered(spec).page
    points = [e for e in page.tagged if "data-max-length" in e]
    lengths = sorted({int(p["data-max-length"]) for p in points})
    assert lengths[0] <= 256 and lengths[-1] >= 32768
    assert len(points) == len(lengths) * len(plan["candidates"])
    for length in lengths:
        changed = plan_json(with_changes(spec, tmp_path, {"training.max_length": length}))
        for point in (p for p in points if int(p["data-max-length"]) == length):
            candidate = lookup(changed, f"candidates.{point['data-precision']}")
            assert int(point["data-bytes"]) == candidate["peak_reserved_bytes"]

    # The largest max_length / micro-batch shown is a setting the spec accepts and that
    # fits, and the next accepted one does not (unless the search stopped at its cap: the
    # model's positions, 4096 sequences).
    limit_cells = [e for e in page.start_tags if "data-limit" in e[1]]
    assert len(limit_cells) == 2 * len(plan["candidates"])
    for _, cell in limit_cells:
        key = {"max_length": "training.max_length"}.get(
            cell["data-limit"], "training.per_device_train_batch_size"
        )
        precision = cell["data-precision"]
        if cell["data-value"] == "none":
            smallest = 16 if cell["data-limit"] == "max_length" else 1
            at = plan_json(with_changes(spec, tmp_path, {key: smallest}))
            assert not lookup(at, f"candidates.{precision}")["fits"]
            continue
        value = int(cell["data-value"])
        at = plan_json(with_changes(spec, tmp_path, {key: value}))
        assert lookup(at, f"candidates.{precision}")["fits"], (precision, key, value)
        if "(model maximum)" in page_text_of_limit(page, cell) or value == 4096:
            continue
        above = next_accepted_plan(spec, tmp_path, key, value)
        assert not lookup(above, f"candidates.{precision}")["fits"], (precision, key, value)


def next_accepted_plan(spec: Path, tmp_path: Path, key: str, value: int) -> dict[str, Any]:
    """``plan --json`` for the next value above ``value`` that the spec accepts (GRPO, for
    one, needs the generation batch to be a multiple of ``num_generations``)."""
    for candidate in range(value + 1, value + 65):
        code, out = run_cli("plan", str(with_changes(spec, tmp_path, {key: candidate})), "--json")
        if code in (0, 3):
            data: dict[str, Any] = json.loads(out)
            return data
    raise AssertionError(f"no accepted {key} within 64 above {value}")


def page_text_of_limit(page: _Elements, cell: dict[str, str]) -> str:
    table = page.tables["limits-table"]
    column = 1 if cell["data-limit"] == "max_length" else 2
    label = {"8bit": "8-bit", "4bit": "4-bit"}.get(cell["data-precision"], cell["data-precision"])
    return next(row[column] for row in table[1:] if row[0] == label)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in ``text`` as rows of cells, separator rows dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if not all(re.fullmatch(r"-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_markdown_has_the_html_tables(spec: Path, rendered: Callable[[Path], Rendered]) -> None:
    html_page, markdown = rendered(spec).page, rendered(spec).markdown
    tables = markdown_tables(markdown)
    by_first_header = {table[0][0]: table for table in tables}
    for table_id, header in (
        ("breakdown-table", "Component"),
        ("limits-table", "Precision"),
        ("curve-table", "max_length"),
    ):
        assert by_first_header[header] == html_page.tables[table_id], table_id
    html_matrix = html_page.tables["fit-matrix-table"]
    md_matrix = by_first_header["GPU"]
    assert [row[1:] for row in md_matrix] == [row[1:] for row in html_matrix]
    assert [markdown_unescape(row[0]).split(" (target)")[0] for row in md_matrix[1:]] == [
        row[0].removesuffix(" target") for row in html_matrix[1:]
    ]
    for name in ("report.memory.svg", "report.max-length.svg"):
        assert f"]({name})" in markdown
        assert (rendered(spec).directory / name).read_text(encoding="utf-8").startswith("<svg")


def markdown_unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def test_markdown_to_stdout_embeds_charts_as_data_uris() -> None:
    code, out = run_cli("report", str(SPECS[0]), "--format", "md")
    assert code == 0
    assert out.count("](data:image/svg+xml;base64,") == 2


def assert_same_text(first: str, second: str) -> None:
    """Equal, or fail showing where they differ (a unified diff, first lines)."""
    if first != second:
        diff = difflib.unified_diff(first.splitlines(), second.splitlines(), lineterm="", n=1)
        pytest.fail("renders differ:\n" + "\n".join(line[:160] for line in list(diff)[:40]))


def test_rendering_twice_gives_identical_bytes(tmp_path: Path) -> None:
    spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    resolved = resolve(load_spec(spec))
    data = report_data(resolved, make_plan(resolved))
    html_text = render_html(data)
    assert_same_text(html_text, render_html(data))
    first_md = render_markdown(data, charts="files")
    second_md = render_markdown(data, charts="files")
    assert_same_text(first_md.text, second_md.text)
    assert first_md.charts == second_md.charts
    # A fresh process too: no ids, dates or salts that change from run to run.
    output = tmp_path / "fresh.html"
    subprocess.run(
        [sys.executable, "-m", "peftgen", "report", str(spec), "-o", str(output)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    assert_same_text(output.read_text(encoding="utf-8"), html_text)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_html_is_self_contained(spec: Path, rendered: Callable[[Path], Rendered]) -> None:
    text, page = rendered(spec).html, rendered(spec).page
    tags = {tag for tag, _ in page.start_tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "img", "base"}
    for _, attributes in page.start_tags:
        for name in ("src", "href", "xlink:href", "action", "srcset"):
            value = attributes.get(name)
            assert value is None or value.startswith("#") or value.startswith("data:"), value
    assert re.findall(r"url\((?!#)", text) == []
    assert "@import" not in text
    # The only URLs are XML namespace names, which are never fetched.
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    csp = [a for t, a in page.start_tags if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    assert text.count("<svg") == 2


def test_nothing_fits_says_so_and_lists_the_suggestions(tmp_path: Path) -> None:
    spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    plan = plan_json(spec, "--vram-gib", "4")
    assert plan["fits"] is False and plan["suggestions"]
    text = render_to(tmp_path, spec, "html", "--vram-gib", "4").read_text(encoding="utf-8")
    assert 'class="verdict no"' in text
    assert "Does not fit" in text
    page = parse_html(text)
    smallest = min(c["peak_reserved_bytes"] for c in plan["candidates"])
    verdict_numbers = [
        e for e in page.tagged if e.get("data-plan-key", "").endswith("peak_reserved_bytes")
    ]
    assert int(verdict_numbers[0]["data-bytes"]) == smallest
    for suggestion in plan["suggestions"]:
        assert escape(suggestion["action"]) in text
        assert escape(suggestion["detail"]) in text
    markdown = render_to(tmp_path, spec, "md", "--vram-gib", "4").read_text(encoding="utf-8")
    assert "**Does not fit" in markdown
    assert len(re.findall(r"^\d+\. \*\*", markdown, flags=re.MULTILINE)) == len(plan["suggestions"])


def test_a_host_ram_misfit_is_not_headlined_as_negative_gpu_overrun(tmp_path: Path) -> None:
    """The 70B FSDP QLoRA example with 16 GiB of host RAM: its GPU peak fits the budget and
    the host does not. The headline once read "19.01 GiB, -3.78 GiB over the budget"."""
    text = (REPO / "specs" / "llama3-70b-qlora-fsdp-2x24gb.yaml").read_text(encoding="utf-8")
    spec = tmp_path / "small-host.yaml"
    spec.write_text(
        text.replace("cpu_offload: true", "cpu_offload: true\n  host_memory_gib: 16"),
        encoding="utf-8",
    )
    plan = plan_json(spec)
    (shown,) = (c for c in plan["candidates"] if c["precision"] == "4bit")
    assert not shown["host_fits"] and shown["peak_reserved_bytes"] <= plan["budget_bytes"]
    for kind in ("md", "html"):
        report = render_to(tmp_path, spec, kind).read_text(encoding="utf-8")
        assert "GiB over the" not in report.split("Or:")[0]
        host = f"{shown['host_memory_bytes'] / 2**30:.2f} GiB of host memory per node"
        assert f"GiB budget, but it needs {host}, over the 16 GiB" in report
        assert "✗ no (host RAM)" in report  # the fits row names what is over


def test_report_says_tight_exactly_when_the_plan_does(tmp_path: Path) -> None:
    """On a card where the peak is 89 % of the budget the upper end of the prediction
    interval is over it: ``plan`` calls that tight, and so must the report's headline and
    table (a share-of-budget rule of its own once said "fits" there)."""
    spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    peak = lookup(plan_json(spec), "chosen.peak_reserved_bytes")
    vram = f"{peak / 0.89 / 0.95 / GIB:.3f}"
    plan = plan_json(spec, "--vram-gib", vram)
    chosen = lookup(plan, f"candidates.{plan['chosen_precision']}")
    assert chosen["peak_reserved_bytes"] < 0.9 * plan["budget_bytes"]
    assert plan["tight"] and chosen["fits"] and not chosen["fits_high"]
    markdown = render_to(tmp_path, spec, "md", "--vram-gib", vram).read_text(encoding="utf-8")
    assert "> **Fits, tightly:" in markdown
    assert (
        f"| Upper end of the prediction interval | {gib(chosen['peak_reserved_bytes_high'])} GiB |"
        in markdown
    )
    page = render_to(tmp_path, spec, "html", "--vram-gib", vram).read_text(encoding="utf-8")
    assert 'class="verdict tight"' in page


def test_the_spec_is_shown_escaped(tmp_path: Path) -> None:
    source = (REPO / "specs" / "llama3-8b-clinical-qlora.yaml").read_text(encoding="utf-8")
    hostile = "# </code></pre><script>alert('x')</script> ``` | **bold**\n"
    spec = tmp_path / "hostile.yaml"
    spec.write_text(hostile + source, encoding="utf-8")
    html_text = render_to(tmp_path, spec, "html").read_text(encoding="utf-8")
    assert "<script>" not in html_text
    assert "&lt;/code&gt;&lt;/pre&gt;&lt;script&gt;" in html_text
    markdown = render_to(tmp_path, spec, "md").read_text(encoding="utf-8")
    fenced = re.search(r"^(`{4,})yaml\n(.*?)\n\1$", markdown, flags=re.DOTALL | re.MULTILINE)
    assert fenced is not None and fenced.group(2) == (hostile + source).rstrip("\n")


def test_markdown_escaping() -> None:
    assert markdown_text("a|b <i>*x*</i> [l](u)") == r"a\|b \<i\>\*x\*\</i\> \[l\](u)"
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("x|y") == r"`x\|y`"
    assert markdown_fence("```\ncode\n```", "yaml").startswith("````yaml\n")


def test_missing_matplotlib_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = resolve(load_spec(SPECS[0]))
    data = report_data(resolved, make_plan(resolved))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=re.escape("pip install 'peftgen[report]'")):
        render_html(data)
    # Tables only (what emit writes as plan.md) need no matplotlib.
    assert render_markdown(data, charts="none").charts == {}


def test_plan_markdown_for_emit_does_not_import_matplotlib() -> None:
    spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    script = (
        "import sys; from pathlib import Path\n"
        "from peftgen.load import load_spec; from peftgen.resolve import resolve\n"
        "from peftgen.plan import make_plan; from peftgen.report import render_plan_markdown\n"
        f"loaded = load_spec(Path({str(spec)!r}))\n"
        "resolved = resolve(loaded)\n"
        "text = render_plan_markdown(make_plan(resolved), resolved)\n"
        "assert '| Component |' in text and '![' not in text, text[:500]\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)


def test_plan_markdown_matches_the_report_tables() -> None:
    spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    loaded = load_spec(spec)
    resolved = resolve(loaded)
    plan = make_plan(resolved)
    plan_md = render_plan_markdown(plan, resolved)
    full_md = render_markdown(report_data(resolved, plan), charts="files").text
    assert markdown_tables(plan_md) == markdown_tables(full_md)


@given(st.text())
def test_markdown_text_cannot_break_out(text: str) -> None:
    escaped = markdown_text(text)
    assert re.search(r"(?<!\\)[|<>`*_\[\]]", escaped.replace("\\\\", "")) is None
    assert markdown_unescape(escaped) == text.replace("\n", " ")


@given(st.text())
def test_markdown_code_holds_any_text(text: str) -> None:
    span = markdown_code(text)
    fence = re.match(r"`+", span)
    assert fence is not None and span.endswith(fence.group(0))
    inner = span[len(fence.group(0)) : -len(fence.group(0))]
    assert fence.group(0) not in inner
    assert "|" not in inner.replace("\\|", "")


def test_fixed_precision_that_does_not_fit_names_the_one_that_would(tmp_path: Path) -> None:
    spec = REPO / "specs" / "mistral-7b-8bit-lora.yaml"  # precision: 8bit
    plan = plan_json(spec, "--vram-gib", "8")
    eight_bit = lookup(plan, "candidates.8bit")
    four_bit = lookup(plan, "candidates.4bit")
    assert plan["chosen_precision"] is None and not eight_bit["fits"] and four_bit["fits"]
    text = render_to(tmp_path, spec, "html", "--vram-gib", "8").read_text(encoding="utf-8")
    first_figure = parse_html(text).tagged[0]
    assert "Does not fit on NVIDIA A10G in 8-bit, the spec's precision" in text
    tightly = ", tightly" if four_bit["tight"] else ""
    offer = (
        f"4-bit would fit{tightly}: peak {gib(four_bit['peak_reserved_bytes'])} GiB, "
        f"up to {gib(four_bit['peak_reserved_bytes_high'])} GiB"
    )
    assert offer in text
    assert first_figure["data-plan-key"] == "candidates.8bit.peak_reserved_bytes"
    assert first_figure["_text"] == gib(eight_bit["peak_reserved_bytes"])
    markdown = render_to(tmp_path, spec, "md", "--vram-gib", "8").read_text(encoding="utf-8")
    assert "in 8-bit, the spec's precision.**" in markdown
    assert offer in markdown


def test_the_precision_offered_instead_is_what_auto_would_load(tmp_path: Path) -> None:
    """8-bit fixed and over the budget, bf16 fits at the estimate only (tight), 4-bit at the
    upper end: ``precision: auto`` loads 4-bit, so the headline offers 4-bit, not bf16."""
    base = REPO / "tests" / "plan_specs" / "llama3-8b-sft-auto.yaml"
    spec = with_changes(base, tmp_path, {"precision": "8bit", "training.max_length": 8192})
    plan = plan_json(spec)
    by = {c["precision"]: c for c in plan["candidates"]}
    assert plan["chosen_precision"] is None and not by["8bit"]["fits"]
    assert by["bf16"]["tight"] and by["4bit"]["fits_high"]
    auto = plan_json(
        with_changes(base, tmp_path, {"precision": "auto", "training.max_length": 8192})
    )
    assert auto["chosen_precision"] == "4bit"
    markdown = render_to(tmp_path, spec, "md").read_text(encoding="utf-8")
    assert "4-bit would fit: peak" in markdown and "bf16 would fit" not in markdown


def test_auto_precision_that_nothing_fits_says_any_precision(tmp_path: Path) -> None:
    spec = REPO / "specs" / "llama3-8b-instruct-dpo-lora.yaml"  # precision: auto
    plan = plan_json(spec, "--vram-gib", "2")
    assert plan["fits"] is False
    text = render_to(tmp_path, spec, "html", "--vram-gib", "2").read_text(encoding="utf-8")
    assert "in any precision</h2>" in text
    smallest = min(c["peak_reserved_bytes"] for c in plan["candidates"])
    assert "The smallest peak, <span" in text and f'data-bytes="{smallest}"' in text


def test_assumptions_are_grouped_by_component_and_shared_texts_listed_once() -> None:
    resolved = resolve(load_spec(REPO / "specs" / "llama3-8b-clinical-qlora.yaml"))
    plan = make_plan(resolved)
    shared = Assumption("activation_bytes", "gradient checkpointing keeps each layer's input")
    per_precision = {
        c.precision: (Assumption("weights_bytes", f"{c.precision} <weights> & scales"), shared)
        for c in plan.candidates
    }
    plan = replace(
        plan,
        candidates=tuple(
            replace(c, assumptions=per_precision[c.precision]) for c in plan.candidates
        ),
    )
    data = report_data(resolved, plan)
    page = render_html(data)
    assert page.count("<summary>Weights</summary>") == 1
    assert page.count("<summary>Activations</summary>") == 1
    assert page.count("gradient checkpointing keeps each layer&#39;s input") == 1
    assert "4bit &lt;weights&gt; &amp; scales" in page
    markdown = render_markdown(data, charts="none").text
    assert "<details><summary>Weights</summary>" in markdown
    assert r"*4-bit*: 4bit \<weights\> & scales" in markdown


def test_spec_warnings_from_the_resolver_are_on_the_page(tmp_path: Path) -> None:
    spec = with_changes(
        REPO / "specs" / "llama3-8b-clinical-qlora.yaml", tmp_path, {"training.max_length": 16384}
    )
    resolved = resolve(load_spec(spec))
    assert resolved.warnings, "the resolver should warn about max_length past 8192 positions"
    text = render_to(tmp_path, spec, "html").read_text(encoding="utf-8")
    markdown = render_to(tmp_path, spec, "md").read_text(encoding="utf-8")
    for warning in resolved.warnings:
        assert escape(warning) in text
        assert markdown_text(warning) in markdown


@pytest.mark.parametrize(
    "spec",
    [REPO / "specs" / "llama3-70b-qlora-fsdp-2x24gb.yaml", REPO / "specs" / "tiny-cpu-sft.yaml"],
    ids=spec_id,
)
def test_gpu_count_table_is_plan_json_per_gpu_count_and_engine(
    spec: Path, tmp_path: Path, rendered: Callable[[Path], Rendered]
) -> None:
    """Every number of the "More GPUs" table is ``plan --json``'s chosen peak for the spec
    edited to that GPU count and engine; its refusals are the spec's own refusals."""
    from peftgen.report.collect import gpu_count_changes

    plan, page = rendered(spec).plan, rendered(spec).page
    cells = [e for e in page.tagged if "data-gpu-count" in e]
    counts = sorted({int(c["data-gpu-count"]) for c in cells})
    assert counts == [1, 2, 4, 8]
    precision = plan["chosen_precision"]
    offload = bool(load_spec(spec).spec.hardware.cpu_offload)
    priced = [c for c in cells if "data-bytes" in c]
    assert priced
    for cell in priced:
        count, engine = int(cell["data-gpu-count"]), cell["data-engine"]
        changes = gpu_count_changes(precision, count, engine, offload and count > 1)
        if engine == "ddp":
            changes["hardware.cpu_offload"] = False
        edited = plan_json(with_changes(spec, tmp_path, changes))
        assert edited["gpu"]["count"] == count
        candidate = lookup(edited, f"candidates.{precision}")
        assert int(cell["data-bytes"]) == candidate["peak_reserved_bytes"], (count, engine)
        assert cell["data-status"] == expected_status(candidate), (count, engine)
        assert gib(candidate["peak_reserved_bytes"]) in cell["_text"]
    for cell in (c for c in cells if "data-bytes" not in c):
        count, engine = int(cell["data-gpu-count"]), cell["data-engine"]
        changes = gpu_count_changes(precision, count, engine, offload and engine != "ddp")
        code, _ = run_cli("validate", str(with_changes(spec, tmp_path, changes)))
        assert code == 2, (count, engine)
    # The spec's own configuration is the plan itself.
    own = [
        c
        for c in priced
        if int(c["data-gpu-count"]) == plan["gpu"]["count"]
        and c["data-engine"] in (load_spec(spec).spec.hardware.distributed, "none")
    ]
    chosen = lookup(plan, "chosen.peak_reserved_bytes")
    assert own and all(int(c["data-bytes"]) == chosen for c in own)


def test_headline_of_a_full_fine_tune_is_not_a_base_model_load(
    rendered: Callable[[Path], Rendered],
) -> None:
    """Full fine-tuning loads fp32 masters: "load the base model in bf16" would mislead."""
    result = rendered(Path("specs/qwen2.5-0.5b-instruct-full.yaml"))
    match = re.search(r'<h2 id="verdict-title">(.*?)</h2>', result.html, re.S)
    assert match is not None
    headline = match.group(1)
    assert "load the base model" not in headline
    assert "train every weight (fp32 master weights under bf16 autocast)" in headline
    assert "train every weight (fp32 master weights under bf16 autocast)" in result.markdown
    lora = rendered(Path("specs/llama3-8b-clinical-qlora.yaml"))
    assert "load the base model in 4-bit" in lora.markdown


def test_sharded_report_shows_loading_peak_and_host_memory(
    rendered: Callable[[Path], Rendered],
) -> None:
    """Both phases are on the page, as plan --json has them, in both formats."""
    result = rendered(Path("specs/llama3-70b-qlora-fsdp-2x24gb.yaml"))
    rows = {row[0]: row[1:] for table in markdown_tables(result.markdown) for row in table}
    candidates = result.plan["candidates"]
    assert rows["Loading peak (before training)"] == [gib(c["load_peak_bytes"]) for c in candidates]
    assert rows["Host memory per node (not GPU)"] == [
        gib(c["host_memory_bytes"]) for c in candidates
    ]


def test_an_output_named_md_is_markdown_unless_format_says_otherwise(tmp_path: Path) -> None:
    """``-o report.md`` without --format wrote HTML into a .md file."""
    spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    for name, args, starts in [
        ("a.md", [], "# VRAM report"),
        ("b.md", ["--format", "html"], "<!DOCTYPE html>"),
        ("c.html", [], "<!DOCTYPE html>"),
    ]:
        out = tmp_path / name
        code, _ = run_cli("report", str(spec), "-o", str(out), *args)
        assert code == 0
        assert out.read_text(encoding="utf-8").startswith(starts), name
