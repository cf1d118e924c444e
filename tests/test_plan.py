"""The planner and ``peftgen plan``: choices, suggestions, JSON contract, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from peftgen.cli import main
from peftgen.load import load_spec
from peftgen.plan import (
    estimate_candidate,
    largest_fitting_batch,
    largest_fitting_max_length,
    make_plan,
)
from peftgen.resolve import Resolved, resolve
from peftgen.spec import SPEC_ADAPTER

REPO = Path(__file__).resolve().parent.parent
PLAN_SPECS = Path(__file__).parent / "plan_specs"
AUTO_SPEC = PLAN_SPECS / "llama3-8b-sft-auto.yaml"
TOO_BIG_SPEC = PLAN_SPECS / "llama3-8b-too-big.yaml"


def resolved(path: Path = AUTO_SPEC) -> Resolved:
    return resolve(load_spec(path))


def with_spec_changes(base: Resolved, section: str, **changes: object) -> Resolved:
    spec = base.loaded.spec
    updated = getattr(spec, section).model_copy(update=changes) if section else None
    new_spec = spec.model_copy(update={section: updated} if section else changes)
    return replace(base, loaded=replace(base.loaded, spec=new_spec))


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [("rtx-4090", "bf16"), ("t4", "4bit"), ("a100-80gb", "bf16")],
)
def test_llama3_8b_auto_precision_per_gpu(gpu: str, expected: str) -> None:
    """bf16 LoRA of an 8B model (~17 GiB) fits 24 GB and 80 GB cards. On a 15 GB T4 the
    8-bit load misses too: LLM.int8 keeps every layer's inputs through checkpointing."""
    plan = make_plan(resolved(), gpu_override=gpu)
    assert plan.chosen_precision == expected
    assert plan.fits
    if gpu == "t4":
        assert [c.precision for c in plan.candidates] == ["fp16", "8bit", "4bit"]
        assert not plan.candidates[0].fits and not plan.candidates[1].fits


def test_fixed_precision_is_honoured() -> None:
    base = with_spec_changes(resolved(), "", precision="4bit")
    plan = make_plan(base, gpu_override="a100-80gb")
    assert plan.chosen_precision == "4bit"
    assert "set in the spec" in plan.decisions[0].reason


def test_fixed_fp16_on_a_bf16_gpu_is_a_candidate() -> None:
    base = with_spec_changes(resolved(), "", precision="fp16")
    plan = make_plan(base, gpu_override="a100-80gb")
    assert [c.precision for c in plan.candidates] == ["fp16", "8bit", "4bit"]
    assert plan.chosen_precision == "fp16"
    assert next(d for d in plan.decisions if d.knob == "compute_dtype").value == "fp16"


def test_fixed_bf16_planned_for_a_gpu_without_bf16() -> None:
    """``--gpu t4`` on a bf16 spec: a plan (exit 3) that says why and what to load instead."""
    base = with_spec_changes(resolved(), "", precision="bf16")
    plan = make_plan(base, gpu_override="t4")
    assert plan.chosen_precision is None and not plan.fits
    assert any("has no bfloat16" in w for w in plan.warnings)
    assert plan.suggestions[0].change == {"precision": "4bit"}


def test_fixed_precision_that_does_not_fit_suggests_one_that_does() -> None:
    base = with_spec_changes(resolved(), "", precision="bf16")
    plan = make_plan(base, vram_gib_override=12)
    assert plan.chosen_precision is None and not plan.fits
    first_fitting = next(c for c in plan.candidates if c.fits)
    assert first_fitting.precision in ("8bit", "4bit")
    assert plan.suggestions[0].change == {"precision": first_fitting.precision}
    assert plan.suggestions[0].peak_reserved_bytes == first_fitting.peak_reserved_bytes


def test_decision_reason_carries_the_numbers() -> None:
    plan = make_plan(resolved(), gpu_override="t4")
    reason = plan.decisions[0].reason
    fp16, eight_bit, four_bit = (
        f"{c.peak_reserved_bytes / 2**30:.1f} GiB" for c in plan.candidates
    )
    assert f"4bit peaks at {four_bit}" in reason
    assert f"fp16 would peak at {fp16}" in reason and f"8bit would peak at {eight_bit}" in reason


