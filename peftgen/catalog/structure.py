"""What transformers 5.24 builds from an ``ArchConfig``: its linear modules and parameters.

Pure arithmetic on the config (no torch), mirroring each family's modeling file. The
catalogue test builds every entry on the meta device and checks these functions against
the real module tree, so a family whose structure drifts fails there, not in a plan.

Facts of transformers 5.24 these functions encode (each checked by the test):

- Qwen2 hard-codes a bias on q/k/v (not o); Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``;
  Qwen3 and Gemma 3 add ``q_norm``/``k_norm`` (RMSNorm, not linear) per layer.
- Mixtral stores its experts as two fused 3-D parameters per layer
  (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) and its router
  (``mlp.gate``) as a bare ``weight`` parameter: none of them is an ``nn.Linear``, so
  bitsandbytes does not quantize them (they stay in the compute dtype under 4-bit).
  peft 0.21 still adapts them: for ``mixtral`` it maps the transformers-4 names that
  ``all-linear`` (or ``w1``/``w2``/``w3``/``gate``) resolves to onto ``target_parameters``
  (``gate_up_proj`` with rank and alpha doubled, ``down_proj``, ``gate.weight``), see
  ``peft/utils/transformers_weight_conversion.py``; ``moe_target_parameters`` models it.
- ``AutoModelForCausalLM`` maps a ``gemma3`` config (4B and larger) to
  ``Gemma3ForConditionalGeneration``: the SigLIP vision tower and projector are loaded
  too, and their ``nn.Linear`` layers are linear modules like any other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

from peftgen.catalog.types import ArchConfig, LinearModule, ModelArch

# Families whose attention projects q, k and v with one fused linear (and gate/up likewise).
FUSED_QKV_TYPES = frozenset({"phi3"})
# Families with a hard-coded bias on q/k/v but not on o_proj, whatever config.json says.
QKV_ONLY_BIAS_TYPES = frozenset({"qwen2"})
# Families whose projections never carry a bias.
NO_BIAS_TYPES = frozenset({"mistral", "mixtral", "phi3"})
# Families with RMSNorm on q and k per head (``q_norm``/``k_norm``, head_dim wide).
QK_NORM_TYPES = frozenset({"qwen3", "gemma3_text", "gemma3"})
# Families with four RMSNorms per decoder layer (pre/post attention and feed-forward).
SANDWICH_NORM_TYPES = frozenset({"gemma2", "gemma3_text", "gemma3"})
# Families whose MLP is a sparse mixture of fused experts.
MOE_TYPES = frozenset({"mixtral"})

SDPA_REFUSED_TYPES = frozenset({"gemma2"})
"""Families whose transformers 5.24 model refuses sdpa (Gemma-2's soft-capped attention:
``_supports_sdpa = False``, models/gemma2/modeling_gemma2.py:353); ``from_pretrained``
raises for them with sdpa, so ``resolve`` refuses the spec."""

SUPPORTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3"}
)
"""Model types whose structure this module mirrors; others cannot be estimated."""

LANGUAGE_MODEL = "language_model"
VISION_TOWER = "vision_tower"


_Result = TypeVar("_Result")


def _once_per_arch(function: Callable[[ModelArch], _Result]) -> Callable[[ModelArch], _Result]:
    """Computes ``function(arch)`` once per architecture object.

    A plan asks for the same model's structure thousands of times (every candidate, every
    suggestion's re-plan, every GPU of the report's matrix); ``ModelArch`` is frozen but not
    hashable (it holds lists and dicts), so the cache is keyed on the object itself and keeps
    it alive, which keeps its ``id`` from being reused. Results are immutable (tuples and
    frozen dataclasses), so callers cannot change a cached answer.
    """
    cache: dict[int, tuple[ModelArch, _Result]] = {}

    @wraps(function)
    def cached(arch: ModelArch) -> _Result:
        hit = cache.get(id(arch))
        if hit is not None and hit[0] is arch:
            return hit[1]
        result = function(arch)
        cache[id(arch)] = (arch, result)
        return result

    return cached


@_once_per_arch
def linear_modules(arch: ModelArch) -> tuple[LinearModule, ...]:
    """Every ``nn.Linear`` of the built model except the output head, grouped by leaf name.

    This is what peft's ``all-linear`` targets and what bitsandbytes quantizes; the
    catalogue test checks it against the model transformers builds on the meta device.
    Multimodal wrappers add their vision tower's linears (``component="vision_tower"``).
    """
    modules = _language_linears(arch.config)
    if arch.config.model_type == "gemma3":
        modules += _siglip_linears(_vision_config(arch.config))
    return tuple(modules)


def _language_linears(c: ArchConfig) -> list[LinearModule]:
    layers = c.num_hidden_layers
    q_out = c.num_attention_heads * c.head_dim
    kv_out = c.num_key_value_heads * c.head_dim
    attn_bias = c.attention_bias and c.model_type not in NO_BIAS_TYPES
    mlp_bias = c.mlp_bias and c.model_type == "llama"
    if c.model_type in FUSED_QKV_TYPES:
        return [
            LinearModule("qkv_proj", c.hidden_size, q_out + 2 * kv_out, layers),
            LinearModule("o_proj", q_out, c.hidden_size, layers),
            LinearModule("gate_up_proj", c.hidden_size, 2 * c.intermediate_size, layers),
            LinearModule("down_proj", c.intermediate_size, c.hidden_size, layers),
        ]
    qkv_bias = attn_bias or c.model_type in QKV_ONLY_BIAS_TYPES
    o_bias = attn_bias and c.model_type not in QKV_ONLY_BIAS_TYPES
    attention = [
        LinearModule("q_proj", c.hidden_size, q_out, layers, qkv_bias),
        LinearModule("k_proj", c.hidden_size, kv_out, layers, qkv_bias),
        LinearModule("v_proj", c.hidden_size, kv_out, layers, qkv_bias),
        LinearModule("o_proj", q_out, c.hidden_size, layers, o_bias),
    ]
    if c.model_type in MOE_TYPES:
        return attention  # router and experts are plain parameters (see parameter_groups)
    return [
        *attention,
        LinearModule("gate_proj", c.hidden_size, c.intermediate_size, layers, mlp_bias),
        LinearModule("up_proj", c.hidden_size, c.intermediate_size, layers, mlp_bias),
        LinearModule("down_proj", c.intermediate_size, c.hidden_size, layers, mlp_bias),
    ]


@dataclass(frozen=True)
class TargetParameter:
    """A weight that is not an ``nn.Linear`` but that peft adapts through
    ``target_parameters`` (one per layer): a fused expert tensor or a MoE router.

    peft gives a [experts, out, in] parameter one LoRA pair of rank
    ``experts * rank_multiplier * r``: A is (rank, in_features), B is (out_features, rank).
    """

    name: str
    """peft's ``target_parameters`` entry, e.g. ``gate_up_proj`` or ``gate.weight``."""
    module_names: tuple[str, ...]
    """The transformers-4 ``nn.Linear`` names peft maps onto it (what users put in
    ``target_modules``); peft requires all of a fused group or none."""
    experts: int
    """Leading expert dimension (1 for the 2-D router)."""
    in_features: int
    out_features: int
    count: int
    """How many such parameters the model has (the layer count)."""
    rank_multiplier: int = 1
    """peft multiplies ``r`` and ``lora_alpha`` by this for fused targets (gate+up: 2)."""

    @property
    def weight_parameters(self) -> int:
        """Elements of the base weight in all layers."""
        return self.experts * self.in_features * self.out_features * self.count

    def lora_parameters(self, r: int) -> int:
        """LoRA A and B elements peft adds for this target in all layers, at rank ``r``."""
        rank = self.experts * self.rank_multiplier * r
        return rank * (self.in_features + self.out_features) * self.count


