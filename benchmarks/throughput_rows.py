"""Published measured training throughputs with full configurations: the throughput model's
evidence (``benchmarks/throughput.py`` reads it; ``peftgen.throughput.EFFICIENCY`` is
derived from the rows marked ``calibration``; the others are held back to measure the error).

Each row keeps its source (repository, file, commit or date) and the configuration the
source states; what the source leaves out is written as an assumption in ``note``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftgen.catalog.types import Gpu, GpuThroughput


@dataclass(frozen=True)
class ThroughputRow:
    row: str
    source: str
    model: str
    """Catalogue model id."""
    gpu: str
    """Catalogue GPU name or alias (``L40`` is defined below: not in the catalogue)."""
    precision: str
    compute_dtype: str
    lora_r: int
    target_modules: tuple[str, ...]
    micro_batch: int
    max_length: int
    gradient_checkpointing: bool
    attn_implementation: str
    measured_tokens_per_second: float
    """Per GPU (all rows are single-GPU runs)."""
    calibration: bool
    """Used to derive ``EFFICIENCY``; False: held back to measure the error."""
    note: str = ""
    finetuning: str = "lora"
    """``full``: every weight trained (no LoRA)."""
    stack: str = "hf"
    """``hf``: transformers Trainer + peft (+ bitsandbytes), the generated script's stack;
    ``torchtune``: torch.compile'd torchtune recipes, a faster stack (its rows are held
    back, and kept out of the range)."""


TORCHTUNE = (
    "pytorch/torchtune README.md, 'Memory and training speed' (commit 0031bfb0, Sept 2024): "
    "Llama 3.1 8B, batch size 2, no gradient accumulation, packed to 2048, torch.compile, "
    "'measured over one full training epoch'"
)
TORCHTUNE_LORA = (
    "config llama3_1/8B_lora_single_device: LoRA r8 on q, v, output_proj + MLP, activation "
    "checkpointing on, bf16; torch.compile and torchtune's own kernels (not HF + peft)"
)
TORCHTUNE_QLORA = (
    "config llama3_1/8B_qlora_single_device: LoRA r8 on q, k, v, output_proj + MLP, torchao "
    "NF4 base, activation checkpointing on, bf16"
)
FMS = (
    "foundation-model-stack/fms-acceleration scripts/benchmarks/refs/{} (commit {}): "
    "HF Trainer 'train_tokens_per_second', 20 steps, fms-hf-tuning sft_trainer, "
    "use_flash_attn, gradient_checkpointing, LoRA r16 on q,k,v,o, 1 GPU"
)
FMS_LENGTH = (
    "tokens per row derived from the table: train_tokens_per_second x train_runtime / (20 "
    "steps x batch) = {} exactly for every row of this file (HF counts the first batch's "
    "input_ids x max_steps, padding included, so rows are taken as padded to that length)"
)

L40 = Gpu(
    name="NVIDIA L40",
    memory_bytes=48305799168,
    compute_capability="8.9",
    bf16=True,
    flash_attention_2=True,
    source="benchmark-only entry (not in the catalogue)",
    throughput=GpuThroughput(
        dense_fp16_tflops=181.05,
        dense_bf16_tflops=181.05,
        memory_bandwidth_gb_s=864,
        fp16_source="NVIDIA L40 datasheet: FP16 Tensor Core (FP32 accumulate) 181.05 | 362.1 "
        "TFLOPS* (* with sparsity)",
        bf16_source="NVIDIA L40 datasheet: BF16 Tensor Core 181.05 | 362.1 TFLOPS*",
        bandwidth_source="NVIDIA L40 datasheet: 864 GB/s",
    ),
)
BENCHMARK_GPUS = {"L40": L40}

ATTN_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

ROWS: tuple[ThroughputRow, ...] = (
    ThroughputRow(
        "T1",
        TORCHTUNE,
        "meta-llama/Llama-3.1-8B-Instruct",
        "rtx-4090",
        "bf16",
        "bf16",
        8,
        ("q_proj", "v_proj", "o_proj", *MLP),
        2,
        2048,
        True,
        "sdpa",
        3083,
        False,
        TORCHTUNE_LORA,
        stack="torchtune",
    ),
    ThroughputRow(
        "T2",
        TORCHTUNE,
        "meta-llama/Llama-3.1-8B-Instruct",
        "rtx-a6000",
        "bf16",
        "bf16",
        8,
        ("q_proj", "v_proj", "o_proj", *MLP),
        2,
        2048,
        False,
        "sdpa",
        4699,
        False,
        TORCHTUNE_LORA + "; activation checkpointing off here, inferred from the row's 30.3 GiB "
        "peak (the 4090 row, with it on, peaks at 16.2 GiB)",
        stack="torchtune",
    ),
    ThroughputRow(
        "T3",
        TORCHTUNE,
        "meta-llama/Llama-3.1-8B-Instruct",
        "rtx-4090",
        "4bit",
        "bf16",
        8,
        (*ATTN_QKVO, *MLP),
        2,
        2048,
        True,
        "sdpa",
        2413,
        False,
        TORCHTUNE_QLORA,
        stack="torchtune",
    ),
    ThroughputRow(
        "T4",
        TORCHTUNE,
        "meta-llama/Llama-3.1-8B-Instruct",
        "rtx-4090",
        "bf16",
        "bf16",
        8,
        (),
        2,
        2048,
        True,
        "sdpa",
        1650,
        False,
        "Full finetune row; config llama3_1/8B_full_single_device: every weight trained in pure "
        "bf16 (no fp32 masters), bitsandbytes PagedAdamW8bit stepped inside the backward, "
        "activation checkpointing on",
        finetuning="full",
        stack="torchtune",
    ),
    ThroughputRow(
        "F1",
        FMS.format("a100_80gb.csv", "04702cc5"),
        "mistralai/Mistral-7B-v0.1",
        "a100-80gb",
        "fp16",
        "fp16",
        16,
        ATTN_QKVO,
        4,
        6144,
        True,
        "flash_attention_2",
        3597.611,
        True,
        "standard-peft: torch_dtype float16 (pure fp16), index 12; " + FMS_LENGTH.format(6144),
    ),
    ThroughputRow(
        "F2",
        FMS.format("a100_80gb.csv", "04702cc5"),
        "mistralai/Mistral-7B-v0.1",
        "a100-80gb",
        "fp16",
        "fp16",
        16,
        ATTN_QKVO,
        8,
        6144,
        True,
        "flash_attention_2",
        3632.412,
        False,
        "standard-peft, index 14; " + FMS_LENGTH.format(6144),
    ),
    ThroughputRow(
        "F3",
        FMS.format("a100_80gb.csv", "04702cc5"),
        "mistralai/Mistral-7B-v0.1",
        "a100-80gb",
        "4bit",
        "fp16",
        16,
        ATTN_QKVO,
        4,
        6144,
        True,
        "flash_attention_2",
        2748.9,
        True,
        "baseline-peft-bnb (bitsandbytes nf4, fp16 autocast), index 24; " + FMS_LENGTH.format(6144),
    ),
    ThroughputRow(
        "F4",
        FMS.format("a100_80gb.csv", "04702cc5"),
        "mistralai/Mistral-7B-v0.1",
        "a100-80gb",
        "4bit",
        "fp16",
        16,
        ATTN_QKVO,
        8,
        6144,
        True,
        "flash_attention_2",
        2880.884,
        False,
        "baseline-peft-bnb, index 26; " + FMS_LENGTH.format(6144),
    ),
    ThroughputRow(
        "F5",
        FMS.format("a100_80gb.csv", "04702cc5"),
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "a100-80gb",
        "4bit",
        "fp16",
        16,
        ATTN_QKVO,
        4,
        6144,
        True,
        "flash_attention_2",
        1396.91,
        False,
        "baseline-peft-bnb, MoE (2 of 8 experts per token), index 28; " + FMS_LENGTH.format(6144),
    ),
    ThroughputRow(
        "F6",
        FMS.format("a100_80gb.csv", "04702cc5"),
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "a100-80gb",
        "4bit",
        "fp16",
        16,
        ATTN_QKVO,
        8,
        6144,
        True,
        "flash_attention_2",
        1560.785,
        False,
        "baseline-peft-bnb, MoE, index 30; " + FMS_LENGTH.format(6144),
    ),
    ThroughputRow(
        "L1",
        FMS.format("l40_40gb.csv", "8af8fa7d"),
        "mistralai/Mistral-7B-v0.1",
        "L40",
        "fp16",
        "fp16",
        16,
        ATTN_QKVO,
        4,
        4096,
        True,
        "flash_attention_2",
        2724.324,
        True,
        "standard-peft, index 12; " + FMS_LENGTH.format(4096),
    ),
    ThroughputRow(
        "L2",
        FMS.format("l40_40gb.csv", "8af8fa7d"),
        "mistralai/Mistral-7B-v0.1",
        "L40",
        "fp16",
        "fp16",
        16,
        ATTN_QKVO,
        8,
        4096,
        True,
        "flash_attention_2",
        2715.679,
        False,
        "standard-peft, index 14; " + FMS_LENGTH.format(4096),
    ),
)
