"""What the estimator assumes about the stack: ``StackProfile`` (the mechanisms of one
library-version combination, switchable so published runs on other versions stay
reproducible), dtype sizes, bitsandbytes block sizes and the allocator constants, each
with its source or marked an assumption."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MIB = 2**20

AdapterDtype = Literal["bf16", "fp16", "fp32"]
LossPath = Literal[
    "fused_lm_head",
    "full_logits_fp32",
    "full_logits_fp32_shifted",
    "chunked_logits_fp32",
    "chunked_logits_bf16",
]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

# bitsandbytes 4-bit: bitsandbytes/nn/modules.py:230 (Params4bit blocksize default 64);
# double quantization quantizes the fp32 absmax per 256 blocks (functional.quantize_4bit,
# ``state2.blocksize == 256`` checked at autograd/_functions.py:333).
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# bitsandbytes 8-bit optimizers: blockwise state quantization, 256 values per fp32 absmax;
# tensors under ``min_8bit_size`` (4096 elements) keep 32-bit states (optim/optimizer.py).
OPTIM_8BIT_BLOCKSIZE = 256
OPTIM_8BIT_MIN_NUMEL = 4096
# Paged optimizers page a state buffer only for parameters of at least 1e5 elements
# (bitsandbytes/optim/optimizer.py:383).
PAGED_MIN_NUMEL = 100_000
# trl/kernels/chunked_logprob.py:23 and trl/trainer/utils.py:1506: the fused LM head
# projects [4096 tokens x 32768 vocabulary] tiles.
FUSED_HEAD_TOKEN_TILE = 4096
FUSED_HEAD_VOCAB_TILE = 32768
# Allocator-level overheads (torch 2.13 CUDA caching allocator). Each names its source or
# says it is an assumption; ``peftgen calibrate`` reports what receipts imply for each.
CUDA_CONTEXT_BYTES = 512 * MIB
"""Assumption (neither measured here nor published for this stack): the CUDA context plus
torch's kernels under lazy module loading (``CUDA_MODULE_LOADING=LAZY``, torch's default),
held by the process (nvidia-smi shows it) but outside ``torch.cuda.memory_reserved``. One
figure for every architecture; it varies with the driver, CUDA and the kernels a run
loads. Receipts record torch's counters only, so they cannot check it."""
CUBLAS_WORKSPACE_BYTES_SM90 = 4096 * 1024 * 8
"""32 MiB: torch's default cuBLAS workspace on compute capability 9.0 (H100, H200),
``CUBLAS_WORKSPACE_CONFIG=:4096:8``. Source: ``parseChosenWorkspaceSize`` in
aten/src/ATen/cuda/CublasHandlePool.cpp (``sm90 ? 4096 * 8 * 1024 : ...``)."""
CUBLAS_WORKSPACE_BYTES_OTHER = 4096 * 1024 * 2 + 16 * 1024 * 8
"""8 MiB + 128 KiB: the same function's default on every other architecture (Volta to
Ada, and Blackwell: only ``major == 9 && minor == 0`` gets the Hopper size),
``CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8``."""
CUBLASLT_WORKSPACE_BYTES = 1024 * 1024
"""cuBLASLt's own workspace: ``CUBLASLT_WORKSPACE_SIZE`` defaults to 1024 KiB
(``parseCUDABlasLtWorkspaceSize``, same file), a separate allocation unless
``TORCH_CUBLASLT_UNIFIED_WORKSPACE=1``; every architecture."""
TRANSIENT_FRAGMENTATION_FRACTION = 0.10
"""Assumption (not fitted, not measured here): the share of the peak's short-lived tensors
(activations, logits, dequantized weights) the caching allocator holds in blocks it cannot
reuse for the next, differently sized request. Not architecture-specific: the allocator's
block rules are the same on every GPU. ``peftgen calibrate`` prints the fraction each
measured receipt implies."""
PERSISTENT_ROUNDING_FRACTION = 0.01
"""Assumption, bounded by the allocator's rounding rules (c10/cuda/CUDACachingAllocator.cpp:
every request rounds up to 512 B (``kMinBlockSize``), requests over 1 MiB to 2 MiB
(``kRoundLarge``), and up to 10 MiB ones share 20 MiB segments): 1 % of long-lived tensors.
The same on every architecture."""


def cublas_workspace_bytes(compute_capability: str | None) -> int:
    """cuBLAS plus cuBLASLt workspaces torch allocates through the caching allocator, once
    per (handle, stream) pair; the training loop multiplies on one stream. ``None`` (a GPU
    of unknown architecture): the larger, Hopper size."""
    hopper = compute_capability is None or compute_capability == "9.0"
    cublas = CUBLAS_WORKSPACE_BYTES_SM90 if hopper else CUBLAS_WORKSPACE_BYTES_OTHER
    return cublas + CUBLASLT_WORKSPACE_BYTES


