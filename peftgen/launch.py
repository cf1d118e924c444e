"""Launch files for a distributed spec: the accelerate config, DeepSpeed's JSON, launch.sh.

peftgen never launches processes itself: ``emit -o DIR`` writes a config for
``accelerate launch`` (accelerate 1.15) and a ``launch.sh`` calling it, so users run the
engine they already trust. The values written here are the ones the planner assumes
(``peftgen.memory.per_gpu_parts``): FSDP's transformer-layer wrapping and
``BACKWARD_PRE`` prefetch, DeepSpeed's bucket sizes, CPU offload.

FSDP settings follow the FSDP + (Q)LoRA recipe of the pinned stack: transformers'
Trainer replaces the wrap policy with peft's ``fsdp_auto_wrap_policy`` (LoRA layers in
their own units, so ``use_orig_params: false`` works) and, for 4-bit loading with a
floating-point ``bnb_4bit_quant_storage``, sets FSDP's mixed precision to that dtype
(transformers/distributed/fsdp.py ``update_fsdp_plugin_peft``). Full fine-tuning keeps
the recipe with two changes (``full_fsdp_config``).
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

from peftgen.memory import (
    DEEPSPEED_BUCKET_ELEMENTS,
    ZERO3_MAX_LIVE_PARAMETERS,
    ZERO3_PREFETCH_BUCKET_ELEMENTS,
)
from peftgen.plan import Plan
from peftgen.spec import AnySpec

ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
DEEPSPEED_CONFIG_FILE = "ds_config.json"
LAUNCH_SCRIPT_FILE = "launch.sh"
LAUNCH_FILES = (ACCELERATE_CONFIG_FILE, DEEPSPEED_CONFIG_FILE, LAUNCH_SCRIPT_FILE)
"""Every file this module may write (``write_output_dir`` may replace them)."""
DEFAULT_MAIN_PROCESS_PORT = 29500
"""torch.distributed's customary rendezvous port; ``MAIN_PROCESS_PORT`` overrides it."""
ZERO3_PERSISTENCE_THRESHOLD = 100_000
"""Parameters smaller than this (norms) stay gathered in ZeRO-3: negligible bytes."""


def launch_files(spec: AnySpec, plan: Plan) -> dict[str, str]:
    """The files a distributed spec adds to ``emit -o DIR`` (none for a single GPU)."""
    if spec.hardware.distributed == "none":
        return {}
    files = {ACCELERATE_CONFIG_FILE: accelerate_config_yaml(spec, plan)}
    if spec.hardware.distributed.startswith("deepspeed"):
        files[DEEPSPEED_CONFIG_FILE] = deepspeed_config_json(spec)
    files[LAUNCH_SCRIPT_FILE] = launch_script(spec)
    return files


def accelerate_config_dict(spec: AnySpec, plan: Plan) -> dict[str, Any]:
    """``accelerate launch --config_file`` contents (a ``ClusterConfig``)."""
    hardware = spec.hardware
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "machine_rank": 0,
        "main_training_function": "main",
        "num_machines": hardware.num_nodes,
        "num_processes": hardware.world_size,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    mixed_precision = "bf16" if plan.gpu.bf16 else "fp16"
    if hardware.distributed == "ddp":
        config |= {"distributed_type": "MULTI_GPU", "mixed_precision": mixed_precision}
    elif hardware.distributed == "fsdp":
        config |= {
            "distributed_type": "FSDP",
            "mixed_precision": mixed_precision,
            "fsdp_config": fsdp_config(spec),
        }
    else:
        # DeepSpeed reads precision, batch sizes and clipping from ds_config.json ("auto":
        # filled in by transformers from the script's arguments); accelerate refuses the same
        # settings in both places.
        config |= {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {
                "deepspeed_config_file": DEEPSPEED_CONFIG_FILE,
                "deepspeed_multinode_launcher": "standard",
                "zero3_init_flag": hardware.distributed == "deepspeed-zero3",
            },
        }
    return dict(sorted(config.items()))


