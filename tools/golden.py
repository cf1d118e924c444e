"""Regenerate ``generated/``: what ``peftgen emit -o`` writes for every spec in ``specs/``.

The checked-in files are the product as a reviewer sees it: a template change shows up as
a diff of real scripts. ``tests/test_golden.py`` renders the same files in memory and fails,
naming ``python -m tools.golden``, when a checked-in file is stale. It lives in
``tools/``, outside the wheel: only a checkout regenerates ``generated/``.

Paths stay relative to the checkout root (specs name their data and local models that
way), so rendering happens with the root as the current directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from peftgen.load import load_spec
from peftgen.plan import make_plan
from peftgen.render import (
    EMITTED_MANIFEST,
    emitted_manifest,
    model_source,
    render_all,
    write_output_dir,
)
from peftgen.report import render_plan_markdown
from peftgen.resolve import resolve

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = Path("specs")
GENERATED_DIR = Path("generated")
REGENERATE_COMMAND = "python -m tools.golden"
TINY_MODEL_DIR = SPECS_DIR / "tiny-llama"
"""The local model of ``specs/tiny-cpu-sft.yaml``, built by ``tests/tiny_model.py``."""


def spec_paths() -> list[Path]:
    """Every spec under ``specs/`` (recursively), relative to the current directory."""
    return sorted(path for path in SPECS_DIR.rglob("*.yaml") if path.is_file())


def render_spec(spec_path: Path) -> tuple[str, dict[str, str]]:
    """(spec name, files by name) as ``emit -o generated/<name>`` writes them; specs that do
    not fit render too."""
    resolved = resolve(load_spec(spec_path))
    plan = make_plan(resolved)
    name = resolved.loaded.spec.name
    files = render_all(
        resolved.loaded,
        plan,
        render_plan_markdown(plan, resolved),
        model_source(resolved),
        GENERATED_DIR / name,
    )
    return name, files


def expected_files() -> dict[Path, str]:
    """Every file ``generated/`` should hold, by path relative to the current directory."""
    expected: dict[Path, str] = {}
    for spec_path in spec_paths():
        name, files = render_spec(spec_path)
        for file_name, text in {**files, EMITTED_MANIFEST: emitted_manifest(files)}.items():
            expected[GENERATED_DIR / name / file_name] = text
    return expected


def _ensure_tiny_model() -> None:
    """Build the tiny model a spec points at, so its plan can read the config (needs torch)."""
    if (TINY_MODEL_DIR / "config.json").is_file():
        return
    print(f"building {TINY_MODEL_DIR} with tests/tiny_model.py", file=sys.stderr)
    subprocess.run([sys.executable, "tests/tiny_model.py", str(TINY_MODEL_DIR)], check=True)


def main() -> int:
    os.chdir(CHECKOUT_ROOT)
    _ensure_tiny_model()
    by_folder: dict[Path, dict[str, str]] = {}
    for path, text in expected_files().items():
        if path.name != EMITTED_MANIFEST:  # write_output_dir writes it
            by_folder.setdefault(path.parent, {})[path.name] = text
    for folder, files in sorted(by_folder.items()):
        write_output_dir(folder, files, overwrite_edits=True)  # goldens are regenerated
        print(f"wrote {folder}/", file=sys.stderr)
    if GENERATED_DIR.is_dir():
        for stale in sorted(set(GENERATED_DIR.iterdir()) - set(by_folder)):
            if stale.is_dir():
                shutil.rmtree(stale)
                print(f"removed {stale}/ (no spec renders it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
