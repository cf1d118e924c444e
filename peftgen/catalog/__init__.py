"""Model architectures and GPUs: typed data, not code.

The numbers live in ``data/models.json`` and ``data/gpus.json`` and are validated by the
same pydantic machinery as the spec. Each model entry copies the fields of the model's
published ``config.json`` that decide memory (and that transformers needs to rebuild the
model on the meta device), plus where they came from.

Lookups are forgiving about spelling (case, spaces, dashes) and answer a miss with a
did-you-mean, because a wrong GPU name is the commonest first mistake.

Modules: ``types`` (the records), ``structure`` (linear modules and parameter groups of
what transformers builds), ``lookup`` (catalogue, local folder and hub resolution),
``table`` (the generated docs/catalogue.md).
"""

from __future__ import annotations

from peftgen.catalog.lookup import (
    DATA_DIR,
    arch_from_config,
    arch_from_folder,
    find_gpu,
    find_model,
    gpu_catalogue,
    gpu_names,
    lookup_gpu,
    lookup_model,
    model_catalogue,
    model_names,
    suggest,
)
from peftgen.catalog.structure import (
    FUSED_QKV_TYPES,
    QKV_ONLY_BIAS_TYPES,
    SUPPORTED_MODEL_TYPES,
    ParameterGroups,
    TargetParameter,
    config_dict,
    linear_modules,
    moe_target_parameters,
    parameter_groups,
)
from peftgen.catalog.types import ArchConfig, Gpu, LinearModule, ModelArch
from peftgen.errors import normalise_name

__all__ = [
    "DATA_DIR",
    "FUSED_QKV_TYPES",
    "QKV_ONLY_BIAS_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "ArchConfig",
    "Gpu",
    "LinearModule",
    "ModelArch",
    "ParameterGroups",
    "TargetParameter",
    "arch_from_config",
    "arch_from_folder",
    "config_dict",
    "find_gpu",
    "find_model",
    "gpu_catalogue",
    "gpu_names",
    "linear_modules",
    "lookup_gpu",
    "lookup_model",
    "model_catalogue",
    "model_names",
    "moe_target_parameters",
    "normalise_name",
    "parameter_groups",
    "suggest",
]
