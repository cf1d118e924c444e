"""The generated script's memory receipt and smoke mode, run on the CPU with a tiny Llama.

Without CUDA the script still writes ``memory_receipt.json`` (device cpu, measurements
null) with the plan's predictions embedded at emit time: that is the path CI can prove.
The smoke mode (``PEFTGEN_SMOKE_STEPS=N``) must train on the longest rows: the data here
has two long rows among short ones, and the tokens the trainer logs show which it saw.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from warm_python import SCRIPT_ENV, run_python

from peftgen.cli import main as peftgen_main
from peftgen.load import load_spec
from peftgen.plan import make_plan
from peftgen.resolve import resolve
from peftgen.stack import RECEIPT_VERSION

MAX_LENGTH = 64
BATCH = 2
SHORT_ROWS = 14
RECEIPT_KEYS = {
    "receipt_version",
    "spec_name",
    "spec_sha256",
    "stage",
    "optimizer_steps",
    "smoke_steps",
    "world_size",
    "device",
    "measured",
    "predicted",
    "versions",
}


def _write_data(path: Path) -> None:
    """Short rows of a few tokens, and two rows far longer than MAX_LENGTH tokens."""
    rows = [{"text": f"Blood pressure {120 + i}/80 mmHg."} for i in range(SHORT_ROWS)]
    long_text = " ".join(["The patient is a 64-year-old man with type 2 diabetes."] * 40)
    rows[3] = {"text": long_text}
    rows[9] = {"text": long_text + " Afebrile."}
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _emit(tmp_path: Path, model_dir: Path, max_steps: int) -> Path:
    data = tmp_path / "notes.jsonl"
    _write_data(data)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: tiny-receipt
            method: sft
            model:
              id: {model_dir.as_posix()}
            dataset:
              path: {data.as_posix()}
              format: text
            hardware:
              vram_gib: 4
            precision: bf16
            lora:
              r: 4
              lora_alpha: 8
            training:
              max_length: {MAX_LENGTH}
              per_device_train_batch_size: {BATCH}
              gradient_accumulation_steps: 1
              max_steps: {max_steps}
              gradient_checkpointing: false
              logging_steps: 1
              save_strategy: "no"
            output_dir: {(tmp_path / "adapter").as_posix()}
            """
        ),
        encoding="utf-8",
    )
    assert peftgen_main(["emit", str(spec), "-o", str(tmp_path / "emitted")]) == 0
    return spec


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # A smoke setting in the caller's environment must not leak into a full run.
    environment = {key: value for key, value in os.environ.items() if key != "PEFTGEN_SMOKE_STEPS"}
    environment.update(SCRIPT_ENV, **env)
    return run_python(tmp_path / "emitted" / "train.py", cwd=tmp_path, env=environment)


def _logged_tokens(stdout: str) -> list[int]:
    """The trainer's cumulative ``num_tokens`` per logged step."""
    return [int(count) for count in re.findall(r"'num_tokens': '(\d+)'", stdout)]


@pytest.mark.slow
def test_cpu_run_writes_receipt_with_the_plan_embedded(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _emit(tmp_path, tiny_model_dir, max_steps=4)
    run = _run(tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]

    # After 3 optimizer steps, and again at the end.
    lines = [line for line in run.stdout.splitlines() if line.startswith("memory receipt")]
    assert [line.split(":")[0] for line in lines] == [
        "memory receipt (early, step 3)",
        "memory receipt (end, step 4)",
    ]
    assert "no CUDA, not measured (plan " in lines[-1]
    receipt_path = tmp_path / "adapter" / "memory_receipt.json"
    assert lines[-1].endswith(f"-> {receipt_path.as_posix()}")
    assert not receipt_path.with_name("receipt.tmp").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    receipt = json.loads(receipt_path.read_text(encoding="utf-8"))
    assert set(receipt) == RECEIPT_KEYS
    assert receipt["stage"] == "end"
    assert receipt["optimizer_steps"] == 4
    assert receipt["smoke_steps"] == 0
    assert receipt["device"] == {"type": "cpu", "name": "cpu", "total_memory_bytes": None}
    measured = receipt["measured"]
    assert receipt["receipt_version"] == RECEIPT_VERSION
    assert (measured["max_memory_allocated_bytes"], measured["max_memory_reserved_bytes"]) == (
        None,
        None,
    )
    # Seconds per optimizer step: the mean over the steps after the first (warm-up).
    assert measured["timed_steps"] == 3
    assert 0 < measured["step_seconds"] < 60
    assert set(receipt["versions"]) == {
        "torch",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "accelerate",
    }  # bf16 with adamw: no bitsandbytes

    loaded = load_spec(spec)
    plan = make_plan(resolve(loaded))
    assert plan.chosen is not None
    assert receipt["spec_name"] == "tiny-receipt"
    assert receipt["spec_sha256"] == loaded.sha256
    predicted = receipt["predicted"]
    assert predicted["gpu"] == plan.gpu.name
    assert predicted["gpu_memory_bytes"] == plan.gpu.vram_bytes
    assert predicted["precision"] == plan.chosen.precision
    assert predicted["peak_allocated_bytes"] == plan.chosen.peak_allocated_bytes
    assert predicted["torch_reserved_bytes"] == plan.chosen.torch_reserved_bytes
    assert predicted["peak_reserved_bytes"] == plan.chosen.peak_reserved_bytes
    breakdown = plan.chosen.breakdown
    assert predicted["breakdown_bytes"]["activation_bytes"] == breakdown.activation_bytes
    assert sum(predicted["breakdown_bytes"].values()) == breakdown.reserved_bytes
    # A vram_gib-only GPU has no datasheet peak: no step time is predicted.
    assert plan.chosen.time is None and predicted["step_seconds"] is None

    # What the user does next: calibrate lists it, without statistics.
    assert peftgen_main(["calibrate", str(receipt_path), "--json"]) == 0


@pytest.mark.slow
def test_smoke_mode_trains_the_longest_rows_and_saves_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    _emit(tmp_path, tiny_model_dir, max_steps=50)
    run = _run(tmp_path, PEFTGEN_SMOKE_STEPS="1")
    assert run.returncode == 0, run.stderr[-4000:]
    assert (
        "smoke test passed: 1 steps on the longest rows; no checkpoint or adapter saved"
        in run.stdout
    )
    # One step of the two long rows, each truncated to MAX_LENGTH: a full batch of tokens.
    # Any short row in the batch would log far fewer.
    assert _logged_tokens(run.stdout) == [BATCH * MAX_LENGTH]
    adapter = tmp_path / "adapter"
    assert not (adapter / "adapter_model.safetensors").exists()
    receipt = json.loads((adapter / "memory_receipt.json").read_text(encoding="utf-8"))
    assert (receipt["stage"], receipt["optimizer_steps"], receipt["smoke_steps"]) == ("end", 1, 1)
