"""Stack facts that several layers read: each is decided once, in ``peftgen.stack``.

Fast tests, no torch: the rule's table, and the estimator and the renderer reading it
(``plan --simulate`` reads it too; ``test_simulate.py`` runs that path)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from peftgen import calibrate, stack
from peftgen.catalog import find_model
from peftgen.memory import DTYPE_BYTES, EstimateInput, adapter_dtype, modules_to_save_dtype_bytes

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = find_model("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "8bit", "4bit"])
@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_one_rule_for_the_dtype_of_trained_copies(precision: str, gpu_bf16: bool) -> None:
    """The estimator counts every trained copy (adapters of a k-bit model, modules_to_save)
    in ``stack.TRAINED_COPY_DTYPE``, the dtype the script trains them in; under DeepSpeed,
    which casts the module and keeps its own fp32 master, in the compute dtype."""
    compute = stack.compute_dtype(precision, gpu_bf16)
    inputs = EstimateInput(
        arch=SMOLLM2,
        precision=precision,  # type: ignore[arg-type]
        compute_dtype=compute,
        modules_to_save=("embed_tokens",),
    )
    assert stack.TRAINED_COPY_DTYPE == "fp32"
    assert modules_to_save_dtype_bytes(inputs) == DTYPE_BYTES[stack.TRAINED_COPY_DTYPE]
    assert adapter_dtype(inputs) == stack.TRAINED_COPY_DTYPE
    zero3 = EstimateInput(
        arch=SMOLLM2,
        precision=precision,  # type: ignore[arg-type]
        compute_dtype=compute,
        distributed="deepspeed-zero3",
        world_size=2,
    )
    assert adapter_dtype(zero3) == compute
    assert not stack.script_upcasts_trained_copies("deepspeed-zero3")


def test_the_receipt_version_is_defined_once() -> None:
    assert stack.RECEIPT_VERSION in calibrate.READABLE_VERSIONS
    templates = Path(__file__).resolve().parent.parent / "templates"
    for template in templates.glob("*.j2"):
        assert '"receipt_version": 2' not in template.read_text(encoding="utf-8"), template


def _header_dependencies(script: Path) -> list[str]:
    """The requirement strings of a script's PEP 723 ``dependencies`` list."""
    lines = script.read_text(encoding="utf-8").splitlines()
    start = lines.index("# dependencies = [") + 1
    end = lines.index("# ]", start)
    return [line.removeprefix("#     ").strip('",') for line in lines[start:end]]


def test_pinned_versions_are_the_extras_the_headers_and_the_installed_stack() -> None:
    """One source for the stack's versions: pyproject's extras pin them, every generated
    script's header pins a subset of them, and the test install runs exactly them (so the
    end-to-end tests exercise the versions the scripts are written for)."""
    from importlib import metadata

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert extras["train"] == [f"{n}=={v}" for n, v in stack.PINNED_VERSIONS.items()]
    assert extras["deepspeed"] == [f"{n}=={v}" for n, v in stack.ENGINE_VERSIONS.items()]
    pins = {f"{n}=={v}" for n, v in (stack.PINNED_VERSIONS | stack.ENGINE_VERSIONS).items()}
    scripts = sorted((REPO / "generated").glob("*/*.py"))
    assert len(scripts) >= 10
    for script in scripts:
        dependencies = _header_dependencies(script)
        assert "torch==" + stack.PINNED_VERSIONS["torch"] in dependencies, script
        assert set(dependencies) <= pins | {stack.VLLM_REQUIREMENT}, script
    for name, version in (stack.PINNED_VERSIONS | stack.ENGINE_VERSIONS).items():
        # The CPU build of torch reports a local version label: 2.13.0+cpu.
        assert metadata.version(name).split("+")[0] == version, name


def test_the_vllm_range_is_the_one_the_pinned_trl_accepts() -> None:
    """Read from trl's own check (import_utils.is_vllm_available), not restated."""
    import inspect
    import re

    from trl import import_utils

    source = inspect.getsource(import_utils.is_vllm_available)
    bounds = re.search(
        r'Version\("([\d.]+)"\) <= _vllm_base_version <= Version\("([\d.]+)"\)', source
    )
    assert bounds is not None, source
    assert bounds.groups() == stack.TRL_VLLM_RANGE
