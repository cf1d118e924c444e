"""Resolve a spec's model and GPU, and check the rules that need them.

(Minimal first version; the full rules, did-you-mean and local/online resolution are
built in issue 2.)
"""

from __future__ import annotations

from dataclasses import dataclass

from peftgen.catalog import Gpu, ModelArch, find_gpu, find_model
from peftgen.errors import UserError
from peftgen.load import LoadedSpec

GIB = 2**30


@dataclass(frozen=True)
class Resolved:
    """A loaded spec with its architecture and target GPU."""

    loaded: LoadedSpec
    arch: ModelArch
    gpu: Gpu


def resolve(loaded: LoadedSpec) -> Resolved:
    spec = loaded.spec
    arch = find_model(spec.model.id)
    if arch is None:
        raise UserError.single(
            f"unknown model {spec.model.id!r}", file=str(loaded.path), field_path="model.id"
        )
    hardware = spec.hardware
    gpu = find_gpu(hardware.gpu) if hardware.gpu else None
    if gpu is None and hardware.gpu:
        raise UserError.single(
            f"unknown GPU {hardware.gpu!r}", file=str(loaded.path), field_path="hardware.gpu"
        )
    if gpu is None:
        assert hardware.vram_gib is not None
        gpu = Gpu(
            name=f"{hardware.vram_gib:g} GiB GPU",
            memory_bytes=int(hardware.vram_gib * GIB),
            compute_capability="8.0",
            bf16=True,
            flash_attention_2=True,
        )
    elif hardware.vram_gib is not None:
        gpu = gpu.model_copy(update={"memory_bytes": int(hardware.vram_gib * GIB)})
    return Resolved(loaded, arch, gpu)