def moe_target_parameters(arch: ModelArch) -> list[TargetParameter]:
    """The fused expert and router weights peft 0.21 adapts in a MoE model (else empty).

    They are adapted when ``target_modules`` is ``all-linear`` or names all their
    ``module_names``; bitsandbytes never quantizes them (they are in ``moe_experts`` /
    ``moe_router`` of ``parameter_groups``).
    """
    c = arch.config
    if c.model_type not in MOE_TYPES or not c.num_local_experts:
        return []
    experts, layers = c.num_local_experts, c.num_hidden_layers
    hidden, inner = c.hidden_size, c.intermediate_size
    return [
        TargetParameter("gate_up_proj", ("w1", "w3"), experts, hidden, 2 * inner, layers, 2),
        TargetParameter("down_proj", ("w2",), experts, inner, hidden, layers),
        TargetParameter("gate.weight", ("gate",), 1, hidden, experts, layers),
    ]


@dataclass(frozen=True)
class _SiglipShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    num_channels: int


def _vision_config(c: ArchConfig) -> _SiglipShape:
    vision: dict[str, Any] = c.wrapper_extra.get("vision_config", {})
    # Defaults are SiglipVisionConfig's, used when config.json leaves a field out.
    return _SiglipShape(
        hidden_size=int(vision.get("hidden_size", 768)),
        intermediate_size=int(vision.get("intermediate_size", 3072)),
        num_hidden_layers=int(vision.get("num_hidden_layers", 12)),
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 16)),
        num_channels=int(vision.get("num_channels", 3)),
    )


def _siglip_linears(v: _SiglipShape) -> list[LinearModule]:
    layers = v.num_hidden_layers
    width = v.hidden_size
    return [
        LinearModule("q_proj", width, width, layers, True, VISION_TOWER),
        LinearModule("k_proj", width, width, layers, True, VISION_TOWER),
        LinearModule("v_proj", width, width, layers, True, VISION_TOWER),
        LinearModule("out_proj", width, width, layers, True, VISION_TOWER),
        LinearModule("fc1", width, v.intermediate_size, layers, True, VISION_TOWER),
        LinearModule("fc2", v.intermediate_size, width, layers, True, VISION_TOWER),
    ]


