"""What ``plan --simulate`` costs: seconds and process memory for an 8B and a 70B model.

Each case runs in a fresh interpreter, so the import of torch/transformers/peft/trl is
counted (``wall s``) apart from the simulation itself (``sim s``), and the process's peak
resident memory (``max RSS``) is that one simulation's. Targets: 8B in <= 30 s, 70B in
<= 2 min, under 2 GB of memory. Not a test: timings depend on the machine.

    python benchmarks/simulate_cost.py                 # both models, bf16 and 4-bit
    python benchmarks/simulate_cost.py --models llama3-8b --precisions 4bit
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODELS = ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B")
PRECISIONS = ("bf16", "4bit")
MAX_LENGTH = 2048

CHILD = """
import json, resource, sys, time
started = time.perf_counter()
from benchmarks.simulate_vs_analytic import resolved_case
from peftgen.catalog import find_model
from peftgen.simulate import simulate_candidate
imported = time.perf_counter() - started
model, precision, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = simulate_candidate(resolved_case(find_model(model), max_length, True), precision)
print(json.dumps({
    "import_seconds": imported,
    "simulate_seconds": result.seconds,
    "peak_allocated_bytes": result.peak_allocated_bytes,
    "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def measure(model: str, precision: str, max_length: int) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, precision, str(max_length)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    args = parser.parse_args(argv)
    print(f"{'model':34} {'prec':5} {'sim s':>6} {'wall s':>7} {'max RSS':>9} {'peak GiB':>9}")
    for model in args.models:
        for precision in args.precisions:
            row = measure(model, precision, args.max_length)
            print(
                f"{model:34} {precision:5} {row['simulate_seconds']:6.1f} "
                f"{row['wall_seconds']:7.1f} {row['max_rss_bytes'] / 2**30:7.2f}GB "
                f"{row['peak_allocated_bytes'] / 2**30:9.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
