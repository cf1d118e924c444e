"""Cold-start time of ``peftgen plan`` (the analytic path), measured in fresh processes.

Each run is a new interpreter (nothing cached in memory, bytecode on disk as an installed
package would have it), timed from process start to exit, for the table output and for
``--json``. The target is <= 0.5 s on the development machine; this is a measurement,
not a test, because timing depends on the machine and its load.

    python benchmarks/plan_speed.py [SPEC] [--runs N] [--record]

``--record`` writes the medians to ``benchmarks/results/plan_speed.json``, from which
``python -m tools.plan_figures`` generates the README's and docs/plan.md's sentence.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
TARGET_SECONDS = 0.5


def cold_run_seconds(arguments: list[str]) -> float:
    """Wall time of one fresh ``python -m peftgen ...`` process."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "peftgen", *arguments],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--record", action="store_true", help="write results/plan_speed.json")
    args = parser.parse_args()
    record: dict[str, object] = {"runs": args.runs, "spec": args.spec.name}
    baseline = [cold_run_seconds(["--version"]) for _ in range(args.runs)]
    floor = statistics.median(baseline)
    print(f"python -m peftgen --version: median {floor:.3f} s (interpreter floor)")
    record["floor"] = floor
    for extra in ([], ["--json"]):
        times = [cold_run_seconds(["plan", str(args.spec), *extra]) for _ in range(args.runs)]
        median = statistics.median(times)
        verdict = "ok" if median <= TARGET_SECONDS else "over target"
        label = " ".join(["plan", args.spec.name, *extra])
        record[" ".join(["plan", *extra])] = {
            "median": median,
            "min": min(times),
            "max": max(times),
        }
        print(
            f"peftgen {label}: median {median:.3f} s, min {min(times):.3f} s, "
            f"max {max(times):.3f} s over {args.runs} runs ({verdict}, target {TARGET_SECONDS} s)"
        )
    if args.record:
        record["machine"] = (
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}"
        )
        record["date"] = datetime.date.today().isoformat()
        out = REPO / "benchmarks" / "results" / "plan_speed.json"
        out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