def test_nothing_fits_suggestions_are_ranked_and_numeric() -> None:
    base = resolved(TOO_BIG_SPEC)
    plan = make_plan(base)
    assert not plan.fits and plan.chosen_precision is None
    assert plan.suggestions, "nothing fits, so the plan must say what to change"
    fitting = [s for s in plan.suggestions if s.fits]
    assert fitting and plan.suggestions[0].fits
    for suggestion in plan.suggestions:
        assert suggestion.change and suggestion.peak_reserved_bytes is not None
    # Every numeric claim is re-checkable: apply the change, estimate again.
    for suggestion in fitting:
        overrides = {k: v for k, v in suggestion.change.items() if k.startswith("training.")}
        if overrides and len(overrides) == len(suggestion.change):
            again = estimate_candidate(base, "4bit", overrides)
            assert again.peak_reserved_bytes == suggestion.peak_reserved_bytes
            assert again.fits


def test_largest_fitting_max_length_is_the_boundary() -> None:
    base = resolved(TOO_BIG_SPEC)
    length = largest_fitting_max_length(base, "4bit")
    assert length is not None
    assert estimate_candidate(base, "4bit", {"training.max_length": length}).fits
    assert not estimate_candidate(base, "4bit", {"training.max_length": length + 1}).fits


def test_largest_fitting_batch_is_the_boundary() -> None:
    base = resolved()
    batch = largest_fitting_batch(base, "4bit", gpu=None)
    assert batch is not None and batch > 1
    key = "training.per_device_train_batch_size"
    assert estimate_candidate(base, "4bit", {key: batch}).fits
    assert not estimate_candidate(base, "4bit", {key: batch + 1}).fits


def test_grpo_peak_is_generation_when_the_generation_batch_is_large() -> None:
    """Generation holds a KV cache for batch x accumulation rows; training one micro-batch."""
    base = resolve(load_spec(REPO / "specs" / "qwen2.5-1.5b-grpo-lora.yaml"))
    small = estimate_candidate(base, "bf16")
    large = estimate_candidate(
        base,
        "bf16",
        {
            "training.per_device_train_batch_size": 1,
            "training.gradient_accumulation_steps": 64,
            "grpo.max_completion_length": 4096,
        },
    )
    assert small.phase == "train"
    assert large.phase == "generation"
    assert large.breakdown.gradient_bytes == 0  # set to None after each optimizer step


def test_largest_grpo_batch_keeps_whole_generation_groups() -> None:
    base = resolve(load_spec(REPO / "specs" / "qwen2.5-1.5b-grpo-lora.yaml"))
    spec = base.loaded.spec
    batch = largest_fitting_batch(base, "4bit")
    assert batch is not None
    generation_batch = batch * spec.training.gradient_accumulation_steps
    assert generation_batch % spec.grpo.num_generations == 0  # type: ignore[union-attr]
    assert estimate_candidate(base, "4bit", {"training.per_device_train_batch_size": batch}).fits


def test_gradient_checkpointing_suggestion_reports_its_saving() -> None:
    plan = make_plan(resolved(TOO_BIG_SPEC))
    by_key = {next(iter(s.change)): s for s in plan.suggestions}
    suggestion = by_key["training.gradient_checkpointing"]
    assert suggestion.detail.startswith("keeps one layer's activations")
    assert "saves " in suggestion.detail


def test_flash_attention_on_t4_warns() -> None:
    base = with_spec_changes(resolved(), "model", attn_implementation="flash_attention_2")
    plan = make_plan(base, gpu_override="t4")
    assert any("flash_attention_2 has no kernels" in w for w in plan.warnings)


def test_paged_optimizer_is_outside_torch_counters() -> None:
    base = with_spec_changes(resolved(), "training", optim="paged_adamw_8bit")
    plan = make_plan(base)
    chosen = plan.chosen
    assert chosen is not None and chosen.managed_bytes > 0
    # Only parameters of >= 1e5 elements are paged; smaller states stay on the device.
    unpaged = make_plan(with_spec_changes(resolved(), "training", optim="adamw_8bit")).chosen
    assert unpaged is not None and unpaged.precision == chosen.precision
    device = chosen.breakdown.optimizer_bytes
    assert 0 < device < chosen.managed_bytes
    assert device + chosen.managed_bytes == unpaged.breakdown.optimizer_bytes
    assert any("managed memory" in w for w in plan.warnings)


