"""Reproduce the published peak-memory measurements (``benchmarks/published.md``).

Every row the estimator covers is rebuilt as an ``EstimateInput`` with the row's own
configuration and the *mechanisms of the stack it ran on*, selected through
``peftgen.memory.StackProfile`` switches (loss path, adapter dtype, fp32 upcasts, what
bitsandbytes saved for backward, how LoRA dropout copies its input). The profiles below are
chosen from what each framework/version does, never tuned to a row; the pinned stack is
``StackProfile()``.

Metrics: ``alloc`` rows are compared with ``peak_allocated_bytes``; ``resv`` rows with
``torch_reserved_bytes`` (``torch.cuda.max_memory_reserved``: no CUDA context); ``weights``
rows with the weights term; ``fit`` rows (T4 fit / OOM) with ``peak_reserved_bytes``
(CUDA context included) against the card's memory.

    python benchmarks/accuracy.py            # table, median / max |error|
    python benchmarks/accuracy.py --markdown # the table for docs/plan.md
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, replace
from typing import Any, Literal

from peftgen.catalog import ArchConfig, ModelArch, find_gpu, find_model
from peftgen.memory import Estimate, EstimateInput, StackProfile, estimate

GB = 10**9
GIB = 2**30

Metric = Literal["alloc", "resv", "weights", "process"]

# ----------------------------------------------------------------------------- stacks

LITGPT_2023 = StackProfile(
    name="litgpt 2023 (bf16-true, bnb 0.41)",
    # finetune/lora.py: logits in lm_head chunks of 128, cross-entropy on the bf16 chunks.
    loss_path="chunked_logits_bf16",
    # bf16-true precision: every parameter, LoRA included, is bf16.
    quantized_adapter_dtype="bf16",
    unquantized_adapter_dtype="bf16",
    # LoRAQKVLinear: one dropout on the fused qkv input, shared by the q and v adapters.
    lora_input_copy_per_module=False,
    # bitsandbytes 0.41 MatMul4Bit saved its input for backward.
    bnb_4bit_saves_input=True,
)
TORCHTUNE_2024 = StackProfile(
    name="torchtune early 2024 (output .float(), torchao NF4)",
    # TransformerDecoder returned ``self.output(h).float()``; CrossEntropyLoss on it.
    loss_path="full_logits_fp32",
    # LoRA parameters in the model dtype (bf16 recipes).
    quantized_adapter_dtype="bf16",
    unquantized_adapter_dtype="bf16",
    # torchao's linear_nf4 saves no input (only the weight is needed for grad_input).
    bnb_4bit_saves_input=False,
)
TORCHTUNE_0_3 = replace(
    TORCHTUNE_2024,
    name="torchtune 0.3 (CEWithChunkedOutputLoss)",
    loss_path="chunked_logits_fp32",
)
HF_2023 = StackProfile(
    name="HF 2023 (transformers 4.30, peft 0.4, bnb 0.39)",
    # LlamaForCausalLM: logits.float(), then a contiguous shifted copy, then CE.
    loss_path="full_logits_fp32_shifted",
    # peft created LoRA layers in fp32 and trainers did not cast them.
    quantized_adapter_dtype="fp32",
    unquantized_adapter_dtype="fp32",
    # prepare_model_for_kbit_training (the blog's notebook) upcast norms, embeddings, head.
    upcast_unquantized_to_fp32=True,
    bnb_4bit_saves_input=True,
)
HF_FSDP_QLORA_2024 = StackProfile(
    name="HF Mar 2024 (fsdp_qlora: transformers 4.38, bnb 0.43, pure bf16)",
    loss_path="full_logits_fp32_shifted",
    # train.py's loop: ``output = model(...)``; ``loss.backward()``; ``output = None`` only
    # after the optimizer step: the fp32 logits stay alive through backward.
    loss_output_held=True,
    # transformers 4.38 LlamaModel._update_causal_mask: a [rows, 1, 4096, 4096] bf16 mask
    # from the max-positions buffer on every forward (train.py passes attention_mask=None,
    # attn_implementation "sdpa").
    causal_mask_max_positions=True,
    # --precision bf16: the whole model, LoRA included, cast to bf16.
    quantized_adapter_dtype="bf16",
    unquantized_adapter_dtype="bf16",
    bnb_4bit_saves_input=True,
)


def fsdp_qlora_stack(stack: StackProfile, precision: str) -> StackProfile:
    """fsdp_qlora train.py's RoPE cache buffers (transformers 4.38 ``_cos_cached`` /
    ``_sin_cached``) in the dtype each path leaves them: ``--train_type lora`` loads with
    ``from_pretrained`` and calls ``model.to(dtype=torch_dtype, ...)`` (bf16 buffers);
    ``qlora`` builds the model with ``from_config`` under ``init_empty_weights`` (real
    buffers in the default fp32) and ``load_and_quantize`` casts only checkpoint tensors."""
    return replace(stack, rope_cache_element_bytes=4 if precision == "4bit" else 2)


HF_PEFT_2025 = StackProfile(
    name="HF 2025 (peft method comparison: transformers 4.5x, fp32 adapters)",
    # model(**batch) with labels: transformers >= 4.46 pads labels, no shifted copy.
    loss_path="full_logits_fp32",
)
HF_PEFT_FULL_2025 = replace(
    HF_PEFT_2025,
    name="HF 2025 (peft method comparison: full fine-tune, pure bf16, no autocast)",
    # default_training_params.json: "dtype": "bfloat16", "use_amp": false: weights,
    # gradients and AdamW states in bf16 (peftgen's own scripts keep fp32 masters).
    full_master_weights="compute",
)

FSDP_QLORA_2024 = replace(
    HF_FSDP_QLORA_2024,
    name="fsdp_qlora Mar 2024 (FSDP1, torch 2.2, transformers 4.38, bnb 0.43, pure bf16)",
    # train.py: FSDP(..., use_orig_params=False, limit_all_gathers=True, sync_module_states=
    # low_memory, default backward_prefetch=BACKWARD_PRE, MixedPrecision(bf16, bf16)); rank 0
    # reads the checkpoint on the CPU, the others on meta (``low_memory``), so each unit is
    # moved to the GPU and sharded while wrapping; no empty_cache before training.
    fsdp_version=1,
    fsdp_backward_prefetch="BACKWARD_PRE",
    fsdp_limit_all_gathers=True,
    fsdp_load_on_cpu=True,
)
HF_PEFT_SHARDED_2024 = StackProfile(
    # The docs' requirements: bitsandbytes>=0.43.3, accelerate>=1.0.1, transformers>4.44.2,
    # trl>0.11.4, peft>0.13.0.
    name="peft docs (transformers > 4.44.2, trl > 0.11.4, peft > 0.13.0, bnb >= 0.43.3)",
    # SFTTrainer without the fused head: model(labels=...); transformers 4.45's
    # LlamaForCausalLM still upcasts the logits and copies the shifted ones (the
    # ``loss_function`` without the copy arrived in 4.46). The Trainer's compute_loss
    # returns the loss alone: nothing holds the output through backward.
    loss_path="full_logits_fp32_shifted",
    # The docs ask for trl > 0.11.4, whose SFTTrainer calls get_peft_model(...,
    # autocast_adapter_dtype=False) for sharded QLoRA (Params4bit on cpu/meta) and skips
    # peft_module_casting_to_bf16: the adapters stay in the bf16 storage dtype they are
    # created in (peft ``_move_adapter_to_device_of_base_layer``).
    quantized_adapter_dtype="bf16",
    # bitsandbytes 0.43.3 MatMul4Bit no longer saves A for frozen weights.
    bnb_4bit_saves_input=False,
    fsdp_version=1,
    fsdp_load_on_cpu=True,
    # deepspeed_config_z3_qlora.yaml names no ds_config file: accelerate's plugin writes
    # no bucket keys, so DeepSpeed's default reduce_bucket_size 5e8 applies.
    zero_reduce_bucket_elements=500_000_000,
)

# ----------------------------------------------------------------------------- models


def catalogued(model_id: str) -> ModelArch:
    arch = find_model(model_id)
    if arch is None:
        raise SystemExit(f"{model_id} left the catalogue")
    return arch


LLAMA2_7B = catalogued("meta-llama/Llama-2-7b-hf")
LLAMA2_13B = catalogued("meta-llama/Llama-2-13b-hf")
LLAMA3_8B = catalogued("meta-llama/Meta-Llama-3-8B")
LLAMA31_8B = catalogued("meta-llama/Llama-3.1-8B")
LLAMA32_3B = catalogued("meta-llama/Llama-3.2-3B")
# Not in the catalogue (no fine-tuning target): meta-llama/Llama-2-70b-hf config.json.
LLAMA2_70B = ModelArch(
    id="meta-llama/Llama-2-70b-hf",
    display_name="Llama 2 70B",
    source="meta-llama/Llama-2-70b-hf config.json",
    config=ArchConfig(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
)

ALPACA_LONGEST = 1304
"""Longest Alpaca sample under the Llama-2 tokenizer (litgpt's resource table). Unpacked
batches pad to their longest row, so the peak batch holds rows of this length. The
torchtune Alpaca rows reuse it (their own longest sample is not published)."""

QV = ("q_proj", "v_proj")
ALL_BUT_O = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
QVO_MLP = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Row:
    """One published number and the estimate of the same run."""

    label: str
    framework: str
    what: str
    inputs: EstimateInput
    measured_bytes: int
    metric: Metric
    note: str = ""

    def predicted_bytes(self) -> int:
        result: Estimate = estimate(self.inputs)
        if self.metric == "alloc":
            return result.peak_allocated_bytes
        if self.metric == "resv":
            return result.torch_reserved_bytes
        if self.metric == "process":
            return result.peak_reserved_bytes
        return result.weights_bytes

    def error(self) -> float:
        return (self.predicted_bytes() - self.measured_bytes) / self.measured_bytes


def lora(arch: ModelArch, stack: StackProfile, **kwargs: object) -> EstimateInput:
    """Defaults shared by the published LoRA runs: SFT, bf16 compute, no checkpointing."""
    base: dict[str, object] = {
        "arch": arch,
        "precision": "bf16",
        "lora_r": 8,
        "target_modules": QV,
        "lora_dropout": 0.05,
        "micro_batch": 1,
        "max_length": ALPACA_LONGEST,
        "gradient_checkpointing": False,
        "optim": "adamw_torch",
        "stack": stack,
    }
    base.update(kwargs)
    return EstimateInput(**base)  # type: ignore[arg-type]


def weights_only(arch: ModelArch, precision: str, double_quant: bool = False) -> EstimateInput:
    return EstimateInput(
        arch=arch,
        precision=precision,  # type: ignore[arg-type]
        bnb_4bit_use_double_quant=double_quant,
        stack=LITGPT_2023,
    )


def published_rows() -> list[Row]:
    """Every row of published.md the estimator covers, with the row's mechanisms."""
    lit, tt, tt3 = LITGPT_2023, TORCHTUNE_2024, TORCHTUNE_0_3
    rows = [
        Row(
            "1",
            "litgpt",
            "Llama-2-7B LoRA r8 q,v mbs1",
            lora(LLAMA2_7B, lit),
            int(21.30 * GB),
            "alloc",
        ),
        Row(
            "2",
            "litgpt",
            "Llama-2-7B LoRA r8 q,v mbs2",
            lora(LLAMA2_7B, lit, micro_batch=2),
            int(29.07 * GB),
            "alloc",
        ),
        Row(
            "3a",
            "litgpt",
            "Llama-2-7B QLoRA nf4, paged AdamW",
            lora(
                LLAMA2_7B,
                lit,
                precision="4bit",
                bnb_4bit_use_double_quant=False,
                optim="paged_adamw_32bit",
            ),
            int(14.14 * GB),
            "alloc",
        ),
        Row(
            "3b",
            "litgpt",
            "Llama-2-7B QLoRA nf4+DQ, paged AdamW",
            lora(
                LLAMA2_7B,
                lit,
                precision="4bit",
                bnb_4bit_use_double_quant=True,
                optim="paged_adamw_32bit",
            ),
            int(13.84 * GB),
            "alloc",
        ),
        Row(
            "4a",
            "litgpt",
            "Llama-2-13B LoRA r8 q,v",
            lora(LLAMA2_13B, lit),
            int(38.12 * GB),
            "alloc",
        ),
        Row(
            "4b",
            "litgpt",
            "Llama-2-13B QLoRA nf4",
            lora(
                LLAMA2_13B,
                lit,
                precision="4bit",
                bnb_4bit_use_double_quant=False,
                optim="paged_adamw_32bit",
            ),
            int(23.14 * GB),
            "alloc",
        ),
        Row(
            "4c",
            "litgpt",
            "Llama-2-13B QLoRA nf4+DQ",
            lora(
                LLAMA2_13B,
                lit,
                precision="4bit",
                bnb_4bit_use_double_quant=True,
                optim="paged_adamw_32bit",
            ),
            int(22.55 * GB),
            "alloc",
        ),
        Row(
            "7a",
            "litgpt",
            "Llama-2-7B weights bf16",
            weights_only(LLAMA2_7B, "bf16"),
            int(13.52 * GB),
            "weights",
        ),
        Row(
            "7b",
            "litgpt",
            "Llama-2-7B weights nf4",
            weights_only(LLAMA2_7B, "4bit"),
            int(4.57 * GB),
            "weights",
        ),
        Row(
            "7c",
            "litgpt",
            "Llama-2-7B weights nf4+DQ",
            weights_only(LLAMA2_7B, "4bit", True),
            int(4.26 * GB),
            "weights",
        ),
        Row(
            "7d",
            "litgpt",
            "Llama-2-13B weights bf16",
            weights_only(LLAMA2_13B, "bf16"),
            int(26.21 * GB),
            "weights",
        ),
        Row(
            "7e",
            "litgpt",
            "Llama-2-13B weights nf4",
            weights_only(LLAMA2_13B, "4bit"),
            int(8.32 * GB),
            "weights",
        ),
        Row(
            "7f",
            "litgpt",
            "Llama-2-13B weights nf4+DQ",
            weights_only(LLAMA2_13B, "4bit", True),
            int(7.72 * GB),
            "weights",
        ),
        Row(
            "7g",
            "litgpt",
            "Llama-2-70B weights nf4+DQ",
            weights_only(LLAMA2_70B, "4bit", True),
            int(37.21 * GB),
            "weights",
        ),
        Row(
            "8",
            "torchtune",
            "Llama-2-7B QLoRA r8 all linear, mbs2, GC",
            lora(
                LLAMA2_7B,
                tt,
                precision="4bit",
                bnb_4bit_use_double_quant=True,
                target_modules="all-linear",
                micro_batch=2,
                gradient_checkpointing=True,
            ),
            int(9.29 * GB),
            "resv",
            "sequence length assumed (Alpaca longest)",
        ),
        Row(
            "9",
            "torchtune",
            "Llama-2-7B LoRA r8 q,v, mbs2, GC",
            lora(LLAMA2_7B, tt, micro_batch=2, gradient_checkpointing=True),
            int(15.57 * GB),
            "resv",
            "sequence length assumed (Alpaca longest)",
        ),
        Row(
            "10",
            "torchtune",
            "Llama-3-8B LoRA r8 q,v, mbs2, GC",
            lora(LLAMA3_8B, tt, micro_batch=2, gradient_checkpointing=True),
            int(18.5 * GB),
            "alloc",
            "sequence length assumed; 'torch stats' read as allocated",
        ),
        Row(
            "11a",
            "torchtune",
            "Llama-3.1-8B QLoRA r8 qvo+MLP, packed 2048, mbs2, GC",
            lora(
                LLAMA31_8B,
                tt3,
                precision="4bit",
                bnb_4bit_use_double_quant=True,
                target_modules=QVO_MLP,
                micro_batch=2,
                max_length=2048,
                gradient_checkpointing=True,
            ),
            int(7.4 * GIB),
            "alloc",
            "'torch stats' read as allocated",
        ),
        Row(
            "11b",
            "torchtune",
            "Llama-3.1-8B LoRA r8 qvo+MLP, packed 2048, mbs2, GC",
            lora(
                LLAMA31_8B,
                tt3,
                target_modules=QVO_MLP,
                micro_batch=2,
                max_length=2048,
                gradient_checkpointing=True,
            ),
            int(16.2 * GIB),
            "alloc",
            "'torch stats' read as allocated",
        ),
        Row(
            "12a",
            "HF+peft",
            "Llama-3.2-3B LoRA r32 q,v, mbs4, <=768",
            lora(
                LLAMA32_3B, HF_PEFT_2025, lora_r=32, lora_dropout=0.0, micro_batch=4, max_length=768
            ),
            int(22.27 * GB),
            "resv",
            "eval generation (batch 50) shares the process",
        ),
        Row(
            "12b",
            "HF+peft",
            "Llama-3.2-3B LoRA r64 q,v, mbs4, <=768",
            lora(
                LLAMA32_3B, HF_PEFT_2025, lora_r=64, lora_dropout=0.0, micro_batch=4, max_length=768
            ),
            int(22.55 * GB),
            "resv",
            "eval generation (batch 50) shares the process",
        ),
        Row(
            "13a",
            "HF+peft",
            "Llama-3.2-3B DoRA r32 q,v, mbs4, <=768",
            lora(
                LLAMA32_3B,
                HF_PEFT_2025,
                lora_r=32,
                lora_dropout=0.0,
                use_dora=True,
                micro_batch=4,
                max_length=768,
            ),
            int(24.53 * GB),
            "resv",
            "eval generation (batch 50) shares the process",
        ),
        Row(
            "13c",
            "HF+peft",
            "Llama-3.2-3B full fine-tune, mbs4, <=768",
            replace(
                lora(LLAMA32_3B, HF_PEFT_FULL_2025, micro_batch=4, max_length=768),
                finetuning="full",
                lora_r=0,
                target_modules=(),
                lora_dropout=0.0,
            ),
            int(38.87 * GB),
            "resv",
            "eval generation (batch 50) shares the process; pure bf16 (no fp32 masters)",
        ),
        Row(
            "13b",
            "HF+peft",
            "Llama-3.2-3B LoRA r10 MLP, mbs4, <=768",
            lora(
                LLAMA32_3B,
                HF_PEFT_2025,
                lora_r=10,
                lora_dropout=0.0,
                target_modules=("gate_proj", "up_proj", "down_proj"),
                micro_batch=4,
                max_length=768,
            ),
            int(24.70 * GB),
            "resv",
            "eval generation (batch 50) shares the process",
        ),
        Row(
            "14",
            "HF+bnb",
            "Llama-2-7B QLoRA r64 all but o, 2048, mbs8, GC",
            lora(
                LLAMA2_7B,
                fsdp_qlora_stack(HF_FSDP_QLORA_2024, "4bit"),
                precision="4bit",
                bnb_4bit_use_double_quant=False,
                lora_r=64,
                lora_dropout=0.1,
                target_modules=ALL_BUT_O,
                micro_batch=8,
                max_length=2048,
                gradient_checkpointing=True,
            ),
            int(20.94 * GIB),
            "resv",
        ),
        Row(
            "15",
            "HF+bnb",
            "Llama-2-7B LoRA r64 all but o, 2048, mbs4, GC",
            lora(
                LLAMA2_7B,
                fsdp_qlora_stack(HF_FSDP_QLORA_2024, "bf16"),
                lora_r=64,
                lora_dropout=0.1,
                target_modules=ALL_BUT_O,
                micro_batch=4,
                max_length=2048,
                gradient_checkpointing=True,
            ),
            int(22.04 * GIB),
            "resv",
        ),
    ]
    return rows


def fsdp_qlora(arch: ModelArch, **kwargs: object) -> EstimateInput:
    """Answer.AI fsdp_qlora train.py defaults (benchmarks_03_2024.md): LoRA r64 on q,k,v,
    gate,up,down, dropout 0.1, NF4 without double quantization, reentrant checkpointing,
    dummy rows of exactly ``context_length`` tokens, FSDP FULL_SHARD over 2 GPUs."""
    base: dict[str, object] = {
        "precision": "4bit",
        "bnb_4bit_use_double_quant": False,
        "lora_r": 64,
        "lora_dropout": 0.1,
        "target_modules": ALL_BUT_O,
        "max_length": 2048,
        "gradient_checkpointing": True,
        "world_size": 2,
        "distributed": "fsdp",
    }
    base.update(kwargs)
    return lora(arch, fsdp_qlora_stack(FSDP_QLORA_2024, str(base["precision"])), **base)


def peft_docs_70b(distributed: str, **kwargs: object) -> EstimateInput:
    """peft docs/source/accelerate/{fsdp,deepspeed}.md: Llama-2-70B QLoRA r8 all-linear,
    dropout 0.1, NF4 + double quantization, bf16 storage, packed 2048, micro-batch 2,
    gradient accumulation 2 (both launch commands: ``--gradient_accumulation_steps 2``),
    reentrant checkpointing, flash-attention 2, 2 GPUs."""
    base: dict[str, object] = {
        "precision": "4bit",
        "bnb_4bit_use_double_quant": True,
        "lora_r": 8,
        "lora_dropout": 0.1,
        "target_modules": "all-linear",
        "max_length": 2048,
        "micro_batch": 2,
        "gradient_accumulation_steps": 2,
        "packing": True,
        "attn_implementation": "flash_attention_2",
        "gradient_checkpointing": True,
        "world_size": 2,
        "distributed": distributed,
    }
    base.update(kwargs)
    return lora(LLAMA2_70B, HF_PEFT_SHARDED_2024, **base)


FSDP_QLORA_DOC = "AnswerDotAI/fsdp_qlora benchmarks_03_2024.md"
PEFT_FSDP_DOC = "huggingface/peft docs/source/accelerate/fsdp.md (Memory usage)"
PEFT_ZERO3_DOC = "huggingface/peft docs/source/accelerate/deepspeed.md (Memory usage)"


def sharded_rows() -> list[Row]:
    """Published FSDP / ZeRO-3 measurements, per GPU, with their stacks' mechanisms.

    16a-d are published.md row 16; 19a-i, 20a-b and 21 are rows 19-21 of
    ``benchmarks/published.md`` (sources in ``Row.note``). The peft docs' figures ("memory
    consumed per GPU", GB) are read as the process figure (``peak_reserved_bytes``: what
    nvidia-smi shows), metric ``process``.
    """
    f = fsdp_qlora
    return [
        Row(
            "16a",
            "HF+bnb",
            "7B QLoRA FSDP 2x3090, ctx 512",
            f(LLAMA2_7B, max_length=512),
            int(4.98 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "16b",
            "HF+bnb",
            "7B QLoRA FSDP 2x3090, ctx 2048",
            f(LLAMA2_7B),
            int(5.21 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "16c",
            "HF+bnb",
            "7B LoRA FSDP 2x3090, ctx 512",
            f(LLAMA2_7B, precision="bf16", max_length=512),
            int(10.24 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "16d",
            "HF+bnb",
            "7B LoRA FSDP 2x3090, ctx 2048",
            f(LLAMA2_7B, precision="bf16"),
            int(10.22 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19a",
            "HF+bnb",
            "7B LoRA FSDP 2x3090, ctx 512 (allocated)",
            f(LLAMA2_7B, precision="bf16", max_length=512),
            int(8.28 * GIB),
            "alloc",
            FSDP_QLORA_DOC + " (NB under the LoRA table)",
        ),
        Row(
            "19b",
            "HF+bnb",
            "7B LoRA FSDP 2x3090, ctx 2048 (allocated)",
            f(LLAMA2_7B, precision="bf16"),
            int(9.16 * GIB),
            "alloc",
            FSDP_QLORA_DOC + " (NB under the LoRA table)",
        ),
        Row(
            "19c",
            "HF+bnb",
            "7B QLoRA FSDP 2x3090, 2048, mbs4",
            f(LLAMA2_7B, micro_batch=4),
            int(11.22 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19d",
            "HF+bnb",
            "7B QLoRA FSDP 2x3090, 2048, mbs10",
            f(LLAMA2_7B, micro_batch=10),
            int(20.97 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19e",
            "HF+bnb",
            "7B LoRA FSDP 2x3090, 2048, mbs4",
            f(LLAMA2_7B, precision="bf16", micro_batch=4),
            int(16.14 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19f",
            "HF+bnb",
            "7B LoRA FSDP 2x3090, 2048, mbs6",
            f(LLAMA2_7B, precision="bf16", micro_batch=6),
            int(21.35 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19g",
            "HF+bnb",
            "70B QLoRA FSDP+offload 2x3090, 2048, mbs2",
            f(LLAMA2_70B, micro_batch=2, cpu_offload=True),
            int(14.92 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19h",
            "HF+bnb",
            "7B QLoRA FSDP+offload 2x4090, 2048, mbs12",
            f(LLAMA2_7B, micro_batch=12, cpu_offload=True),
            int(22.38 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "19i",
            "HF+bnb",
            "7B LoRA FSDP+offload 2x4090, 2048, mbs10",
            f(LLAMA2_7B, precision="bf16", micro_batch=10, cpu_offload=True),
            int(22.69 * GIB),
            "resv",
            FSDP_QLORA_DOC,
        ),
        Row(
            "20a",
            "HF+peft",
            "70B QLoRA FSDP+offload, 2 GPUs",
            peft_docs_70b("fsdp", cpu_offload=True),
            int(19.6 * GB),
            "process",
            PEFT_FSDP_DOC,
        ),
        Row(
            "20b",
            "HF+peft",
            "70B QLoRA FSDP, 2 GPUs",
            peft_docs_70b("fsdp"),
            int(35.6 * GB),
            "process",
            PEFT_FSDP_DOC,
        ),
        Row(
            "21",
            "HF+peft",
            "70B QLoRA ZeRO-3, 2 GPUs",
            peft_docs_70b("deepspeed-zero3"),
            int(36.6 * GB),
            "process",
            PEFT_ZERO3_DOC,
        ),
    ]


@dataclass(frozen=True)
class FitRow:
    """A published fit / OOM observation on a given card."""

    label: str
    what: str
    inputs: EstimateInput
    fits: bool


def fit_rows() -> list[FitRow]:
    """Row 17: every row of the HF 4-bit blog's table of T4 experiments (batch 1, LoRA r8
    q,v, 16-bit compute; 1 x T4 rows only, the blog's 2 x T4 row is not a fit / OOM on one
    card).

    transformers 4.30 (the blog installs transformers from source, May 2023) had only the
    eager attention for Llama (``LlamaAttention.forward``: ``torch.matmul`` scores, an fp32
    ``softmax``); SDPA arrived for Llama in 4.36. So the rows run ``eager``: without
    checkpointing every layer keeps its (seq x seq) scores per head, the term that sends
    the 1024-token runs out of memory."""
    t4: dict[str, Any] = {
        "stack": HF_2023,
        "compute_dtype": "fp16",
        "lora_dropout": 0.05,
        "attn_implementation": "eager",
    }

    def run(
        arch: ModelArch, precision: str, max_length: int, checkpointing: bool, **kwargs: Any
    ) -> EstimateInput:
        return lora(
            arch,
            precision=precision,
            max_length=max_length,
            gradient_checkpointing=checkpointing,
            **t4,
            **kwargs,
        )

    nf4 = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}
    fp4 = {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}
    nf4_dq = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    return [
        FitRow("17a", "LLaMA-7B int8 + GC, 512", run(LLAMA2_7B, "8bit", 512, True), True),
        FitRow("17b", "LLaMA-7B int8 + GC, 1024", run(LLAMA2_7B, "8bit", 1024, True), False),
        FitRow(
            "17c", "LLaMA-7B nf4 no GC, 1024", run(LLAMA2_7B, "4bit", 1024, False, **nf4), False
        ),
        FitRow("17d", "LLaMA-7B nf4 + GC, 1024", run(LLAMA2_7B, "4bit", 1024, True, **nf4), True),
        FitRow(
            "17e", "LLaMA-13B nf4 + GC, 1024", run(LLAMA2_13B, "4bit", 1024, True, **nf4), False
        ),
        FitRow(
            "17f",
            "LLaMA-13B nf4+DQ + GC, 1024",
            run(LLAMA2_13B, "4bit", 1024, True, **nf4_dq),
            True,
        ),
        FitRow("17g", "LLaMA-7B nf4 no GC, 512", run(LLAMA2_7B, "4bit", 512, False, **nf4), True),
        FitRow("17h", "LLaMA-7B fp4 no GC, 512", run(LLAMA2_7B, "4bit", 512, False, **fp4), True),
        FitRow(
            "17i", "LLaMA-7B fp4 no GC, 1024", run(LLAMA2_7B, "4bit", 1024, False, **fp4), False
        ),
        FitRow("17j", "LLaMA-13B int8 + GC, 512", run(LLAMA2_13B, "8bit", 512, True), False),
        FitRow(
            "17k",
            "LLaMA-13B fp4 no GC, 512 (bf16 or fp16 CD)",
            run(LLAMA2_13B, "4bit", 512, False, **fp4),
            False,
        ),
        FitRow("17l", "LLaMA-13B nf4 + GC, 512", run(LLAMA2_13B, "4bit", 512, True, **nf4), True),
    ]


NOT_COVERED = [
    ("5", "StableLM-alpha-3B (GPT-NeoX): architecture not modelled by the catalogue"),
    ("6", "phi-1.5 (phi): architecture not modelled by the catalogue"),
    ("18", "QLoRA paper accounting: its terms have no stated metric or configuration"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rows = published_rows()
    errors = [abs(row.error()) for row in rows]
    if args.markdown:
        print("| row | framework | run | metric | measured GB | predicted GB | error | stack |")
        print("|---|---|---|---|---:|---:|---:|---|")
    for row in rows:
        measured, predicted = row.measured_bytes / GB, row.predicted_bytes() / GB
        if args.markdown:
            print(
                f"| {row.label} | {row.framework} | {row.what} | {row.metric} | {measured:.2f} "
                f"| {predicted:.2f} | {100 * row.error():+.1f} % | {row.inputs.stack.name} |"
            )
        else:
            print(
                f"{row.label:>4} {row.framework:<9} {row.what:<52} {row.metric:<7} "
                f"measured {measured:6.2f} GB  predicted {predicted:6.2f} GB  "
                f"{100 * row.error():+6.1f} %  {row.note}"
            )
    print()
    print(
        f"{len(rows)} rows: median |error| {100 * statistics.median(errors):.1f} %, "
        f"max |error| {100 * max(errors):.1f} %"
    )
    t4 = find_gpu("t4")
    assert t4 is not None
    print()
    print(f"fit / OOM on {t4.name} ({t4.memory_bytes / GB:.2f} GB), row 17:")
    agree = 0
    for fit in fit_rows():
        peak = estimate(fit.inputs).peak_reserved_bytes
        predicted_fit = peak <= t4.memory_bytes
        agree += predicted_fit == fit.fits
        print(
            f"  {fit.label} {fit.what:<30} published {'fits' if fit.fits else 'OOM ':<4}  "
            f"predicted peak {peak / GB:5.2f} GB -> {'fits' if predicted_fit else 'OOM'}"
        )
    print(f"  {agree} of {len(fit_rows())} fit/OOM outcomes agree")
    print()
    sharded = sharded_rows()
    print("sharded runs (FSDP / ZeRO-3), per GPU:")
    for row in sharded:
        measured, predicted = row.measured_bytes / GIB, row.predicted_bytes() / GIB
        print(
            f"{row.label:>4} {row.what:<45} {row.metric:<7} measured {measured:6.2f} GiB  "
            f"predicted {predicted:6.2f} GiB  {100 * row.error():+6.1f} %  "
            f"({row.inputs.stack.name})"
        )
    sharded_errors = [abs(row.error()) for row in sharded]
    median = 100 * statistics.median(sharded_errors)
    print(
        f"{len(sharded)} sharded rows: median |error| {median:.1f} %, "
        f"max |error| {100 * max(sharded_errors):.1f} %"
    )
    print()
    print("not covered:")
    for label, reason in NOT_COVERED:
        print(f"  {label}: {reason}")


if __name__ == "__main__":
    main()