@dataclass(frozen=True)
class StackProfile:
    """The mechanisms the estimate assumes; the default is the pinned stack.

    Each switch names a behaviour that differs between library versions or frameworks.
    ``benchmarks/accuracy.py`` selects, per published row, the mechanisms that row's stack
    had; nothing here is a fitted number.
    """

    name: str = "pinned (transformers 5.24, peft 0.21.2, trl 1.16, bitsandbytes 0.50.2)"
    loss_path: LossPath = "fused_lm_head"
    """``fused_lm_head``: trl 1.16 SFT/DPO/GRPO score tokens through tiled log-probs
    (trl/trainer/utils.py:1548, sft_trainer.py:1144, dpo_trainer.py:960,
    grpo_trainer.py:1068). ``full_logits_fp32``: a plain ``model(labels=...)`` loss in
    transformers 5 (compute-dtype logits, their fp32 upcast, the fp32 log-softmax saved for
    backward: 10 B per token x vocabulary entry), also torchtune 2024's ``.float()`` output.
    ``full_logits_fp32_shifted``: transformers < 4.46 upcast the logits themselves and made
    a contiguous fp32 copy of the shifted logits (12 B in forward; the backward's 12 B, 16 B
    when the loop holds the output: ``loss_backward_bytes_per_entry``).
    ``chunked_logits_fp32``: torchtune >= 0.3's
    ``CEWithChunkedOutputLoss`` (bf16 output chunks, each upcast to fp32 whose log-softmax
    is saved: 6 B). ``chunked_logits_bf16``: litgpt's chunked cross-entropy on bf16 logit
    chunks (logits + bf16 log-softmax, 4 B)."""
    quantized_adapter_dtype: AdapterDtype = "fp32"
    """trl 1.16 casts trainable params (not DoRA magnitudes) of 8/4-bit models to bf16
    (sft_trainer.py:906-911, dpo_trainer.py:726-729, grpo_trainer.py:538-541); the emitted
    script casts them back to fp32 (``stack.TRAINED_COPY_DTYPE``). Older stacks: bf16."""
    unquantized_adapter_dtype: AdapterDtype = "fp32"
    """peft ``autocast_adapter_dtype=True`` upcasts bf16/fp16 LoRA weights to fp32
    (peft/tuners/tuners_utils.py:628)."""
    upcast_unquantized_to_fp32: bool = False
    """peft ``prepare_model_for_kbit_training`` casts every non-quantized floating parameter
    (embeddings, lm_head, norms) to fp32. trl 1.16's SFT/DPO/GRPO trainers no longer call
    it (only experimental ORPO/CPO do); older trl and most QLoRA scripts did."""
    norm_saves_fp32_input: bool = True
    """HF RMSNorm upcasts its input to fp32 and ``pow`` saves it for backward."""
    lora_input_copy_per_module: bool = True
    """peft casts the LoRA input to the adapter dtype (peft/tuners/lora/layer.py:1100) and
    applies a per-module dropout: each adapted linear saves its own copy of its input.
    False: one copy per shared input (litgpt's LoRA on its fused qkv projection)."""
    bnb_4bit_saves_input: bool = False
    """bitsandbytes < 0.43 ``MatMul4Bit`` saved its input A for backward even for frozen
    weights; 0.50.2 keeps ``(None, B)`` (bitsandbytes/autograd/_functions.py:357)."""
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    # --- sharded engines (what accelerate 1.15 / torch 2.13 / DeepSpeed run) ---------------
    fsdp_version: Literal[1, 2] = 1
    """1: ``FullyShardedDataParallel`` with flat parameters (what peftgen emits: bitsandbytes
    0.50.2 has no DTensor support, so ``fully_shard`` would drop ``Params4bit``); 2:
    ``fully_shard`` (per-parameter DTensor shards, no flat buffers)."""
    fsdp_backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NONE"] = "BACKWARD_PRE"
    """FSDP1 ``backward_prefetch`` (accelerate's ``fsdp_backward_prefetch``)."""
    fsdp_forward_prefetch: bool = False
    """FSDP1 ``forward_prefetch``: the next unit's all-gather is issued before this
    unit's forward runs."""
    fsdp_limit_all_gathers: bool = True
    """FSDP1 ``limit_all_gathers`` (accelerate's default True): the CPU thread blocks once
    two all-gathers are ahead of the computation (``_free_event_queue``, max 2)."""
    fsdp_load_on_cpu: bool = True
    """How the sharded model is built: the checkpoint is read into host memory and FSDP /
    ZeRO moves each unit to the GPU while wrapping (the emitted recipe; fsdp_qlora's
    ``low_memory``). False: every rank first loads the whole model on its GPU."""
    collectives_on_own_stream: bool = True
    """FSDP (all-gather and reduce-scatter streams) and ZeRO-3 (its all-gather stream)
    allocate their outputs on side streams; the caching allocator keeps a separate block pool
    per stream, so those blocks never serve the compute stream's activations."""
    deepspeed_casts_module: bool = True
    """``deepspeed.initialize`` casts the whole module to the run's 16-bit dtype
    (engine.py ``_configure_distributed_model``: ``self.module.bfloat16()`` / ``.half()``),
    so under ZeRO-2 and ZeRO-3 the LoRA adapters train in the compute dtype whatever peft
    created them in; their fp32 copy is the optimizer's master partition
    (``deepspeed_master_weight_bytes``). (trl 1.16 also passes ``autocast_adapter_dtype=False``
    under ZeRO-3, trl/trainer/sft_trainer.py:856.)"""
    zero3_init: bool = True
    """The script registers DeepSpeed's ZeRO-3 config before ``from_pretrained``, so a 16-bit
    model is built under ``deepspeed.zero.Init`` (each parameter partitioned as it is
    created; the emitted script: ``stack.zero3_partitions_while_loading``). transformers
    skips ``zero.Init`` for quantized models whatever the order (modeling_utils.py:1435
    ``not _is_quantized``; since transformers PR #32640, Aug 2024). False: a script that
    loads the model first, so ``deepspeed.initialize`` moves the whole module to each GPU
    (engine.py: ``self.module.to(self.device)`` unless ``is_zero_init_model``) and
    partitions it there (``zero3_loads_whole_model``)."""
    nccl_channels: int = 8
    """NCCL channels per communicator: each channel keeps a receive buffer per protocol
    (``NCCL_BUFFSIZE`` 4 MiB for SIMPLE, about 4.5 MiB for LL128, 256 KiB for LL), outside
    torch's allocator (counted in the process figure, not ``memory_reserved``)."""
    zero_reduce_bucket_elements: int = 50_000_000
    """DeepSpeed ``reduce_bucket_size`` in the run's ds_config: peftgen writes
    ``DEEPSPEED_BUCKET_ELEMENTS`` (5e7); a config accelerate builds from its plugin (no
    ds_config file: accelerate/utils/dataclasses.py ``DeepSpeedPlugin.__post_init__`` writes
    no bucket keys) runs with DeepSpeed's default 5e8 (deepspeed/runtime/zero/config.py
    ``reduce_bucket_size: int = Field(pp_int(5e8))``)."""
    zero3_max_reuse_distance: int = 1_000_000_000
    """DeepSpeed ``stage3_max_reuse_distance`` (elements): peftgen does not write it, so
    DeepSpeed's default 1e9 (zero/config.py ``max_reuse_distance``)."""
    loss_output_held: bool = False
    """The training loop keeps the model's output, and the fp32 logits in it, referenced
    through ``loss.backward()``: AnswerDotAI/fsdp_qlora train.py (``output = model(...)``,
    ``loss.backward()``, ``output = None`` only after the optimizer step). transformers'
    ``Trainer.compute_loss`` returns the loss alone, so the Trainer's output is gone before
    backward (False)."""
    causal_mask_max_positions: bool = False
    """transformers 4.38 (Llama and the models copying it): ``LlamaModel`` keeps a
    ``causal_mask`` buffer of ``max_position_embeddings``² bools and ``_update_causal_mask``
    turns it into a [rows, 1, P, P] compute-dtype mask on every forward
    (``self.causal_mask[None, None, :, :].repeat(batch_size, 1, 1, 1).to(dtype) * min_dtype``)
    even without padding; each SDPA layer indexes its [rows, 1, T, T] slice out of it
    (``causal_mask[:, :, cache_position, : key_states.shape[-2]]``, a copy) and, given a
    mask, SDPA runs the memory-efficient kernel, which saves that bias. transformers >= 4.39
    sizes the mask by the sequence and skips it for SDPA without padding (False)."""
    rope_cache_element_bytes: int = 0
    """Element size of the per-layer RoPE ``_cos_cached`` / ``_sin_cached`` buffers
    transformers 4.38's ``LlamaRotaryEmbedding.__init__`` registers ("For BC we register cos
    and sin cached", [max_position_embeddings, head_dim] each, in the default dtype fp32
    unless the script casts the model); 0: the stack has none (transformers >= 4.40)."""
    full_master_weights: Literal["fp32", "compute"] = "fp32"
    """Full fine-tuning: ``fp32`` master weights under compute-dtype autocast (what peftgen
    emits); ``compute``: the model loaded and trained in the compute dtype, no autocast
    (pure bf16: weights, gradients and AdamW states 2 B each, as peft's method comparison
    ran its full fine-tune)."""
