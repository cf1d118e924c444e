"""How far above its estimate a run's peak may land: the upper end of the plan's
prediction interval, derived from the accuracy benchmark's measured errors.

``benchmarks/accuracy.py`` rebuilds 26 published peak-memory measurements with the
estimator (the measured numbers are in that file, each with its source row of
``benchmarks/published.md``). Of its rows, the 19 that measure a whole run's peak
(metric ``alloc``: ``max_memory_allocated``; ``resv``: ``max_memory_reserved``) give the
ratio measured / predicted; the weights-only rows (``weights``) do not measure a peak and
are left out. Most ratios are above 1: the estimate under-predicts more often than not.

``UNDER_PREDICTION_FACTOR`` is the 90th percentile of those ratios
(``statistics.quantiles(ratios, n=10, method="inclusive")[-1]``), rounded up to three
decimals. ``tests/test_plan_honest.py`` recomputes it from the benchmark's rows and fails
when they drift from this constant; rerun the recipe and update it with the benchmark.

The factor applies to what torch's allocator holds (the quantity the rows measure); the
CUDA context, outside torch's counters, is a fixed size and is added unscaled.
"""

from __future__ import annotations

import math

UNDER_PREDICTION_FACTOR = 1.144
"""90th percentile of measured / predicted peak over the 19 ``alloc`` / ``resv`` rows of
``benchmarks/accuracy.py`` (``published_rows()``), rounded up to three decimals."""

INTERVAL_PERCENTILE = 90
"""The percentile of the measured / predicted ratios the factor is."""


def factor_from_ratios(ratios: list[float]) -> float:
    """The recipe: the 90th percentile (inclusive method), rounded up to three decimals,
    never below 1."""
    import statistics

    percentile = statistics.quantiles(ratios, n=10, method="inclusive")[-1]
    return max(1.0, math.ceil(percentile * 1000 - 1e-9) / 1000)


def high_end_bytes(peak_reserved_bytes: int, torch_reserved_bytes: int) -> int:
    """The upper end of the interval around ``peak_reserved_bytes``: torch's share scaled
    by ``UNDER_PREDICTION_FACTOR``, the CUDA context unscaled."""
    extra = math.ceil(torch_reserved_bytes * (UNDER_PREDICTION_FACTOR - 1.0))
    return peak_reserved_bytes + max(0, extra)