def fsdp_config(spec: AnySpec) -> dict[str, Any]:
    """FSDP1 settings for (Q)LoRA, and for full fine-tuning with ``full_fsdp_config``.

    Why FSDP1 and not FSDP2 (accelerate 1.15 supports both, ``fsdp_version``): FSDP2's
    ``fully_shard`` replaces every parameter with a DTensor, and bitsandbytes 0.50.2 has no
    DTensor support for ``Params4bit`` (its ``quant_state`` is lost); transformers' FSDP-QLoRA
    hook (distributed/fsdp.py ``update_fsdp_plugin_peft``) and ``is_fsdp_enabled`` (the
    ``cpu_ram_efficient_loading`` path) cover FSDP1; peft's documented FSDP-QLoRA recipe
    (docs/source/accelerate/fsdp.md) is FSDP1 with ``use_orig_params: false``. FSDP2 stays
    an input switch of the estimator (``StackProfile.fsdp_version``).

    - ``TRANSFORMER_BASED_WRAP``: one unit per decoder layer (``_no_split_modules``);
      transformers swaps in peft's policy, which also wraps each LoRA layer.
    - ``BACKWARD_PRE``: the next unit's all-gather overlaps this one's backward (two layers
      gathered at once, as the planner counts).
    - ``cpu_ram_efficient_loading`` + ``sync_module_states``: only rank 0 reads the
      checkpoint; the others receive it (accelerate requires both together).
    - ``use_orig_params: false``: flat parameters, possible because peft's policy keeps
      trainable and frozen tensors in separate units.
    - ``FULL_STATE_DICT``: the final ``save_model`` gathers the full state on rank 0 so
      peft writes a normal adapter (costs host RAM at save time).

    Full fine-tuning changes two settings (``full_fsdp_config``).
    """
    config = {
        "fsdp_activation_checkpointing": False,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_forward_prefetch": False,
        "fsdp_offload_params": spec.hardware.cpu_offload,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_sync_module_states": True,
        "fsdp_use_orig_params": False,
        "fsdp_version": 1,
    }
    if spec.finetuning == "full":
        config |= full_fsdp_config()
    return config


def full_fsdp_config() -> dict[str, Any]:
    """FSDP1 settings for ``finetuning: full`` (the rest as for LoRA).

    - ``use_orig_params: true``: transformers' own default for FSDP
      (transformers/training_args.py:2876); the optimizer sees the original parameters by
      name, so the Trainer's weight-decay groups (no decay for biases and norms) apply,
      where flat parameters would put every weight of a unit in one group. Every parameter
      trains, so the units need no peft policy.
    - ``SHARDED_STATE_DICT`` for checkpoints: each rank writes its own shard of the fp32
      weights and optimizer state; ``FULL_STATE_DICT`` would gather the whole model and
      optimizer state (16 bytes per parameter with AdamW) in rank 0's host memory at every
      checkpoint. The script switches to ``FULL_STATE_DICT`` before its final
      ``save_model``, which then gathers the fp32 model on rank 0 (accelerate's
      ``get_state_dict``, accelerator.py: ``FullStateDictConfig(offload_to_cpu=True,
      rank0_only=True)``) and saves a plain transformers model.
    - Mixed precision comes from accelerate's ``mixed_precision: bf16``:
      ``MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16)``
      (accelerate/utils/dataclasses.py:2129-2141); the model is loaded in fp32, so the
      sharded masters the optimizer steps stay fp32.
    - Wrapping, loading (rank 0 reads the fp32 checkpoint, ``cpu_ram_efficient_loading``
      with ``sync_module_states``) and prefetch as for LoRA.
    """
    return {"fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_use_orig_params": True}


def deepspeed_config_dict(spec: AnySpec) -> dict[str, Any]:
    """ZeRO-2 / ZeRO-3 with the bucket sizes the planner counts; "auto" values are filled in
    by transformers' DeepSpeed integration from the script's training arguments.

    Full fine-tuning needs nothing else: ``"bf16": {"enabled": "auto"}`` becomes true with
    the script's ``bf16=True``, so DeepSpeed casts the fp32-loaded model to bf16 and its ZeRO
    optimizer keeps the fp32 master partition (``peftgen.memory.full_zero_parts``); ZeRO-3's
    ``stage3_gather_16bit_weights_on_model_save`` lets the final ``save_model`` gather the
    partitioned bf16 weights (accelerate's ``get_state_dict`` refuses without it), so the
    saved model is a plain bf16 transformers model."""
    hardware = spec.hardware
    stage = 3 if hardware.distributed == "deepspeed-zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": DEEPSPEED_BUCKET_ELEMENTS,
    }
    if stage == 2:
        zero["allgather_bucket_size"] = DEEPSPEED_BUCKET_ELEMENTS
    else:
        zero |= {
            "stage3_prefetch_bucket_size": ZERO3_PREFETCH_BUCKET_ELEMENTS,
            "stage3_max_live_parameters": ZERO3_MAX_LIVE_PARAMETERS,
            "stage3_param_persistence_threshold": ZERO3_PERSISTENCE_THRESHOLD,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if hardware.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": zero,
    }


