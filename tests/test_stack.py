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


@pytest.mark.parametrize(
    ("precision", "finetuning", "gpu_bf16", "expected"),
    [
        ("bf16", "lora", True, "fp32"),  # modules_to_save upcast from bf16
        ("fp16", "lora", True, "fp32"),
        ("fp16", "lora", False, "fp32"),
        ("4bit", "lora", True, "bf16"),  # trl's cast of a k-bit model's trainables
        ("8bit", "lora", True, "bf16"),
        ("4bit", "lora", False, "fp32"),  # no bf16 on the GPU: the script casts back
        ("8bit", "lora", False, "fp32"),
        ("bf16", "full", True, "fp32"),  # full fine-tuning: fp32 masters
        ("fp16", "full", False, "fp32"),
    ],
)
def test_one_rule_for_the_dtype_of_trained_copies(
    precision: str, finetuning: str, gpu_bf16: bool, expected: str
) -> None:
    compute = stack.compute_dtype(precision, gpu_bf16)
    assert stack.trained_copy_dtype(precision, finetuning, compute) == expected
    inputs = EstimateInput(
        arch=SMOLLM2,
        precision=precision,  # type: ignore[arg-type]
        compute_dtype=compute,
        finetuning=finetuning,  # type: ignore[arg-type]
        modules_to_save=("embed_tokens",),
    )
    assert modules_to_save_dtype_bytes(inputs) == DTYPE_BYTES[expected]
    if precision in ("8bit", "4bit"):
        assert adapter_dtype(inputs) == expected


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

    from peftgen.render import VLLM_REQUIREMENT

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
        assert set(dependencies) <= pins | {VLLM_REQUIREMENT}, script
    for name, version in (stack.PINNED_VERSIONS | stack.ENGINE_VERSIONS).items():
        # The CPU build of torch reports a local version label: 2.13.0+cpu.
        assert metadata.version(name).split("+")[0] == version, name
