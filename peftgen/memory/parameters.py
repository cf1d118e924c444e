"""Parameter counts from the architecture: base, LoRA (dense and fused MoE experts),
biases, ``modules_to_save``, and the linear modules each input feeds."""

from __future__ import annotations

from peftgen import stack
from peftgen.catalog import LinearModule, ModelArch, linear_modules, parameter_groups
from peftgen.catalog.structure import (
    LANGUAGE_MODEL,
)
from peftgen.memory.types import EstimateInput


def linear_parameter_count(module: LinearModule) -> int:
    """Weights (+ bias) of all ``module.count`` instances."""
    return module.weight_parameters + module.bias_parameters


def base_parameter_count(arch: ModelArch) -> int:
    """Parameters of the base model as ``numel`` counts them before quantization."""
    return parameter_groups(arch).total


def language_linear_modules(arch: ModelArch) -> list[LinearModule]:
    """The decoder's linears: what text-only training pushes activations through (a
    multimodal wrapper's vision tower sits idle)."""
    return [m for m in linear_modules(arch) if m.component == LANGUAGE_MODEL]


def moe_experts_per_layer(arch: ModelArch) -> int:
    """Experts per layer of a fused-expert MoE (transformers 5 Mixtral), else 0."""
    c = arch.config
    return (c.num_local_experts or 0) if parameter_groups(arch).moe_experts else 0


def moe_lora_parameter_count(arch: ModelArch, r: int) -> int:
    """LoRA peft 0.21.2 adds to fused MoE layers under ``all-linear``.

    peft maps the transformers-5 fused experts back to their v4 linears
    (peft/utils/transformers_weight_conversion.py:474): the router ``mlp.gate`` gets a
    rank-r adapter (A r x H, B E x r), and each 3-D expert parameter a per-expert one
    stacked to rank r x E, doubled for ``gate_up_proj`` (two v4 linears fused into it):
    gate_up A (2rE x H), B (2I x 2rE); down A (rE x I), B (H x rE). Checked against peft
    on the meta device by ``tests/test_adapter_count.py``.
    """
    per_layer = sum(rows * cols for rows, cols in moe_lora_shapes(arch, r))
    return arch.config.num_hidden_layers * per_layer


def moe_lora_shapes(arch: ModelArch, r: int) -> list[tuple[int, int]]:
    """Shapes of one layer's MoE LoRA tensors (see ``moe_lora_parameter_count``)."""
    experts = moe_experts_per_layer(arch)
    if not experts:
        return []
    c = arch.config
    h = c.hidden_size
    width = c.moe_intermediate_size or c.intermediate_size
    return [
        (r, h),
        (experts, r),
        (2 * r * experts, h),
        (2 * width, 2 * r * experts),
        (r * experts, width),
        (h, r * experts),
    ]


def targeted_modules(
    arch: ModelArch, target_modules: tuple[str, ...] | str
) -> tuple[LinearModule, ...]:
    """The linear modules peft wraps with LoRA.

    ``all-linear`` is every linear but the output layer (peft/tuners/tuners_utils.py,
    ``_maybe_include_all_linear_layers``); listed names match a module by its last
    dotted component(s), as peft's suffix match does.
    """
    modules = linear_modules(arch)
    if target_modules == "all-linear":
        return modules
    leaves = {name.rsplit(".", 1)[-1] for name in target_modules}
    return tuple(m for m in modules if m.name in leaves)


def lora_parameter_count(arch: ModelArch, inputs: EstimateInput) -> int:
    """LoRA A (r x in) + B (out x r) per wrapped module, DoRA magnitudes (out) and biases.

    ``bias="all"``/``"lora_only"`` make the base biases trainable (peft
    ``mark_only_lora_as_trainable``); they are counted in ``trainable`` but already in the
    base weights' bytes.
    """
    total = 0
    for module in targeted_modules(arch, inputs.target_modules):
        per = inputs.lora_r * (module.in_features + module.out_features)
        if inputs.use_dora:
            per += module.out_features
        total += per * module.count
    if inputs.target_modules == "all-linear":
        total += moe_lora_parameter_count(arch, inputs.lora_r)
    return total


def trainable_bias_count(arch: ModelArch, inputs: EstimateInput) -> int:
    """Base biases peft makes trainable: all (``all``) or the wrapped ones (``lora_only``)."""
    if inputs.lora_bias == "none":
        return 0
    modules = (
        linear_modules(arch)
        if inputs.lora_bias == "all"
        else targeted_modules(arch, inputs.target_modules)
    )
    return sum(m.out_features * m.count for m in modules if m.bias)


def modules_to_save_parameter_count(arch: ModelArch, modules_to_save: tuple[str, ...]) -> int:
    """Parameters of the full trainable copies peft makes of ``modules_to_save``.

    With tied embeddings and both ``embed_tokens`` and ``lm_head`` listed, the script sets
    ``ensure_weight_tying=True``, so peft keeps one trained copy for both (two without it).
    """
    groups = parameter_groups(arch)
    numel_by_name = {
        "embed_tokens": groups.embedding,
        "lm_head": groups.lm_head or groups.embedding,
    }
    for module in linear_modules(arch):
        numel_by_name.setdefault(module.name, linear_parameter_count(module))
    leaves = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in modules_to_save))
    if stack.shares_tied_copy(arch.config.tie_word_embeddings, leaves):
        leaves.remove("lm_head")
    return sum(numel_by_name.get(leaf, 0) for leaf in leaves)


def trainable_parameter_count(arch: ModelArch, inputs: EstimateInput) -> int:
    """What peft's ``print_trainable_parameters`` reports as ``trainable params``."""
    if inputs.finetuning == "full":
        return base_parameter_count(arch)
    return (
        lora_parameter_count(arch, inputs)
        + modules_to_save_parameter_count(arch, inputs.modules_to_save)
        + trainable_bias_count(arch, inputs)
    )


def peft_total_parameter_count(arch: ModelArch, inputs: EstimateInput) -> int:
    """peft's ``all params``: base + LoRA + modules_to_save copies.

    peft counts a packed 4-bit tensor as ``numel * 2 * quant_storage.itemsize``
    (peft/peft_model.py:947-954), which recovers the unpacked count, so the figure does
    not depend on the loading precision.
    """
    if inputs.finetuning == "full":
        return base_parameter_count(arch)
    return (
        base_parameter_count(arch)
        + lora_parameter_count(arch, inputs)
        + modules_to_save_parameter_count(arch, inputs.modules_to_save)
    )


def _input_groups(inputs: EstimateInput) -> list[tuple[int, list[LinearModule]]]:
    """Linear modules grouped by the tensor they read: (input width, members)."""
    groups: dict[str, tuple[int, list[LinearModule]]] = {}
    for module in language_linear_modules(inputs.arch):
        key = INPUT_GROUP.get(module.name, module.name)
        _, members = groups.setdefault(key, (module.in_features, []))
        members.append(module)
    return list(groups.values())


# Which linears share an input tensor (one saved copy for all of them).
INPUT_GROUP = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv_proj": "attn_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "gate_up_proj": "mlp_in",
}
