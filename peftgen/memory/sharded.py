"""Per-GPU memory under DDP, FSDP and DeepSpeed ZeRO: sharded and replicated terms,
parameters gathered per wrap unit, gradient and communication buffers, NCCL, the loading
peak and the host memory for CPU offload, for LoRA and for full fine-tuning (fp32 master
shards, every unit's gradient)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from peftgen.catalog import ModelArch, linear_modules, parameter_groups
from peftgen.memory.activations import dequantized_weight_transient_bytes
from peftgen.memory.full import full_master_bytes
from peftgen.memory.optimizer import (
    managed_optimizer_bytes,
    optimizer_state_bytes,
    optimizer_step_temporary_bytes,
)
from peftgen.memory.parameters import base_parameter_count
from peftgen.memory.profile import DTYPE_BYTES, MIB, StackProfile, cublas_workspace_bytes
from peftgen.memory.types import EstimateInput
from peftgen.memory.weights import (
    adapter_bytes,
    adapter_dtype,
    gradient_bytes,
    linear_weight_bytes,
    model_buffer_bytes,
    nf4_linear_bytes,
    trainable_tensors,
    unquantized_weight_dtype_bytes,
    weights_bytes,
)
from peftgen.spec import (
    PARAMETER_SHARDING_ENGINES,
    STATE_SHARDING_ENGINES,
)
from peftgen.stack import zero3_partitions_while_loading

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
    rule, with the fp32 unit of ``full_storage_unit_bytes``). ZeRO-3 under ``zero.Init`` (the
    emitted script): the parameters are created partitioned in fp32, and rank 0 copies the
    checkpoint in one module at a time, each gathered whole meanwhile
    (``_load_state_dict_into_zero3_model``: ``GatheredParameters`` over the module's own
    parameters): the largest fp32 module plus its partition. Without ``zero.Init``
    (``zero3_loads_whole_model``): ``deepspeed.initialize`` moves the whole bf16 module to
    the GPU before partitioning it."""
    if inputs.distributed == "fsdp":
        unit = full_storage_unit_bytes(inputs)
        return 2 * unit + _shard(unit, inputs.world_size)
    if not zero3_loads_whole_model(inputs):
        groups = parameter_groups(inputs.arch)
        largest_linear = max(m.in_features * m.out_features for m in linear_modules(inputs.arch))
        module = 4 * max(groups.embedding, groups.lm_head, largest_linear)
        return module + _shard(module, inputs.world_size)
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
    (``cpu_ram_efficient_loading``) and ZeRO-3 under ``zero.Init`` on rank 0 only (the
    others map the checkpoint to the meta device, modeling_utils.py ``map_location``);
    ZeRO-3 without ``zero.Init`` reads it in every process (transformers loads the whole
    fp32 model in host memory, then DeepSpeed casts it to bf16 in place before moving it)."""
    whole = full_master_bytes(inputs) * base_parameter_count(inputs.arch)
    return whole * (gpus_per_node if zero3_loads_whole_model(inputs) else 1)


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
    layers -= model_buffer_bytes(inputs)
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
    return min(largest + prefetch, max(cap, largest)) + zero3_reuse_retained_bytes(inputs)


def zero3_generation_gather_bytes(inputs: EstimateInput) -> int:
    """What GRPO's generation adds under ZeRO-3: trl gathers every parameter for
    ``generate`` (trl/models/utils.py ``_unwrap_model_for_generation``:
    ``deepspeed.zero.GatheredParameters(model.parameters())`` with DeepSpeed's hooks removed,
    ``ds3_gather_for_generation`` True by default, which the script keeps), so each GPU
    holds the whole model beside its partitions instead of the per-module working set.
    0 for the other engines (FSDP1 summons only the root unit, ``recurse=False``, and
    gathers the layers as in training) and with vLLM (it generates from its own copy)."""
    if inputs.distributed != "deepspeed-zero3" or inputs.method != "grpo":
        return 0
    if inputs.vllm_mode != "none":
        return 0
    replicated = replicated_quant_state_bytes(inputs) + model_buffer_bytes(inputs)
    whole = weights_bytes(inputs) - replicated
    return max(0, whole - zero3_gathered_parameter_bytes(inputs))


def zero3_reuse_retained_bytes(inputs: EstimateInput) -> int:
    """Decoder layers ZeRO-3 does not release at the forward's end because the trace reuses
    them within ``stage3_max_reuse_distance`` elements.

    ``PartitionedParameterCoordinator.release_sub_module`` releases a module's parameters
    only if ``__params_to_release`` finds no reuse in the next ``max_reuse_distance``
    elements of the recorded module order (partitioned_param_coordinator.py: the loop over
    ``self.__submodule_order[step_id:]`` that discards every parameter it meets while
    ``params_traversed < self.__max_reuse_dist_in_numel``). After the last layer's forward
    the trace runs the final norm and the head, the head again in backward, then (with
    checkpointing) the last layer's recompute and backward before the layer below: the last
    layer is met again after about one layer plus twice the head; the layer below only
    after three more layer passes. That limit caps prefetching only, not retention, so these
    layers stay gathered next to the head at the loss's peak. Elements are the parameters'
    own (a 4-bit layer's packed storage counts its storage elements)."""
    c = inputs.arch.config
    element = unquantized_weight_dtype_bytes(inputs)
    layer = layer_unit_bytes(inputs) // element
    groups = parameter_groups(inputs.arch)
    head = groups.lm_head or groups.embedding
    limit = inputs.stack.zero3_max_reuse_distance
    retained = 0
    passes = 1 if inputs.gradient_checkpointing else 0
    while retained < c.num_hidden_layers:
        distance = (retained * (2 + passes) + 1) * layer + 2 * head
        if distance >= limit:
            break
        retained += 1
    return retained * layer_unit_bytes(inputs)


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
    """DeepSpeed's gradient buckets with ``contiguous_gradients`` (what peftgen writes and
    DeepSpeed's default), allocated at ``reduce_bucket_size`` elements in the gradient dtype
    however few parameters are trained.

    ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py ``backward``): ``ipg_buffer`` holds
    ``buf_0`` and, with ``overlap_comm`` (peftgen writes true), ``buf_1`` ("double buffers
    to avoid data access conflict"), each ``torch.empty(int(self.reduce_bucket_size))``,
    for the backward. ZeRO-3 (stage3.py ``_setup_for_real_optimizer``): one
    ``__ipg_bucket_flat_buffer = torch.empty(self.reduce_bucket_size, ...)`` for the job;
    its reduce (``__avg_scatter_grads`` -> ``reduce_scatter_coalesced``, which ``torch.cat``s
    the bucket's gradients) runs during the layers' backward only when the trained
    elements overflow one bucket, else once after it (``independent_gradient_partition_
    epilogue``), when the activations are gone: one more bucket-sized copy only then."""
    bucket = inputs.stack.zero_reduce_bucket_elements
    trainable = sum(trainable_tensors(inputs).numel_by_bytes.values())
    element = DTYPE_BYTES[inputs.compute_dtype]
    if inputs.distributed == "deepspeed-zero3":
        overflow_copy = min(bucket, trainable) if trainable > bucket else 0
        return (bucket + overflow_copy) * element
    return 2 * bucket * element


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


def zero3_loads_whole_model(inputs: EstimateInput) -> bool:
    """ZeRO-3 without ``zero.Init`` (``StackProfile.zero3_init``; never for a quantized
    model): ``deepspeed.initialize`` moves the whole module to each GPU and only then
    partitions it, so every GPU holds the whole model while loading."""
    if inputs.distributed != "deepspeed-zero3":
        return False
    return not (
        inputs.stack.zero3_init
        and zero3_partitions_while_loading(inputs.distributed, inputs.precision)
    )


def sharded_load_transient_bytes(inputs: EstimateInput) -> int:
    """GPU bytes a unit needs while it is sharded at load: FSDP1 moves the unit's
    parameters to the GPU (``_move_module_to_device``), broadcasts them from rank 0
    (``sync_module_states``), flattens them into a new ``FlatParameter`` (``flatten_tensors``
    -> ``torch.cat``) and clones this rank's shard (``_get_shard``): twice the unit plus a
    shard. ZeRO-3 under ``zero.Init`` partitions one parameter at a time (the unit plus its
    partition); without it, the whole model (``zero3_loads_whole_model``). Full fine-tuning:
    ``full_sharded_load_transient_bytes``."""
    if inputs.finetuning == "full":
        return full_sharded_load_transient_bytes(inputs)
    if zero3_loads_whole_model(inputs):
        return weights_bytes(inputs) + adapter_bytes(inputs)
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
    in the compute dtype while bitsandbytes quantizes it; ZeRO-3 without ``zero.Init``
    (``zero3_loads_whole_model``) moves the model, already quantized in host memory, whole.
    Full fine-tuning under FSDP / ZeRO: ``full_sharded_load_peak_bytes``.
    """
    if full_sharded(inputs) and inputs.stack.fsdp_load_on_cpu:
        return full_sharded_load_peak_bytes(inputs)
    stack = inputs.stack
    context = stack.cuda_context_bytes + cublas_workspace_bytes(inputs.gpu_compute_capability)
    whole = weights_bytes(inputs) + adapter_bytes(inputs)
    whole += dequantized_weight_transient_bytes(inputs)
    if zero3_loads_whole_model(inputs):
        # Quantized in host memory (the script's device map), then moved whole: no
        # dequantized transient on the GPU.
        whole = weights_bytes(inputs) + adapter_bytes(inputs)
    elif inputs.distributed in PARAMETER_SHARDING_ENGINES and stack.fsdp_load_on_cpu:
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
    if zero3_loads_whole_model(inputs):
        # The whole module's blocks, freed as each parameter is partitioned, stay cached.
        compute_stream_load = sharded_load_transient_bytes(inputs)
    elif inputs.stack.fsdp_load_on_cpu:
        compute_stream_load = sharded_resident_bytes(inputs) + sharded_load_transient_bytes(inputs)
    loading = max(0, compute_stream_load - compute_stream_train)
    return loading + fsdp_pending_free_bytes(inputs) + fsdp_offload_copy_pool_bytes(inputs)


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
    ``cpu_ram_efficient_loading`` / ZeRO-3's ``zero.Init`` is read by one rank per node;
    ZeRO-3 without ``zero.Init`` reads it in every process (``zero3_loads_whole_model``)."""
    if inputs.distributed not in PARAMETER_SHARDING_ENGINES or not inputs.stack.fsdp_load_on_cpu:
        return 0
    if inputs.finetuning == "full":
        return full_sharded_host_load_bytes(inputs, gpus_per_node)
    whole = weights_bytes(inputs) + adapter_bytes(inputs)
    quantized = inputs.precision in ("8bit", "4bit")
    every_process = quantized or zero3_loads_whole_model(inputs)
    return whole * (gpus_per_node if every_process else 1) + (
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


def deepspeed_optimizer_state_bytes(inputs: EstimateInput) -> int:
    """Optimizer state under DeepSpeed ZeRO: the client optimizer's parameter groups are
    replaced by DeepSpeed's fp32 partitions (stage_1_and_2.py / stage3.py
    ``_create_fp32_partitions``: ``self.fp32_partitioned_groups_flat``, the tensors
    ``self.optimizer.param_groups`` steps), so torch AdamW's exp_avg and exp_avg_sq are fp32
    whatever the model's dtype (bf16 adapters included). Other optimizers keep their rule."""
    if inputs.optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * 4 * sum(trainable_tensors(inputs).numel_by_bytes.values())
    return optimizer_state_bytes(inputs)


def fsdp_no_sync_gradient_bytes(inputs: EstimateInput) -> int:
    """Unsharded gradients FSDP accumulates between optimizer steps with gradient
    accumulation.

    transformers' Trainer runs every micro-batch but the last of an accumulation window
    under ``accelerator.no_sync(model)`` (trainer.py: ``sync_context =
    functools.partial(self.accelerator.no_sync, model=model)``), which is FSDP1's
    ``model.no_sync()`` (FSDP2: ``set_requires_gradient_sync(False)``); inside it FSDP1's
    ``_post_backward_hook`` returns before the reduce-scatter (``if not
    state._sync_gradients: ... return``, torch/distributed/fsdp/_runtime_utils.py), so each
    unit keeps its whole unsharded gradient ("FSDP will accumulate the full model gradients
    (instead of gradient shards) until the eventual sync", ``no_sync``'s docstring), in the
    unsharded parameters' dtype (the compute dtype under mixed precision), and on the GPU
    even with CPU offload (same docstring). The window's last micro-batch therefore runs
    its forward and backward next to them."""
    if inputs.distributed != "fsdp" or inputs.gradient_accumulation_steps <= 1:
        return 0
    numel = sum(trainable_tensors(inputs).numel_by_bytes.values())
    return numel * DTYPE_BYTES[inputs.compute_dtype]


def fsdp_offload_copy_pool_bytes(inputs: EstimateInput) -> int:
    """The pre-unshard stream's block pool under FSDP1 CPU offload.

    ``FlatParamHandle.pre_unshard`` copies an offloaded unit's CPU shard to the GPU
    (``elif self._offload_params and self.flat_param.device != self.device:
    self.flat_param_to(self.device, non_blocking=True)``, torch/distributed/fsdp/
    _flat_param.py) as the all-gather's input, under ``state._pre_unshard_stream``
    (_runtime_utils.py ``_unshard``), a stream of its own (``_init_streams``), so the
    caching allocator serves these copies from a separate pool. Each copy dies once its
    all-gather has run; with the rate limiter at most two all-gathers are in flight, so the
    pool holds the larger of the root's shard (unsharded first, at the forward's start) and
    two layer shards. Reserved, not allocated at the peak."""
    if inputs.distributed != "fsdp" or inputs.stack.fsdp_version != 1 or not inputs.cpu_offload:
        return 0
    if not inputs.stack.collectives_on_own_stream:
        return 0
    world = inputs.world_size
    root = _shard(root_unit_bytes(inputs), world)
    return max(root, 2 * _shard(layer_unit_bytes(inputs), world))


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
    if inputs.distributed.startswith("deepspeed"):
        optimizer = deepspeed_optimizer_state_bytes(inputs) + deepspeed_master_weight_bytes(inputs)
    temporary = optimizer_step_temporary_bytes(inputs)
    managed = managed_optimizer_bytes(inputs)
    gathered = 0
    offload = inputs.cpu_offload
    if inputs.distributed in PARAMETER_SHARDING_ENGINES:
        replicated = replicated_quant_state_bytes(inputs) + model_buffer_bytes(inputs)
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
    gradient = max(gradient, fsdp_no_sync_gradient_bytes(inputs))
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
