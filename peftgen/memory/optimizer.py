"""Optimizer state per ``training.optim``: torch AdamW, bitsandbytes 8-bit (blockwise
states), paged states in CUDA managed memory, and the optimizer step's temporaries."""

from __future__ import annotations

import math
from typing import get_args

from peftgen import stack
from peftgen.memory.profile import OPTIM_8BIT_BLOCKSIZE, OPTIM_8BIT_MIN_NUMEL, PAGED_MIN_NUMEL
from peftgen.memory.types import EstimateInput
from peftgen.memory.weights import trainable_tensors
from peftgen.spec import (
    Optim,
)

PAGED_OPTIMIZERS = frozenset(name for name, optim in stack.OPTIMIZERS.items() if optim.paged)
OPTIMIZERS: tuple[str, ...] = get_args(Optim)
"""Every ``training.optim`` the spec accepts; each has a rule below."""


def bnb_state_bytes(numel: int, states: int, bits: int) -> int:
    """bitsandbytes optimizer state for one tensor: 8-bit blockwise (uint8 + fp32 absmax per
    256) for tensors of at least 4096 elements, fp32 otherwise (optim/optimizer.py)."""
    if bits == 8 and numel >= OPTIM_8BIT_MIN_NUMEL:
        per_state = numel + 4 * math.ceil(numel / OPTIM_8BIT_BLOCKSIZE)
    else:
        per_state = 4 * numel
    return states * per_state


def optimizer_state_bytes(inputs: EstimateInput) -> int:
    """Optimizer state for the trainable tensors (paged states: ``managed_optimizer_bytes``).

    torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; bitsandbytes keeps
    8- or 32-bit states whatever the parameter dtype; transformers' Adafactor
    (beta1=None) keeps factored fp32 row and column second moments; SGD without momentum
    keeps nothing.
    """
    if inputs.optim in PAGED_OPTIMIZERS:
        return _optimizer_bytes_unpaged(inputs) - managed_optimizer_bytes(inputs)
    return _optimizer_bytes_unpaged(inputs)


def optimizer_step_temporary_bytes(inputs: EstimateInput) -> int:
    """Tensors the optimizer step allocates and frees, on top of its state.

    torch's default foreach AdamW allocates one parameter-sized tensor (``_foreach_sqrt``
    of exp_avg_sq); the fused step and bitsandbytes' kernels update in place;
    Adafactor upcasts each gradient to fp32 and squares it, one tensor at a time. The
    step runs after the last backward, when activations are freed, so these only matter
    when they exceed the activations (see ``estimate``).
    """
    tensors = trainable_tensors(inputs)
    optim = inputs.optim.removeprefix("paged_")
    if optim == "adamw_torch":
        return sum(size * n for size, n in tensors.numel_by_bytes.items())
    if optim == "adafactor":
        return 2 * 4 * max((r * c for r, c, _ in tensors.shape_counts), default=0)
    return 0


def managed_optimizer_bytes(inputs: EstimateInput) -> int:
    """Paged optimizer states: cudaMallocManaged, outside torch's counters, evictable to
    host memory under pressure, so they do not make a run run out of memory."""
    if inputs.optim not in PAGED_OPTIMIZERS:
        return 0
    bits = 8 if inputs.optim.endswith("8bit") else 32
    states = 1 if "lion" in inputs.optim else 2
    shapes = trainable_tensors(inputs).shape_counts
    return sum(n * paged_state_bytes(r * c, states, bits) for r, c, n in shapes)


def paged_state_bytes(numel: int, states: int, bits: int) -> int:
    """The paged part of one tensor's bitsandbytes state: only the state buffers of
    parameters with at least ``PAGED_MIN_NUMEL`` elements are paged
    (``get_state_buffer``, bitsandbytes/optim/optimizer.py:383); smaller tensors' states
    and every 8-bit block scale (``absmax``, :528-529) are ordinary device tensors, counted
    in ``optimizer_state_bytes``."""
    if numel < PAGED_MIN_NUMEL:
        return 0
    per_state = numel if bits == 8 and numel >= OPTIM_8BIT_MIN_NUMEL else 4 * numel
    return states * per_state


def _optimizer_bytes_unpaged(inputs: EstimateInput) -> int:
    tensors = trainable_tensors(inputs)
    optim = inputs.optim.removeprefix("paged_")
    shapes = tensors.shape_counts
    param_bytes = sum(size * n for size, n in tensors.numel_by_bytes.items())
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes
    if optim in ("adamw_8bit", "adamw_bnb_8bit"):
        return sum(n * bnb_state_bytes(r * c, 2, 8) for r, c, n in shapes)
    if optim == "adamw_32bit":
        return sum(n * bnb_state_bytes(r * c, 2, 32) for r, c, n in shapes)
    if optim == "lion_8bit":
        return sum(n * bnb_state_bytes(r * c, 1, 8) for r, c, n in shapes)
    if optim == "lion_32bit":
        return sum(n * bnb_state_bytes(r * c, 1, 32) for r, c, n in shapes)
    if optim == "adafactor":
        return sum(n * 4 * (r + c if c > 1 else r) for r, c, n in shapes)
    if optim == "sgd":
        return 0
    raise ValueError(f"optimizer {inputs.optim!r} is not modelled")
