"""Agreement of the analytic estimator with the fake-tensor simulation, case by case.

For each catalogue model x load precision {bf16, 8bit, 4bit} x max_length {512, 2048, 8192}
x gradient checkpointing {on, off} (SFT unless ``--methods``, micro-batch 1, gradient
accumulation 8, LoRA r=16 on all linear layers, adamw_torch; GRPO: 8 generations of 256),
it computes ``peak_allocated_bytes`` both ways and prints one row per case
plus the share of cases where the two agree within 5 %. The simulation is the reference
here only in the sense that it runs the real code; where they disagree, the per-term
columns say which term differs, and the benchmark notes in ``docs/simulate.md`` say which
side was wrong and why.

The whole catalogue takes long (every case runs one step): ``--models`` / ``--limit`` pick
a subset, ``--lengths`` / ``--precisions`` narrow the grid, ``--json`` writes the rows.

    python benchmarks/simulate_vs_analytic.py --models SmolLM2-135M Llama-3.2-1B
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftgen.catalog import ModelArch, find_gpu, find_model, model_catalogue
from peftgen.load import LoadedSpec
from peftgen.plan import estimate_candidate
from peftgen.resolve import Resolved
from peftgen.simulate import simulate_candidate
from peftgen.spec import SPEC_ADAPTER

PRECISIONS = ("bf16", "8bit", "4bit")
LENGTHS = (512, 2048, 8192)
TOLERANCE = 0.05
GPU = "H200"
"""A GPU large enough that fit never matters: only the byte counts are compared."""
GIB = 2**30


@dataclass(frozen=True)
class Row:
    model: str
    precision: str
    max_length: int
    gradient_checkpointing: bool
    analytic_bytes: int
    simulated_bytes: int
    analytic_terms: dict[str, int]
    simulated_terms: dict[str, int]
    seconds: float

    @property
    def relative_error(self) -> float:
        """(analytic - simulated) / simulated: positive when the formula predicts more."""
        return (self.analytic_bytes - self.simulated_bytes) / self.simulated_bytes

    @property
    def agrees(self) -> bool:
        return abs(self.relative_error) <= TOLERANCE


FORMAT_BY_METHOD = {"sft": "messages", "dpo": "preference", "grpo": "prompt"}


def resolved_case(
    arch: ModelArch, max_length: int, gradient_checkpointing: bool, method: str = "sft"
) -> Resolved:
    """A minimal spec for ``arch``, validated by the real spec model."""
    raw: dict[str, Any] = {
        "name": "simulate-vs-analytic",
        "method": method,
        "model": {"id": arch.id},
        "dataset": {"path": "data.jsonl", "format": FORMAT_BY_METHOD[method]},
        "hardware": {"gpu": GPU},
        "lora": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear"},
        "training": {
            "max_length": max_length,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 8,
            "gradient_checkpointing": gradient_checkpointing,
            "optim": "adamw_torch",
        },
    }
    if method == "grpo":
        raw["grpo"] = {
            "num_generations": 8,
            "max_completion_length": 256,
            "reward_funcs": ["length"],
        }
    spec = SPEC_ADAPTER.validate_python(raw)
    text = json.dumps(raw, sort_keys=True)
    loaded = LoadedSpec(
        spec=spec,
        path=Path("<benchmark>"),
        text=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
    gpu = find_gpu(GPU)
    assert gpu is not None, f"{GPU} is not in the GPU catalogue"
    return Resolved(loaded, arch, gpu)


def run_case(
    arch: ModelArch, precision: str, max_length: int, checkpointing: bool, method: str = "sft"
) -> Row:
    resolved = resolved_case(arch, max_length, checkpointing, method)
    analytic = estimate_candidate(resolved, precision)  # type: ignore[arg-type]
    simulated = simulate_candidate(resolved, precision)
    analytic_terms = {
        key: value
        for key, value in vars(analytic.breakdown).items()
        if key != "overhead_bytes" and isinstance(value, int)
    }
    simulated_terms = {k: v for k, v in simulated.breakdown.items() if k != "overhead_bytes"}
    return Row(
        model=arch.id if method == "sft" else f"{arch.id} {method}",
        precision=precision,
        max_length=max_length,
        gradient_checkpointing=checkpointing,
        analytic_bytes=analytic.peak_allocated_bytes,
        simulated_bytes=simulated.peak_allocated_bytes,
        analytic_terms=analytic_terms,
        simulated_terms=simulated_terms,
        seconds=simulated.seconds,
    )


def _gib(value: int) -> str:
    return f"{value / GIB:7.2f}"


TERM_COLUMNS = ("weights_bytes", "activation_bytes", "logits_bytes")


def format_row(row: Row) -> str:
    terms = "  ".join(
        f"{key.removesuffix('_bytes')[:5]} {_gib(row.analytic_terms.get(key, 0))}"
        f"/{_gib(row.simulated_terms.get(key, 0)).strip()}"
        for key in TERM_COLUMNS
    )
    return (
        f"{row.model[:34]:34} {row.precision:5} {row.max_length:5} "
        f"{'gc' if row.gradient_checkpointing else '--':2} "
        f"{_gib(row.analytic_bytes)} {_gib(row.simulated_bytes)} "
        f"{row.relative_error * 100:+7.1f}% {'ok' if row.agrees else '!!':2} "
        f"{row.seconds:5.1f}s  {terms}"
    )


HEADER = (
    f"{'model':34} {'prec':5} {'len':>5} gc {'analytic':>7} {'simul.':>7} "
    f"{'diff':>8}    {'sim s':>6}  per term (GiB, analytic/simulated)"
)


def selected_models(names: list[str] | None, limit: int | None) -> list[ModelArch]:
    if names:
        models = []
        for name in names:
            arch = find_model(name)
            if arch is None:
                raise SystemExit(f"unknown model {name!r}")
            models.append(arch)
    else:
        models = list(model_catalogue())
    return models[:limit] if limit else models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="catalogue ids or aliases (default: all)")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--methods", nargs="+", default=["sft"], choices=list(FORMAT_BY_METHOD))
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    print(HEADER)
    for arch in selected_models(args.models, args.limit):
        grid = itertools.product(args.methods, args.precisions, args.lengths, (True, False))
        for method, precision, max_length, checkpointing in grid:
            row = run_case(arch, precision, max_length, checkpointing, method)
            rows.append(row)
            print(format_row(row), flush=True)
    within = sum(row.agrees for row in rows)
    share = within / len(rows) if rows else 0.0
    print(f"\n{within}/{len(rows)} cases within {TOLERANCE:.0%}: {share:.1%}")
    if args.json:
        payload: list[dict[str, Any]] = [
            {**vars(row), "relative_error": row.relative_error} for row in rows
        ]
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
