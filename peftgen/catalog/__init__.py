"""Model architectures and GPUs: typed data, not code.

The numbers live in ``data/models.json`` and ``data/gpus.json`` and are validated by the
same pydantic machinery as the spec. Each model entry copies the fields of the model's
published ``config.json`` that decide memory (and that transformers needs to rebuild the
model on the meta device), plus where they came from.

Lookups are forgiving about spelling (case, spaces, dashes) and answer a miss with a
did-you-mean, because a wrong GPU name is the commonest first mistake.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DATA_DIR = Path(__file__).parent / "data"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArchConfig(_Frozen):
    """The memory-relevant fields of a model's ``config.json``, named as there."""

    model_type: str
    architectures: list[str]
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    """Per-head width; configs that omit it mean hidden_size // num_attention_heads."""
    tie_word_embeddings: bool
    max_position_embeddings: int = Field(gt=0)
    attention_bias: bool = False
    """q/k/v (and for some families o) projections carry a bias (Qwen2: q/k/v only)."""
    mlp_bias: bool = False
    num_local_experts: int | None = None
    """MoE experts per layer (Mixtral ``num_local_experts``, Qwen-MoE ``num_experts``)."""
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    extra: dict[str, Any] = {}
    """Other config.json fields transformers needs to rebuild the model exactly
    (rope settings, sliding windows, softcapping, layer types ...)."""


class ModelArch(_Frozen):
    """One catalogued (or locally resolved) causal-LM architecture."""

    id: str
    """Canonical hub id, e.g. ``meta-llama/Meta-Llama-3-8B``."""
    aliases: list[str] = []
    """Short names users type, e.g. ``llama3-8b``."""
    display_name: str
    published_parameters: int | None = None
    """Total parameter count as published by the authors (for the catalogue test)."""
    has_chat_template: bool = False
    """The tokenizer ships a chat template (instruct/chat models)."""
    source: str
    """Where the config numbers come from (a config.json copy: repository and path)."""
    config: ArchConfig


class Gpu(_Frozen):
    """One GPU model as the driver reports it."""

    name: str
    """Marketing name as ``nvidia-smi`` prints it, e.g. ``NVIDIA GeForce RTX 4090``."""
    aliases: list[str] = []
    memory_bytes: int = Field(gt=0)
    """Total memory the driver reports (``torch.cuda.get_device_properties().total_memory``)."""
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    bf16: bool
    """Native bfloat16 (Ampere, sm_80, and newer)."""
    flash_attention_2: bool
    """FlashAttention-2 kernels exist for this architecture (Ampere and newer)."""
    source: str = ""


@dataclass(frozen=True)
class LinearModule:
    """One kind of ``nn.Linear`` in the architecture, e.g. every layer's ``q_proj``."""

    name: str
    """Leaf module name as peft matches it, e.g. ``q_proj``."""
    in_features: int
    out_features: int
    count: int
    """How many such modules the model has (usually the layer count)."""
    bias: bool = False


def normalise_name(name: str) -> str:
    """Case-, space-, dash- and underscore-insensitive key for lookups."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


@cache
def model_catalogue() -> tuple[ModelArch, ...]:
    raw = json.loads((DATA_DIR / "models.json").read_text(encoding="utf-8"))
    return tuple(ModelArch.model_validate(item) for item in raw["models"])


@cache
def gpu_catalogue() -> tuple[Gpu, ...]:
    raw = json.loads((DATA_DIR / "gpus.json").read_text(encoding="utf-8"))
    return tuple(Gpu.model_validate(item) for item in raw["gpus"])


@cache
def _model_index() -> dict[str, ModelArch]:
    index: dict[str, ModelArch] = {}
    for arch in model_catalogue():
        for key in (arch.id, arch.id.split("/")[-1], *arch.aliases):
            index.setdefault(normalise_name(key), arch)
    return index


@cache
def _gpu_index() -> dict[str, Gpu]:
    index: dict[str, Gpu] = {}
    for gpu in gpu_catalogue():
        for key in (gpu.name, *gpu.aliases):
            index.setdefault(normalise_name(key), gpu)
    return index


def find_model(model_id: str) -> ModelArch | None:
    """The catalogue entry for a hub id or alias (case-insensitive), or None."""
    return _model_index().get(normalise_name(model_id))


def find_gpu(name: str) -> Gpu | None:
    """The catalogue entry for a GPU name or alias (case/space/dash-insensitive), or None."""
    return _gpu_index().get(normalise_name(name))


def suggest(name: str, choices: list[str], limit: int = 3) -> list[str]:
    """Close matches for a did-you-mean."""
    keyed = {normalise_name(choice): choice for choice in choices}
    hits = difflib.get_close_matches(normalise_name(name), list(keyed), n=limit, cutoff=0.6)
    return [keyed[hit] for hit in hits]


def model_names() -> list[str]:
    return [name for arch in model_catalogue() for name in (arch.id, *arch.aliases)]


def gpu_names() -> list[str]:
    return [name for gpu in gpu_catalogue() for name in (gpu.name, *gpu.aliases)]


def linear_modules(arch: ModelArch) -> list[LinearModule]:
    """Every ``nn.Linear`` of the built model except the output head, grouped by leaf name.

    This is what peft's ``all-linear`` targets and what bitsandbytes quantizes; the
    catalogue test checks it against the model transformers builds on the meta device.
    """
    c = arch.config
    layers = c.num_hidden_layers
    q_out = c.num_attention_heads * c.head_dim
    kv_out = c.num_key_value_heads * c.head_dim
    attn_bias = c.attention_bias
    if c.model_type in FUSED_QKV_TYPES:
        modules = [
            LinearModule("qkv_proj", c.hidden_size, q_out + 2 * kv_out, layers, attn_bias),
            LinearModule("o_proj", q_out, c.hidden_size, layers, attn_bias),
            LinearModule("gate_up_proj", c.hidden_size, 2 * c.intermediate_size, layers, c.mlp_bias),
            LinearModule("down_proj", c.intermediate_size, c.hidden_size, layers, c.mlp_bias),
        ]
        return modules
    o_bias = attn_bias and c.model_type not in QKV_ONLY_BIAS_TYPES
    return [
        LinearModule("q_proj", c.hidden_size, q_out, layers, attn_bias),
        LinearModule("k_proj", c.hidden_size, kv_out, layers, attn_bias),
        LinearModule("v_proj", c.hidden_size, kv_out, layers, attn_bias),
        LinearModule("o_proj", q_out, c.hidden_size, layers, o_bias),
        LinearModule("gate_proj", c.hidden_size, c.intermediate_size, layers, c.mlp_bias),
        LinearModule("up_proj", c.hidden_size, c.intermediate_size, layers, c.mlp_bias),
        LinearModule("down_proj", c.intermediate_size, c.hidden_size, layers, c.mlp_bias),
    ]


# Families whose attention projects q, k and v with one fused linear (and gate/up likewise).
FUSED_QKV_TYPES = frozenset({"phi3"})
# Families with a bias on q/k/v but not on o_proj.
QKV_ONLY_BIAS_TYPES = frozenset({"qwen2"})
