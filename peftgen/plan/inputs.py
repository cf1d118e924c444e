"""From a resolved spec to the estimator's ``EstimateInput``: the candidate precisions, the
budget, the target GPU and the spec keys an override may change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from peftgen.catalog import Gpu, ModelArch, lookup_gpu
from peftgen.chat_templates import CHATML_SPECIAL_TOKENS
from peftgen.errors import UserError
from peftgen.memory import (
    EstimateInput,
)
from peftgen.resolve import Resolved
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    AnySpec,
    LoadPrecision,
    trained_modules_to_save,
)
from peftgen.stack import GIB
from peftgen.stack import compute_dtype as stack_compute_dtype

MIN_MAX_LENGTH = 16
"""The smallest ``training.max_length`` the spec allows."""

# Spec keys a suggestion or an override may change, and the estimate field each feeds.
SPEC_KEY_TO_FIELD: dict[str, str] = {
    "training.gradient_checkpointing": "gradient_checkpointing",
    "training.optim": "optim",
    "training.per_device_train_batch_size": "micro_batch",
    "training.gradient_accumulation_steps": "gradient_accumulation_steps",
    "training.max_length": "max_length",
    "lora.r": "lora_r",
    "lora.use_dora": "use_dora",
    "lora.lora_dropout": "lora_dropout",
    "model.attn_implementation": "attn_implementation",
    "grpo.max_completion_length": "max_completion_length",
    "grpo.vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "grpo.vllm_enable_sleep_mode": "vllm_enable_sleep_mode",
    "hardware.num_gpus": "world_size",
    "hardware.num_nodes": "world_size",
    "hardware.distributed": "distributed",
    "hardware.cpu_offload": "cpu_offload",
}
"""``hardware.num_gpus`` (per node) and ``hardware.num_nodes`` both feed the world size:
their product, each taken from the override or else the spec."""


def precision_order(
    gpu: Gpu, requested: str = "auto", distributed: str = "none"
) -> tuple[LoadPrecision, ...]:
    """Candidates from the most to the least faithful: a 16-bit load (the GPU's, or the
    one the spec fixes: fp16 on a bf16 GPU is allowed), 8-bit, 4-bit. FSDP and ZeRO-3
    cannot shard LLM.int8 weights, so they skip 8-bit."""
    sixteen: LoadPrecision = "bf16" if gpu.bf16 else "fp16"
    if requested == "fp16":
        sixteen = "fp16"
    if distributed in PARAMETER_SHARDING_ENGINES:
        return (sixteen, "4bit")
    return (sixteen, "8bit", "4bit")


def budget_bytes(gpu: Gpu, headroom_fraction: float) -> int:
    """What the run may hold: GPU memory less the spec's headroom."""
    return int(gpu.memory_bytes * (1.0 - headroom_fraction))


def trained_arch(resolved: Resolved) -> ModelArch:
    """The architecture the script trains: with ``dataset.chat_template: chatml`` the two
    ChatML markers become new tokens, and ``resize_token_embeddings`` grows the vocabulary
    (embeddings, a separate head) by them."""
    arch = resolved.arch
    if resolved.loaded.spec.dataset.chat_template is None:
        return arch
    grown = arch.config.vocab_size + len(CHATML_SPECIAL_TOKENS)
    return arch.model_copy(update={"config": arch.config.model_copy(update={"vocab_size": grown})})


def estimate_input(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
) -> EstimateInput:
    """The estimator's input for the resolved spec loaded in ``precision``.

    ``overrides`` are dotted spec keys (``SPEC_KEY_TO_FIELD``), so a suggestion's
    ``change`` can be estimated before the user edits the spec.
    """
    spec = resolved.loaded.spec
    target = gpu or resolved.gpu
    lora, training = spec.lora, spec.training
    targets = (
        lora.target_modules if lora.target_modules == "all-linear" else tuple(lora.target_modules)
    )
    grpo = getattr(spec, "grpo", None)
    inputs = EstimateInput(
        arch=trained_arch(resolved),
        precision=precision,
        method=spec.method,
        compute_dtype=stack_compute_dtype(precision, target.bf16),
        bnb_4bit_quant_type=spec.quantization.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=spec.quantization.bnb_4bit_use_double_quant,
        lora_r=lora.r,
        target_modules=targets,
        use_dora=lora.use_dora,
        modules_to_save=tuple(trained_modules_to_save(spec)),
        lora_dropout=lora.lora_dropout,
        lora_bias=lora.bias,
        micro_batch=training.per_device_train_batch_size,
        max_length=training.max_length,
        gradient_checkpointing=training.gradient_checkpointing,
        packing=spec.method == "sft" and training.packing,
        attn_implementation=spec.model.attn_implementation,
        optim=training.optim,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_completion_length=grpo.max_completion_length if grpo else 256,
        world_size=spec.hardware.world_size,
        num_nodes=spec.hardware.num_nodes,
        distributed=spec.hardware.distributed,
        cpu_offload=spec.hardware.cpu_offload,
        gpu_compute_capability=target.compute_capability,
        **vllm_fields(spec, target),
    )
    if overrides:
        unknown = set(overrides) - set(SPEC_KEY_TO_FIELD)
        if unknown:
            raise KeyError(f"cannot override {sorted(unknown)}; known: {sorted(SPEC_KEY_TO_FIELD)}")
        fields = {SPEC_KEY_TO_FIELD[k]: v for k, v in overrides.items()}
        if "world_size" in fields:
            gpus = int(overrides.get("hardware.num_gpus", spec.hardware.num_gpus))
            nodes = int(overrides.get("hardware.num_nodes", spec.hardware.num_nodes))
            fields["world_size"] = gpus * nodes
        inputs = replace(inputs, **fields)
    if spec.finetuning == "full":
        inputs = as_full_finetuning(inputs, spec)
    return inputs


