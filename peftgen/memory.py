"""The memory estimator: peak GPU bytes per component for one LoRA/QLoRA training run.

Pure functions, bytes in and bytes out, one per term, no torch. Each term mirrors what the
generated script really does with the pinned stack (transformers 5.24, peft 0.21.2, trl 1.16,
bitsandbytes 0.50.2, torch 2.13); the source lines each rule comes from are cited in the
docstrings (paths relative to ``site-packages``).

Mechanisms that changed between stacks (the loss path, adapter dtype, fp32 upcasts) are
switches of ``StackProfile``, whose default is the pinned stack, so older published
measurements can be reproduced by *selecting* their mechanisms rather than by fitting
constants (``benchmarks/accuracy.py``).

Per-GPU figures: every term is first computed as if one GPU held the whole run; then
``per_gpu_parts`` applies the distributed engine (``EstimateInput.distributed``): DDP adds
its gradient buckets, ZeRO-2 divides gradients and optimizer state by ``world_size``,
ZeRO-3 and FSDP divide the parameters too and add the gathered working set (full
fine-tuning: section "full fine-tuning, sharded").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from peftgen import stack
from peftgen.catalog import LinearModule, ModelArch, linear_modules, parameter_groups
from peftgen.catalog.structure import (
    LANGUAGE_MODEL,
    QK_NORM_TYPES,
    SANDWICH_NORM_TYPES,
    SDPA_REFUSED_TYPES,
)
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    STATE_SHARDING_ENGINES,
    Distributed,
    LoadPrecision,
    Method,
    Optim,
)

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
    ``full_logits_fp32_shifted``: transformers < 4.45 also made a contiguous fp32 copy of
    the shifted logits (14 B). ``chunked_logits_fp32``: torchtune >= 0.3's
    ``CEWithChunkedOutputLoss`` (bf16 output chunks, each upcast to fp32 whose log-softmax
    is saved: 6 B). ``chunked_logits_bf16``: litgpt's chunked cross-entropy on bf16 logit
    chunks (logits + bf16 log-softmax, 4 B)."""
    quantized_adapter_dtype: AdapterDtype = "bf16"
    """trl 1.16 casts trainable params (not DoRA magnitudes) of 8/4-bit models to bf16
    (sft_trainer.py:906-911, dpo_trainer.py:726-729, grpo_trainer.py:538-541)."""
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
    zero3_adapters_in_base_dtype: bool = True
    """trl 1.16 passes ``autocast_adapter_dtype=False`` to ``get_peft_model`` under ZeRO-3
    for non-quantized models (trl/trainer/sft_trainer.py:856): LoRA stays in the base
    model's dtype instead of peft's fp32."""
    nccl_channels: int = 8
    """NCCL channels per communicator: each channel keeps a receive buffer per protocol
    (``NCCL_BUFFSIZE`` 4 MiB for SIMPLE, about 4.5 MiB for LL128, 256 KiB for LL), outside
    torch's allocator (counted in the process figure, not ``memory_reserved``)."""
    full_master_weights: Literal["fp32", "compute"] = "fp32"
    """Full fine-tuning: ``fp32`` master weights under compute-dtype autocast (what peftgen
    emits); ``compute``: the model loaded and trained in the compute dtype, no autocast
    (pure bf16: weights, gradients and AdamW states 2 B each, as peft's method comparison
    ran its full fine-tune)."""


@dataclass(frozen=True)
class EstimateInput:
    """Everything the estimate depends on, independent of the spec's file format.

    Built from a spec by ``peftgen.plan.estimate_input``; the accuracy benchmark builds it
    directly for published rows. GRPO's ``num_generations`` and ``beta`` are absent on
    purpose: the generation batch is ``micro_batch x gradient_accumulation_steps`` rows
    whatever the group size, and the reference log-probs (``beta > 0``) are computed
    without gradients before the training step, one layer at a time.
    """

    arch: ModelArch
    precision: LoadPrecision
    method: Method = "sft"
    compute_dtype: stack.ComputeDtype = "bf16"
    """Dtype of unquantized weights and of the autocast compute (fp16 on GPUs without bf16)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    lora_r: int = 16
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    lora_dropout: float = 0.05
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    micro_batch: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = True
    packing: bool = False
    """SFT ``training.packing`` (trl's padding-free ``bfd``): rows hold several sequences."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    optim: str = "adamw_torch"
    gradient_accumulation_steps: int = 1
    max_completion_length: int = 256
    world_size: int = 1
    """GPUs sharing the run (processes, one per GPU, over all nodes)."""
    distributed: Distributed = "none"
    """The engine accelerate launches: what is replicated and what is sharded per GPU."""
    cpu_offload: bool = False
    """FSDP ``offload_params`` / DeepSpeed ``offload_optimizer`` (+ ``offload_param`` for
    ZeRO-3): sharded state lives in host memory."""
    num_nodes: int = 1
    """Machines the ``world_size`` GPUs are spread over (host memory is per node)."""
    finetuning: Literal["lora", "full"] = "lora"
    """``full``: every weight trained, fp32 master weights under compute-dtype autocast (no
    LoRA, no quantization); see the "full fine-tuning" section."""
    reference_model: bool = False
    """Full fine-tuning only: a frozen reference copy of the model in the compute dtype on
    the GPU (DPO without ``precompute_ref_log_probs``, GRPO with ``beta > 0``). With LoRA the
    reference is the base with the adapter disabled: no copy."""
    vllm_mode: Literal["none", "colocate", "server"] = "none"
    """GRPO generation through trl's vLLM integration (``grpo.use_vllm``)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Colocate: the share of each GPU's memory vLLM takes (trl's default 0.3)."""
    vllm_enable_sleep_mode: bool = False
    """Colocate: vLLM sleeps (level 2) during the training phase."""
    gpu_memory_bytes: int = 0
    """The GPU's memory: vLLM's colocated share is a fraction of it."""
    stack: StackProfile = field(default_factory=StackProfile)
    gpu_compute_capability: str | None = None
    """The GPU's compute capability (``"8.0"``): it sizes the cuBLAS workspace. ``None``
    where the GPU is unknown (published rows that do not name one): the larger size."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak memory per component, per GPU, in bytes.

    ``weights + adapter + gradient + optimizer + activation + logits`` is the peak of
    ``torch.cuda.max_memory_allocated``; ``overhead`` (CUDA context, cuBLAS workspace,
    allocator rounding and fragmentation) brings it to what the process reserves.
    """

    weights_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    overhead_bytes: int

    @property
    def allocated_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.adapter_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.logits_bytes
        )

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.overhead_bytes


@dataclass(frozen=True)
class Estimate(MemoryBreakdown):
    """Per-component peak bytes plus what sits outside torch's counters."""

    torch_reserved_bytes: int
    """What ``torch.cuda.max_memory_reserved`` would report (no CUDA context)."""
    managed_bytes: int
    """Paged optimizer states in CUDA managed memory: invisible to torch, evictable."""
    phase: str
    communication_bytes: int
    """Of ``gradient_bytes``: the engine's gradient communication buffers (DDP buckets,
    DeepSpeed reduce/all-gather buckets, FSDP's unsharded gradient of one unit)."""
    gathered_weight_bytes: int
    """Of ``weights_bytes``: parameters FSDP / ZeRO-3 hold unsharded at the peak."""
    trainable_parameters: int
    total_parameters: int
    load_peak_bytes: int = 0
    """The loading phase's peak per GPU (model built, wrapped and sharded), what the
    process holds then (CUDA context included), to compare with the training peak."""
    host_memory_bytes: int = 0
    """Host RAM per node: the larger of the loading phase (checkpoint read into host
    memory) and training (CPU-offloaded shards and optimizer), all the node's processes."""
    sharded_reserve_bytes: int = 0
    """Of ``overhead_bytes``: blocks the caching allocator keeps beyond the allocated peak
    under FSDP / ZeRO-3 (loading leftovers, side-stream pools) plus NCCL's buffers."""
    vllm_bytes: int = 0
    """Of ``overhead_bytes``: vLLM's colocated share at the peak (its weights and KV cache,
    ``vllm_gpu_memory_utilization`` of the GPU), outside torch's training counters."""

    @property
    def peak_allocated_bytes(self) -> int:
        return self.allocated_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        return self.reserved_bytes


# --------------------------------------------------------------------------- parameters


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


def targeted_modules(arch: ModelArch, target_modules: tuple[str, ...] | str) -> list[LinearModule]:
    """The linear modules peft wraps with LoRA.

    ``all-linear`` is every linear but the output layer (peft/tuners/tuners_utils.py,
    ``_maybe_include_all_linear_layers``); listed names match a module by its last
    dotted component(s), as peft's suffix match does.
    """
    modules = linear_modules(arch)
    if target_modules == "all-linear":
        return modules
    leaves = {name.rsplit(".", 1)[-1] for name in target_modules}
    return [m for m in modules if m.name in leaves]


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


# --------------------------------------------------------------------------- weights


def int8_linear_bytes(in_features: int, out_features: int) -> int:
    """LLM.int8 ``Int8Params``: int8 ``CB`` [out, in] plus one fp32 ``SCB`` scale per row."""
    return in_features * out_features + 4 * out_features


def nf4_linear_bytes(in_features: int, out_features: int, double_quant: bool) -> int:
    """bitsandbytes 4-bit (NF4 or FP4; same layout): packed nibbles + block scales.

    Packed weight: 2 values per byte. One absmax per 64-value block: fp32 without double
    quantization; with it (bitsandbytes/functional.py:938-950) uint8 codes of the
    mean-centred absmax, one fp32 absmax per 256 blocks and the fp32 mean (``offset``).
    Each module also carries its 16-entry fp32 quant map (``get_4bit_type``, :936); the
    nested 256-entry code book is one cached tensor shared by all modules (:655).
    """
    numel = in_features * out_features
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    quant_map = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + quant_map
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested_blocks + 4 + quant_map


def linear_weight_bytes(module: LinearModule, inputs: EstimateInput) -> int:
    """One module kind's weights (+ bias, kept in the load dtype) for all its instances."""
    load_bytes = DTYPE_BYTES[inputs.compute_dtype]
    if inputs.precision == "8bit":
        per = int8_linear_bytes(module.in_features, module.out_features)
    elif inputs.precision == "4bit":
        per = nf4_linear_bytes(
            module.in_features, module.out_features, inputs.bnb_4bit_use_double_quant
        )
    else:
        per = module.in_features * module.out_features * load_bytes
    bias_dtype_bytes = unquantized_weight_dtype_bytes(inputs)
    bias = module.out_features * bias_dtype_bytes if module.bias else 0
    return (per + bias) * module.count


def unquantized_weight_dtype_bytes(inputs: EstimateInput) -> int:
    """Bytes per element of embeddings, norms, head and biases: the load dtype, or fp32
    when the stack runs ``prepare_model_for_kbit_training`` on a quantized model."""
    quantized = inputs.precision in ("8bit", "4bit")
    if quantized and inputs.stack.upcast_unquantized_to_fp32:
        return 4
    return DTYPE_BYTES[inputs.compute_dtype]


def weights_bytes(inputs: EstimateInput) -> int:
    """The frozen base model on the GPU (per GPU; sharding divides it, issue 8)."""
    if inputs.finetuning == "full":
        return full_weights_bytes(inputs)
    linear = sum(linear_weight_bytes(m, inputs) for m in linear_modules(inputs.arch))
    groups = parameter_groups(inputs.arch)
    return linear + (groups.non_linear - groups.linear_bias) * unquantized_weight_dtype_bytes(
        inputs
    )


# --------------------------------------------------------------------------- adapters


def adapter_dtype(inputs: EstimateInput) -> AdapterDtype:
    """Dtype of LoRA A/B: bf16 on quantized models (trl's cast), else peft's fp32 upcast."""
    if inputs.precision in ("8bit", "4bit"):
        if inputs.compute_dtype == "fp16":
            return "fp32"  # the script casts trl's bf16 adapters back: the GPU has no bf16
        return inputs.stack.quantized_adapter_dtype
    if inputs.distributed == "deepspeed-zero3" and inputs.stack.zero3_adapters_in_base_dtype:
        return inputs.compute_dtype
    return inputs.stack.unquantized_adapter_dtype


