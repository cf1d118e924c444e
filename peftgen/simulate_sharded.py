"""Simulate one sharded training step per rank: FSDP on fake tensors, fake process group.

``plan --simulate`` for a ``distributed: fsdp`` spec (and the benchmark in
``benchmarks/simulate_sharded.py``) builds the model as ``peftgen.simulate`` does (meta
device, bitsandbytes stand-ins, peft and trl's preparation, fake tensors), then shards it
with torch's own FSDP over a *fake* process group
(``torch.testing._internal.distributed.fake_pg``: collectives return at once, outputs are
allocated with their real shapes) in one process that plays rank 0 of ``world_size``, and
runs one optimizer step under torch's ``FSDPMemTracker``
(``torch.distributed._tools.fsdp2_mem_tracker``), which categorises every live byte
(sharded / unsharded parameters, gradients, all-gather and reduce-scatter buffers,
activations, optimizer state, temporaries) per module.

The engine is FSDP2 (``fully_shard``): FSDP1 refuses to run without an accelerator
(``_init_device_handle``: "FSDP needs a non-CPU accelerator device"), and the tracker is
FSDP2's. So the simulation is compared with the analytic figure of the same engine
(``StackProfile(fsdp_version=2)``), and the 4-bit stand-ins keep their quantization state on
the module (what ``Linear4bit`` falls back to when FSDP replaces the weight,
``fix_4bit_weight_quant_state_from_module``), with ``bnb_4bit_quant_storage`` = the compute
dtype so FSDP's mixed precision sees one floating dtype.

torch, transformers, peft, trl and bitsandbytes are imported only when a simulation runs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from peftgen import stack
from peftgen.catalog import Gpu
from peftgen.memory import StackProfile, estimate
from peftgen.plan import estimate_input
from peftgen.resolve import Resolved

SHARDED_STACK = StackProfile(fsdp_version=2)
"""The analytic profile of the engine the simulation runs (FSDP2)."""


@dataclass(frozen=True)
class ShardedSimulation:
    """Rank 0's peak live bytes during the second (steady-state) step, by the tracker's
    categories, and the analytic figure of the same run."""

    precision: str
    world_size: int
    peak_allocated_bytes: int
    by_category: dict[str, int]
    analytic_allocated_bytes: int
    seconds: float

    @property
    def error(self) -> float:
        """Analytic relative to simulated."""
        return (self.analytic_allocated_bytes - self.peak_allocated_bytes) / max(
            1, self.peak_allocated_bytes
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "world_size": self.world_size,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "by_category": dict(self.by_category),
            "analytic_allocated_bytes": self.analytic_allocated_bytes,
            "seconds": round(self.seconds, 3),
        }


def analytic_allocated_bytes(resolved: Resolved, precision: str, gpu: Gpu | None = None) -> int:
    """The estimator's per-GPU allocated peak for the engine the simulation runs (without
    CPU offload)."""
    inputs = estimate_input(resolved, precision, gpu=gpu)  # type: ignore[arg-type]
    # The fake tensors all live in host memory: the simulation keeps the shards "on the
    # device", so it is compared with the analytic figure without CPU offload.
    inputs = replace(inputs, stack=SHARDED_STACK, cpu_offload=False)
    return estimate(inputs).peak_allocated_bytes


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A fake process group of ``world_size`` ranks (this process is rank 0) and its CPU
    device mesh; destroyed on exit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def simulate_sharded(
    resolved: Resolved, precision: str, gpu: Gpu | None = None
) -> ShardedSimulation:
    """One FSDP step of ``resolved`` at ``precision`` as rank 0 of the spec's world size."""
    target = gpu or resolved.gpu
    compute_dtype = stack.compute_dtype(precision, target.bf16)
    world = resolved.loaded.spec.hardware.world_size
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_process_group(world) as mesh:
            peak, categories = _simulate_sharded(resolved, precision, compute_dtype, mesh)
    return ShardedSimulation(
        precision=precision,
        world_size=world,
        peak_allocated_bytes=peak,
        by_category=categories,
        analytic_allocated_bytes=analytic_allocated_bytes(resolved, precision, target),
        seconds=time.perf_counter() - started,
    )


