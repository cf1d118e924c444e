"""``peftgen check-data``: check a dataset against the spec before any GPU time is spent.

``check_dataset`` streams the rows once: each is checked against the method and format
(``rows``), and, when a tokenizer is at hand, tokenized exactly as the generated trl
script will (``tokens``) for length statistics and a rendered example with its trained
tokens. ``measured_length_percentile`` gives the planner a measured sequence length.
"""

from peftgen.check_data.checker import (
    BadRow,
    DataReport,
    LengthStats,
    check_dataset,
    length_stats,
    measured_length_percentile,
    nearest_rank_percentile,
)

__all__ = [
    "BadRow",
    "DataReport",
    "LengthStats",
    "check_dataset",
    "length_stats",
    "measured_length_percentile",
    "nearest_rank_percentile",
]