def accelerate_config_yaml(spec: AnySpec, plan: Plan) -> str:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buffer = StringIO()
    yaml.dump(accelerate_config_dict(spec, plan), buffer)
    header = (
        f"# accelerate launch config for {spec.name}: {spec.hardware.distributed} on "
        f"{spec.hardware.num_nodes} machine(s) x {spec.hardware.num_gpus} GPU(s).\n"
        f"# Written by peftgen; run it with launch.sh.\n"
    )
    return header + buffer.getvalue()


def deepspeed_config_json(spec: AnySpec) -> str:
    return json.dumps(deepspeed_config_dict(spec), indent=2) + "\n"


def _cpu_threads_lines(spec: AnySpec) -> str:
    """launch.sh's share of the machine's cores per process, where the run computes on the
    CPU: torchrun sets ``OMP_NUM_THREADS=1`` for each process unless it is set
    (torch/distributed/run.py), and quantizing a 70B model in host memory on one thread
    takes over an hour (16 s per 8192 x 28672 matrix, measured here), as does a CPU
    optimizer step on one thread. Empty where the CPU does little."""
    quantized_on_cpu = spec.hardware.distributed == "fsdp" and spec.precision in ("8bit", "4bit")
    if not (quantized_on_cpu or spec.hardware.cpu_offload):
        return ""
    work = (
        "the model is quantized in host memory"
        if quantized_on_cpu
        else "the offloaded optimizer steps on the CPU"
    )
    per_node = max(1, spec.hardware.world_size // spec.hardware.num_nodes)
    return (
        "# torchrun gives each process one CPU thread unless OMP_NUM_THREADS is set, and\n"
        f"# {work}: the {per_node} processes of this machine share its cores instead.\n"
        f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {per_node} > 1 '
        f'? $(nproc) / {per_node} : 1 ))}}"\n'
    )


def launch_script(spec: AnySpec) -> str:
    """``launch.sh``: ``accelerate launch`` with this folder's config and train.py. The
    multi-node variables are passed through only when set, so one machine needs none."""
    nodes = spec.hardware.num_nodes
    # accelerate resolves the config's relative DeepSpeed path against the current
    # directory; the command line's path wins over the config's.
    deepspeed_file = (
        f' --deepspeed_config_file "$here/{DEEPSPEED_CONFIG_FILE}"'
        if spec.hardware.distributed.startswith("deepspeed")
        else ""
    )
    threads = _cpu_threads_lines(spec)
    return f"""#!/usr/bin/env bash
# train.py through accelerate: {spec.hardware.distributed}, {spec.hardware.world_size} GPU(s).
# Run from any directory (train.py finds its files from its own folder):
#   bash path/to/launch.sh [extra train.py arguments]
# On more than one machine ({nodes} in this spec), run it on every machine with:
#   MACHINE_RANK       this machine's index: 0 on the main machine, then 1, 2, ...
#   MAIN_PROCESS_IP    the main machine's address, reachable from all the others
#   MAIN_PROCESS_PORT  a free TCP port on the main machine (default {DEFAULT_MAIN_PROCESS_PORT})
set -euo pipefail
{threads}here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
args=(--config_file "$here/{ACCELERATE_CONFIG_FILE}"{deepspeed_file})
if [[ -n "${{MAIN_PROCESS_IP:-}}" ]]; then
    args+=(
        --machine_rank "${{MACHINE_RANK:?set MACHINE_RANK (0 on the main machine)}}"
        --main_process_ip "$MAIN_PROCESS_IP"
        --main_process_port "${{MAIN_PROCESS_PORT:-{DEFAULT_MAIN_PROCESS_PORT}}}"
    )
fi
exec accelerate launch "${{args[@]}}" "$here/train.py" "$@"
"""