def test_dpo_and_grpo_cost_more_than_sft() -> None:
    """DPO runs chosen + rejected in one forward; GRPO rows are prompt + completion."""
    sft = estimate_candidate(resolved(), "4bit")
    spec = resolved().loaded.spec.model_dump()
    for method, extra in (("dpo", {}), ("grpo", {"grpo": {"reward_funcs": ["length"]}})):
        data = {**spec, "method": method, **extra}
        data["dataset"] = {
            **data["dataset"],
            "format": "preference" if method == "dpo" else "prompt",
        }
        data["training"] = {**data["training"], "packing": False}
        other = replace(
            resolved(), loaded=replace(resolved().loaded, spec=SPEC_ADAPTER.validate_python(data))
        )
        assert estimate_candidate(other, "4bit").peak_allocated_bytes > sft.peak_allocated_bytes


def test_cli_table_and_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(AUTO_SPEC), "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 41,943,040 || all params: 8,072,204,288 || trainable%: 0.5196" in out
    assert "4bit (chosen)" in out


def test_cli_nothing_fits_exits_3_with_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(TOO_BIG_SPEC)]) == 3
    out = capsys.readouterr().out
    assert "nothing fits" in out and "shorten max_length to" in out


def test_cli_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(AUTO_SPEC), "--json", "--vram-gib", "16"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "spec",
        "gpu",
        "budget_bytes",
        "trainable_parameters",
        "total_parameters",
        "chosen_precision",
        "fits",
        "candidates",
        "suggestions",
    ):
        assert key in data
    assert data["gpu"]["vram_bytes"] == 16 * 2**30
    assert data["budget_bytes"] == int(16 * 2**30 * 0.95)
    # 8-bit fits at the estimate (14.4 of 15.2 GiB) but not at the interval's upper end,
    # so auto takes 4-bit.
    eight = next(c for c in data["candidates"] if c["precision"] == "8bit")
    assert eight["fits"] and eight["tight"] and not eight["fits_high"]
    assert data["chosen_precision"] == "4bit" and not data["tight"]
    assert data["model_id"] == "meta-llama/Meta-Llama-3-8B"
    for candidate in data["candidates"]:
        assert candidate["peak_reserved_bytes_high"] > candidate["peak_reserved_bytes"]
        breakdown = candidate["breakdown"]
        parts = sum(v for k, v in breakdown.items() if k != "overhead_bytes")
        assert candidate["peak_allocated_bytes"] == parts
        assert candidate["peak_reserved_bytes"] == parts + breakdown["overhead_bytes"]
        assert candidate["fits"] == (candidate["peak_reserved_bytes"] <= data["budget_bytes"])


def test_cli_unknown_gpu_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(AUTO_SPEC), "--gpu", "rtx-4009"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_plan_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from peftgen.cli import main\n"
        f"rc = main(['plan', {str(AUTO_SPEC)!r}, '--json'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes') "
        "if m in sys.modules]\n"
        "assert rc == 0, rc\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"] == "llama3-8b-sft-auto"


def test_cli_table_shows_loading_peak_and_host_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 13: both phases and the host in the table, the numbers of ``plan --json``."""
    spec = str(REPO / "specs" / "llama3-70b-qlora-fsdp-2x24gb.yaml")
    assert main(["plan", spec, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert main(["plan", spec]) == 0
    lines = capsys.readouterr().out.splitlines()

    def cells(label: str) -> list[str]:
        row = next(line for line in lines if line.strip("│ ").startswith(label))
        return [cell.strip() for cell in row.strip("│ ").split("│")][1:]

    assert cells("loading peak") == [
        f"{c['load_peak_bytes'] / 2**30:.2f}" for c in data["candidates"]
    ]
    assert cells("host RAM / node") == [
        f"{c['host_memory_bytes'] / 2**30:.2f}" for c in data["candidates"]
    ]
