"""Facts about the pinned training stack that several layers need: one definition each.

The bottom layer: it imports nothing from peftgen. The spec validates against these
facts, the estimator sizes with them, and the renderer writes them into scripts, so a
rule read from the libraries' code is written down once and cannot drift between the
plan and the script.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

GIB = 2**30
"""Bytes per GiB: every memory figure peftgen prints is in GiB (2**30 bytes)."""


def format_gib(value_bytes: int | float, digits: int = 1) -> str:
    """The one way peftgen writes a memory figure: ``12.3 GiB``."""
    return f"{value_bytes / GIB:.{digits}f} GiB"


MIN_VRAM_GIB = 0.5
"""Least GPU memory a plan accepts (``hardware.vram_gib``, ``--vram-gib``): the CUDA
context alone takes about 0.5 GiB."""
MAX_VRAM_GIB = 4096.0
"""Most GPU memory a plan accepts."""


def vram_gib_problem(vram_gib: float) -> str | None:
    """Why a GPU memory size in GiB cannot be planned for (NaN, inf, tiny, huge), or None."""
    if math.isfinite(vram_gib) and MIN_VRAM_GIB <= vram_gib <= MAX_VRAM_GIB:
        return None
    return (
        f"must be a number of GiB from {MIN_VRAM_GIB:g} to {MAX_VRAM_GIB:g} (the CUDA "
        f"context alone takes about {MIN_VRAM_GIB:g} GiB); got {vram_gib:g}"
    )


LOCAL_DATA_LOADERS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
"""``datasets`` builders for a local data file, by suffix; any other ``dataset.path`` is a
hub dataset. A local file loads as one split, ``train``."""


TRL_VLLM_RANGE: tuple[str, str] = ("0.22.0", "0.31.0")
"""The vLLM releases trl 1.16 accepts (trl/import_utils.py ``is_vllm_available``: it
warns outside them). Not a pin: which one installs depends on torch and transformers."""
VLLM_REQUIREMENT = f"vllm>={TRL_VLLM_RANGE[0]},<={TRL_VLLM_RANGE[1]}"
"""The header's vLLM requirement for GRPO with ``use_vllm``: uv resolves it together with
the pinned torch and transformers (a bare ``pip install vllm`` takes the newest release,
outside trl's range, and may replace them)."""


PINNED_VERSIONS: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "trl": "1.16.0",
    "bitsandbytes": "0.50.2",
    "datasets": "5.2.0",
    "accelerate": "1.15.0",
}
"""The versions the generated scripts are written for and the end-to-end tests run.
pyproject's ``train`` extra and every PEP 723 header pin exactly these (a test ties them)."""

ENGINE_VERSIONS: dict[str, str] = {"deepspeed": "0.19.8"}
"""Libraries only some scripts need, pinned like ``PINNED_VERSIONS``: DeepSpeed for the
ZeRO-2 / ZeRO-3 scripts (their PEP 723 header; pyproject's ``deepspeed`` extra, which the
test command installs so the emitted ZeRO launch files run on two CPU processes)."""

ComputeDtype = Literal["bf16", "fp16"]

RECEIPT_VERSION = 2
"""The memory receipt's format (``memory_receipt.json``) that generated scripts write and
``peftgen calibrate`` reads: version 1 plus measured and predicted step seconds."""


def compute_dtype(precision: str, gpu_bf16: bool) -> ComputeDtype:
    """The dtype the script computes in: fp16 when the spec loads in fp16 (even on a bf16
    GPU: the user chose it) or the GPU has no bfloat16; otherwise bf16. 8-bit and 4-bit
    loads compute in the same dtype (``bnb_4bit_compute_dtype``, LLM.int8's fp16/bf16
    matmul)."""
    return "fp16" if precision == "fp16" or not gpu_bf16 else "bf16"


TrainedCopyDtype = Literal["bf16", "fp32"]

