"""Full fine-tuning under the sharded engines (issue 16): FSDP, ZeRO-2 and ZeRO-3 shard the
fp32 masters, gradients and optimizer state of every parameter.

Estimator properties that can fail (per-GPU state never rises with more GPUs, the engines'
order, full at least LoRA), an independent oracle (parameter counts of the model
transformers builds on the meta device, divided by the world size), the plan and the
emitted launch files of the example specs in ``tests/plan_specs``, and (slow) FSDP1 itself
on two CPU processes with the emitted accelerate config.

Why the 2-process run is not the emitted ``launch.sh``: accelerate 1.15 turns FSDP on only
for accelerator devices (accelerate/state.py:986-1013 sets ``DistributedType.FSDP`` for
``MULTI_GPU``-like types; on the CPU, state.py:800-812, it is ``MULTI_CPU``, which the
Trainer wraps in DDP, checked here: the script then trains without FSDP), and
``sync_module_states`` asks for an accelerator device (accelerate/utils/dataclasses.py:1998
-2016; torch refuses CPU states with it, torch/distributed/fsdp/_init_utils.py:1176). torch's
FSDP1 itself runs on the CPU when given ``device_id=cpu`` (_init_utils.py:369-394), which is
the device accelerate passes (accelerator.py:1957). So the run builds accelerate's own
``FullyShardedDataParallelPlugin`` from the emitted config (the environment ``accelerate
launch`` exports) and wraps the tiny model with the same FSDP arguments accelerate passes,
trains two steps with torch's AdamW under CPU bf16 autocast, switches to
``FULL_STATE_DICT`` as the emitted script does before its final save, and saves a model
that ``AutoModelForCausalLM`` loads. Each rank also reports its shard sizes and dtypes,
which the estimator's per-GPU terms must match. DeepSpeed is not installed: its configs are
checked by accelerate's parser and by their JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from peftgen import memory
from peftgen.catalog import ModelArch, config_dict, find_model
from peftgen.cli import main as peftgen_main
from peftgen.load import load_spec
from peftgen.memory import (
    EstimateInput,
    StackProfile,
    estimate,
    full_fsdp_parts,
    full_layer_unit_bytes,
    full_root_parameters,
    full_zero_parts,
    load_peak_bytes,
    per_gpu_parts,
)
from peftgen.plan import estimate_input
from peftgen.resolve import resolve
from peftgen.spec import SPEC_ADAPTER

REPO = Path(__file__).resolve().parents[1]
PLAN_SPECS = Path(__file__).parent / "plan_specs"
FSDP_SPEC = PLAN_SPECS / "qwen2.5-0.5b-full-fsdp-4gpu.yaml"
ZERO3_SPEC = PLAN_SPECS / "qwen2.5-0.5b-full-zero3-2gpu.yaml"
DATA = REPO / "specs" / "data" / "clinical_sft.jsonl"
ENGINES = ("fsdp", "deepspeed-zero2", "deepspeed-zero3")
MODELS = ("qwen2.5-0.5b", "llama3-8b", "mistral-7b")
WORLD_SIZES = (2, 3, 4, 8, 16, 64)


def _arch(model: str) -> ModelArch:
    arch = find_model(model)
    assert arch is not None
    return arch


def _full(model: str, **changes: Any) -> EstimateInput:
    """A full fine-tuning input as ``peftgen.plan.as_full_finetuning`` builds it."""
    inputs = EstimateInput(
        arch=_arch(model),
        precision="bf16",
        finetuning="full",
        lora_r=0,
        target_modules=(),
        lora_dropout=0.0,
        micro_batch=1,
        max_length=1024,
    )
    return replace(inputs, **changes)


def _lora(model: str, **changes: Any) -> EstimateInput:
    return replace(EstimateInput(arch=_arch(model), precision="bf16", max_length=1024), **changes)


def _persistent(inputs: EstimateInput) -> int:
    """What stays on one GPU across steps: weights (without the gathered working set),
    adapters, gradients (without the communication buffers) and optimizer state."""
    parts = per_gpu_parts(inputs)
    return (
        parts.weights_bytes
        - parts.gathered_weight_bytes
        + parts.adapter_bytes
        + parts.gradient_bytes
        - parts.communication_bytes
        + parts.optimizer_bytes
    )


# --------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", MODELS)
def test_full_sharded_state_never_rises_with_more_gpus(
    model: str, engine: str, offload: bool
) -> None:
    rows = []
    for world in WORLD_SIZES:
        inputs = _full(model, distributed=engine, world_size=world, cpu_offload=offload)
        parts = per_gpu_parts(inputs)
        state = (
            parts.optimizer_bytes
            + parts.gradient_bytes
            - parts.communication_bytes
            + parts.weights_bytes
            - parts.gathered_weight_bytes
        )
        rows.append(
            (
                parts.optimizer_bytes,  # fp32 masters (DeepSpeed) + optimizer state
                parts.gradient_bytes - parts.communication_bytes,
                parts.weights_bytes - parts.gathered_weight_bytes,
                state,
                estimate(inputs).peak_reserved_bytes,
                load_peak_bytes(inputs),
            )
        )
    for column in zip(*rows, strict=True):
        assert list(column) == sorted(column, reverse=True), column
    if not offload:
        # From 2 to 64 GPUs the sharded state shrinks by far more than a little.
        assert rows[-1][3] < rows[0][3] / 4


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("model", MODELS)
def test_full_persistent_terms_order_zero3_fsdp_below_zero2_below_ddp(
    model: str, world: int
) -> None:
    def persistent(engine: str) -> int:
        return _persistent(_full(model, distributed=engine, world_size=world))

    ddp, zero2 = persistent("ddp"), persistent("deepspeed-zero2")
    assert persistent("deepspeed-zero3") <= zero2 <= ddp
    assert persistent("fsdp") <= zero2
    # DDP keeps 16 bytes per parameter (fp32 weight, gradient, two AdamW moments).
    assert ddp == 16 * memory.base_parameter_count(_arch(model))


@pytest.mark.parametrize("world", [2, 8])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", MODELS)
def test_full_needs_at_least_lora_per_gpu_under_the_same_engine(
    model: str, engine: str, world: int
) -> None:
    full = _full(model, distributed=engine, world_size=world)
    lora = _lora(model, distributed=engine, world_size=world)
    assert _persistent(full) >= _persistent(lora)
    assert estimate(full).peak_reserved_bytes >= estimate(lora).peak_reserved_bytes


def _meta_counts(arch: ModelArch) -> tuple[int, int, int]:
    """(all parameters, root-unit parameters, one decoder layer's parameters) of the model
    transformers builds from the catalogue config on the meta device: what FSDP's
    transformer-layer wrapping puts in the root unit and in each layer unit."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**config_dict(arch))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    total = sum(p.numel() for p in model.parameters())  # tied tensors once
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return total, total - config.num_hidden_layers * layer, layer


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama3-8b"])
def test_full_shards_are_the_meta_models_parameters_over_the_world_size(
    model: str, world: int
) -> None:
    """An oracle independent of the catalogue's parameter arithmetic: transformers' model."""
    total, root, layer = _meta_counts(_arch(model))
    fsdp_in = _full(model, distributed="fsdp", world_size=world)
    fsdp = full_fsdp_parts(fsdp_in)
    assert full_root_parameters(fsdp_in.arch) == root
    assert full_layer_unit_bytes(fsdp_in) == 2 * layer  # gathered in bf16
    # fp32 master shards, fp32 gradient shards, two fp32 AdamW moments: 1/N each.
    assert fsdp.weights_bytes - fsdp.gathered_weight_bytes == -(-4 * total // world)
    assert fsdp.gradient_bytes - fsdp.communication_bytes == -(-4 * total // world)
    assert fsdp.optimizer_bytes == -(-8 * total // world)
    # The gathered set: the bf16 root unit plus two bf16 layers (BACKWARD_PRE).
    assert fsdp.gathered_weight_bytes == 2 * root + 2 * 2 * layer
    for engine in ("deepspeed-zero2", "deepspeed-zero3"):
        zero = full_zero_parts(_full(model, distributed=engine, world_size=world))
        # DeepSpeed's fp32 master partition plus the AdamW moments of that partition.
        assert zero.optimizer_bytes == -(-4 * total // world) + -(-8 * total // world)
        # bf16 gradient partition.
        assert zero.gradient_bytes - zero.communication_bytes == -(-2 * total // world)
        resident = zero.weights_bytes - zero.gathered_weight_bytes
        # ZeRO-2 replicates the bf16 module, ZeRO-3 partitions it.
        assert resident == (2 * total if engine == "deepspeed-zero2" else -(-2 * total // world))


def test_full_zero3_loads_partitioned_under_zero_init() -> None:
    """The emitted script registers DeepSpeed's config before from_pretrained, so the fp32
    model is created partitioned (zero.Init; each module gathered while rank 0 copies the
    checkpoint in): the loading peak is well under one bf16 copy of the model, and one host
    reads the checkpoint. A script that loads first (``zero3_init=False``) has
    ``deepspeed.initialize`` move the whole bf16 module to each GPU, and every process read
    the fp32 model."""
    total = memory.base_parameter_count(_arch("llama3-8b"))
    inputs = _full("llama3-8b", distributed="deepspeed-zero3", world_size=8)
    whole = replace(inputs, stack=StackProfile(zero3_init=False))
    assert load_peak_bytes(inputs) < total < 2 * total <= load_peak_bytes(whole)
    assert memory.host_memory_bytes(whole) == 8 * memory.host_memory_bytes(inputs)


# --------------------------------------------------------------------------- spec rules

BASE: dict[str, Any] = {
    "name": "x",
    "finetuning": "full",
    "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
    "hardware": {"gpu": "a100-80gb", "num_gpus": 2},
}


@pytest.mark.parametrize("engine", ENGINES)
def test_full_sft_and_precomputed_dpo_are_accepted_under_every_engine(engine: str) -> None:
    hardware = {**BASE["hardware"], "distributed": engine}
    sft = {**BASE, "method": "sft", "hardware": hardware}
    sft["dataset"] = {"path": "rows.jsonl", "format": "messages"}
    assert SPEC_ADAPTER.validate_python(sft).hardware.distributed == engine
    dpo = {**BASE, "method": "dpo", "hardware": hardware}
    dpo["dataset"] = {"path": "pairs.jsonl", "format": "preference"}
    dpo["dpo"] = {"precompute_ref_log_probs": True}
    assert SPEC_ADAPTER.validate_python(dpo).finetuning == "full"


@pytest.mark.parametrize("engine", ENGINES)
def test_full_grpo_and_a_dpo_reference_copy_stay_refused_when_sharded(engine: str) -> None:
    hardware = {**BASE["hardware"], "distributed": engine}
    grpo = {
        **BASE,
        "method": "grpo",
        "hardware": hardware,
        "dataset": {"path": "prompts.jsonl", "format": "prompt"},
        "training": {"gradient_accumulation_steps": 8},
        "grpo": {"reward_funcs": ["format"]},
    }
    with pytest.raises(ValidationError, match="summon_full_params"):
        SPEC_ADAPTER.validate_python(grpo)
    dpo = {**BASE, "method": "dpo", "hardware": hardware}
    dpo["dataset"] = {"path": "pairs.jsonl", "format": "preference"}
    with pytest.raises(ValidationError, match=r"dpo\.precompute_ref_log_probs: true"):
        SPEC_ADAPTER.validate_python(dpo)


# --------------------------------------------------------------------------- plan and emit


@pytest.mark.parametrize("spec_path", [FSDP_SPEC, ZERO3_SPEC], ids=["fsdp", "zero3"])
def test_plan_json_of_the_sharded_full_examples(
    spec_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert peftgen_main(["plan", str(spec_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    spec = load_spec(spec_path).spec
    assert data["gpu"]["count"] == spec.hardware.num_gpus
    assert data["full_finetuning"] is None  # the spec is full already: no comparison
    chosen = next(c for c in data["candidates"] if c["precision"] == data["chosen_precision"])
    assert chosen["fits"] and chosen["breakdown"]["adapter_bytes"] == 0
    assert data["trainable_parameters"] == data["total_parameters"]
    # Per GPU, the sharded run needs well under the one-GPU full fine-tune.
    single = estimate(
        replace(estimate_input(resolve(load_spec(spec_path)), "bf16"), distributed="none")
    )
    assert chosen["peak_reserved_bytes"] < single.peak_reserved_bytes
    texts = " ".join(a["text"] for a in chosen["assumptions"])
    assert f"1/{spec.hardware.num_gpus}" in texts


def _emit(spec_path: Path, out: Path) -> Path:
    assert peftgen_main(["emit", str(spec_path), "-o", str(out)]) == 0
    return out


def _staged(spec_path: Path, tmp_path: Path) -> Path:
    """The example spec and its dataset copied next to ``tmp_path / "emitted"``, so the
    script's relative data path stays short (ruff's line length)."""
    import shutil

    (tmp_path / "data").mkdir()
    shutil.copy(DATA, tmp_path / "data" / DATA.name)
    staged = tmp_path / "spec" / spec_path.name
    staged.parent.mkdir()
    text = spec_path.read_text(encoding="utf-8")
    staged.write_text(text.replace("../../specs/data/", "../data/"), encoding="utf-8")
    return staged


def _fsdp_environment(config_file: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file FILE`` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    _validate_launch_command(args)
    assert args.use_fsdp
    return {key: str(value) for key, value in prepare_multi_gpu_env(args).items()}


def _fsdp_plugin(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """accelerate's FSDP plugin as each process builds it (device lookup stubbed)."""
    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(environment["ACCELERATE_MIXED_PRECISION"])
    return plugin


def test_emitted_fsdp_full_config_is_what_accelerate_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from test_golden import ruff_problems

    emitted = _emit(_staged(FSDP_SPEC, tmp_path), tmp_path / "emitted")
    assert sorted(p.name for p in emitted.iterdir()) == [
        ".peftgen-emitted.json",
        "accelerate_config.yaml",
        "launch.sh",
        "plan.md",
        "spec.yaml",
        "train.py",
    ]
    plugin = _fsdp_plugin(_fsdp_environment(emitted / "accelerate_config.yaml"), monkeypatch)
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.use_orig_params is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True and plugin.sync_module_states is True
    assert plugin.backward_prefetch.name == "BACKWARD_PRE"
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    script = (emitted / "train.py").read_text(encoding="utf-8")
    assert "from peft" not in script and "dtype=torch.float32," in script
    assert ruff_problems(emitted) == ""
    # The script's switch to a full state dict before save_model, run on accelerate's own
    # plugin: FSDP.state_dict_type refuses a type whose config is of the other kind
    # (torch/distributed/fsdp/fully_sharded_data_parallel.py, "Expected state_dict_config").
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    lines = script.splitlines()
    start = lines.index("    if trainer.is_fsdp_enabled:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("        "))
    switch = textwrap.dedent("\n".join(lines[start:end]))
    state = types.SimpleNamespace(fsdp_plugin=plugin)
    trainer = types.SimpleNamespace(
        is_fsdp_enabled=True, accelerator=types.SimpleNamespace(state=state)
    )
    exec(switch, {"trainer": trainer})
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert type(plugin.state_dict_config) is FullStateDictConfig
    assert type(plugin.optim_state_dict_config) is FullOptimStateDictConfig
    assert plugin.state_dict_config.rank0_only and plugin.state_dict_config.offload_to_cpu


def test_emitted_zero3_full_config_gathers_16bit_weights_on_save(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from test_golden import ruff_problems

    emitted = _emit(_staged(ZERO3_SPEC, tmp_path), tmp_path / "emitted")
    assert not (emitted / "merge.py").exists()
    cluster = ClusterConfig.from_yaml_file(str(emitted / "accelerate_config.yaml"))
    assert cluster.distributed_type.value == "DEEPSPEED" and cluster.num_processes == 2
    ds = json.loads((emitted / "ds_config.json").read_text(encoding="utf-8"))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"] == {"enabled": "auto"}
    script = (emitted / "train.py").read_text(encoding="utf-8")
    assert "from peft" not in script and "dtype=torch.float32," in script
    assert "DeepSpeed casts the model to bfloat16" in script
    assert "FULL_STATE_DICT" not in script
    launch = (emitted / "launch.sh").read_text(encoding="utf-8")
    assert '--deepspeed_config_file "$here/ds_config.json"' in launch
    assert ruff_problems(emitted) == ""


# --------------------------------------------------------------------------- FSDP1 on 2 CPUs

WORKER = textwrap.dedent(
    '''\
    """One rank: the emitted FSDP settings (accelerate's plugin, from the environment
    accelerate launch exports) on the CPU, two steps, the final FULL_STATE_DICT save."""
    import importlib.util
    import json
    import os
    import sys

    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM

    model_dir, out_dir, script = sys.argv[1], sys.argv[2], sys.argv[3]
    # The emitted script's own fix, before accelerate builds its plugin: fp32 buffers.
    spec = importlib.util.spec_from_file_location("emitted_train", script)
    emitted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emitted)
    emitted.keep_fsdp_buffers_fp32()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # sync_module_states asks accelerate for an accelerator device: stand one in.
    accelerate_dataclasses.is_cuda_available = lambda: True
    torch.cuda.current_device = lambda: 0
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plugin.set_auto_wrap_policy(model)
    # The arguments accelerate passes (accelerator.py, FSDP1 kwargs) on the CPU device;
    # every rank reads the same checkpoint instead of rank 0's broadcast (torch refuses
    # sync_module_states for CPU tensors).
    wrapped = FSDP(
        model,
        sharding_strategy=plugin.sharding_strategy,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=False,
        backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch,
        use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=torch.device("cpu"),
    )
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    ids = torch.randint(4, 500, (2, 32), generator=torch.Generator().manual_seed(rank))
    handles = [m._handle for m in FSDP.fsdp_modules(wrapped) if m._handle is not None]
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [h.flat_param.grad for h in handles]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    report = {
        "rank": rank,
        "losses": losses,
        "inv_freq": str(wrapped.module.model.rotary_emb.inv_freq.dtype),
        "units": [
            {
                "fqns": list(h.flat_param._fqns),
                "shard_dtype": str(h.flat_param.dtype),
                "shard_numel": h.flat_param.numel(),
                "unsharded_dtype": str(h.flat_param._full_param_padded.dtype),
                "unsharded_numel": h.flat_param._full_param_padded.numel(),
                "grad_dtype": str(g.dtype),
                "grad_numel": g.numel(),
            }
            for h, g in zip(handles, grads)
        ],
        "optimizer_bytes": sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for key, t in state.items()
            if key != "step"
        ),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # What the emitted script does before its final save_model, then accelerate's
    # get_state_dict for FSDP1 (offload_to_cpu is for GPU tensors: off on the CPU).
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        state_dict = wrapped.state_dict()
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "model"), state_dict=state_dict)
    dist.barrier()
    dist.destroy_process_group()
    '''
)


def _free_port() -> int:
    """A TCP port free now (torchrun's ``--master_port 0`` leaves the workers waiting)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # with test_multigpu's DDP run, never two at once
def test_fsdp_full_finetuning_on_two_cpu_processes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        textwrap.dedent(
            f"""\
            name: tiny-full-fsdp
            method: sft
            finetuning: full
            model:
              id: {tiny_model_dir.as_posix()}
            dataset:
              path: {DATA.as_posix()}
              format: messages
            hardware:
              vram_gib: 4
              num_gpus: 2
              distributed: fsdp
            precision: bf16
            training:
              max_length: 32
              per_device_train_batch_size: 2
              max_steps: 2
              save_strategy: "no"
            """
        ),
        encoding="utf-8",
    )
    emitted = _emit(spec_path, tmp_path / "emitted")
    environment = _fsdp_environment(emitted / "accelerate_config.yaml")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        **environment,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    ran = subprocess.run(
        [
            sys.executable,
            *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *("--master_port", str(_free_port())),
            *(str(worker), str(tiny_model_dir), str(out), str(emitted / "train.py")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]

    # What FSDP1 holds per rank, against the estimator's per-GPU terms for this spec.
    inputs = estimate_input(resolve(load_spec(spec_path)), "bf16")
    parts = full_fsdp_parts(inputs)
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text(encoding="utf-8"))
        units = report["units"]
        assert all(math.isfinite(loss) for loss in report["losses"])
        assert report["inv_freq"] == "torch.float32"  # RoPE not rounded to bf16
        assert {u["shard_dtype"] for u in units} == {"torch.float32"}  # fp32 masters
        assert {u["unsharded_dtype"] for u in units} == {"torch.bfloat16"}  # gathered bf16
        assert {u["grad_dtype"] for u in units} == {"torch.float32"}  # fp32 grad shards
        assert all(u["grad_numel"] == u["shard_numel"] for u in units)
        slack = 4 * len(units)  # FSDP pads each unit to a multiple of the world size
        masters = 4 * sum(u["shard_numel"] for u in units)
        assert abs(parts.weights_bytes - parts.gathered_weight_bytes - masters) <= slack
        assert abs(parts.gradient_bytes - parts.communication_bytes - masters) <= slack
        assert abs(parts.optimizer_bytes - report["optimizer_bytes"]) <= 2 * slack
        # A layer unit's names are relative to its layer; the root holds the embeddings.
        root = [u for u in units if "model.embed_tokens.weight" in u["fqns"]]
        layers = [u for u in units if u not in root]
        assert len(root) == 1 and len(layers) == inputs.arch.config.num_hidden_layers
        assert abs(2 * root[0]["unsharded_numel"] - 2 * full_root_parameters(inputs.arch)) <= 2
        for unit in layers:
            assert abs(2 * unit["unsharded_numel"] - full_layer_unit_bytes(inputs)) <= 2

    saved = out / "model"
    names = {p.name for p in saved.iterdir()}
    assert "config.json" in names and not any(n.startswith("adapter_") for n in names)
    trained = AutoModelForCausalLM.from_pretrained(saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert trained.dtype == torch.float32
    changed = [
        name
        for (name, a), (_, b) in zip(
            trained.named_parameters(), base.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert any("mlp.down_proj" in n for n in changed) and any("embed_tokens" in n for n in changed)


@pytest.mark.slow
def test_sharded_simulation_of_full_finetuning_agrees_with_the_analytic_figure(
    tmp_path: Path,
) -> None:
    """One FSDP2 step on fake tensors (``peftgen.simulate_sharded``: fake process group,
    rank 0 of 2, fp32 masters under bf16 ``MixedPrecisionPolicy``) of SmolLM2-135M trained
    in full: per GPU its fp32 master and gradient shards are the estimator's, and the
    analytic allocated peak is within 15 % of the simulated one."""
    from peftgen.simulate_sharded import simulate_sharded

    spec_path = tmp_path / "smol.yaml"
    spec_path.write_text(
        textwrap.dedent(
            f"""\
            name: smol-full-fsdp
            method: sft
            finetuning: full
            model:
              id: HuggingFaceTB/SmolLM2-135M
            dataset:
              path: {DATA.as_posix()}
              format: messages
            hardware:
              gpu: rtx-4090
              num_gpus: 2
              distributed: fsdp
            precision: bf16
            training:
              max_length: 256
              per_device_train_batch_size: 2
              gradient_checkpointing: true
            """
        ),
        encoding="utf-8",
    )
    resolved = resolve(load_spec(spec_path))
    result = simulate_sharded(resolved, "bf16")
    parts = full_fsdp_parts(estimate_input(resolved, "bf16"))
    categories = result.by_category
    assert categories["Sharded Param"] == parts.weights_bytes - parts.gathered_weight_bytes
    assert categories["Sharded Grad"] == parts.gradient_bytes - parts.communication_bytes
    assert abs(result.error) <= 0.15, result.to_json()
