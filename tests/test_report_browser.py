"""The report in a real browser: headless Debian ``chromium`` driven over the DevTools
protocol (``--remote-debugging-pipe``: two file descriptors, no websocket library).

Checks through the live DOM that the charts and tables are there and visible, takes a
full-page screenshot, and records every network request the page makes: there must be
none beyond the page's own file. Skipped only where chromium is missing *and* this is
not CI; in CI (``CI`` set) a missing chromium fails the test.

Also a script: ``python tests/test_report_browser.py SPEC OUT.png [WIDTH [HEIGHT]]`` saves
the screenshots in ``docs/``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
QLORA_SPEC = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``.

    Chromium reads JSON commands from fd 3 and writes replies and events to fd 4, each
    message terminated by a NUL byte.
    """

    def __init__(self, chromium: str, profile_dir: Path) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def wire_pipes() -> None:
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self.process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile_dir}",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                # Any lookup that slips past the page's CSP fails instead of leaving the box.
                "--host-resolver-rules=MAP * ~NOTFOUND",
                *(["--no-sandbox"] if os.geteuid() == 0 else []),
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=wire_pipes,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; events seen meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result
            self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = next((e for e in self.events if e.get("method") == method), None)
        while seen is None:
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                seen = event
        return seen

    def _read(self, timeout_s: float = 60.0) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout_s)
            if not ready:
                raise TimeoutError(f"chromium sent nothing for {timeout_s:.0f} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


# Runs in the page (DevTools evaluation is not bound by the page's CSP).
DOM_PROBE = """
(() => {
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none';
  };
  const figures = [...document.querySelectorAll('figure')].map((f) => {
    const svg = f.querySelector('svg');
    const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return {id: f.id, svg: !!svg, visible: !!svg && visible(svg), width: r.width,
            height: r.height, title: svg && svg.querySelector('title')
              ? svg.querySelector('title').textContent : null,
            shapes: svg ? svg.querySelectorAll('path, rect, use').length : 0,
            texts: svg ? svg.querySelectorAll('text').length : 0};
  });
  const tables = [...document.querySelectorAll('table[id]')].map((t) => ({
    id: t.id, rows: t.rows.length, visible: visible(t),
    inClosedDetails: !!t.closest('details:not([open])')}));
  return JSON.stringify({
    title: document.title,
    verdict: document.querySelector('#verdict h2').textContent,
    verdictVisible: visible(document.querySelector('#verdict')),
    figures, tables,
    resources: performance.getEntriesByType('resource').map((e) => e.name),
    height: document.documentElement.scrollHeight,
  });
})()
"""


def load_in_chromium(
    chromium: str,
    page: Path,
    screenshot: Path | None,
    width: int = 1100,
    height: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Open ``page``; return the DOM probe's answer and every DevTools event seen.

    The screenshot is the whole page, or its top ``height`` pixels.
    """
    with tempfile.TemporaryDirectory(prefix="peftgen-chromium-") as profile:
        browser = DevTools(chromium, Path(profile))
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            session = browser.send("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            for domain in ("Page", "Network", "Log", "Runtime"):
                browser.send(f"{domain}.enable", session)
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            browser.events.clear()
            browser.send("Page.navigate", session, url=page.resolve().as_uri())
            browser.wait_for("Page.loadEventFired")
            probe = json.loads(
                browser.send("Runtime.evaluate", session, expression=DOM_PROBE, returnByValue=True)[
                    "result"
                ]["value"]
            )
            if screenshot is not None:
                shot = browser.send(
                    "Page.captureScreenshot",
                    session,
                    format="png",
                    captureBeyondViewport=True,
                    clip={
                        "x": 0,
                        "y": 0,
                        "width": width,
                        "height": min(height or probe["height"], probe["height"]),
                        "scale": 1,
                    },
                )
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return probe, list(browser.events)
        finally:
            browser.close()


def render_report(spec: Path, output: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "peftgen", "report", str(spec), "-o", str(output), *extra],
        check=True,
        cwd=REPO,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must install it (see tests/run_all.sh)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "extra"),
    [(QLORA_SPEC, ()), (QLORA_SPEC, ("--vram-gib", "4"))],
    ids=["fits", "nothing-fits"],
)
def test_report_in_headless_chromium(
    chromium: str, spec: Path, extra: tuple[str, ...], tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    render_report(spec, page, *extra)
    screenshot = tmp_path / "report.png"
    probe, events = load_in_chromium(chromium, page, screenshot)

    assert probe["verdictVisible"]
    assert probe["verdict"].startswith("Fits" if not extra else "Does not fit")
    figures = {f["id"]: f for f in probe["figures"]}
    assert set(figures) == {"breakdown-chart", "max-length-chart"}
    for figure in figures.values():
        assert figure["svg"] and figure["visible"], figure
        assert figure["width"] > 400 and figure["height"] > 200, figure
        assert figure["shapes"] > 20 and figure["texts"] > 10, figure
        assert figure["title"] and "Peak GPU memory" in figure["title"]
    tables = {t["id"]: t for t in probe["tables"]}
    for table_id in ("breakdown-table", "fit-matrix-table", "limits-table"):
        assert tables[table_id]["visible"] and tables[table_id]["rows"] >= 3, tables[table_id]
    assert tables["curve-table"]["inClosedDetails"]

    # Nothing but the page itself was requested, and nothing was blocked trying.
    requested = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requested == [page.resolve().as_uri()], requested
    assert probe["resources"] == []
    failures = [e for e in events if e.get("method") == "Network.loadingFailed"]
    assert failures == []
    problems = [
        e["params"]["entry"]
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    assert problems == [], problems

    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 50_000


def _main(argv: list[str]) -> int:
    """``SPEC OUT.png [WIDTH [HEIGHT]]``: screenshot the report of SPEC (top HEIGHT pixels)."""
    found = find_chromium()
    if found is None:
        print("chromium is not installed", file=sys.stderr)
        return 1
    spec, output = Path(argv[0]), Path(argv[1])
    width = int(argv[2]) if len(argv) > 2 else 1100
    height = int(argv[3]) if len(argv) > 3 else None
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        render_report(spec, page)
        probe, _ = load_in_chromium(found, page, output, width, height)
    print(f"wrote {output} (page {width}x{probe['height']})")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