TRAINED_COPY_DTYPE: TrainedCopyDtype = "fp32"
"""The dtype the generated script trains every trained copy in: LoRA adapters of an 8/4-bit
model, ``modules_to_save`` and trainable biases, full fine-tuning's weights.

fp32 master weights: in 16 bits an AdamW update below half a unit in the last place rounds
away. trl 1.16 casts every trainable weight of an 8/4-bit model to bf16
(sft_trainer.py:906-911, dpo_trainer.py:726-729, grpo_trainer.py:538-541), where a
``lora_A`` entry of Kaiming size (about 0.016 for 4096 inputs) has a unit of 6e-5: at DPO's
learning rate 5e-6, 10 AdamW steps change 12 % of its entries, at 2e-5 48 %, at 2e-4 98 %
(measured on the CPU). So the script casts trl's bf16 copies back to fp32 after building the
trainer, as it upcasts a 16-bit base's ``modules_to_save``; peft upcasts LoRA adapters of a
16-bit base itself (``autocast_adapter_dtype``), and full fine-tuning loads in fp32.
DeepSpeed keeps its own fp32 master (``script_upcasts_trained_copies``)."""


def script_upcasts_trained_copies(distributed: str) -> bool:
    """Whether the script itself upcasts trained copies (``TRAINED_COPY_DTYPE``) after
    building the trainer. Not under DeepSpeed: ``deepspeed.initialize`` casts the whole
    module to the compute dtype (its optimizer keeps the fp32 master partition), which would
    undo the upcast, and under ZeRO-3's ``zero.Init`` replacing a partitioned parameter's
    ``data`` leaves it fp32 while its partition stays bf16, so the forward mixes dtypes
    (seen on two CPU processes: ``expected m1 and m2 to have the same dtype``)."""
    return not distributed.startswith("deepspeed")


def peft_misses_adapter_keys_under_fsdp(distributed: str, finetuning: str) -> bool:
    """Whether peft 0.21.2 would save, and resume, an FSDP1 LoRA adapter empty.

    Under FSDP1 each decoder layer and each LoRA leaf is a unit of its own (peft's
    ``fsdp_auto_wrap_policy``, which transformers installs). Saving: peft finds the
    adapter's state-dict keys from module names and strips only a leading
    ``_fsdp_wrapped_module.`` (peft/tuners/tuners_utils.py ``_get_tuner_state_dict_key_
    prefixes``), so ``layers.0._fsdp_wrapped_module.mlp...`` matches no key of FSDP's state
    dicts and the final adapter and every checkpoint hold no LoRA weight. Resuming: the
    Trainer loads into the FSDP wrapper (trainer.py ``_load_from_checkpoint(...,
    self.model_wrapped)``), whose parameter names lack ``base_model.model.``, so
    ``set_peft_model_state_dict`` strips that prefix from every key and loads nothing.
    The script patches both (``fix_peft_adapter_io_under_fsdp``; ``tests/test_sharded.py``
    shows the empty save and the fix on two CPU processes)."""
    return distributed == "fsdp" and finetuning == "lora"


def fsdp_rounds_buffers(distributed: str) -> bool:
    """Whether the run's engine would cast the model's buffers to the 16-bit compute dtype.

    accelerate's FSDP mixed precision sets ``buffer_dtype`` to the compute dtype unless
    ``buffer_autocast`` (accelerate/utils/dataclasses.py ``set_mixed_precision``), from the
    launch's ``mixed_precision`` (accelerate/state.py) and again, for a 4-bit model, from
    its quant storage (transformers/distributed/fsdp.py ``update_fsdp_plugin_peft``). FSDP
    then rounds RoPE's ``inv_freq`` to bf16 at its first forward: some angles move by more
    than 3 radians at position 2048 (Llama-3's base 500000). One GPU and DDP keep the loaded
    fp32 buffers, and DeepSpeed 0.19.8 keeps them too (engine.py
    ``_cast_module_mixed_precision`` casts buffers only when ``buffer_dtype`` is set; seen
    fp32 under ZeRO-3 on two CPU processes). The script keeps them fp32
    (``keep_fsdp_buffers_fp32``)."""
    return distributed == "fsdp"


TORCH_DTYPE_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""peftgen's short dtype names to ``torch.<name>``."""


@dataclass(frozen=True)
class Optimizer:
    """One transformers 5.24 ``OptimizerNames`` value, as peftgen models and renders it."""

    name: str
    bitsandbytes: bool
    """Built through bitsandbytes by transformers (``trainer.py`` get_optimizer_cls_and_kwargs):
    the script needs the package, and ZeRO / CPU offload cannot partition its states."""
    paged: bool
    """States in CUDA managed memory (bitsandbytes paging): outside torch's counters."""
    state_bits: int
    """Bits per optimizer-state element (8-bit blockwise or 32-bit)."""
    states: int
    """State tensors per parameter: Adam's two moments, Lion's one, SGD (no momentum) none;
    Adafactor's factored rows/columns are sized by the estimator."""


