"""``peftgen calibrate``: receipts in, predicted vs measured and error statistics out.

Receipts here are written in the shape the generated script writes (``tests/test_receipts.py``
proves that shape on a real CPU run); the numbers are chosen so each error is known.
The harness test runs ``benchmarks/calibration/run.py --dry`` end to end on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftgen.calibrate import calibrate_receipts
from peftgen.cli import main as peftgen_main
from peftgen.errors import UserError

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def _receipt(
    predicted_allocated: int,
    measured_allocated: int | None,
    predicted_reserved: int,
    measured_reserved: int | None,
    name: str = "run",
) -> dict[str, Any]:
    """A receipt as the generated script writes it, with these four numbers."""
    cuda = measured_allocated is not None
    return {
        "receipt_version": 1,
        "spec_name": name,
        "spec_sha256": "0" * 64,
        "stage": "end",
        "optimizer_steps": 10,
        "smoke_steps": 0,
        "world_size": 1,
        "device": {
            "type": "cuda" if cuda else "cpu",
            "name": "NVIDIA H200" if cuda else "cpu",
            "total_memory_bytes": 150_000_000_000 if cuda else None,
        },
        "measured": {
            "max_memory_allocated_bytes": measured_allocated,
            "max_memory_reserved_bytes": measured_reserved,
        },
        "predicted": {
            "gpu": "NVIDIA H200",
            "gpu_memory_bytes": 150_000_000_000,
            "precision": "bf16",
            "peak_allocated_bytes": predicted_allocated,
            "torch_reserved_bytes": predicted_reserved,
            "peak_reserved_bytes": predicted_reserved + GIB // 2,
            "breakdown_bytes": {"weights_bytes": predicted_allocated},
        },
        "versions": {"torch": "2.13.0"},
    }


def _write(folder: Path, name: str, receipt: object) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(receipt), encoding="utf-8")
    return path


@pytest.fixture
def receipts(tmp_path: Path) -> list[Path]:
    return [
        # allocated +10 %, reserved -20 %
        _write(tmp_path, "a", _receipt(11 * GIB, 10 * GIB, 16 * GIB, 20 * GIB, "a")),
        # allocated -5 %, reserved +4 %
        _write(tmp_path, "b", _receipt(19 * GIB, 20 * GIB, 26 * GIB, 25 * GIB, "b")),
        # allocated +2 %, reserved +1 %
        _write(tmp_path, "c", _receipt(51 * GIB, 50 * GIB, 101 * GIB, 100 * GIB, "c")),
        # written on a laptop: listed, left out of the statistics
        _write(tmp_path, "cpu", _receipt(3 * GIB, None, 4 * GIB, None, "cpu")),
    ]


def test_errors_and_statistics(receipts: list[Path]) -> None:
    result = calibrate_receipts(receipts)
    errors = [
        (row.error_percent("allocated"), row.error_percent("reserved")) for row in result.rows
    ]
    assert errors[0] == pytest.approx((10.0, -20.0))
    assert errors[1] == pytest.approx((-5.0, 4.0))
    assert errors[2] == pytest.approx((2.0, 1.0))
    assert errors[3] == (None, None)
    allocated = result.statistics["allocated"]
    reserved = result.statistics["reserved"]
    assert allocated is not None and reserved is not None
    assert allocated.count == reserved.count == 3
    assert allocated.median_abs_percent == pytest.approx(5.0)
    assert allocated.max_abs_percent == pytest.approx(10.0)
    assert allocated.median_percent == pytest.approx(2.0)
    assert reserved.median_abs_percent == pytest.approx(4.0)
    assert reserved.max_abs_percent == pytest.approx(20.0)
    assert result.unmeasured_files == [str(receipts[3])]


def test_cli_table(receipts: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert peftgen_main(["calibrate", *map(str, receipts)]) == 0
    out = capsys.readouterr().out
    assert "+10.0%" in out and "-20.0%" in out
    assert "allocated: median |error| 5.0%, max |error| 10.0%" in out
    assert "reserved: median |error| 4.0%, max |error| 20.0%" in out
    assert "left out of the statistics" in out and "cpu.json" in out


def test_receipt_strings_reach_the_terminal_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crafted receipt's spec name holds a terminal escape (clear the screen, retitle):
    the table shows it as text, never sends the control bytes."""
    hostile = "run\x1b[2J\x1b]0;owned\x07[red]x"
    receipt = _receipt(11 * GIB, 10 * GIB, 16 * GIB, 20 * GIB, hostile)
    assert peftgen_main(["calibrate", str(_write(tmp_path, "r", receipt))]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "run\\x1b[2J" in out and "[red]x" in out


def test_cli_json(receipts: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert peftgen_main(["calibrate", *map(str, receipts), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["spec_name"] for row in data["receipts"]] == ["a", "b", "c", "cpu"]
    assert data["receipts"][0]["reserved"] == {
        "predicted_bytes": 16 * GIB,
        "measured_bytes": 20 * GIB,
        "error_percent": pytest.approx(-20.0),
    }
    assert data["statistics"]["allocated"]["max_abs_percent"] == pytest.approx(10.0)
    assert data["excluded_without_cuda"] == [str(receipts[3])]


def test_only_cpu_receipts_give_no_statistics(
    receipts: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert peftgen_main(["calibrate", str(receipts[3])]) == 0
    assert "allocated: no receipt measured on a GPU; no statistics" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"receipt_version": 1}), "spec_name: missing"),
        (json.dumps({**_receipt(1, 1, 1, 1), "receipt_version": 9}), "version 9 is not supported"),
        (
            json.dumps({**_receipt(1, 1, 1, 1), "measured": {"max_memory_allocated_bytes": "1"}}),
            "measured.max_memory_allocated_bytes: has the wrong type (str)",
        ),
        (
            json.dumps(_receipt(1, 0, 1, 1)),
            "measured.max_memory_allocated_bytes: must be a positive byte count (at most 2**60) "
            "or null; got 0",
        ),
    ],
)
def test_bad_receipts_are_user_errors_naming_the_file(
    tmp_path: Path, content: str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "receipt.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as raised:
        calibrate_receipts([path])
    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)
    assert peftgen_main(["calibrate", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_every_bad_file_is_reported_at_once(tmp_path: Path, receipts: list[Path]) -> None:
    with pytest.raises(UserError) as raised:
        calibrate_receipts([tmp_path / "x.json", receipts[0], tmp_path / "y.json"])
    assert [problem.file for problem in raised.value.problems] == [
        str(tmp_path / "x.json"),
        str(tmp_path / "y.json"),
    ]


def test_calibrate_does_not_import_torch(receipts: list[Path]) -> None:
    code = (
        "import sys\nfrom peftgen.cli import main\n"
        f"assert main(['calibrate', *{[str(p) for p in receipts]!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'calibrate imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_harness_dry(tmp_path: Path) -> None:
    """The harness end to end on the CPU: tiny model, three configs, two steps each."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "calibration" / "run.py"),
            "--dry",
            "--work",
            str(tmp_path / "work"),
            "--results-root",
            str(tmp_path / "results"),
            "--name",
            "dry",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = tmp_path / "results" / "dry"
    manifest = json.loads((results / "manifest.json").read_text(encoding="utf-8"))
    names = [run["name"] for run in manifest["runs"]]
    assert names == [
        "tiny-llama-sft-bf16-64-gc",
        "tiny-llama-sft-4bit-64-nogc",
        "tiny-llama-dpo-bf16-64-gc",
    ]
    assert all(run["returncode"] == 0 for run in manifest["runs"])
    for name in names:
        receipt = json.loads((results / f"{name}.json").read_text(encoding="utf-8"))
        assert receipt["spec_name"] == name
        assert receipt["optimizer_steps"] == 2
        assert receipt["predicted"]["gpu"] == "NVIDIA H200"
        # bitsandbytes is recorded only where the script uses it (4-bit loading).
        assert ("bitsandbytes" in receipt["versions"]) == ("4bit" in name)
    calibration = json.loads((results / "calibration.json").read_text(encoding="utf-8"))
    assert len(calibration["receipts"]) == 3
    assert len(calibration["excluded_without_cuda"]) == 3  # a CPU run measures nothing
    assert "memory receipts: predicted vs measured" in (results / "table.txt").read_text()


# --- Step time (receipt version 2) --------------------------------------------------------


def _timed(
    predicted: float | None, measured: float | None, cuda: bool = True, name: str = "t"
) -> dict[str, Any]:
    """A version-2 receipt: version 1 plus the plan's step seconds and the measured mean."""
    receipt = _receipt(10 * GIB, 10 * GIB if cuda else None, 12 * GIB, 12 * GIB if cuda else None)
    receipt["receipt_version"] = 2
    receipt["spec_name"] = name
    receipt["measured"] |= {"step_seconds": measured, "timed_steps": 9}
    receipt["predicted"] |= {
        "step_seconds": predicted,
        "step_seconds_low": None if predicted is None else predicted * 0.88,
        "step_seconds_high": None if predicted is None else predicted * 1.16,
    }
    return receipt


def test_step_seconds_compared_with_the_prediction(tmp_path: Path) -> None:
    paths = [
        _write(tmp_path, "fast", _timed(2.0, 2.5, name="fast")),  # -20 %, outside the range
        _write(tmp_path, "near", _timed(4.2, 4.0, name="near")),  # +5 %, inside
        _write(tmp_path, "laptop", _timed(4.0, 30.0, cuda=False, name="laptop")),  # CPU: left out
        _write(tmp_path, "old", _receipt(GIB, GIB, GIB, GIB, "old")),  # version 1: no step time
    ]
    result = calibrate_receipts(paths)
    by_name = {row.spec_name: row for row in result.rows}
    assert by_name["fast"].error_percent("step_seconds") == pytest.approx(-20.0)
    assert by_name["fast"].within_step_range() is False
    assert by_name["near"].within_step_range() is True
    assert by_name["laptop"].error_percent("step_seconds") is None
    assert by_name["old"].predicted_step_seconds is None
    stats = result.statistics["step_seconds"]
    assert stats is not None
    assert (stats.count, stats.max_abs_percent) == (2, pytest.approx(20.0))
    assert stats.median_abs_percent == pytest.approx(12.5)
    data = result.to_json()
    step = data["receipts"][0]["step_seconds"]
    assert step["predicted"] == 2.0 and step["measured"] == 2.5
    assert step["within_range"] is False


def test_step_seconds_in_the_table_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "one", _timed(3.0, 3.0))
    assert peftgen_main(["calibrate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step err" in out
    assert "step_seconds: median |error| 0.0%" in out and "1 of 1 inside" in out


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, 1e12, "3 s", True])
def test_bad_step_seconds_are_user_errors(tmp_path: Path, bad: object) -> None:
    receipt = _timed(3.0, 3.0)
    receipt["measured"]["step_seconds"] = bad
    path = tmp_path / "bad.json"
    # NaN as JSON's NaN literal, which Python's json writes and reads back.
    path.write_text(json.dumps(receipt), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        calibrate_receipts([path])
    assert caught.value.problems[0].field_path == "measured.step_seconds"


def test_receipt_version_2_without_step_fields_still_reads(tmp_path: Path) -> None:
    receipt = _receipt(GIB, GIB, GIB, GIB)
    receipt["receipt_version"] = 2
    row = calibrate_receipts([_write(tmp_path, "bare", receipt)]).rows[0]
    assert row.measured_step_seconds is None and row.predicted_step_seconds is None


def _with_breakdown(receipt: dict[str, Any], device: str, **parts: int) -> dict[str, Any]:
    receipt["device"]["name"] = device
    receipt["predicted"]["breakdown_bytes"] = {
        key: parts.get(key, 0)
        for key in (
            "weights_bytes",
            "adapter_bytes",
            "gradient_bytes",
            "optimizer_bytes",
            "activation_bytes",
            "logits_bytes",
            "overhead_bytes",
        )
    }
    return receipt


def test_allocator_constants_and_what_receipts_imply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per architecture, the fragmentation a receipt implies: reserved - allocated, less
    torch's default cuBLAS + cuBLASLt workspaces (32 MiB + 1 MiB on compute capability 9.0,
    8 MiB + 128 KiB + 1 MiB elsewhere) and 1 % of the long-lived bytes, over the short-lived
    bytes."""
    mib = 2**20
    hopper = _with_breakdown(
        _receipt(10 * GIB, 10 * GIB, 11 * GIB, 11 * GIB, "h200"),
        "NVIDIA H200",
        weights_bytes=8 * GIB,
        activation_bytes=2 * GIB,
    )
    ampere = _with_breakdown(
        _receipt(10 * GIB, 10 * GIB, 11 * GIB, 10 * GIB + 512 * mib, "a100"),
        "NVIDIA A100-SXM4-80GB",
        weights_bytes=6 * GIB,
        optimizer_bytes=2 * GIB,
        activation_bytes=GIB,
        logits_bytes=GIB,
    )
    paths = [_write(tmp_path, "h200", hopper), _write(tmp_path, "a100", ampere)]
    implied = calibrate_receipts(paths).to_json()["allocator"]
    fragmentation = implied["transient_fragmentation_fraction"]
    assert fragmentation["basis"] == "assumption"
    hopper_free = GIB - 33 * mib - int(0.01 * 8 * GIB)
    ampere_free = 512 * mib - (8 * mib + 128 * 1024 + mib) - int(0.01 * 8 * GIB)
    assert fragmentation["receipts_imply"]["9.0"]["median"] == pytest.approx(
        hopper_free / (2 * GIB)
    )
    assert fragmentation["receipts_imply"]["8.0"]["median"] == pytest.approx(
        ampere_free / (2 * GIB)
    )
    assert implied["cublas_workspace_bytes"]["by_architecture"] == {
        "8.0": 8 * mib + 128 * 1024 + mib,
        "9.0": 33 * mib,
    }
    assert implied["cuda_context_bytes"]["basis"] == "assumption"
    assert peftgen_main(["calibrate", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "CUDA context 512 MiB: an assumption" in out
    assert f"receipts on compute capability 9.0 imply {hopper_free / (2 * GIB):.1%}" in out
    assert f"receipts on compute capability 8.0 imply {ampere_free / (2 * GIB):.1%}" in out


def test_a_receipt_without_a_breakdown_implies_nothing(receipts: list[Path]) -> None:
    implied = calibrate_receipts(receipts).to_json()["allocator"]
    assert implied["transient_fragmentation_fraction"]["receipts_imply"] == {}


def test_receipts_imply_an_efficiency_factor(tmp_path: Path) -> None:
    """Measured 25 % slower than predicted: the factor the receipts imply is 0.8x the
    calibrated one (every term of a step is divided by it)."""
    from peftgen.throughput import EFFICIENCY

    path = _write(tmp_path, "slow", _timed(2.0, 2.5))
    result = calibrate_receipts([path])
    implied = result.implied_efficiency()
    assert implied == {
        "16bit": {
            "median": pytest.approx(0.8 * EFFICIENCY["16bit"]),
            "count": 1,
            "calibrated": EFFICIENCY["16bit"],
        }
    }
    assert result.to_json()["implied_efficiency"]["16bit"]["count"] == 1