@dataclass(frozen=True)
class TrainableTensors:
    """Trainable parameters split by the dtype they live in (bytes per element)."""

    numel_by_bytes: dict[int, int]
    """Element size in bytes -> number of trainable elements of that size."""
    shape_counts: tuple[tuple[int, int, int], ...]
    """(rows, cols, how many tensors of that shape), for per-tensor optimizer rules."""


def trainable_tensors(inputs: EstimateInput, include_biases: bool = True) -> TrainableTensors:
    """Every trainable tensor with its dtype: LoRA A/B, DoRA magnitudes (always fp32:
    peft's autocast, and trl skips them in its bf16 cast), modules_to_save copies (load
    dtype; bf16 under trl's quantized cast; fp32 in the fp16 script, which upcasts every
    trainable tensor) and trainable biases."""
    if inputs.finetuning == "full":
        return full_trainable_tensors(inputs)
    arch = inputs.arch
    lora_bytes = DTYPE_BYTES[adapter_dtype(inputs)]
    copy_bytes = modules_to_save_dtype_bytes(inputs)
    numel_by_bytes: dict[int, int] = {}
    shapes: list[tuple[int, int, int]] = []

    def add(size: int, rows: int, cols: int, times: int) -> None:
        numel_by_bytes[size] = numel_by_bytes.get(size, 0) + rows * cols * times
        shapes.append((rows, cols, times))

    for module in targeted_modules(arch, inputs.target_modules):
        add(lora_bytes, inputs.lora_r, module.in_features, module.count)
        add(lora_bytes, module.out_features, inputs.lora_r, module.count)
        if inputs.use_dora:
            add(4, module.out_features, 1, module.count)
    if inputs.target_modules == "all-linear":
        for rows, cols in moe_lora_shapes(arch, inputs.lora_r):
            add(lora_bytes, rows, cols, arch.config.num_hidden_layers)
    mts = modules_to_save_parameter_count(arch, inputs.modules_to_save)
    if mts:
        add(copy_bytes, mts // arch.config.hidden_size, arch.config.hidden_size, 1)
    biases = trainable_bias_count(arch, inputs) if include_biases else 0
    if biases:
        add(copy_bytes, biases, 1, 1)
    return TrainableTensors(numel_by_bytes, tuple(shapes))


def modules_to_save_dtype_bytes(inputs: EstimateInput) -> int:
    """Element size of the trained full copies (and trainable biases): bf16 under trl's
    cast of quantized models; fp32 on a 16-bit base, where the script upcasts every
    trainable tensor (16-bit master weights round small updates away, and the fp16
    gradient scaler refuses fp16 parameters)."""
    quantized = inputs.precision in ("8bit", "4bit")
    return 2 if quantized and inputs.compute_dtype != "fp16" else 4


def adapter_bytes(inputs: EstimateInput) -> int:
    """Trainable parameters' own storage (LoRA, DoRA magnitudes, modules_to_save copies);
    trainable base biases are already in ``weights_bytes``."""
    if inputs.finetuning == "full":
        return 0  # the trained weights are the weights
    tensors = trainable_tensors(inputs, include_biases=False)
    return sum(size * n for size, n in tensors.numel_by_bytes.items())


def gradient_bytes(inputs: EstimateInput) -> int:
    """``.grad`` of every trainable tensor, in the parameter's dtype; kept across micro-batches."""
    tensors = trainable_tensors(inputs)
    return sum(size * n for size, n in tensors.numel_by_bytes.items())


# --------------------------------------------------------------------------- optimizer

PAGED_OPTIMIZERS = frozenset(name for name, optim in stack.OPTIMIZERS.items() if optim.paged)
OPTIMIZERS: tuple[str, ...] = get_args(Optim)
"""Every ``training.optim`` the spec accepts; each has a rule below."""


def bnb_state_bytes(numel: int, states: int, bits: int) -> int:
    """bitsandbytes optimizer state for one tensor: 8-bit blockwise (uint8 + fp32 absmax per
    256) for tensors of at least 4096 elements, fp32 otherwise (optim/optimizer.py)."""
    if bits == 8 and numel >= OPTIM_8BIT_MIN_NUMEL:
        per_state = numel + 4 * math.ceil(numel / OPTIM_8BIT_BLOCKSIZE)
    else:
        per_state = 4 * numel
    return states * per_state


def optimizer_state_bytes(inputs: EstimateInput) -> int:
    """Optimizer state for the trainable tensors (paged states: ``managed_optimizer_bytes``).

    torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; bitsandbytes keeps
    8- or 32-bit states whatever the parameter dtype; transformers' Adafactor
    (beta1=None) keeps factored fp32 row and column second moments; SGD without momentum
    keeps nothing.
    """
    if inputs.optim in PAGED_OPTIMIZERS:
        return _optimizer_bytes_unpaged(inputs) - managed_optimizer_bytes(inputs)
    return _optimizer_bytes_unpaged(inputs)


def optimizer_step_temporary_bytes(inputs: EstimateInput) -> int:
    """Tensors the optimizer step allocates and frees, on top of its state.

    torch's default foreach AdamW allocates one parameter-sized tensor (``_foreach_sqrt``
    of exp_avg_sq); the fused step and bitsandbytes' kernels update in place;
    Adafactor upcasts each gradient to fp32 and squares it, one tensor at a time. The
    step runs after the last backward, when activations are freed, so these only matter
    when they exceed the activations (see ``estimate``).
    """
    tensors = trainable_tensors(inputs)
    optim = inputs.optim.removeprefix("paged_")
    if optim == "adamw_torch":
        return sum(size * n for size, n in tensors.numel_by_bytes.items())
    if optim == "adafactor":
        return 2 * 4 * max((r * c for r, c, _ in tensors.shape_counts), default=0)
    return 0


def managed_optimizer_bytes(inputs: EstimateInput) -> int:
    """Paged optimizer states: cudaMallocManaged, outside torch's counters, evictable to
    host memory under pressure, so they do not make a run run out of memory."""
    if inputs.optim not in PAGED_OPTIMIZERS:
        return 0
    bits = 8 if inputs.optim.endswith("8bit") else 32
    states = 1 if "lion" in inputs.optim else 2
    shapes = trainable_tensors(inputs).shape_counts
    return sum(n * paged_state_bytes(r * c, states, bits) for r, c, n in shapes)


def paged_state_bytes(numel: int, states: int, bits: int) -> int:
    """The paged part of one tensor's bitsandbytes state: only the state buffers of
    parameters with at least ``PAGED_MIN_NUMEL`` elements are paged
    (``get_state_buffer``, bitsandbytes/optim/optimizer.py:383); smaller tensors' states
    and every 8-bit block scale (``absmax``, :528-529) are ordinary device tensors, counted
    in ``optimizer_state_bytes``."""
    if numel < PAGED_MIN_NUMEL:
        return 0
    per_state = numel if bits == 8 and numel >= OPTIM_8BIT_MIN_NUMEL else 4 * numel
    return states * per_state


def _optimizer_bytes_unpaged(inputs: EstimateInput) -> int:
    tensors = trainable_tensors(inputs)
    optim = inputs.optim.removeprefix("paged_")
    shapes = tensors.shape_counts
    param_bytes = sum(size * n for size, n in tensors.numel_by_bytes.items())
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes
    if optim in ("adamw_8bit", "adamw_bnb_8bit"):
        return sum(n * bnb_state_bytes(r * c, 2, 8) for r, c, n in shapes)
    if optim == "adamw_32bit":
        return sum(n * bnb_state_bytes(r * c, 2, 32) for r, c, n in shapes)
    if optim == "lion_8bit":
        return sum(n * bnb_state_bytes(r * c, 1, 8) for r, c, n in shapes)
    if optim == "lion_32bit":
        return sum(n * bnb_state_bytes(r * c, 1, 32) for r, c, n in shapes)
    if optim == "adafactor":
        return sum(n * 4 * (r + c if c > 1 else r) for r, c, n in shapes)
    if optim == "sgd":
        return 0
    raise ValueError(f"optimizer {inputs.optim!r} is not modelled")


# --------------------------------------------------------------------------- activations


def tokens_per_micro_batch(inputs: EstimateInput) -> int:
    """Token positions in one training forward: DPO concatenates chosen and rejected
    (dpo_trainer.py:349-352); GRPO trains on prompt + completion rows."""
    if inputs.method == "dpo":
        return 2 * inputs.micro_batch * inputs.max_length
    if inputs.method == "grpo":
        return inputs.micro_batch * grpo_sequence_length(inputs)
    return inputs.micro_batch * inputs.max_length


def sequences_per_micro_batch(inputs: EstimateInput) -> int:
    return 2 * inputs.micro_batch if inputs.method == "dpo" else inputs.micro_batch


def sequence_length(inputs: EstimateInput) -> int:
    return grpo_sequence_length(inputs) if inputs.method == "grpo" else inputs.max_length


def grpo_sequence_length(inputs: EstimateInput) -> int:
    """GRPO rows are a prompt (bounded by ``max_length``) plus ``max_completion_length``."""
    return inputs.max_length + inputs.max_completion_length


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


def lora_saved_input_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """Inputs the adapted (and 8-bit) linears of one layer save for backward.

    A frozen ``nn.Linear`` or 4-bit matmul saves no input (it needs only the weight for
    the input gradient; bitsandbytes MatMul4Bit keeps ``(None, B)``,
    autograd/_functions.py:357); LLM.int8 keeps its input A (autograd/_functions.py:186).
    Each LoRA A saves its own input: with dropout the bf16 dropout output plus its bool
    mask (3 B/element); without dropout, fp32 adapters still see an autocast bf16 copy of
    the fp32-cast input (2 B/element), bf16 adapters share the layer's tensor. lora_A's
    output (r per token) is saved by lora_B; DoRA saves the base and LoRA outputs for its
    magnitude scaling.
    """
    compute = DTYPE_BYTES[inputs.compute_dtype]
    wrapped = {
        m.name
        for m in targeted_modules(inputs.arch, inputs.target_modules)
        if m.component == LANGUAGE_MODEL
    }
    fp32_adapters = adapter_dtype(inputs) == "fp32"
    total = 0
    for width, members in _input_groups(inputs):
        adapted = [m for m in members if m.name in wrapped]
        share_input = inputs.precision == "8bit" or (
            inputs.precision == "4bit" and inputs.stack.bnb_4bit_saves_input
        )
        per_module = 0
        if adapted:
            if inputs.lora_dropout > 0:
                per_module = 3
            elif fp32_adapters:
                per_module = compute
            else:
                share_input = True
        copies = len(adapted) if inputs.stack.lora_input_copy_per_module else min(len(adapted), 1)
        total += copies * per_module * tokens * width
        if share_input:
            total += compute * tokens * width
        for module in adapted:
            total += compute * tokens * inputs.lora_r
            if inputs.use_dora:
                total += 2 * compute * tokens * module.out_features
    return total


def effective_attn_implementation(inputs: EstimateInput) -> str:
    """The attention kernel that really runs: sdpa falls back to eager where refused."""
    if inputs.attn_implementation == "sdpa" and inputs.arch.config.model_type in SDPA_REFUSED_TYPES:
        return "eager"
    return inputs.attn_implementation


def attention_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """What attention saves for backward in one layer.

    sdpa / flash-attention: q, k, v (k/v at the key-value head count), the output and a
    fp32 log-sum-exp per head and token, plus the contiguous copy of the output that
    o_proj reads. Eager: k/v expanded to every head (``repeat_kv``), the fp32 softmax and
    its compute-dtype copy over (seq x seq) per head: the seq² term; soft-capped logits
    (Gemma-2, ``tanh``) keep one more compute-dtype copy.
    """
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    q_width = c.num_attention_heads * c.head_dim
    kv_width = c.num_key_value_heads * c.head_dim
    if effective_attn_implementation(inputs) == "eager":
        seq = sequence_length(inputs)
        rows = sequences_per_micro_batch(inputs)
        softcap = compute if c.extra.get("attn_logit_softcapping") else 0
        scores = rows * c.num_attention_heads * seq * seq * (4 + compute + softcap)
        return compute * tokens * (3 * q_width) + scores + fused_qkv_output_bytes(inputs, tokens)
    lse = 4 * tokens * c.num_attention_heads
    return (
        compute * tokens * (2 * q_width + 2 * kv_width)
        + lse
        + fused_qkv_output_bytes(inputs, tokens)
    )


def fused_qkv_output_bytes(inputs: EstimateInput, tokens: int) -> int:
    """The rest of a fused ``qkv_proj`` output that the saved values keep alive.

    Phi-3 slices q, k and v out of one projection (models/phi3/modeling_phi3.py:219-224);
    q and k become new tensors through the rotary embedding, but v stays a view, and the
    attention kernel saving v keeps the whole output's storage: q and k widths more per
    token than three separate projections."""
    if not any(m.name == "qkv_proj" for m in language_linear_modules(inputs.arch)):
        return 0
    c = inputs.arch.config
    width = (c.num_attention_heads + c.num_key_value_heads) * c.head_dim
    return DTYPE_BYTES[inputs.compute_dtype] * tokens * width


def sliding_window_layer_count(inputs: EstimateInput) -> int:
    """Decoder layers whose attention uses a sliding window (transformers 5.24 configs).

    Mistral and Phi-3 slide on every layer when ``sliding_window`` is set
    (models/mistral/modeling_mistral.py:355, models/phi3/modeling_phi3.py:386); Qwen2 only
    with ``use_sliding_window``; Gemma-3 on every layer but each ``sliding_window_pattern``-th
    (models/gemma3/configuration_gemma3.py:108-109)."""
    c = inputs.arch.config
    window = c.extra.get("sliding_window")
    if not window or c.extra.get("use_sliding_window") is False:
        return 0
    pattern = c.extra.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:
        return c.num_hidden_layers - c.num_hidden_layers // pattern
    return c.num_hidden_layers


def masked_attention_layer_count(inputs: EstimateInput) -> int:
    """Layers whose SDPA call gets an explicit mask instead of ``is_causal=True``.

    transformers skips the mask only when nothing but causality is needed: a sliding layer
    needs one once the keys reach the window (``kv_length >= local_attention_size``,
    masking_utils.py:286), and packed SFT rows (trl's ``bfd`` packing is padding-free:
    ``position_ids`` only, sft_trainer.py:916) get a block-causal mask on every layer
    (masking_utils.py:991-996). flash-attention takes neither (varlen / window arguments);
    eager adds its mask to the scores (counted with them)."""
    if effective_attn_implementation(inputs) != "sdpa":
        return 0
    c = inputs.arch.config
    if inputs.method == "sft" and inputs.packing:
        return c.num_hidden_layers
    window = c.extra.get("sliding_window")
    if isinstance(window, int) and sequence_length(inputs) >= window:
        return sliding_window_layer_count(inputs)
    return 0


def attention_mask_bytes(inputs: EstimateInput) -> int:
    """One layer's SDPA mask as the kernel saves it: torch converts the bool mask to a
    compute-dtype additive mask ([rows, 1, T, T], ``convert_boolean_attn_mask``) on every
    call, and the memory-efficient kernel saves that bias for backward."""
    seq = sequence_length(inputs)
    return DTYPE_BYTES[inputs.compute_dtype] * sequences_per_micro_batch(inputs) * seq * seq


def bool_attention_mask_bytes(inputs: EstimateInput) -> int:
    """The model's bool mask ([rows, 1, T, T], built once per forward and shared by the
    layers). Non-reentrant checkpointing keeps each layer's arguments for the recompute, so
    with checkpointing it lives until backward ends."""
    if not masked_attention_layer_count(inputs):
        return 0
    seq = sequence_length(inputs)
    return sequences_per_micro_batch(inputs) * seq * seq


def mlp_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """Gated MLP: the activation's input, its output and the up projection (3 x T x I).

    MoE layers run each token through ``num_experts_per_tok`` experts of width
    ``moe_intermediate_size``.
    """
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    width = c.intermediate_size
    if c.num_local_experts:
        width = (c.moe_intermediate_size or c.intermediate_size) * (c.num_experts_per_tok or 1)
    return 3 * compute * tokens * width


def norm_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """RMSNorms of one layer; each saves its fp32-upcast input (``pow`` needs it).

    Two per layer, four in Gemma 2/3 (norms after attention and MLP too); Qwen3 and
    Gemma 3 also normalise q and k per head."""
    c = inputs.arch.config
    per = 4 if inputs.stack.norm_saves_fp32_input else DTYPE_BYTES[inputs.compute_dtype]
    norms = 4 if c.model_type in SANDWICH_NORM_TYPES else 2
    total = norms * per * tokens * c.hidden_size
    if c.model_type in QK_NORM_TYPES:
        heads = c.num_attention_heads + c.num_key_value_heads
        total += per * tokens * heads * c.head_dim
    return total


def moe_merged_expert_bytes_per_layer(inputs: EstimateInput) -> int:
    """A fused-MoE layer's experts with their LoRA merged in, as peft's ``ParamWrapper``
    builds them on every forward (a parametrization ``W + B @ A``,
    peft/tuners/lora/layer.py:2572-2598): the merged 3-D weights are what the experts'
    matmuls save for backward. fp32 adapters promote the merged weights to fp32."""
    if inputs.target_modules != "all-linear" or not moe_experts_per_layer(inputs.arch):
        return 0
    c = inputs.arch.config
    width = c.moe_intermediate_size or c.intermediate_size
    experts = moe_experts_per_layer(inputs.arch)
    element = max(DTYPE_BYTES[inputs.compute_dtype], DTYPE_BYTES[adapter_dtype(inputs)])
    return element * experts * 3 * width * c.hidden_size


def layer_saved_activation_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Everything one decoder layer keeps for its backward pass (no checkpointing)."""
    if inputs.finetuning == "full":
        return (
            norm_saved_bytes_per_layer(inputs, tokens)
            + attention_saved_bytes_per_layer(inputs, tokens)
            + mlp_saved_bytes_per_layer(inputs, tokens)
            + full_saved_bytes_per_layer(inputs, tokens)
        )
    return (
        moe_merged_expert_bytes_per_layer(inputs)
        + norm_saved_bytes_per_layer(inputs, tokens)
        + attention_saved_bytes_per_layer(inputs, tokens)
        + mlp_saved_bytes_per_layer(inputs, tokens)
        + lora_saved_input_bytes_per_layer(inputs, tokens)
    )


def backward_transient_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Short-lived tensors at the worst moment of one layer's backward: two gradients of
    the widest activation, and the dequantized weight of the largest 8/4-bit linear
    (MatMul4Bit dequantizes the whole weight to the compute dtype in forward and backward,
    autograd/_functions.py:384,446; LLM.int8 dequantizes CB in backward, :237).

    When LoRA adapts the layer, the gradient reaching the adapter's input is in the
    adapter's dtype (fp32 adapters: the fp32-cast input's gradient, then the dropout's),
    so the two gradients take the adapter's element size when it is the larger."""
    c = inputs.arch.config
    element = DTYPE_BYTES[inputs.compute_dtype]
    if targeted_modules(inputs.arch, inputs.target_modules):
        element = max(element, DTYPE_BYTES[adapter_dtype(inputs)])
    width = max(c.intermediate_size, c.num_attention_heads * c.head_dim)
    if inputs.finetuning == "full":
        return 2 * element * tokens * width + full_weight_gradient_transient_bytes(inputs)
    return 2 * element * tokens * width + dequantized_weight_transient_bytes(inputs)


def dequantized_weight_transient_bytes(inputs: EstimateInput) -> int:
    """The largest quantized linear dequantized to the compute dtype (0 when unquantized)."""
    if inputs.precision not in ("8bit", "4bit"):
        return 0
    largest = max(m.in_features * m.out_features for m in linear_modules(inputs.arch))
    return DTYPE_BYTES[inputs.compute_dtype] * largest


def kept_activation_bytes(inputs: EstimateInput) -> int:
    """Activations saved across the whole forward, alive when backward starts.

    Without checkpointing every layer's saved tensors (plus the embedding output). With
    (non-reentrant) checkpointing only each layer's input, ``T x hidden`` in the compute
    dtype. Both keep the final norm's fp32 input.
    """
    c = inputs.arch.config
    tokens = tokens_per_micro_batch(inputs)
    hidden = residual_stream_dtype_bytes(inputs) * tokens * c.hidden_size
    if inputs.gradient_checkpointing:
        kept = c.num_hidden_layers * (hidden + int8_inputs_outside_checkpoint_bytes(inputs, tokens))
        kept += bool_attention_mask_bytes(inputs)
    else:
        kept = c.num_hidden_layers * layer_saved_activation_bytes(inputs, tokens) + hidden
        kept += masked_attention_layer_count(inputs) * attention_mask_bytes(inputs)
    return kept + 4 * tokens * c.hidden_size


def residual_stream_dtype_bytes(inputs: EstimateInput) -> int:
    """Element size of the hidden states between decoder layers: the embedding weight's.

    autocast changes neither the embedding lookup nor the residual adds, and HF RMSNorm
    returns ``weight * x.to(input_dtype)``, so fp32 embeddings (the fp16 script's fp32
    trained copy of ``embed_tokens``; ``prepare_model_for_kbit_training``'s upcast) keep
    every layer's input and output in fp32; a tied ``lm_head`` copy is separate and does
    not matter here."""
    if inputs.finetuning == "full":
        return full_master_bytes(inputs)  # fp32 embeddings: an fp32 residual stream
    trained = {name.rsplit(".", 1)[-1] for name in inputs.modules_to_save}
    if "embed_tokens" in trained:
        return modules_to_save_dtype_bytes(inputs)
    return unquantized_weight_dtype_bytes(inputs)


def int8_inputs_outside_checkpoint_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Inputs of one layer's LLM.int8 linears that survive activation checkpointing.

    ``MatMul8bitLt`` keeps its input on ``ctx.tensors`` (bitsandbytes
    autograd/_functions.py:186), not through ``save_for_backward``, so checkpointing's
    saved-tensor hooks never see it: every 8-bit layer's inputs stay alive through the
    forward even with gradient checkpointing on. One tensor per shared input.
    """
    if inputs.precision != "8bit":
        return 0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    return sum(compute * tokens * width for width, _ in _input_groups(inputs))


def backward_layer_bytes(inputs: EstimateInput) -> int:
    """What one layer's backward adds to the kept activations: its recomputed forward
    (checkpointing only) and the larger of the recompute's and the backward's transients
    (never alive together: the recomputed forward has returned before the layer's
    backward kernels run). The LM head's backward runs before any layer's, and has
    finished by then."""
    tokens = tokens_per_micro_batch(inputs)
    transient = backward_transient_bytes(inputs, tokens)
    if inputs.gradient_checkpointing:
        transient = max(transient, recompute_transient_bytes(inputs, tokens))
        mask = attention_mask_bytes(inputs) if masked_attention_layer_count(inputs) else 0
        return layer_saved_activation_bytes(inputs, tokens) + mask + transient
    return transient


def recompute_transient_bytes(inputs: EstimateInput, tokens: int) -> int:
    """Unsaved tensors alive while a checkpointed layer's forward is recomputed, at its
    widest moment: ``down_proj``'s LoRA branch.

    The MLP's product ``act(gate) * up`` (compute dtype) is alive while ``down_proj``
    runs. peft casts it to the adapter dtype into its local ``x``, held until the module
    returns (peft/tuners/lora/layer.py:1100), and dropout writes a new tensor in that
    dtype; with fp32 adapters both are fp32 and neither is saved (lora_A saves autocast's
    compute-dtype copy, counted in ``lora_saved_input_bytes_per_layer``). bf16 adapters
    (8/4-bit models under trl) make no cast, and their dropout output is the saved input.
    """
    down = [
        m
        for m in targeted_modules(inputs.arch, inputs.target_modules)
        if m.name == "down_proj" and m.component == LANGUAGE_MODEL
    ]
    if not down:
        return 0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    adapter = DTYPE_BYTES[adapter_dtype(inputs)]
    per_element = compute
    if adapter != compute:
        per_element += adapter
        if inputs.lora_dropout > 0:
            per_element += adapter
    return per_element * tokens * down[0].in_features


def activation_bytes(inputs: EstimateInput) -> int:
    """Activations at the worst moment of the decoder layers' backward."""
    return kept_activation_bytes(inputs) + backward_layer_bytes(inputs)


def train_step_peak_parts(inputs: EstimateInput) -> tuple[int, int]:
    """(activation, logits) bytes at the training step's peak.

    Two moments compete: the LM head and loss (forward end / backward start: the kept
    activations plus ``logits_bytes``) and a decoder layer's backward (the kept
    activations plus ``backward_layer_bytes``; the head's tensors are freed by then).
    """
    kept = kept_activation_bytes(inputs)
    head = logits_bytes(inputs)
    layer = backward_layer_bytes(inputs)
    if head >= layer:
        return kept, head
    return kept + layer, 0


# --------------------------------------------------------------------------- logits / loss


FULL_LOGITS_BYTES_PER_ENTRY = {
    "full_logits_fp32": 2 + 4 + 4,
    "full_logits_fp32_shifted": 2 + 4 + 4 + 4,
    "chunked_logits_fp32": 2 + 4,
    "chunked_logits_bf16": 2 + 2,
}
"""Bytes alive per (token x vocabulary entry) at the loss's peak, per full-logits path."""


def logits_bytes(inputs: EstimateInput) -> int:
    """The LM head and loss at their peak, per the stack's loss path.

    ``fused_lm_head`` (trl 1.16): the compact hidden states (one copy), one
    [4096 x 32768] compute-dtype tile (forward's buffer, freed before backward allocates
    its own; the Triton kernels fold each tile in place), the fp32
    gradient of the hidden states and a handful of fp32 per-token statistics
    (trl/kernels/chunked_logprob.py:340-349, 406-415). The full-logits paths cost their
    bytes per token x vocabulary entry (``StackProfile.loss_path``).
    """
    c = inputs.arch.config
    tokens = tokens_per_micro_batch(inputs)
    compute = DTYPE_BYTES[inputs.compute_dtype]
    if inputs.stack.loss_path in FULL_LOGITS_BYTES_PER_ENTRY:
        return FULL_LOGITS_BYTES_PER_ENTRY[inputs.stack.loss_path] * tokens * c.vocab_size
    tokens = fused_head_scored_tokens(inputs)
    tile = compute * min(tokens, FUSED_HEAD_TOKEN_TILE) * min(c.vocab_size, FUSED_HEAD_VOCAB_TILE)
    fused = compute * tokens * c.hidden_size + tile + 4 * tokens * c.hidden_size + 8 * 4 * tokens
    if inputs.finetuning == "full":
        return fused + full_head_extra_bytes(inputs, tokens)
    return fused + trained_head_gradient_bytes(inputs)


def fused_head_scored_tokens(inputs: EstimateInput) -> int:
    """Tokens the fused LM head projects: on CUDA only positions with a label
    (``hidden_states[mask]``, trl/trainer/utils.py:1642-1648). GRPO masks the prompt
    (``labels[:, :-logits_to_keep] = -100``, grpo_trainer.py:1496, with ``logits_to_keep``
    the completion length, :2504), so only ``max_completion_length`` tokens per row are
    scored; SFT and DPO score every position of a full-length row."""
    if inputs.method == "grpo":
        return inputs.micro_batch * inputs.max_completion_length
    return tokens_per_micro_batch(inputs)


def trained_head_gradient_bytes(inputs: EstimateInput) -> int:
    """A trained ``lm_head`` (``modules_to_save``) gets its gradient from the fused head's
    backward as an fp32 buffer of the whole head (chunked_logprob.py:411-412), cast to the
    weight's dtype on return: 4 + 2 bytes per head parameter, on top of ``.grad``."""
    if "lm_head" not in {name.rsplit(".", 1)[-1] for name in inputs.modules_to_save}:
        return 0
    c = inputs.arch.config
    return (4 + DTYPE_BYTES[inputs.compute_dtype]) * c.vocab_size * c.hidden_size


# --------------------------------------------------------------------------- GRPO generation


def kv_cache_bytes(inputs: EstimateInput, rows: int, positions: int) -> int:
    """Keys and values of every layer for ``rows`` sequences of ``positions`` tokens."""
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * rows * positions * compute


def grpo_generation_rows(inputs: EstimateInput) -> int:
    """Sequences generated at once: trl's generation batch is
    ``per_device_train_batch_size x steps_per_generation`` (= gradient accumulation,
    grpo_config.py:1098-1100), all passed to one ``generate`` call (grpo_trainer.py:1873)."""
    return inputs.micro_batch * inputs.gradient_accumulation_steps


def grpo_generation_bytes(inputs: EstimateInput) -> int:
    """The generation phase's peak (no gradients): the larger of the prompt's prefill and
    the last decoding step. Full fine-tuning adds autocast's cast of every decoder weight,
    cached until each forward returns (``full_decoder_cast_bytes``)."""
    peak = max(grpo_prefill_bytes(inputs), grpo_last_decode_bytes(inputs))
    if inputs.finetuning == "full":
        peak += full_decoder_cast_bytes(inputs)
    return peak


def grpo_prefill_bytes(inputs: EstimateInput) -> int:
    """Prefill of the whole generation batch: the prompt's KV cache plus one layer's
    widest moment, the gated MLP: either forming ``up_proj``'s output plus its LoRA term
    next to the activation, or ``down_proj``'s LoRA reading the product. The model stays in
    train mode during trl's ``generate`` (``unwrap_model_for_generation`` does not call
    ``eval()``), so LoRA dropout runs: an adapted ``down_proj`` casts its input to the
    adapter dtype, applies dropout (output + bool mask) and autocast copies the result back
    for the matmul, all while the product is alive. Four hidden-sized tensors come on top:
    the embedding output (the model's ``inputs_embeds`` stays referenced through its
    forward), the layer's input (the caller's ``hidden_states``), the post-attention
    residual and the norm output the MLP reads; and the dequantized weight of an 8/4-bit
    linear."""
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    rows = grpo_generation_rows(inputs)
    tokens = rows * inputs.max_length
    mlp_width = c.intermediate_size
    if c.num_local_experts:
        mlp_width = (c.moe_intermediate_size or c.intermediate_size) * (c.num_experts_per_tok or 1)
    adapted = {m.name for m in targeted_modules(inputs.arch, inputs.target_modules)}
    # act(gate) * up, with up's LoRA sum being formed: activation, base output, LoRA
    # output and its scaled copy (4 tensors) when up (or gate) is adapted, else 3.
    up_side = 4.0 if adapted & {"up_proj", "gate_proj", "gate_up_proj"} else 3.0
    down_side = 1.0
    if "down_proj" in adapted:
        adapter = DTYPE_BYTES[adapter_dtype(inputs)]
        upcast = adapter != compute
        # product + its adapter-dtype cast + dropout output and mask + autocast's copy
        copies = (adapter if upcast else 0) + (adapter + 1 if inputs.lora_dropout > 0 else 0)
        down_side = 1 + (copies + (compute if upcast else 0)) / compute
    mlp = int(max(up_side, down_side) * compute * tokens * mlp_width)
    residual = 4 * compute * tokens * c.hidden_size
    cache = kv_cache_bytes(inputs, rows, inputs.max_length)
    return cache + mlp + residual + dequantized_weight_transient_bytes(inputs)


def grpo_last_decode_bytes(inputs: EstimateInput) -> int:
    """The last decoding step: the full KV cache, one layer's keys and values twice while
    the cache grows by concatenation, and the next-token logits (compute dtype, fp32 copy,
    fp32 probabilities for sampling)."""
    c = inputs.arch.config
    rows = grpo_generation_rows(inputs)
    positions = grpo_sequence_length(inputs)
    cache = kv_cache_bytes(inputs, rows, positions)
    regrow = cache // c.num_hidden_layers
    logits = (DTYPE_BYTES[inputs.compute_dtype] + 4 + 4) * rows * c.vocab_size
    return cache + regrow + logits + dequantized_weight_transient_bytes(inputs)


# --------------------------------------------------------------------------- full fine-tuning
#
# ``finetuning: full`` as the emitted script runs it: the model loaded in fp32 (master
# weights), trained under accelerate's bf16 autocast (``bf16=True``; fp16 GPUs ``fp16=True``),
# so gradients and optimizer states are fp32 too. Pure bf16 weights would save half the
# weight and gradient bytes but round small AdamW updates away (lr x update << bf16's 8-bit
# mantissa), the reason the LoRA scripts keep fp32 masters for modules_to_save.
#
# What autocast adds (torch/amp/autocast_mode.py, accelerate/accelerator.py:1826-1833
# wrapping ``model.forward``): every matmul casts its fp32 weight to the compute dtype; the
# cast of a leaf parameter is cached until the outermost autocast exits (the end of the
# forward, autocast_mode.py:349 ``clear_autocast_cache``), and the matmul saves it for
# backward. Without checkpointing every layer's casts live until that layer's backward; with
# (non-reentrant) checkpointing the forward's saved tensors are dropped, but the cache still
# holds every cast until the forward returns, and each recomputed layer holds its own.


def full_parameter_shapes(arch: ModelArch) -> list[tuple[int, int, int]]:
    """(rows, cols, how many) of every parameter tensor of the built model, for the
    per-tensor optimizer rules (8-bit states for tensors of 4096+ elements, Adafactor's
    factored rows and columns): linear weights and biases, embeddings, the untied head, the
    norms (1-D), fused MoE experts and routers, and the rest of a vision tower."""
    c = arch.config
    groups = parameter_groups(arch)
    shapes: list[tuple[int, int, int]] = []
    for module in linear_modules(arch):
        shapes.append((module.out_features, module.in_features, module.count))
        if module.bias:
            shapes.append((module.out_features, 1, module.count))
    shapes.append((c.vocab_size, c.hidden_size, 1))
    if groups.lm_head:
        shapes.append((c.vocab_size, c.hidden_size, 1))
    norm_vectors, rest = divmod(groups.norm, c.hidden_size)
    shapes.append((c.hidden_size, 1, norm_vectors))
    if rest:
        shapes.append((rest, 1, 1))
    if groups.moe_experts:
        per_layer = groups.moe_experts // c.num_hidden_layers
        shapes.append((per_layer // c.hidden_size, c.hidden_size, c.num_hidden_layers))
    if groups.moe_router:
        shapes.append((groups.moe_router // c.num_hidden_layers, 1, c.num_hidden_layers))
    if groups.vision_other:
        shapes.append((groups.vision_other, 1, 1))
    return [shape for shape in shapes if shape[0] * shape[1] * shape[2]]


def full_master_bytes(inputs: EstimateInput) -> int:
    """Bytes per element of the trained weights: fp32 masters, or the compute dtype when
    the stack trains in pure 16 bits (``StackProfile.full_master_weights``)."""
    if inputs.stack.full_master_weights == "fp32":
        return 4
    return DTYPE_BYTES[inputs.compute_dtype]


def full_autocast(inputs: EstimateInput) -> bool:
    """fp32 masters run under autocast, which casts each weight per matmul."""
    return inputs.stack.full_master_weights == "fp32"


def full_trainable_tensors(inputs: EstimateInput) -> TrainableTensors:
    """Every parameter, in the master dtype (what the optimizer steps)."""
    arch = inputs.arch
    shapes = tuple(full_parameter_shapes(arch))
    return TrainableTensors({full_master_bytes(inputs): base_parameter_count(arch)}, shapes)


def reference_weight_bytes(inputs: EstimateInput) -> int:
    """The frozen reference copy full fine-tuning keeps for DPO (no
    ``precompute_ref_log_probs``) and GRPO (``beta > 0``): the script loads it in the compute
    dtype (trl would load it in the policy's fp32, dpo_trainer.py:924, grpo_trainer.py:1002)."""
    if inputs.finetuning != "full" or not inputs.reference_model:
        return 0
    return DTYPE_BYTES[inputs.compute_dtype] * base_parameter_count(inputs.arch)


def full_weights_bytes(inputs: EstimateInput) -> int:
    """Master weights of every parameter, plus the reference copy if any."""
    master = full_master_bytes(inputs) * base_parameter_count(inputs.arch)
    return master + reference_weight_bytes(inputs)


def full_layer_linear_parameters(inputs: EstimateInput) -> int:
    """Weight elements of one decoder layer's linears (what autocast casts per layer)."""
    total = sum(m.weight_parameters for m in language_linear_modules(inputs.arch))
    return total // inputs.arch.config.num_hidden_layers


def full_weight_cast_bytes_per_layer(inputs: EstimateInput) -> int:
    """One layer's autocast weight casts: every linear weight in the compute dtype (none
    when the weights are in the compute dtype already)."""
    if not full_autocast(inputs):
        return 0
    return DTYPE_BYTES[inputs.compute_dtype] * full_layer_linear_parameters(inputs)


def full_decoder_cast_bytes(inputs: EstimateInput) -> int:
    """Every decoder layer's weight casts: what autocast's cache holds at a forward's end."""
    return inputs.arch.config.num_hidden_layers * full_weight_cast_bytes_per_layer(inputs)


def full_saved_bytes_per_layer(inputs: EstimateInput, tokens: int) -> int:
    """What training every weight adds to a layer's saved tensors (beyond the attention,
    MLP and norm rules the LoRA estimate shares).

    - The weight casts (``full_weight_cast_bytes_per_layer``): each matmul saves its
      compute-dtype weight for the input gradient.
    - Each linear saves its input for the weight gradient. The residual stream is fp32
      (fp32 embeddings; RMSNorm returns ``weight * x.to(input_dtype)``), so q/k/v and
      gate/up each save their own autocast copy of the fp32 norm output (autocast caches
      only leaf parameters); o_proj reads the attention output (counted by the attention
      rule); down_proj saves ``act(gate) * up``.
    - Each norm's trainable ``weight * x`` saves the fp32 normalised ``x``.
    """
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    total = full_weight_cast_bytes_per_layer(inputs)
    for width, members in _input_groups(inputs):
        names = {m.name for m in members}
        if names & {"o_proj", "dense"}:
            continue
        # Pure 16-bit: the members share the norm's output (no autocast copies).
        copies = len(members) if full_autocast(inputs) else 1
        total += copies * compute * tokens * width
    norms = 4 if c.model_type in SANDWICH_NORM_TYPES else 2
    total += norms * full_master_bytes(inputs) * tokens * c.hidden_size
    return total


def full_gradients_released(inputs: EstimateInput, phase: str) -> bool:
    """No gradients at the forward's end: full fine-tuning with one micro-batch per optimizer
    step (the Trainer's ``zero_grad`` sets them to None after each step; with accumulation
    they survive into the next micro-batch). LoRA's gradients are small: not split there.
    DeepSpeed keeps its gradient partition between steps (ZeRO-3's flat gradient buffer is
    allocated once, stage3.py ``grad_partitions_flat_buffer``): not released there."""
    return (
        inputs.finetuning == "full"
        and inputs.gradient_accumulation_steps == 1
        and phase == "train"
        and not inputs.distributed.startswith("deepspeed")
    )


def full_weight_gradient_transient_bytes(inputs: EstimateInput) -> int:
    """The largest linear's weight gradient as its backward makes it: the compute-dtype
    matmul result, then autocast's cast back to the fp32 master (``ToCopyBackward``)
    before it is accumulated into ``.grad``."""
    largest = max(m.in_features * m.out_features for m in language_linear_modules(inputs.arch))
    upcast = 4 if full_autocast(inputs) else 0
    return (DTYPE_BYTES[inputs.compute_dtype] + upcast) * largest


def full_head_extra_bytes(inputs: EstimateInput, tokens: int) -> int:
    """At the LM head (forward end / backward start) under full fine-tuning: the fused
    head's fp32 gradient buffer of the whole head (chunked_logprob.py:410, kept fp32: the
    weight is fp32), the head's input in fp32 rather than the compute dtype, and with
    checkpointing every layer's weight cast still in autocast's cache (without it they are
    in the kept activations already)."""
    c = inputs.arch.config
    compute = DTYPE_BYTES[inputs.compute_dtype]
    # fp32 buffer, cast to a 16-bit weight's dtype on return
    head = (4 + (0 if full_autocast(inputs) else compute)) * c.vocab_size * c.hidden_size
    hidden = (full_master_bytes(inputs) - compute) * tokens * c.hidden_size
    cache = full_decoder_cast_bytes(inputs) if inputs.gradient_checkpointing else 0
    return head + hidden + cache


# ----------------------------------------------------------------- full fine-tuning, sharded
#
# ``finetuning: full`` under FSDP / ZeRO-2 / ZeRO-3 trains every parameter, so every engine
# shards the whole model's fp32 masters, gradients and optimizer state (ZeRO-2 replicates
# the 16-bit weights, FSDP and ZeRO-3 shard them too). What the emitted recipe runs (paths
# relative to site-packages; DeepSpeed is not pinned, its paths are deepspeed/runtime/...):
#
# FSDP1 (accelerate 1.15, ``mixed_precision: bf16``): ``set_mixed_precision`` gives
# ``MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16)``
# (accelerate/utils/dataclasses.py:2129-2141). The model is loaded in fp32, so each unit's
# sharded ``FlatParameter`` is fp32 and is what the optimizer steps (accelerate also upcasts
# a 16-bit one, accelerator.py:1995-2037). Before the all-gather FSDP casts the shard into
# a bf16 copy (``_mp_shard``, torch/distributed/fsdp/_flat_param.py:1271-1276,
# ``_use_low_precision_shard``) and gathers into a bf16 unsharded parameter
# (``_full_param_padded``, :1286-1292). Autograd's gradient is bf16, reduce-scattered in
# bf16 into a bf16 shard (_runtime_utils.py ``_post_backward_hook`` :756-766,
# ``_reduce_grad`` :846-862), which ``_cast_grad_to_param_dtype`` (:1030-1056) casts to the
# fp32 shard's dtype and keeps as ``_saved_grad_shard`` (:906-928): the fp32 ``.grad`` the
# optimizer reads. The forward and backward see bf16 weights only (autocast on bf16 weights
# casts nothing), so the activations are those of pure-bf16 training.
#
# DeepSpeed (ZeRO-2 / ZeRO-3, ``"bf16": {"enabled": "auto"}`` filled from ``bf16=True``):
# ``deepspeed.initialize`` casts the module to bf16 and, unless it was built under
# ``zero.Init``, moves it whole to the GPU (engine.py ``_configure_distributed_model``:
# ``self.module.bfloat16()``, ``self.module.to(self.device)``). The emitted script loads the
# model before its training arguments exist, so transformers' ``is_deepspeed_zero3_enabled``
# (integrations/deepspeed.py:284, a weak reference that TrainingArguments sets,
# training_args.py:1716-1721) is still False at ``from_pretrained``: no ``zero.Init``. The
# ZeRO optimizer keeps its fp32 master partition (``single_partition_of_fp32_groups``,
# stage_1_and_2.py; ``fp32_partitioned_groups_flat``, stage3.py) and the optimizer states of
# that partition; gradients are reduced in the bf16 model dtype into bf16 partitions (the
# gradient accumulation dtype is the model dtype under ZeRO, engine.py ``get_data_types``)
# and the step makes an fp32 copy of the partition's gradient (``single_grad_partition``).
# accelerate runs no autocast under DeepSpeed (accelerator.py:585-590: ``native_amp`` only
# for the other engines), so the activations are pure bf16 here too.


def full_sharded(inputs: EstimateInput) -> bool:
    """Full fine-tuning under an engine that shards its state (FSDP, ZeRO-2, ZeRO-3)."""
    return inputs.finetuning == "full" and inputs.distributed in STATE_SHARDING_ENGINES


def full_sharded_activation_inputs(inputs: EstimateInput) -> EstimateInput:
    """The inputs the activation and logits terms see: under FSDP the layers compute with
    their gathered bf16 weights, under DeepSpeed with the bf16 module, so no weight casts,
    a bf16 residual stream and shared linear inputs, as in pure 16-bit training
    (``StackProfile.full_master_weights = "compute"``). One GPU and DDP: unchanged."""
    if not full_sharded(inputs):
        return inputs
    from dataclasses import replace

    return replace(inputs, stack=replace(inputs.stack, full_master_weights="compute"))


def full_root_parameters(arch: ModelArch) -> int:
    """Parameters of FSDP's root unit (embeddings, untied head, final norm): those no
    decoder layer owns under the transformer-layer wrap policy."""
    groups = parameter_groups(arch)
    return groups.embedding + groups.lm_head + arch.config.hidden_size


def full_layer_unit_bytes(inputs: EstimateInput) -> int:
    """One decoder layer's parameters as FSDP gathers them under full fine-tuning: in the
    compute dtype (``_full_param_padded`` is allocated in ``param_dtype``,
    torch/distributed/fsdp/_flat_param.py:1286), not in the fp32 they are stored in."""
    arch = inputs.arch
    layers = base_parameter_count(arch) - full_root_parameters(arch)
    per_layer = math.ceil(layers / arch.config.num_hidden_layers)
    return per_layer * DTYPE_BYTES[inputs.compute_dtype]


def full_storage_unit_bytes(inputs: EstimateInput) -> int:
    """The largest FSDP unit in its fp32 storage dtype: what wrapping moves to the GPU and
    flattens while the model is loaded (the root, or a decoder layer when larger)."""
    arch = inputs.arch
    layers = base_parameter_count(arch) - full_root_parameters(arch)
    per_layer = math.ceil(layers / arch.config.num_hidden_layers)
    return 4 * max(full_root_parameters(arch), per_layer)


def full_fsdp_gradient_buffer_bytes(inputs: EstimateInput) -> int:
    """FSDP1's gradient buffers when every unit trains.

    - The root unit's unsharded bf16 gradient: its flat parameter's views (head and
      embeddings) pass their gradients through one ``SplitWithSizesBackward``, which runs
      only once the embeddings' gradient arrives at the backward's end, so the head's
      gradient lives through the whole backward and the root's post-backward hook
      (_runtime_utils.py ``_post_backward_hook``) reduces it last.
    - ``fsdp_gathered_layer_units`` decoder layers' unsharded bf16 gradients, kept for the
      post-backward stream (``_no_dispatch_record_stream``, :772), plus one reduce-scatter
      output shard in ``reduce_dtype`` (``_get_reduce_scatter_tensors``).
    - The bf16 copies of the shards being all-gathered (``_mp_shard``, freed once the
      gather is done, ``_free_low_precision_sharded_param``)."""
    compute = DTYPE_BYTES[inputs.compute_dtype]
    world = inputs.world_size
    root = compute * full_root_parameters(inputs.arch)
    layer = full_layer_unit_bytes(inputs)
    units = fsdp_gathered_layer_units(inputs.stack)
    low_precision_shards = units * _shard(layer, world)
    return root + units * layer + _shard(layer, world) + low_precision_shards


def full_zero_gradient_partition_bytes(inputs: EstimateInput) -> int:
    """This rank's gradient partition under ZeRO-2 / ZeRO-3 full fine-tuning: bf16 (the
    gradient accumulation dtype is the model dtype, engine.py ``get_data_types``), 1/N of
    every parameter (ZeRO-3's ``grad_partitions_flat_buffer``, ZeRO-2's averaged
    partition)."""
    compute = DTYPE_BYTES[inputs.compute_dtype]
    return _shard(compute * base_parameter_count(inputs.arch), inputs.world_size)


def full_zero_step_temporary_bytes(inputs: EstimateInput) -> int:
    """The ZeRO step's temporaries on this rank: the fp32 copy of the partition's gradient
    the optimizer steps the fp32 master with (stage_1_and_2.py ``single_grad_partition``,
    stage3.py ``_prepare_fp32_grad_for_sub_group``) plus the torch optimizer's own step
    temporary for the fp32 partition."""
    fp32_grad = _shard(4 * base_parameter_count(inputs.arch), inputs.world_size)
    return fp32_grad + _shard(optimizer_step_temporary_bytes(inputs), inputs.world_size)


def full_fsdp_parts(inputs: EstimateInput) -> PerGpuParts:
    """FSDP1 FULL_SHARD of a fully fine-tuned model, per GPU: fp32 master shards (1/N of
    every parameter), the gathered bf16 root unit plus ``fsdp_gathered_layer_units`` bf16
    layers, fp32 gradient shards (``_saved_grad_shard``), the optimizer state of the fp32
    shards and its step temporary (1/N each), the gradient buffers
    (``full_fsdp_gradient_buffer_bytes``). CPU offload (``offload_params``) moves the fp32
    shards, their gradients and the optimizer step to host memory."""
    world = inputs.world_size
    offload = inputs.cpu_offload
    units = max(
        fsdp_gathered_layer_units(inputs.stack), fsdp_forward_gathered_layer_units(inputs.stack)
    )
    compute = DTYPE_BYTES[inputs.compute_dtype]
    gathered = compute * full_root_parameters(inputs.arch) + units * full_layer_unit_bytes(inputs)
    masters = _shard(full_master_bytes(inputs) * base_parameter_count(inputs.arch), world)
    communication = full_fsdp_gradient_buffer_bytes(inputs)
    kept = 0 if offload else 1
    return PerGpuParts(
        weights_bytes=kept * masters + gathered,
        adapter_bytes=0,
        gradient_bytes=kept * _shard(gradient_bytes(inputs), world) + communication,
        optimizer_bytes=kept * _shard(optimizer_state_bytes(inputs), world),
        optimizer_step_temporary_bytes=kept * _shard(optimizer_step_temporary_bytes(inputs), world),
        managed_bytes=kept * _shard(managed_optimizer_bytes(inputs), world),
        communication_bytes=communication,
        gathered_weight_bytes=gathered,
    )


def full_zero_parts(inputs: EstimateInput) -> PerGpuParts:
    """DeepSpeed ZeRO-2 / ZeRO-3 of a fully fine-tuned model, per GPU.

    Weights: the bf16 module, whole under ZeRO-2, 1/N plus the gathered modules
    (``zero3_gathered_parameter_bytes``) under ZeRO-3. Gradients: the bf16 partition
    (``full_zero_gradient_partition_bytes``) plus the reduce buckets (``zero_bucket_bytes``).
    Optimizer: DeepSpeed's fp32 master partition (``deepspeed_master_weight_bytes`` / N)
    and the optimizer states of that partition (fp32: torch AdamW keeps them in the master's
    dtype). Step temporaries: ``full_zero_step_temporary_bytes``. CPU offload
    (``offload_optimizer``, ZeRO-3 also ``offload_param``) moves the master partition, the
    optimizer states and the step (ZeRO-3: the parameter partition) to host memory; the
    gradient partition stays, as for LoRA."""
    world = inputs.world_size
    offload = inputs.cpu_offload
    compute = DTYPE_BYTES[inputs.compute_dtype]
    module = compute * base_parameter_count(inputs.arch)
    gathered = 0
    weights = module
    if inputs.distributed == "deepspeed-zero3":
        gathered = zero3_gathered_parameter_bytes(inputs)
        weights = (0 if offload else _shard(module, world)) + gathered
    master = _shard(deepspeed_master_weight_bytes(inputs), world)
    optimizer = 0 if offload else master + _shard(optimizer_state_bytes(inputs), world)
    temporary = 0 if offload else full_zero_step_temporary_bytes(inputs)
    communication = zero_bucket_bytes(inputs)
    return PerGpuParts(
        weights_bytes=weights,
        adapter_bytes=0,
        gradient_bytes=full_zero_gradient_partition_bytes(inputs) + communication,
        optimizer_bytes=optimizer,
        optimizer_step_temporary_bytes=temporary,
        managed_bytes=0 if offload else _shard(managed_optimizer_bytes(inputs), world),
        communication_bytes=communication,
        gathered_weight_bytes=gathered,
    )


def full_sharded_parts(inputs: EstimateInput) -> PerGpuParts:
    """``per_gpu_parts`` for full fine-tuning under FSDP / ZeRO-2 / ZeRO-3."""
    if inputs.distributed == "fsdp":
        return full_fsdp_parts(inputs)
    return full_zero_parts(inputs)


def full_sharded_load_transient_bytes(inputs: EstimateInput) -> int:
    """The loading transient of full fine-tuning under FSDP / ZeRO-3.

    FSDP (``cpu_ram_efficient_loading``: rank 0 reads the fp32 checkpoint, the others build
    on the meta device): wrapping a unit moves it to the GPU in fp32, flattens it into a
    new ``FlatParameter`` and clones this rank's shard (``sharded_load_transient_bytes``'s
    rule, with the fp32 unit of ``full_storage_unit_bytes``). ZeRO-3 without ``zero.Init``
    (the emitted script, see above): ``deepspeed.initialize`` moves the whole bf16 module to
    the GPU before partitioning it."""
    if inputs.distributed == "fsdp":
        unit = full_storage_unit_bytes(inputs)
        return 2 * unit + _shard(unit, inputs.world_size)
    return DTYPE_BYTES[inputs.compute_dtype] * base_parameter_count(inputs.arch)


def full_sharded_load_peak_bytes(inputs: EstimateInput) -> int:
    """The loading peak per GPU (process figure) for full fine-tuning under FSDP / ZeRO:
    FSDP / ZeRO-3, the shards made so far plus ``full_sharded_load_transient_bytes``;
    ZeRO-2, the whole bf16 module DeepSpeed moves to the GPU plus the fp32 master partition
    its optimizer creates (it flattens the bf16 groups after moving them to the CPU,
    stage_1_and_2.py ``move_to_cpu`` before ``flatten_dense_tensors_aligned``)."""
    context = inputs.stack.cuda_context_bytes + cublas_workspace_bytes(
        inputs.gpu_compute_capability
    )
    context += nccl_buffer_bytes(inputs)
    if inputs.distributed == "deepspeed-zero2":
        module = DTYPE_BYTES[inputs.compute_dtype] * base_parameter_count(inputs.arch)
        return module + _shard(deepspeed_master_weight_bytes(inputs), inputs.world_size) + context
    return sharded_resident_bytes(inputs) + full_sharded_load_transient_bytes(inputs) + context


def full_sharded_host_load_bytes(inputs: EstimateInput, gpus_per_node: int) -> int:
    """Host RAM while loading, per node: FSDP reads the fp32 checkpoint on rank 0 only
    (``cpu_ram_efficient_loading``); ZeRO-3 without ``zero.Init`` reads it in every process
    (transformers loads the whole fp32 model in host memory, then DeepSpeed casts it to
    bf16 in place before moving it)."""
    whole = full_master_bytes(inputs) * base_parameter_count(inputs.arch)
    return whole * (gpus_per_node if inputs.distributed == "deepspeed-zero3" else 1)


# --------------------------------------------------------------------------- GRPO with vLLM
#
# trl 1.16 (trl/generation/vllm_generation.py:347-368) builds ``vllm.LLM`` in the training
# process for ``vllm_mode="colocate"`` with ``gpu_memory_utilization`` (trl's default 0.3).
# vLLM's documented meaning (EngineArgs ``gpu_memory_utilization``): the fraction of the
# GPU's *total* memory this instance may use, a per-instance limit holding its own copy of
# the weights, its activation workspace and the KV cache, which fills what is left of the
# fraction; vLLM requests total x utilisation and refuses to start when less than that is
# free ("Free memory on device ... is less than desired GPU memory utilization",
# vllm-project/vllm#20305). With
# ``vllm_enable_sleep_mode`` trl puts vLLM to sleep at level 2 after every generation round
# (weights and KV cache released, :750) and wakes it for the next (:489, :704). In
# ``server`` mode vLLM runs on other GPUs (``trl vllm-serve``) and the training GPUs only
# receive completions.


def vllm_share_bytes(inputs: EstimateInput) -> int:
    """vLLM's colocated share of one GPU: ``vllm_gpu_memory_utilization`` x its memory."""
    if inputs.vllm_mode != "colocate":
        return 0
    return int(inputs.vllm_gpu_memory_utilization * inputs.gpu_memory_bytes)


def vllm_training_phase_bytes(inputs: EstimateInput) -> int:
    """What colocated vLLM holds while the policy trains: its whole share, or nothing once
    asleep (what vLLM keeps mapped while asleep, its CUDA graphs, is not modelled)."""
    if inputs.vllm_mode != "colocate" or inputs.vllm_enable_sleep_mode:
        return 0
    return vllm_share_bytes(inputs)


# --------------------------------------------------------------------------- totals


def overhead_bytes(persistent_bytes: int, transient_bytes: int, inputs: EstimateInput) -> int:
    """Reserved minus allocated: cuBLAS workspace (per architecture), allocator rounding of
    long-lived tensors, fragmentation among short-lived ones, and the CUDA context."""
    return (
        cublas_workspace_bytes(inputs.gpu_compute_capability)
        + int(PERSISTENT_ROUNDING_FRACTION * persistent_bytes)
        + int(TRANSIENT_FRAGMENTATION_FRACTION * transient_bytes)
        + inputs.stack.cuda_context_bytes
    )


def estimate(inputs: EstimateInput) -> Estimate:
    """Peak memory of the run, per component, per GPU.

    Parameters, gradients and optimizer state coexist with a micro-batch's activations
    from the second optimizer step on (gradients survive across accumulation steps), so
    the peak is their sum; the optimizer step's temporaries replace the (then freed)
    activations when they are larger. GRPO's peak is the larger of its generation phase
    (no gradients: the trainer sets them to None after each step) and its training phase.
    Each GPU runs its own micro-batch, so activations do not shrink with more GPUs; the
    persistent terms are split per ``per_gpu_parts``.
    """
    parts = per_gpu_parts(inputs)
    weights, adapter = parts.weights_bytes, parts.adapter_bytes
    gradient, optimizer = parts.gradient_bytes, parts.optimizer_bytes
    communication = parts.communication_bytes
    activation, logits = train_step_peak_parts(full_sharded_activation_inputs(inputs))
    phase = "train"
    vllm = vllm_training_phase_bytes(inputs)
    if inputs.method == "grpo" and inputs.vllm_mode != "none":
        share = vllm_share_bytes(inputs)
        if share > gradient + activation + logits + vllm:
            # A sleeping colocated vLLM wakes up for each generation round: its share next
            # to the training state, without gradients or training activations.
            phase, vllm = "generation", share
            communication = communication if inputs.distributed == "ddp" else 0
            gradient, activation, logits = communication, 0, 0
    elif inputs.method == "grpo":
        generation = grpo_generation_bytes(inputs)
        if generation > gradient + activation + logits:
            phase = "generation"
            gradient, activation, logits = 0, generation, 0
            # DDP's buckets live as long as the wrapper; the other engines' buffers are
            # alive only while gradients are reduced.
            communication = communication if inputs.distributed == "ddp" else 0
            gradient = communication
    if full_gradients_released(inputs, phase):
        # Full fine-tuning, one micro-batch per step: zero_grad(set_to_none=True) frees the
        # gradients after each step, so the forward runs without them; they come back in
        # backward as the activations are freed. The peak is the forward's end, or the
        # optimizer step (every gradient and the step's temporaries, no activations).
        step = gradient - communication + parts.optimizer_step_temporary_bytes
        if activation + logits >= step:
            gradient = communication
        else:
            activation, logits = 0, 0
    optimizer += max(0, parts.optimizer_step_temporary_bytes - (activation + logits))
    gathered = parts.gathered_weight_bytes
    copy_out = fsdp2_all_gather_buffer_bytes(inputs)
    if copy_out > activation + logits:
        # FSDP2 unsharding the largest unit before any activation exists
        phase = "unshard"
        weights, gathered = weights + copy_out, gathered + copy_out
        activation = logits = 0
    persistent = weights + adapter + gradient + optimizer
    overhead = overhead_bytes(persistent, activation + logits, inputs) + vllm
    allocated = persistent + activation + logits
    reserve = allocator_sharded_reserve_bytes(inputs, allocated, gathered)
    nccl = nccl_buffer_bytes(inputs)
    overhead += reserve + nccl
    return Estimate(
        weights_bytes=weights,
        adapter_bytes=adapter,
        gradient_bytes=gradient,
        optimizer_bytes=optimizer,
        activation_bytes=activation,
        logits_bytes=logits,
        overhead_bytes=overhead,
        torch_reserved_bytes=allocated + overhead - inputs.stack.cuda_context_bytes - nccl - vllm,
        managed_bytes=parts.managed_bytes,
        phase=phase,
        communication_bytes=communication,
        gathered_weight_bytes=gathered,
        trainable_parameters=trainable_parameter_count(inputs.arch, inputs),
        total_parameters=peft_total_parameter_count(inputs.arch, inputs),
        load_peak_bytes=load_peak_bytes(inputs),
        host_memory_bytes=host_memory_bytes(inputs),
        sharded_reserve_bytes=reserve + nccl,
        vllm_bytes=vllm,
    )


# --------------------------------------------------------------------------- multi-GPU

DEEPSPEED_BUCKET_ELEMENTS = 50_000_000
"""``reduce_bucket_size`` and ``allgather_bucket_size`` peftgen writes into ds_config.json."""
ZERO3_PREFETCH_BUCKET_ELEMENTS = 50_000_000
"""``stage3_prefetch_bucket_size`` peftgen writes into ds_config.json."""
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
"""``stage3_max_live_parameters`` peftgen writes: the cap on gathered elements."""


@dataclass(frozen=True)
class PerGpuParts:
    """The persistent terms on one GPU after the engine replicated or sharded them."""

    weights_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_step_temporary_bytes: int
    managed_bytes: int
    communication_bytes: int
    """Included in ``gradient_bytes``."""
    gathered_weight_bytes: int
    """Included in ``weights_bytes``."""


def _shard(total_bytes: int, world_size: int) -> int:
    """One rank's share: FSDP and ZeRO pad flat buffers to a multiple of the world size."""
    return math.ceil(total_bytes / world_size)


def replicated_quant_state_bytes(inputs: EstimateInput) -> int:
    """bitsandbytes 4-bit block scales and quant maps: ``quant_state`` is an attribute of
    the packed weight and of ``Linear4bit``, not a parameter, so FSDP / ZeRO-3 flatten and
    shard only the packed bytes and every rank keeps all scales."""
    if inputs.precision != "4bit":
        return 0
    total = 0
    for module in linear_modules(inputs.arch):
        packed = math.ceil(module.in_features * module.out_features / 2)
        scales = nf4_linear_bytes(
            module.in_features, module.out_features, inputs.bnb_4bit_use_double_quant
        )
        total += (scales - packed) * module.count
    return total


def root_unit_bytes(inputs: EstimateInput) -> int:
    """Embeddings, output head and final norm: the parameters no decoder layer owns. With
    the transformer-layer auto wrap policy they form FSDP's root unit, which FSDP keeps
    gathered from the forward's start to the backward's end."""
    groups = parameter_groups(inputs.arch)
    numel = groups.embedding + groups.lm_head + inputs.arch.config.hidden_size
    return numel * unquantized_weight_dtype_bytes(inputs)


def layer_unit_bytes(inputs: EstimateInput) -> int:
    """One decoder layer's parameters, unsharded (what one all-gather brings in). The layers
    of the catalogued families are identical, so this is the largest layer too. Full
    fine-tuning: ``full_layer_unit_bytes`` (gathered in the compute dtype)."""
    if inputs.finetuning == "full":
        return full_layer_unit_bytes(inputs)
    layers = weights_bytes(inputs) - root_unit_bytes(inputs) - replicated_quant_state_bytes(inputs)
    return math.ceil(layers / inputs.arch.config.num_hidden_layers)


def fsdp_gathered_layer_units(stack: StackProfile) -> int:
    """Decoder-layer units FSDP holds unsharded at the backward's peak, per the prefetch
    configured.

    FSDP1 (torch/distributed/fsdp/_runtime_utils.py ``_pre_backward_hook`` ->
    ``_prefetch_handle``): ``BACKWARD_PRE`` issues the next unit's all-gather before this
    unit's gradient is computed, so two units are unsharded together; ``BACKWARD_POST``
    issues it after this unit's backward (the current unit is freed first: one unit and the
    next's all-gather overlap only the reduce-scatter); ``NONE`` gathers on use. FSDP2
    prefetches one unit in backward by default (``_fsdp_state.py`` ``_pre_backward``:
    ``backward_prefetch`` of the reverse post-forward order), like ``BACKWARD_PRE``."""
    if stack.fsdp_version == 2:
        return 2
    return 1 if stack.fsdp_backward_prefetch == "NONE" else 2


def fsdp_forward_gathered_layer_units(stack: StackProfile) -> int:
    """Layer units unsharded at once during the forward: one, two with ``forward_prefetch``
    (or FSDP2's default forward prefetch of one unit); without ``limit_all_gathers`` the
    CPU thread may issue one more all-gather ahead of the computation."""
    units = 2 if stack.fsdp_forward_prefetch or stack.fsdp_version == 2 else 1
    if stack.fsdp_version == 1 and not stack.fsdp_limit_all_gathers:
        units += 1
    return units


def zero3_gathered_parameter_bytes(inputs: EstimateInput) -> int:
    """ZeRO-3's gathered working set: DeepSpeed gathers parameters per *module* on its
    forward/backward pre-hook (deepspeed/runtime/zero/partitioned_param_coordinator.py
    ``fetch_sub_module``) and prefetches the next modules in trace order up to
    ``stage3_prefetch_bucket_size`` elements, all capped by ``stage3_max_live_parameters``
    elements. The largest module is the output head (or, when larger, a decoder linear)."""
    element = unquantized_weight_dtype_bytes(inputs)
    largest = zero3_largest_module_bytes(inputs)
    prefetch = min(ZERO3_PREFETCH_BUCKET_ELEMENTS * element, largest)
    cap = ZERO3_MAX_LIVE_PARAMETERS * element
    return min(largest + prefetch, max(cap, largest))


def zero3_largest_module_bytes(inputs: EstimateInput) -> int:
    """The largest module ZeRO-3 gathers at once: the head (embeddings when tied) or one
    decoder linear (4-bit: its packed storage)."""
    groups = parameter_groups(inputs.arch)
    largest = (groups.lm_head or groups.embedding) * unquantized_weight_dtype_bytes(inputs)
    for module in linear_modules(inputs.arch):
        largest = max(largest, linear_weight_bytes(module, inputs) // module.count)
    return largest


def gathered_parameter_bytes(inputs: EstimateInput) -> int:
    """Parameters FSDP / ZeRO-3 hold unsharded at the backward's peak.

    FSDP: the whole root unit (embeddings, head, final norm: the root is not resharded
    after forward, FSDP1 ``_post_forward_reshard`` skips ``_is_root``; FSDP2 sets the
    root's ``post_forward_mesh_info`` to None) plus ``fsdp_gathered_layer_units`` decoder
    layers. ZeRO-3: ``zero3_gathered_parameter_bytes``.
    """
    if inputs.distributed == "fsdp":
        units = max(
            fsdp_gathered_layer_units(inputs.stack),
            fsdp_forward_gathered_layer_units(inputs.stack),
        )
        return root_unit_bytes(inputs) + units * layer_unit_bytes(inputs)
    return zero3_gathered_parameter_bytes(inputs)


def fsdp2_all_gather_buffer_bytes(inputs: EstimateInput) -> int:
    """FSDP2's all-gather output: ``foreach_all_gather`` gathers a unit into one flat
    buffer and ``foreach_all_gather_copy_out`` copies it into the per-parameter unsharded
    tensors (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py), so while the largest
    unit (the root, at the forward's start) is unsharded its buffer is alive too. FSDP1
    all-gathers straight into the unsharded flat parameter: 0."""
    if inputs.distributed != "fsdp" or inputs.stack.fsdp_version != 2:
        return 0
    return max(root_unit_bytes(inputs), layer_unit_bytes(inputs))


def fsdp_mixed_precision_copy_bytes(inputs: EstimateInput) -> int:
    """FSDP's low-precision parameter copies of trainable units whose storage dtype differs
    from ``MixedPrecision.param_dtype`` (fp32 LoRA under bf16 mixed precision): FSDP1 keeps
    a sharded low-precision copy (``_mp_shard``, flat_param.py ``_uses_param_mixed_precision``)
    while the unit is gathered, and gathers in the low precision; the sharded master stays
    in the storage dtype (fp32). Two layers' adapters are gathered at the peak; frozen 4-bit
    units store in ``bnb_4bit_quant_storage`` = the compute dtype (transformers sets the
    mixed precision to it, distributed/fsdp.py ``update_fsdp_plugin_peft``): no copy."""
    if inputs.distributed != "fsdp":
        return 0
    adapter_element = DTYPE_BYTES[adapter_dtype(inputs)]
    compute = DTYPE_BYTES[inputs.compute_dtype]
    if adapter_element == compute:
        return 0
    numel = sum(trainable_tensors(inputs, include_biases=False).numel_by_bytes.values())
    per_layer = math.ceil(numel / inputs.arch.config.num_hidden_layers)
    units = fsdp_gathered_layer_units(inputs.stack)
    return units * (per_layer * compute + _shard(per_layer * compute, inputs.world_size))


def fsdp_gradient_buffer_bytes(inputs: EstimateInput) -> int:
    """Unsharded gradients and reduce-scatter outputs of trainable units.

    FSDP1 ``_post_backward_hook`` (_runtime_utils.py): the unit's unsharded gradient (in
    ``reduce_dtype``, the compute dtype under accelerate's mixed precision), and, on the
    post-backward stream, a padded copy to reduce-scatter from plus the new sharded
    gradient (1/N); the unsharded gradient is kept alive for that stream
    (``_no_dispatch_record_stream``) while the next unit's backward runs: two units'
    buffers at once with ``BACKWARD_PRE``."""
    if inputs.distributed != "fsdp":
        return 0
    compute = DTYPE_BYTES[inputs.compute_dtype]
    numel = sum(trainable_tensors(inputs).numel_by_bytes.values())
    per_layer = math.ceil(numel / inputs.arch.config.num_hidden_layers) * compute
    units = fsdp_gathered_layer_units(inputs.stack)
    return units * per_layer + _shard(per_layer, inputs.world_size)


def zero_bucket_bytes(inputs: EstimateInput) -> int:
    """DeepSpeed's gradient buckets: with ``contiguous_gradients`` an ``ipg`` buffer of
    ``reduce_bucket_size`` elements in the gradient dtype receives each gradient as it is
    produced, and the reduce (ZeRO-2: plus ``allgather_bucket_size`` for the updated
    parameters; ZeRO-3: the parameters' all-gather goes through the prefetch bucket)
    uses a second bucket of the same size (deepspeed/runtime/zero/stage3.py
    ``__reduce_and_partition_ipg_grads``; fewer elements when fewer are trained)."""
    trainable = sum(trainable_tensors(inputs).numel_by_bytes.values())
    bucket = min(DEEPSPEED_BUCKET_ELEMENTS, trainable)
    return 2 * bucket * DTYPE_BYTES[inputs.compute_dtype]


def communication_buffer_bytes(inputs: EstimateInput) -> int:
    """Gradient communication buffers alive at the peak.

    DDP (``gradient_as_bucket_view=False``): the reducer keeps its own bucketed copy of
    every trainable gradient, in buckets of at most 25 MiB, for the job's life. DeepSpeed:
    ``zero_bucket_bytes``. FSDP: ``fsdp_gradient_buffer_bytes`` plus the mixed-precision
    copies of gathered trainable units (``fsdp_mixed_precision_copy_bytes``).
    """
    if inputs.distributed == "none":
        return 0
    if inputs.distributed == "ddp":
        return gradient_bytes(inputs)
    if inputs.distributed == "fsdp":
        return fsdp_gradient_buffer_bytes(inputs) + fsdp_mixed_precision_copy_bytes(inputs)
    return zero_bucket_bytes(inputs)


def nccl_buffer_bytes(inputs: EstimateInput) -> int:
    """NCCL's own device buffers (cudaMalloc outside torch's allocator), one communicator
    per process group: per channel a receive buffer per protocol (SIMPLE ``NCCL_BUFFSIZE``
    4 MiB, LL128 ~4.5 MiB, LL 256 KiB), for the ring and the tree. Counted in the process
    figure, not in ``torch.cuda.memory_reserved``."""
    if inputs.world_size <= 1 or inputs.distributed == "none":
        return 0
    per_channel = 4 * MIB + 4608 * 1024 + 256 * 1024
    return 2 * inputs.stack.nccl_channels * per_channel


def sharded_resident_bytes(inputs: EstimateInput) -> int:
    """What stays on one GPU between steps under FSDP / ZeRO-3: parameter shards (or
    nothing with offload), replicated 4-bit scales, adapter shards."""
    parts = per_gpu_parts(inputs)
    return parts.weights_bytes - parts.gathered_weight_bytes + parts.adapter_bytes


def largest_wrap_unit_bytes(inputs: EstimateInput) -> int:
    """The largest unit FSDP wraps (root or decoder layer) / ZeRO-3's largest module."""
    if inputs.distributed == "fsdp":
        return max(root_unit_bytes(inputs), layer_unit_bytes(inputs))
    return zero3_largest_module_bytes(inputs)


def sharded_load_transient_bytes(inputs: EstimateInput) -> int:
    """GPU bytes a unit needs while it is sharded at load: FSDP1 moves the unit's
    parameters to the GPU (``_move_module_to_device``), broadcasts them from rank 0
    (``sync_module_states``), flattens them into a new ``FlatParameter`` (``flatten_tensors``
    -> ``torch.cat``) and clones this rank's shard (``_get_shard``): twice the unit plus a
    shard. ZeRO-3 partitions one parameter at a time (the unit plus its partition). Full
    fine-tuning: ``full_sharded_load_transient_bytes``."""
    if inputs.finetuning == "full":
        return full_sharded_load_transient_bytes(inputs)
    unit = largest_wrap_unit_bytes(inputs)
    if inputs.distributed == "fsdp":
        return 2 * unit + _shard(unit, inputs.world_size)
    return unit + _shard(unit, inputs.world_size)


def load_peak_bytes(inputs: EstimateInput) -> int:
    """The loading phase's peak on one GPU, in the process figure (CUDA context included).

    Sharded engines (``StackProfile.fsdp_load_on_cpu``, the emitted recipe): the model is
    read into host memory and each unit is moved, flattened and sharded in turn, so the
    GPU holds the shards made so far plus one unit's transient
    (``sharded_load_transient_bytes``). Otherwise (one GPU, DDP, ZeRO-2, or a sharded run
    that loads on every GPU first) the whole model is on the GPU, plus the largest linear
    in the compute dtype while bitsandbytes quantizes it. Full fine-tuning under FSDP /
    ZeRO: ``full_sharded_load_peak_bytes``.
    """
    if full_sharded(inputs) and inputs.stack.fsdp_load_on_cpu:
        return full_sharded_load_peak_bytes(inputs)
    stack = inputs.stack
    context = stack.cuda_context_bytes + cublas_workspace_bytes(inputs.gpu_compute_capability)
    whole = weights_bytes(inputs) + adapter_bytes(inputs)
    whole += dequantized_weight_transient_bytes(inputs)
    if inputs.distributed in PARAMETER_SHARDING_ENGINES and stack.fsdp_load_on_cpu:
        resident = sharded_resident_bytes(inputs)
        return resident + sharded_load_transient_bytes(inputs) + context + nccl_buffer_bytes(inputs)
    return whole + context + nccl_buffer_bytes(inputs)


def allocator_sharded_reserve_bytes(inputs: EstimateInput, allocated: int, gathered: int) -> int:
    """What torch's caching allocator reserves beyond the allocated peak under FSDP /
    ZeRO-3 (``collectives_on_own_stream``).

    The gathered parameters are allocated on the all-gather stream
    (FSDP1 ``_alloc_padded_unsharded_flat_param`` under ``_unshard_stream``; FSDP2
    ``foreach_all_gather`` on ``all_gather_stream``; ZeRO-3's ``__allgather_stream``); the
    allocator pools blocks per stream (c10/cuda/CUDACachingAllocator.cpp ``BlockPool`` keyed
    by stream), so that pool is reserved for them alone. The compute stream's pool still
    holds the loading phase's blocks (nothing calls ``empty_cache`` between loading and
    training): its reservation is the larger of the load transient's high-water mark and
    the training peak without the gathered set. Reserved beyond allocated is the excess of
    that over the allocated peak."""
    if inputs.distributed not in PARAMETER_SHARDING_ENGINES:
        return 0
    if not inputs.stack.collectives_on_own_stream:
        return 0
    compute_stream_train = allocated - gathered
    compute_stream_load = 0
    if inputs.stack.fsdp_load_on_cpu:
        compute_stream_load = sharded_resident_bytes(inputs) + sharded_load_transient_bytes(inputs)
    loading = max(0, compute_stream_load - compute_stream_train)
    return loading + fsdp_pending_free_bytes(inputs)


def fsdp_pending_free_bytes(inputs: EstimateInput) -> int:
    """Unsharded units freed but not yet reusable: FSDP1 frees a unit's unsharded flat
    parameter after ``record_stream`` on the compute stream (flat_param.py
    ``_free_unsharded_flat_param``), so its block returns to the all-gather pool only once
    the GPU has run past it; the CPU runs ahead, and the rate limiter
    (``limit_all_gathers``, _runtime_utils.py ``_unshard``: ``_free_event_queue`` of 2)
    waits only for the free two units back. One layer unit's block is reserved beyond what
    is allocated (``max_memory_allocated`` drops at the free); without the limiter the CPU
    may run a further unit ahead."""
    if inputs.distributed != "fsdp" or inputs.stack.fsdp_version != 1:
        return 0
    if not inputs.stack.collectives_on_own_stream:
        return 0
    units = 1 if inputs.stack.fsdp_limit_all_gathers else 2
    return units * layer_unit_bytes(inputs)


def host_load_bytes(inputs: EstimateInput, gpus_per_node: int) -> int:
    """Host RAM while loading, per node. transformers 5.24 reads a quantized model on every
    rank (the meta-device path skips quantized models: modeling_utils.py:4862 ``not
    is_quantized``), and bitsandbytes quantizes it on the CPU when the device map is the CPU:
    each process holds the whole quantized model. A 16-bit model under FSDP's
    ``cpu_ram_efficient_loading`` / ZeRO-3's ``zero.Init`` is read by one rank per node."""
    if inputs.distributed not in PARAMETER_SHARDING_ENGINES or not inputs.stack.fsdp_load_on_cpu:
        return 0
    if inputs.finetuning == "full":
        return full_sharded_host_load_bytes(inputs, gpus_per_node)
    whole = weights_bytes(inputs) + adapter_bytes(inputs)
    quantized = inputs.precision in ("8bit", "4bit")
    return whole * (gpus_per_node if quantized else 1) + (
        dequantized_weight_transient_bytes(inputs) if quantized else 0
    )


def host_offload_bytes(inputs: EstimateInput) -> int:
    """Host RAM one GPU's offloaded state takes: what leaves the GPU with ``cpu_offload``
    (parameter shards, adapters, gradients, optimizer state and the CPU step's temporary)."""
    if not inputs.cpu_offload:
        return 0
    kept = per_gpu_parts(_replace_offload(inputs, False))
    moved = per_gpu_parts(inputs)
    names = (
        "weights_bytes",
        "adapter_bytes",
        "gradient_bytes",
        "optimizer_bytes",
        "optimizer_step_temporary_bytes",
        "managed_bytes",
    )
    return sum(max(0, getattr(kept, n) - getattr(moved, n)) for n in names)


def host_memory_bytes(inputs: EstimateInput, gpus_per_node: int | None = None) -> int:
    """Host RAM per node: the larger of the loading phase and training (the offloaded
    state of every GPU on the node, pinned). 0 when neither puts model state in host memory
    (the Python processes themselves are not counted)."""
    gpus = gpus_per_node or max(1, inputs.world_size // max(1, inputs.num_nodes))
    return max(host_load_bytes(inputs, gpus), gpus * host_offload_bytes(inputs))


def _replace_offload(inputs: EstimateInput, offload: bool) -> EstimateInput:
    from dataclasses import replace

    return replace(inputs, cpu_offload=offload)


def deepspeed_master_weight_bytes(inputs: EstimateInput) -> int:
    """DeepSpeed's ZeRO optimizer keeps an fp32 copy of the trainable parameters (its
    rank's partition) and steps that copy; torch's optimizers under DDP/FSDP have none."""
    if not inputs.distributed.startswith("deepspeed"):
        return 0
    return 4 * sum(trainable_tensors(inputs).numel_by_bytes.values())


def per_gpu_parts(inputs: EstimateInput) -> PerGpuParts:
    """Split the single-GPU persistent terms as the engine does.

    DDP replicates everything. ZeRO-2 and FSDP / ZeRO-3 shard gradients and optimizer
    state (and DeepSpeed's fp32 master copy); FSDP / ZeRO-3 shard parameters too, except
    bitsandbytes' quant states, and add the gathered working set. CPU offload moves the
    sharded state to host memory: with FSDP the parameters, their gradients and the
    optimizer (the step runs on the CPU); with DeepSpeed the optimizer and master copy
    (ZeRO-3 the parameters too). Full fine-tuning: ``full_sharded_parts``.
    """
    if full_sharded(inputs):
        return full_sharded_parts(inputs)
    world = inputs.world_size
    weights, adapter = weights_bytes(inputs), adapter_bytes(inputs)
    gradient = gradient_bytes(inputs)
    optimizer = optimizer_state_bytes(inputs) + deepspeed_master_weight_bytes(inputs)
    temporary = optimizer_step_temporary_bytes(inputs)
    managed = managed_optimizer_bytes(inputs)
    gathered = 0
    offload = inputs.cpu_offload
    if inputs.distributed in PARAMETER_SHARDING_ENGINES:
        replicated = replicated_quant_state_bytes(inputs)
        # Every unit keeps its shard while it is gathered (FSDP1's sharded FlatParameter,
        # FSDP2's DTensor shards next to the unsharded tensors): the root too.
        sharded = weights - replicated
        gathered = gathered_parameter_bytes(inputs)
        weights = replicated + (0 if offload else _shard(sharded, world)) + gathered
        adapter = 0 if offload else _shard(adapter, world)
    if inputs.distributed in STATE_SHARDING_ENGINES:
        optimizer, temporary = _shard(optimizer, world), _shard(temporary, world)
        managed = _shard(managed, world)
        gradient = _shard(gradient, world)
        if offload:
            optimizer = temporary = managed = 0
            gradient = 0 if inputs.distributed != "deepspeed-zero2" else gradient
    communication = communication_buffer_bytes(inputs)
    return PerGpuParts(
        weights_bytes=weights,
        adapter_bytes=adapter,
        gradient_bytes=gradient + communication,
        optimizer_bytes=optimizer,
        optimizer_step_temporary_bytes=temporary,
        managed_bytes=managed,
        communication_bytes=communication,
        gathered_weight_bytes=gathered,
    )