def _simulate_sharded(
    resolved: Resolved, precision: str, compute_dtype: str, mesh: Any
) -> tuple[int, dict[str, int]]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from peftgen import simulate as sim

    spec = resolved.loaded.spec
    torch.manual_seed(0)
    state = sim._SimState()
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float16
    model = sim.build_model(resolved, precision, compute_dtype, state.notes)
    if precision == "4bit":
        _quant_storage_in(model, dtype)
    tracker = sim._StorageTracker()
    packed = spec.method == "sft" and spec.training.packing
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode, sim._gpu_lm_head_kernels(tracker), sim._gpu_functions(), sim._sequences(packed):
        sim._materialize(model, tracker)
        _quant_state_on_modules(model)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)
        memory = FSDPMemTracker(model, optimizer)
        with sim._make_dispatch_mode(tracker, state):
            _step(model, optimizer, resolved, dtype, state, sim)  # optimizer state exists now
            with memory:
                memory.reset_mod_stats()
                _step(model, optimizer, resolved, dtype, state, sim)
        peak = memory.get_tracker_snapshot("peak")
        scales = _quant_state_bytes(model)
    totals: dict[str, int] = {}
    for per_device in peak.values():
        for name, value in per_device.items():
            key = str(getattr(name, "value", name))
            totals[key] = totals.get(key, 0) + int(value)
    if scales:
        # bitsandbytes' quantization state: plain tensors on every rank (not parameters or
        # buffers, so FSDP neither shards them nor does the tracker see them), alive for the
        # whole step.
        totals["Quant State"] = scales
    return totals.pop("Total", 0) + scales, totals


def _quant_state_bytes(model: Any) -> int:
    """Bytes of the 4-bit stand-ins' quantization state (absmax, code, offset, nested)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        state = getattr(module, "_sim_quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                total += storage.nbytes()
    return total


def _step(model: Any, optimizer: Any, resolved: Resolved, dtype: Any, state: Any, sim: Any) -> None:
    import torch

    spec = resolved.loaded.spec
    shape = sim.step_shape(resolved)
    with torch.autocast("cpu", dtype=dtype):
        loss = sim._loss(model, spec.method, shape, state)
    loss.backward()
    del loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, sim.MAX_GRAD_NORM, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _decoder_layers(model: Any) -> list[Any]:
    """The decoder layers (transformers' ``_no_split_modules``): FSDP's wrap units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _quant_storage_in(model: Any, dtype: Any) -> None:
    """The stand-ins' packed bytes in ``bnb_4bit_quant_storage`` = the compute dtype."""
    import torch
    from torch import nn

    for module in model.modules():
        if getattr(module, "_sim_4bit", None) is None:
            continue
        weight = module.weight
        numel = (
            weight.shape[0] * weight.element_size() // torch.empty((), dtype=dtype).element_size()
        )
        new = nn.Parameter(torch.empty((numel, 1), dtype=dtype, device="meta"), requires_grad=False)
        for attr in ("quant_type", "compress_statistics", "blocksize"):
            setattr(new, attr, getattr(weight, attr))
        module.weight = new


def _quant_state_on_modules(model: Any) -> None:
    """Keep each 4-bit stand-in's quant state on the module and read it from there: FSDP
    replaces the weight parameter, as it does for bitsandbytes' ``Params4bit``."""
    import importlib

    bnb: Any = importlib.import_module("bitsandbytes")
    for module in model.modules():
        if getattr(module, "_sim_4bit", None) is None:
            continue
        module._sim_quant_state = module.weight.quant_state

        def forward(self: Any, x: Any) -> Any:
            input_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            weight = self.weight.view(-1, 1)
            out = bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=self._sim_quant_state)
            return out.to(input_dtype)

        module.forward = forward.__get__(module)
