"""``generated/`` is exactly what emit renders now, renders are stable, and ruff is clean.

Rendering happens in a scratch copy of the checkout's layout (``specs/`` linked, the tiny
model of ``specs/tiny-cpu-sft.yaml`` built by the fixture), so relative paths resolve as
they do for ``python -m tools.golden`` and the test never writes into the checkout.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from peftgen.launch import LAUNCH_FILES
from tools import golden

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "generated"


@pytest.fixture(scope="module")
def workspace(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    specs = root / "specs"
    specs.mkdir()
    for entry in (REPO / "specs").iterdir():
        if entry.name != golden.TINY_MODEL_DIR.name:
            (specs / entry.name).symlink_to(entry)
    (specs / golden.TINY_MODEL_DIR.name).symlink_to(tiny_model_dir)
    return root


@pytest.fixture(scope="module")
def expected(workspace: Path) -> dict[Path, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        return golden.expected_files()


def test_every_spec_is_rendered(expected: dict[Path, str]) -> None:
    spec_count = len(list((REPO / "specs").rglob("*.yaml")))
    folders = {path.parent for path in expected}
    assert spec_count >= 7
    assert len(folders) == spec_count
    single_gpu = {"train.py", "merge.py", "plan.md", "spec.yaml", ".peftgen-emitted.json"}
    for folder in folders:
        names = {path.name for path in expected if path.parent == folder}
        if folder.name == "llama3-70b-qlora-fsdp-2x24gb":
            # A distributed spec adds its accelerate config and launch.sh (no DeepSpeed JSON
            # for FSDP).
            assert names == single_gpu | {"accelerate_config.yaml", "launch.sh"}
        elif "\nfinetuning: full\n" in expected[folder / "spec.yaml"]:
            # Full fine-tuning saves the model itself: no adapter, no merge.py.
            assert names == single_gpu - {"merge.py"}
        else:
            assert single_gpu <= names and names - single_gpu <= set(LAUNCH_FILES)


def test_generated_files_are_up_to_date(expected: dict[Path, str]) -> None:
    stale: list[str] = []
    for relative, text in sorted(expected.items()):
        checked_in = REPO / relative
        actual = checked_in.read_text(encoding="utf-8") if checked_in.is_file() else ""
        if actual != text:
            diff = difflib.unified_diff(
                actual.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{relative} (checked in)",
                tofile=f"{relative} (rendered now)",
                n=2,
            )
            stale.append("".join(list(diff)[:40]))
    extra = sorted(
        str(path.relative_to(REPO))
        for path in GENERATED.rglob("*")
        if path.is_file() and path.relative_to(REPO) not in expected
    )
    assert not stale and not extra, (
        f"generated/ is stale: run `{golden.REGENERATE_COMMAND}`\n"
        + "\n".join(stale)
        + (f"\nfiles no spec renders: {extra}" if extra else "")
    )


def test_rendering_twice_gives_identical_bytes(workspace: Path, expected: dict[Path, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        again = golden.expected_files()
    assert again == expected


def _ruff_options() -> list[str]:
    """pyproject's ruff settings as flags, for files its `extend-exclude` leaves out."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]
    lint = config.get("lint", {})
    return (
        [
            "--isolated",
            f"--line-length={config['line-length']}",
            f"--target-version={config['target-version']}",
        ]
        + ([f"--select={','.join(lint['select'])}"] if "select" in lint else [])
        + ([f"--ignore={','.join(lint['ignore'])}"] if "ignore" in lint else [])
    )


def ruff_problems(folder: Path) -> str:
    """ruff check + format --check output for the Python files in ``folder`` ('' when clean)."""
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is a test dependency (pip install -e .[test])"
    options = _ruff_options()
    check = subprocess.run(
        [ruff, "check", *options, "--no-cache", str(folder)], capture_output=True, text=True
    )
    format_options = [
        option for option in options if not option.startswith(("--select", "--ignore"))
    ]
    formatted = subprocess.run(
        [ruff, "format", *format_options, "--no-cache", "--check", "--diff", str(folder)],
        capture_output=True,
        text=True,
    )
    problems = ""
    if check.returncode != 0:
        problems += check.stdout + check.stderr
    if formatted.returncode != 0:
        problems += formatted.stdout + formatted.stderr
    return problems


def test_generated_scripts_pass_ruff(expected: dict[Path, str], tmp_path: Path) -> None:
    for relative, text in expected.items():
        if relative.suffix == ".py":
            target = tmp_path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    assert len(list(tmp_path.rglob("*.py"))) >= 14
    assert ruff_problems(tmp_path) == ""
