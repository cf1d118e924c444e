"""The estimator's input and output types: ``EstimateInput``, ``MemoryBreakdown``,
``Estimate``, ``TrainableTensors``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peftgen import stack
from peftgen.catalog import ModelArch
from peftgen.memory.profile import StackProfile
from peftgen.spec import (
    Distributed,
    LoadPrecision,
    Method,
)


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


@dataclass(frozen=True)
class TrainableTensors:
    """Trainable parameters split by the dtype they live in (bytes per element)."""

    numel_by_bytes: dict[int, int]
    """Element size in bytes -> number of trainable elements of that size."""
    shape_counts: tuple[tuple[int, int, int], ...]
    """(rows, cols, how many tensors of that shape), for per-tensor optimizer rules."""
