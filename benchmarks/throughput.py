"""Predicted vs measured training throughput (``benchmarks/throughput_rows.py``).

    python benchmarks/throughput.py            # the table; median / max |error| on held-back rows
    python benchmarks/throughput.py --derive   # the efficiency factors and the range the rows give

The efficiency factor of a path is the median, over its calibration rows, of ``ideal /
measured`` seconds per token, where ideal is the model's time at 100 % of the datasheet
peak (compute and bandwidth terms alike); ``peftgen.throughput.EFFICIENCY`` holds the
result, and a test checks that it matches this derivation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_rows import BENCHMARK_GPUS, ROWS, ThroughputRow

from peftgen import throughput
from peftgen.catalog import Gpu, find_gpu, find_model
from peftgen.memory import EstimateInput


def row_gpu(row: ThroughputRow) -> Gpu:
    gpu = BENCHMARK_GPUS.get(row.gpu) or find_gpu(row.gpu)
    if gpu is None:
        raise SystemExit(f"row {row.row}: unknown GPU {row.gpu}")
    return gpu


def row_input(row: ThroughputRow) -> EstimateInput:
    arch = find_model(row.model)
    if arch is None:
        raise SystemExit(f"row {row.row}: unknown model {row.model}")
    return EstimateInput(
        arch=arch,
        precision=row.precision,  # type: ignore[arg-type]
        compute_dtype=row.compute_dtype,  # type: ignore[arg-type]
        lora_r=row.lora_r,
        target_modules=row.target_modules,
        micro_batch=row.micro_batch,
        max_length=row.max_length,
        gradient_checkpointing=row.gradient_checkpointing,
        attn_implementation=row.attn_implementation,  # type: ignore[arg-type]
        lora_dropout=0.0,
        finetuning=row.finetuning,  # type: ignore[arg-type]
    )


def ideal_seconds_per_token(row: ThroughputRow) -> float:
    """The model's seconds per token at 100 % efficiency on every term."""
    inputs = row_input(row)
    terms = throughput.step_seconds_per_term(inputs, row_gpu(row))
    assert terms is not None
    efficiency = throughput.EFFICIENCY[throughput.path_of(inputs)]
    return sum(terms.values()) * efficiency / throughput.tokens_per_optimizer_step(inputs)


def derived_efficiency() -> dict[str, float]:
    """Median ``ideal / measured`` per path over the calibration rows (3 decimals); 8bit
    has no row and takes the 4bit factor (an assumption, said in EFFICIENCY's docstring)."""
    by_path: dict[str, list[float]] = {}
    for row in ROWS:
        if row.calibration:
            path = throughput.path_of(row_input(row))
            ratio = ideal_seconds_per_token(row) * row.measured_tokens_per_second
            by_path.setdefault(path, []).append(ratio)
    factors = {path: round(statistics.median(values), 3) for path, values in by_path.items()}
    factors.setdefault("8bit", factors["4bit"])
    return factors


@dataclass(frozen=True)
class Compared:
    row: ThroughputRow
    predicted: float
    bound: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted - self.row.measured_tokens_per_second) / (
            self.row.measured_tokens_per_second
        )


def compare(row: ThroughputRow) -> Compared:
    inputs = row_input(row)
    gpu = row_gpu(row)
    estimate = throughput.estimate_time(inputs, gpu)
    assert estimate is not None
    bound = estimate.peak_tflops * 1e12 / estimate.flops_per_token
    return Compared(row, estimate.tokens_per_second, bound)


def derived_range(rows: list[Compared]) -> tuple[float, float]:
    """measured / predicted over the rows of the generated script's stack (``hf``): min
    rounded down, max rounded up (0.01)."""
    ratios = [c.row.measured_tokens_per_second / c.predicted for c in rows if c.row.stack == "hf"]
    return math.floor(min(ratios) * 100) / 100, math.ceil(max(ratios) * 100) / 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--derive", action="store_true", help="print the calibrated constants")
    args = parser.parse_args(argv)
    rows = [compare(row) for row in ROWS]
    if args.derive:
        print(f"EFFICIENCY = {derived_efficiency()}")
        low, high = derived_range(rows)
        print(f"RATIO_LOW = {low}\nRATIO_HIGH = {high}")
        return 0
    print("| row | GPU | model | load | mbs x len | measured tok/s | predicted | error | use |")
    print("|---|---|---|---|---|---:|---:|---:|---|")
    for c in rows:
        r = c.row
        print(
            f"| {r.row} | {r.gpu} | {r.model.split('/')[-1]} | "
            f"{r.precision}{' full' if r.finetuning == 'full' else ''} | "
            f"{r.micro_batch} x {r.max_length} | {r.measured_tokens_per_second:,.0f} | "
            f"{c.predicted:,.0f} | {c.error:+.1%} | "
            f"{'calibration' if r.calibration else 'held back'} ({r.stack}) |"
        )
    held = [abs(c.error) for c in rows if not c.row.calibration]
    held_hf = [abs(c.error) for c in rows if not c.row.calibration and c.row.stack == "hf"]
    print(
        f"\n{len(rows)} rows ({len(rows) - len(held)} calibration, {len(held)} held back); "
        f"held-back rows: median |error| {statistics.median(held):.1%}, max |error| "
        f"{max(held):.1%}; of them HF + peft ({len(held_hf)}): median "
        f"{statistics.median(held_hf):.1%}, max {max(held_hf):.1%}"
    )
    low, high = derived_range(rows)
    print(f"range: measured / predicted {low:.2f} to {high:.2f} over the HF + peft rows")
    for source in dict.fromkeys(c.row.source for c in rows):
        print(f"source: {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
