"""The catalogue's record types: what a model architecture and a GPU are, to peftgen.

They are pydantic models (frozen, ``extra="forbid"``) so the JSON data files are
validated by the same machinery as the spec, and a typo in a data file fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArchConfig(_Frozen):
    """The memory-relevant fields of a model's ``config.json``, named as there.

    For a multimodal wrapper whose ``config.json`` nests the language model under
    ``text_config`` (Gemma 3 4B and larger), the size fields are the language model's,
    ``model_type``/``architectures`` are the wrapper's (what ``AutoModelForCausalLM``
    builds), and ``text_config_model_type``/``wrapper_extra`` keep the rest, so
    ``config_dict`` can give transformers back the exact nested layout.
    """

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
    """config.json's ``attention_bias``. Families that hard-code their biases (Qwen2's
    q/k/v bias) ignore it; ``linear_modules`` knows which do."""
    mlp_bias: bool = False
    num_local_experts: int | None = None
    """MoE experts per layer (Mixtral ``num_local_experts``, Qwen-MoE ``num_experts``)."""
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    extra: dict[str, Any] = {}
    """Other config.json fields transformers needs to rebuild the model exactly
    (rope settings, sliding windows, softcapping, layer types ...)."""
    text_config_model_type: str | None = None
    """``text_config.model_type`` when config.json nests the language model (else None)."""
    wrapper_extra: dict[str, Any] = {}
    """A multimodal wrapper's other top-level fields (``vision_config``, image tokens)."""


class ModelArch(_Frozen):
    """One catalogued (or locally resolved) causal-LM architecture."""

    id: str
    """Canonical hub id, e.g. ``meta-llama/Meta-Llama-3-8B`` (or the local folder)."""
    aliases: list[str] = []
    """Short names users type, e.g. ``llama3-8b``."""
    display_name: str
    published_parameters: int | None = None
    """Total parameter count as published by the authors (for the catalogue test)."""
    has_chat_template: bool = False
    """The tokenizer ships a chat template (instruct/chat models)."""
    chat_template_family: str | None = None
    """The chat template family the tokenizer ships, a key of
    ``peftgen.chat_templates.FAMILIES`` (which says how to train on it with an
    assistant-only loss); None for base models and for templates peftgen does not know.
    For a catalogued model it is what the hub repository ships; for a local folder it is
    ``identify``'s exact match of the folder's template."""
    source: str
    """Where the config numbers come from (a config.json copy: repository and path)."""
    config: ArchConfig


class GpuThroughput(_Frozen):
    """Datasheet peaks for the throughput model (``peftgen.throughput``), each with its source.

    Tensor-core figures are *dense* (NVIDIA datasheets print the 2:4-sparse figure, twice
    the dense one, for Ampere and newer) and with fp32 accumulation, what mixed-precision
    training uses (GeForce cards run fp16/bf16 with fp32 accumulation at half their
    fp16-accumulate rate).
    """

    dense_fp16_tflops: float = Field(gt=0)
    dense_bf16_tflops: float | None = Field(default=None, gt=0)
    """None on GPUs without bfloat16 tensor cores (before Ampere)."""
    memory_bandwidth_gb_s: float = Field(gt=0)
    """Peak DRAM bandwidth, GB/s (10^9 bytes)."""
    fp16_source: str
    bf16_source: str = ""
    bandwidth_source: str


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
    throughput: GpuThroughput | None = None
    """Peak dense tensor FLOP/s and memory bandwidth; None for a ``--vram-gib`` card."""
    architecture_assumed: bool = False
    """No card named (``hardware.vram_gib`` alone): an Ampere-or-newer one is assumed, and
    whatever depends on that (bf16, TF32, FlashAttention-2) says so."""


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
    component: str = "language_model"
    """Which tower it sits in: ``language_model`` or ``vision_tower``. Leaf names repeat
    across towers with other shapes (SigLIP's ``q_proj`` is 1152 wide in every Gemma 3)."""

    @property
    def weight_parameters(self) -> int:
        """Weight elements of all ``count`` modules (what bitsandbytes quantizes)."""
        return self.in_features * self.out_features * self.count

    @property
    def bias_parameters(self) -> int:
        """Bias elements of all ``count`` modules (kept in the compute dtype)."""
        return self.out_features * self.count if self.bias else 0
