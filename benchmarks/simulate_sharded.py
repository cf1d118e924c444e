"""Sharded simulation vs the analytic per-GPU figure (issue 13).

For Llama-3-8B and Llama-3-70B, LoRA (bf16) and QLoRA (4-bit NF4 + double quantization,
bf16 storage), on 2 / 4 / 8 GPUs with FSDP: one step as rank 0 on a fake process group
(``peftgen.simulate_sharded``), compared with ``peftgen.memory.estimate`` for the same
engine (FSDP2, no offload). The spec is the 70B example's (r 16 all-linear, max_length
2048, micro-batch 1, gradient checkpointing, packing).

    python benchmarks/simulate_sharded.py                 # the full table (slow: minutes)
    python benchmarks/simulate_sharded.py --models llama3-8b --gpus 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from peftgen.load import load_spec
from peftgen.resolve import resolve
from peftgen.simulate_sharded import ShardedSimulation, simulate_sharded

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "specs" / "llama3-70b-qlora-fsdp-2x24gb.yaml"
MODELS = {
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B-Instruct",
}
GIB = 2**30


def sharded_spec(folder: Path, model: str, precision: str, gpus: int) -> Path:
    """The 70B example with another model, precision and GPU count, without offload."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("meta-llama/Meta-Llama-3-70B-Instruct", MODELS[model])
    text = text.replace("num_gpus: 2", f"num_gpus: {gpus}")
    text = text.replace("cpu_offload: true", "cpu_offload: false")
    text = text.replace("precision: 4bit", f"precision: {precision}")
    text = text.replace("path: data/", f"path: {(REPO / 'specs' / 'data').as_posix()}/")
    path = folder / f"{model}-{precision}-{gpus}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def run(model: str, precision: str, gpus: int) -> ShardedSimulation:
    with tempfile.TemporaryDirectory() as folder:
        resolved = resolve(load_spec(sharded_spec(Path(folder), model, precision, gpus)))
        return simulate_sharded(resolved, precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "4bit"])
    parser.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8])
    args = parser.parse_args()
    print("| model | precision | GPUs | simulated GiB | analytic GiB | analytic vs simulated |")
    print("|---|---|---:|---:|---:|---:|")
    errors = []
    for model in args.models:
        for precision in args.precisions:
            for gpus in args.gpus:
                result = run(model, precision, gpus)
                errors.append(abs(result.error))
                simulated = result.peak_allocated_bytes / GIB
                analytic = result.analytic_allocated_bytes / GIB
                print(
                    f"| {model} | {precision} | {gpus} | {simulated:.2f} | {analytic:.2f} "
                    f"| {100 * result.error:+.1f} % |",
                    flush=True,
                )
    print(
        f"\n{len(errors)} cases: median |error| {100 * statistics.median(errors):.1f} %, "
        f"max {100 * max(errors):.1f} %"
    )


if __name__ == "__main__":
    main()
