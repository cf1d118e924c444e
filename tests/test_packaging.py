"""The installed wheel works on its own: templates and catalogues ship inside it.

An editable install finds ``templates/`` through the checkout, which hides a wheel that
forgot them; so this builds the real wheel, installs it into a folder of its own and runs
the CLI from a directory outside the checkout with that folder first on ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT = str(REPO_ROOT)
PIP = (sys.executable, "-m", "pip")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --target`` of the freshly built wheel; returns the target folder."""
    build_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(build_dir), ROOT],
        check=True,
    )
    (wheel,) = build_dir.glob("peftgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "peftgen/_templates/train_sft.py.j2" in names
    assert "peftgen/catalog/data/models.json" in names
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [*PIP, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    return target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from peftgen.cli import main; sys.exit(main())", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def _copy_example(workdir: Path) -> Path:
    specs = workdir / "specs"
    shutil.copytree(REPO_ROOT / "specs" / "data", specs / "data")
    spec = specs / "llama3-8b-clinical-qlora.yaml"
    shutil.copy(REPO_ROOT / "specs" / spec.name, spec)
    return spec


def test_installed_wheel_renders_from_its_own_templates(
    installed_wheel: Path, tmp_path: Path
) -> None:
    spec = _copy_example(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import peftgen.render as r; print(r._template_root())"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed_wheel)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(installed_wheel)

    out_dir = tmp_path / "run"
    emitted = _run_installed(installed_wheel, tmp_path, "emit", str(spec), "-o", str(out_dir))
    assert emitted.returncode == 0, emitted.stderr
    train = (out_dir / "train.py").read_text(encoding="utf-8")
    assert "BitsAndBytesConfig(" in train
    compile(train, "train.py", "exec")
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".peftgen-emitted.json",
        "merge.py",
        "plan.md",
        "spec.yaml",
        "train.py",
    ]


def test_validate_plan_emit_never_import_torch(installed_wheel: Path, tmp_path: Path) -> None:
    """The analytic path stays light: a researcher plans on a laptop without torch."""
    spec = _copy_example(tmp_path)
    code = (
        "import sys, io, contextlib\n"
        "from peftgen.cli import main\n"
        f"spec = {str(spec)!r}\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['validate', spec]) == 0\n"
        "    assert main(['plan', spec, '--json']) == 0\n"
        "    assert main(['emit', spec]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes',"
        " 'datasets', 'matplotlib') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed_wheel), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
