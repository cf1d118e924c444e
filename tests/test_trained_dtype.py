"""Why every trained copy is fp32 (``stack.TRAINED_COPY_DTYPE``): in bf16, AdamW's small
updates round away. trl 1.16 casts an 8/4-bit model's trainable weights to bf16; the
script casts them back."""

from __future__ import annotations

import math

import pytest


def _changed_fraction(dtype: str, learning_rate: float) -> float:
    """Share of a Kaiming-initialised ``lora_A`` (16 x 4096, peft's init) that 10 AdamW
    steps on unit-scale gradients change."""
    import torch

    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.empty(16, 4096, dtype=getattr(torch, dtype)))
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    start = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=learning_rate, weight_decay=0.0)
    for _ in range(10):
        weight.grad = torch.randn(weight.shape, generator=generator).to(weight.dtype)
        optimizer.step()
    return float((weight != start).float().mean())


@pytest.mark.parametrize("learning_rate", [5e-6, 2e-5])
def test_bf16_adapters_lose_small_updates_that_fp32_keeps(learning_rate: float) -> None:
    assert _changed_fraction("float32", learning_rate) > 0.999
    assert _changed_fraction("bfloat16", learning_rate) < 0.6
    assert _changed_fraction("bfloat16", 5e-6) < 0.25  # DPO's usual rate: most never move
