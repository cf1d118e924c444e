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

The factor applies to what torch's allocator holds (the quantity the rows measure); what
lies outside torch's counters (the CUDA context, NCCL's buffers, a colocated vLLM's memory:
``UNSCALED``) is added unscaled.

Runs whose engine shards the parameters (FSDP, DeepSpeed ZeRO-3) take their own factor,
``SHARDED_UNDER_PREDICTION_FACTOR``, by the same recipe over the benchmark's 16 sharded
rows (``sharded_rows()``): the per-GPU estimate of a sharded step errs wider than the
single-GPU one (four of those rows are 10-27 % under), and a user reaches for several
GPUs exactly when memory is tight. DDP and ZeRO-2 replicate the parameters; their
per-GPU figure is a single-GPU step plus buffers, so they keep the single-GPU factor.
"""

from __future__ import annotations

import math

UNDER_PREDICTION_FACTOR = 1.144
"""90th percentile of measured / predicted peak over the 19 ``alloc`` / ``resv`` rows of
``benchmarks/accuracy.py`` (``published_rows()``), rounded up to three decimals."""

SHARDED_UNDER_PREDICTION_FACTOR = 1.163
"""90th percentile of measured / predicted per-GPU peak over the 16 rows of
``benchmarks/accuracy.py``'s ``sharded_rows()`` (FSDP and ZeRO-3 on 2 GPUs; metrics
``alloc``, ``resv`` and ``process``, each against its own predicted figure), rounded up to
three decimals."""

UNSCALED = "the CUDA context, NCCL buffers and vLLM's memory unscaled"
"""How the plan and the report say what ``high_end_bytes`` leaves as it is: what lies
outside torch's allocator."""


def factor_from_ratios(ratios: list[float]) -> float:
    """The recipe: the 90th percentile (inclusive method), rounded up to three decimals,
    never below 1."""
    import statistics

    percentile = statistics.quantiles(ratios, n=10, method="inclusive")[-1]
    return max(1.0, math.ceil(percentile * 1000 - 1e-9) / 1000)


def interval_factor(shards_parameters: bool) -> float:
    """The factor for a run: ``SHARDED_UNDER_PREDICTION_FACTOR`` when its engine shards
    the parameters (the evidence for those estimates is the sharded rows), else
    ``UNDER_PREDICTION_FACTOR``."""
    return SHARDED_UNDER_PREDICTION_FACTOR if shards_parameters else UNDER_PREDICTION_FACTOR


def interval_evidence(shards_parameters: bool) -> str:
    """What the factor of ``interval_factor`` was derived from, for the plan to say."""
    if shards_parameters:
        return "the accuracy benchmark's 16 sharded rows (FSDP, ZeRO-3)"
    return "the accuracy benchmark's 19 whole-run rows"


def high_end_bytes(peak_reserved_bytes: int, torch_reserved_bytes: int, factor: float) -> int:
    """The upper end of the interval around ``peak_reserved_bytes``: torch's share scaled
    by ``factor`` (``interval_factor``); the rest of the peak (``UNSCALED``) as it is."""
    extra = math.ceil(torch_reserved_bytes * (factor - 1.0))
    return peak_reserved_bytes + max(0, extra)