def as_full_finetuning(inputs: EstimateInput, spec: AnySpec) -> EstimateInput:
    """``inputs`` for ``finetuning: full``: no adapters, every weight trained (in the
    16-bit autocast dtype the input computes in), the reference copy when the method keeps
    one."""
    sixteen: LoadPrecision = "fp16" if inputs.compute_dtype == "fp16" else "bf16"
    return replace(
        inputs,
        finetuning="full",
        precision=sixteen,
        lora_r=0,
        target_modules=(),
        use_dora=False,
        modules_to_save=(),
        lora_dropout=0.0,
        lora_bias="none",
        reference_model=needs_reference_copy(spec),
    )


def vllm_fields(spec: AnySpec, gpu: Gpu) -> dict[str, Any]:
    """The estimate's vLLM inputs from ``grpo.use_vllm`` and its options."""
    grpo = getattr(spec, "grpo", None)
    if grpo is None or not grpo.use_vllm:
        return {"gpu_memory_bytes": gpu.memory_bytes}
    return {
        "vllm_mode": grpo.use_vllm,
        "vllm_gpu_memory_utilization": grpo.vllm_gpu_memory_utilization,
        "vllm_enable_sleep_mode": grpo.vllm_enable_sleep_mode,
        "gpu_memory_bytes": gpu.memory_bytes,
    }


def needs_reference_copy(spec: AnySpec) -> bool:
    """Full fine-tuning keeps a frozen reference model: DPO unless its log-probs are
    precomputed (trl then sets ``ref_model=None`` and scores with the untrained policy
    before training, dpo_trainer.py:909), GRPO when ``beta > 0`` (grpo_trainer.py:984)."""
    dpo = getattr(spec, "dpo", None)
    if dpo is not None:
        return not dpo.precompute_ref_log_probs
    grpo = getattr(spec, "grpo", None)
    return grpo is not None and grpo.beta > 0


def full_finetuning_input(
    resolved: Resolved,
    precision: LoadPrecision,
    overrides: Mapping[str, Any] | None = None,
    gpu: Gpu | None = None,
) -> EstimateInput:
    """The estimate's input for ``finetuning: full``, also for a LoRA spec's comparison (the
    same spec as if it said ``finetuning: full``). ``precision`` only picks the autocast
    dtype: bf16, or fp16 where the GPU lacks bf16 or the spec asks for it."""
    spec = resolved.loaded.spec
    if spec.finetuning != "full":
        full_spec = spec.model_copy(update={"finetuning": "full"})
        resolved = replace(resolved, loaded=replace(resolved.loaded, spec=full_spec))
    target = gpu or resolved.gpu
    sixteen: LoadPrecision = "bf16" if target.bf16 and precision != "fp16" else "fp16"
    return estimate_input(resolved, sixteen, overrides, gpu)


def spec_precisions(order: tuple[LoadPrecision, ...], spec: AnySpec) -> tuple[LoadPrecision, ...]:
    """The candidates the spec allows: full fine-tuning loads fp32 masters and computes in
    the 16-bit dtype (one candidate, never 8/4-bit); vLLM cannot load LLM.int8 weights."""
    if spec.finetuning == "full":
        return order[:1]
    grpo = getattr(spec, "grpo", None)
    if grpo is not None and grpo.use_vllm:
        return tuple(p for p in order if p != "8bit")
    return order


def planned_precisions(
    gpu: Gpu, spec: AnySpec, distributed: str | None = None
) -> tuple[LoadPrecision, ...]:
    """The precisions planned for ``spec`` on ``gpu``, in the order ``precision: auto``
    tries them: ``precision_order`` (the spec's fixed 16-bit dtype, the engine: the spec's
    own unless ``distributed`` says otherwise) narrowed by ``spec_precisions``. The plan,
    its suggestions, the engine it recommends and the report's GPU matrix all ask this."""
    engine = spec.hardware.distributed if distributed is None else distributed
    return spec_precisions(precision_order(gpu, spec.precision, engine), spec)


def target_gpu(resolved: Resolved, gpu_name: str | None, vram_gib: float | None) -> Gpu:
    """The spec's GPU, or the one named on the command line, with memory overridden."""
    gpu = resolved.gpu
    if gpu_name is not None:
        try:
            gpu = lookup_gpu(
                gpu_name,
                # --vram-gib alone keeps the spec's card (its bf16, its speed), so an
                # uncatalogued card is an unnamed one: plan's --set can say that.
                instead="plan it as an unnamed card: peftgen plan SPEC --set hardware.gpu=null "
                "--set hardware.vram_gib=GIB",
                memory_override="give --gpu {gpu} --vram-gib {gb}",
            )
        except UserError as error:
            raise UserError(
                [replace(p, field_path="--gpu", file=None) for p in error.problems]
            ) from None
    if vram_gib is not None:
        from peftgen.stack import vram_gib_problem

        problem = vram_gib_problem(vram_gib)
        if problem is not None:
            raise UserError.single(problem, field_path="--vram-gib")
        gpu = gpu.model_copy(update={"memory_bytes": int(vram_gib * GIB)})
    return gpu