OPTIMIZERS: dict[str, Optimizer] = {
    optimizer.name: optimizer
    for optimizer in (
        Optimizer("adamw_torch", bitsandbytes=False, paged=False, state_bits=32, states=2),
        Optimizer("adamw_torch_fused", bitsandbytes=False, paged=False, state_bits=32, states=2),
        Optimizer("adamw_8bit", bitsandbytes=True, paged=False, state_bits=8, states=2),
        Optimizer("adamw_bnb_8bit", bitsandbytes=True, paged=False, state_bits=8, states=2),
        Optimizer("paged_adamw_8bit", bitsandbytes=True, paged=True, state_bits=8, states=2),
        Optimizer("paged_adamw_32bit", bitsandbytes=True, paged=True, state_bits=32, states=2),
        Optimizer("adafactor", bitsandbytes=False, paged=False, state_bits=32, states=0),
        Optimizer("sgd", bitsandbytes=False, paged=False, state_bits=32, states=0),
        # transformers 5.24 builds every Lion through bitsandbytes (bnb.optim.Lion /
        # Lion8bit / PagedLion...), including the 32-bit ones.
        Optimizer("lion_8bit", bitsandbytes=True, paged=False, state_bits=8, states=1),
        Optimizer("lion_32bit", bitsandbytes=True, paged=False, state_bits=32, states=1),
        Optimizer("paged_lion_8bit", bitsandbytes=True, paged=True, state_bits=8, states=1),
        Optimizer("paged_lion_32bit", bitsandbytes=True, paged=True, state_bits=32, states=1),
    )
}


def uses_bitsandbytes(precision: str, optim: str) -> bool:
    """The script imports bitsandbytes: a k-bit load, or an optimizer built through it."""
    return precision in ("8bit", "4bit") or OPTIMIZERS[optim].bitsandbytes


def zero3_partitions_while_loading(distributed: str, precision: str) -> bool:
    """The emitted script builds its model under ``deepspeed.zero.Init``: ZeRO-3 and a 16-bit
    (or full fine-tuning's fp32) load. transformers 5.24 uses zero.Init when DeepSpeed's
    ZeRO-3 config is registered before ``from_pretrained`` (the training arguments do that
    under ``accelerate launch``, training_args.py ``set_deepspeed_weakref``) and the model is
    not quantized (modeling_utils.py:1435 ``not _is_quantized``); a quantized model keeps
    its CPU device map, which transformers would refuse once ZeRO-3 is registered
    (integrations/accelerate.py:137), so its script loads first and DeepSpeed moves the
    whole model to each GPU."""
    return distributed == "deepspeed-zero3" and precision not in ("8bit", "4bit")


INT8_SHARDING_REFUSED = (
    "bitsandbytes shards 4-bit weights only, not LLM.int8's int8 weights with their per-row scales"
)
"""Why 8-bit loading has no place under FSDP / ZeRO-3: the spec's refusal and the plan's
note on its missing 8-bit column say it in these words."""


BUILTIN_REWARDS: tuple[str, ...] = ("format", "length")
"""GRPO rewards the scripts define themselves: `format` (an <answer> block, optionally after
<think>) and `length` (peaks at half of max_completion_length)."""


GATED_MODEL_PREFIXES: tuple[str, ...] = ("meta-llama/", "google/gemma", "mistralai/")
"""Hub repositories that ask each user to accept a licence before downloading; the
script then needs ``HF_TOKEN`` (or ``hf auth login``) of an account that accepted it."""


def is_gated(model_id: str) -> bool:
    return model_id.startswith(GATED_MODEL_PREFIXES)


def shares_tied_copy(tie_word_embeddings: bool, modules_to_save: Iterable[str]) -> bool:
    """The script sets ``ensure_weight_tying=True``: the model ties its head to the input
    embeddings and both are trained in full, so peft keeps one trained copy for both (two
    without it, and the merged model would come out untied)."""
    leaves = {name.rsplit(".", 1)[-1] for name in modules_to_save}
    return tie_word_embeddings and {"embed_tokens", "lm_head"} <= leaves
