"""What the process holds beyond torch's allocated peak: CUDA context, cuBLAS workspace,
allocator rounding and fragmentation."""

from __future__ import annotations

from peftgen.memory.profile import (
    PERSISTENT_ROUNDING_FRACTION,
    TRANSIENT_FRAGMENTATION_FRACTION,
    cublas_workspace_bytes,
)
from peftgen.memory.types import EstimateInput


def overhead_bytes(persistent_bytes: int, transient_bytes: int, inputs: EstimateInput) -> int:
    """Reserved minus allocated: cuBLAS workspace (per architecture), allocator rounding of
    long-lived tensors, fragmentation among short-lived ones, and the CUDA context."""
    return (
        cublas_workspace_bytes(inputs.gpu_compute_capability)
        + int(PERSISTENT_ROUNDING_FRACTION * persistent_bytes)
        + int(TRANSIENT_FRAGMENTATION_FRACTION * transient_bytes)
        + inputs.stack.cuda_context_bytes
    )