@dataclass(frozen=True)
class ParameterGroups:
    """Parameter counts (elements, not bytes) of the built model, by how they are stored.

    The estimator multiplies each group by its own bytes per element: under bitsandbytes
    only ``linear_weight`` is quantized; every other group stays in the compute dtype.
    """

    linear_weight: int
    """Weights of the ``nn.Linear`` modules of ``linear_modules`` (quantizable, LoRA targets)."""
    linear_bias: int
    """Their biases."""
    embedding: int
    """Input token embeddings (``embed_tokens``)."""
    lm_head: int
    """The untied output head; 0 when it shares the embedding's weight. transformers keeps
    it out of bitsandbytes quantization."""
    norm: int
    """RMSNorm/LayerNorm weights (and LayerNorm biases)."""
    moe_experts: int
    """Fused 3-D expert tensors (Mixtral): not ``nn.Linear``, never quantized by bnb."""
    moe_router: int
    """Router weights (Mixtral ``mlp.gate.weight``): a bare parameter, not ``nn.Linear``."""
    vision_other: int
    """Vision tower and projector parameters that are not linear weights or norms
    (patch convolution, position embedding, projection matrix)."""

    @property
    def total(self) -> int:
        """All parameters, shared ones counted once (``model.num_parameters()``)."""
        return self.linear_weight + self.non_linear

    @property
    def non_linear(self) -> int:
        """Everything that is not a linear weight: what stays in the compute dtype when
        the linear weights are quantized."""
        return (
            self.linear_bias
            + self.embedding
            + self.lm_head
            + self.norm
            + self.moe_experts
            + self.moe_router
            + self.vision_other
        )


@_once_per_arch
def parameter_groups(arch: ModelArch) -> ParameterGroups:
    """How many parameters the model transformers 5.24 builds has, by storage group.

    ``total`` equals the built model's ``num_parameters()`` (the catalogue test checks it
    for every entry); ``non_linear`` is what bitsandbytes leaves unquantized.
    """
    c = arch.config
    linears = linear_modules(arch)
    embedding = c.vocab_size * c.hidden_size
    norm = _language_norm_parameters(c)
    moe_experts = moe_router = vision_other = 0
    if c.model_type in MOE_TYPES:
        experts = c.num_local_experts or 0
        moe_experts = c.num_hidden_layers * experts * 3 * c.intermediate_size * c.hidden_size
        moe_router = c.num_hidden_layers * experts * c.hidden_size
    if c.model_type == "gemma3":
        vision = _vision_config(c)
        norm += _siglip_norm_parameters(vision) + vision.hidden_size  # + mm_soft_emb_norm
        vision_other = _siglip_other_parameters(vision) + vision.hidden_size * c.hidden_size
    return ParameterGroups(
        linear_weight=sum(module.weight_parameters for module in linears),
        linear_bias=sum(module.bias_parameters for module in linears),
        embedding=embedding,
        lm_head=0 if c.tie_word_embeddings else embedding,
        norm=norm,
        moe_experts=moe_experts,
        moe_router=moe_router,
        vision_other=vision_other,
    )


def _language_norm_parameters(c: ArchConfig) -> int:
    norms_per_layer = 4 if c.model_type in SANDWICH_NORM_TYPES else 2
    per_layer = norms_per_layer * c.hidden_size
    if c.model_type in QK_NORM_TYPES:
        per_layer += 2 * c.head_dim
    return c.num_hidden_layers * per_layer + c.hidden_size  # + the final norm


def _siglip_norm_parameters(v: _SiglipShape) -> int:
    layer_norm = 2 * v.hidden_size  # LayerNorm: weight and bias
    return v.num_hidden_layers * 2 * layer_norm + layer_norm  # + post_layernorm


def _siglip_other_parameters(v: _SiglipShape) -> int:
    patch_conv = v.hidden_size * v.num_channels * v.patch_size**2 + v.hidden_size
    positions = (v.image_size // v.patch_size) ** 2
    return patch_conv + positions * v.hidden_size


_CORE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


def config_dict(arch: ModelArch) -> dict[str, Any]:
    """The arch as a ``config.json``-shaped dict transformers can rebuild the model from.

    Multimodal wrappers get their nested ``text_config`` back, so
    ``AutoConfig.for_model(**config_dict(arch))`` builds what ``from_pretrained`` would.
    A deep copy: transformers edits nested fields in place (``rope_scaling`` gains
    ``rope_type``), which must not reach the cached catalogue entry.
    """
    c = arch.config
    fields = {name: getattr(c, name) for name in _CORE_FIELDS if getattr(c, name) is not None}
    language = {**fields, **c.extra}
    if c.text_config_model_type is None:
        flat = {"model_type": c.model_type, "architectures": list(c.architectures), **language}
        return copy.deepcopy(flat)
    return copy.deepcopy(
        {
            "model_type": c.model_type,
            "architectures": list(c.architectures),
            "tie_word_embeddings": c.tie_word_embeddings,
            **c.wrapper_extra,
            "text_config": {"model_type": c.text_config_model_type, **language},
        }
    )
