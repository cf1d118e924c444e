"""Multi-GPU: per-GPU planner properties, accelerate configs, and a 2-process DDP run.

The DDP run executes the emitted ``launch.sh`` unmodified: on a machine without CUDA,
accelerate's launcher starts two processes and ``PartialState`` joins them over gloo.
accelerate 1.15 refuses FSDP without an accelerator (``sync_module_states`` needs a
device), so the FSDP and DeepSpeed configs are checked by accelerate's own parser,
launcher environment and plugin classes instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from peftgen.catalog import find_model
from peftgen.cli import main as peftgen_main
from peftgen.load import load_spec
from peftgen.memory import (
    EstimateInput,
    communication_buffer_bytes,
    estimate,
    gradient_bytes,
    replicated_quant_state_bytes,
)
from peftgen.plan import make_plan
from peftgen.resolve import resolve

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "specs" / "data"
EXAMPLE_70B = REPO / "specs" / "llama3-70b-qlora-fsdp-2x24gb.yaml"
WORLD_SIZES = (1, 2, 3, 4, 8, 16, 64)
MODELS = ("llama3-70b", "llama3-8b", "mistral-7b", "qwen2.5-1.5b")


def _inputs(model: str, precision: str, **changes: Any) -> EstimateInput:
    arch = find_model(model)
    assert arch is not None
    return replace(EstimateInput(arch=arch, precision=precision), **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- planner properties


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero2", "deepspeed-zero3"])
@pytest.mark.parametrize("precision", ["bf16", "4bit"])
@pytest.mark.parametrize("model", MODELS)
def test_sharded_per_gpu_peak_never_rises_with_more_gpus(
    model: str, precision: str, engine: str, offload: bool
) -> None:
    peaks = [
        estimate(
            _inputs(model, precision, distributed=engine, world_size=n, cpu_offload=offload)
        ).peak_reserved_bytes
        for n in WORLD_SIZES
        if n > 1
    ]
    assert peaks == sorted(peaks, reverse=True), peaks
    # Sharding saves something on the way from 2 to 64 GPUs (offload leaves little to save).
    if not offload:
        assert peaks[-1] < peaks[0]


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit"])
@pytest.mark.parametrize("model", MODELS)
def test_ddp_per_gpu_is_single_gpu_plus_its_gradient_buckets(
    model: str, precision: str, optim: str
) -> None:
    single = estimate(_inputs(model, precision, optim=optim))
    for world in (2, 8):
        inputs = _inputs(model, precision, optim=optim, distributed="ddp", world_size=world)
        ddp = estimate(inputs)
        buckets = communication_buffer_bytes(inputs)
        assert buckets == gradient_bytes(inputs) > 0  # a bucketed copy of every gradient
        assert ddp.peak_allocated_bytes == single.peak_allocated_bytes + buckets
        assert ddp.gradient_bytes == single.gradient_bytes + buckets
        for part in ("weights_bytes", "adapter_bytes", "optimizer_bytes", "activation_bytes"):
            assert getattr(ddp, part) == getattr(single, part), part


def test_zero2_shards_states_but_not_weights() -> None:
    single = estimate(_inputs("llama3-8b", "bf16"))
    zero2 = estimate(_inputs("llama3-8b", "bf16", distributed="deepspeed-zero2", world_size=4))
    assert zero2.weights_bytes == single.weights_bytes
    # Every adapter element on every GPU, but in bf16: deepspeed.initialize casts the module
    # (engine.py _configure_distributed_model) where one GPU keeps peft's fp32 upcast.
    assert zero2.trainable_parameters == single.trainable_parameters
    assert zero2.adapter_bytes == 2 * zero2.trainable_parameters
    assert single.adapter_bytes == 4 * single.trainable_parameters
    assert zero2.optimizer_bytes < single.optimizer_bytes
    assert zero2.gradient_bytes - zero2.communication_bytes < single.gradient_bytes


def test_fsdp_shards_weights_but_keeps_the_gathered_working_set() -> None:
    single = estimate(_inputs("llama3-70b", "4bit"))
    fsdp = estimate(_inputs("llama3-70b", "4bit", distributed="fsdp", world_size=8))
    assert 0 < fsdp.gathered_weight_bytes < fsdp.weights_bytes < single.weights_bytes / 2
    # 64 GPUs: the shard all but vanishes; the gathered layers and root unit remain, and
    # bitsandbytes' block scales, which are not parameters, stay on every rank.
    inputs = _inputs("llama3-70b", "4bit", distributed="fsdp", world_size=64)
    many = estimate(inputs)
    replicated = replicated_quant_state_bytes(inputs)
    assert replicated > 0
    shard = many.weights_bytes - many.gathered_weight_bytes - replicated
    assert 0 < shard < single.weights_bytes / 32


def _plan(spec_path: Path) -> Any:
    return make_plan(resolve(load_spec(spec_path)))


def test_example_70b_on_two_24gb_gpus_fits_per_gpu_and_explains_itself() -> None:
    plan = _plan(EXAMPLE_70B)
    assert plan.gpu.count == 2
    assert plan.fits and plan.chosen_precision == "4bit"
    chosen = plan.chosen
    assert chosen is not None
    assert chosen.peak_reserved_bytes <= plan.budget_bytes
    assert chosen.gathered_weight_bytes > 0
    assert any("fsdp over 2 GPUs" in warning for warning in plan.warnings)
    assert any("cpu_offload" in warning for warning in plan.warnings)


def test_smallest_gpu_count_suggestion_is_the_smallest_that_fits(tmp_path: Path) -> None:
    """Without offload the 70B example does not fit 2 GPUs; the suggested count fits at
    the prediction interval's upper end and one GPU fewer does not (the plan's own
    numbers)."""
    text = EXAMPLE_70B.read_text(encoding="utf-8").replace("  cpu_offload: true\n", "")
    spec_path = tmp_path / "no-offload.yaml"
    spec_path.write_text(text, encoding="utf-8")
    resolved = resolve(load_spec(spec_path))
    plan = make_plan(resolved)
    assert not plan.fits
    counts = [s for s in plan.suggestions if "hardware.num_gpus" in s.change]
    assert len(counts) == 1
    suggested = counts[0].change["hardware.num_gpus"]
    assert counts[0].fits and counts[0].change["hardware.distributed"] == "fsdp"
    offload = [s for s in plan.suggestions if s.change.get("hardware.cpu_offload") is True]
    assert offload and offload[0].fits

    def fits_with(count: int) -> bool:
        edited = text.replace("  num_gpus: 2\n", f"  num_gpus: {count}\n")
        path = tmp_path / f"n{count}.yaml"
        path.write_text(edited, encoding="utf-8")
        plan = _plan(path)
        return bool(plan.fits and not plan.tight)

    assert fits_with(suggested)
    assert not fits_with(suggested - 1)


def test_plan_json_counts_the_world_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert peftgen_main(["plan", str(EXAMPLE_70B), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"]["count"] == 2
    chosen = next(c for c in data["candidates"] if c["precision"] == data["chosen_precision"])
    assert chosen["peak_reserved_bytes"] <= data["budget_bytes"]


# --------------------------------------------------------------------------- emitted configs


def _tiny_spec(model_dir: Path, engine: str, extra_hardware: str = "") -> str:
    return textwrap.dedent(
        f"""\
        name: tiny-{engine}
        method: sft
        model:
          id: {model_dir.as_posix()}
        dataset:
          path: {(DATA / "clinical_sft.jsonl").as_posix()}
          format: messages
        hardware:
          vram_gib: 4
          num_gpus: 2
          distributed: {engine}
        {extra_hardware}
        precision: bf16
        lora:
          r: 8
          lora_alpha: 16
          lora_dropout: 0.0
        training:
          max_length: 128
          per_device_train_batch_size: 2
          gradient_accumulation_steps: 1
          max_steps: 2
          learning_rate: 0.01
          warmup_ratio: 0.0
          gradient_checkpointing: true
          logging_steps: 1
          save_strategy: "no"
          packing: true
        output_dir: adapter
        """
    )


def _emit(spec_text: str, tmp_path: Path) -> Path:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec_text, encoding="utf-8")
    emitted = tmp_path / "emitted"
    assert peftgen_main(["emit", str(spec_path), "-o", str(emitted)]) == 0
    return emitted


def _launch_args(config_file: Path) -> Any:
    """``accelerate launch --config_file FILE train.py`` as accelerate parses it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    _validate_launch_command(args)
    return args


def test_fsdp_config_builds_accelerates_fsdp_plugin(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    emitted = _emit(_tiny_spec(tiny_model_dir, "fsdp", "  cpu_offload: true"), tmp_path)
    assert {p.name for p in emitted.iterdir()} >= {"accelerate_config.yaml", "launch.sh"}
    config_file = emitted / "accelerate_config.yaml"
    cluster = ClusterConfig.from_yaml_file(str(config_file))
    assert cluster.distributed_type.value == "FSDP"
    assert cluster.num_processes == 2 and cluster.num_machines == 1
    args = _launch_args(config_file)
    assert args.use_fsdp and args.num_processes == 2
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # sync_module_states asks the accelerator for its device; stand in for the GPU.
    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.backward_prefetch.name == "BACKWARD_PRE"
    assert plugin.cpu_offload.offload_params is True
    assert plugin.use_orig_params is False
    assert plugin.sync_module_states is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy is not None
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("engine", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_config_points_at_its_zero_json(
    engine: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    emitted = _emit(_tiny_spec(tiny_model_dir, engine, "  cpu_offload: true"), tmp_path)
    config_file = emitted / "accelerate_config.yaml"
    cluster = ClusterConfig.from_yaml_file(str(config_file))
    assert isinstance(load_config_from_file(str(config_file)), ClusterConfig)
    assert cluster.distributed_type.value == "DEEPSPEED"
    assert cluster.num_processes == 2
    ds_file = cluster.deepspeed_config["deepspeed_config_file"]
    assert ds_file == "ds_config.json"
    assert cluster.deepspeed_config["zero3_init_flag"] is (engine == "deepspeed-zero3")
    # accelerate refuses precision in both places when a DeepSpeed file is given.
    assert "mixed_precision" not in config_file.read_text(encoding="utf-8")
    ds = json.loads((emitted / ds_file).read_text(encoding="utf-8"))
    zero = ds["zero_optimization"]
    assert zero["stage"] == (3 if engine == "deepspeed-zero3" else 2)
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) is (engine == "deepspeed-zero3")
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    launch = (emitted / "launch.sh").read_text(encoding="utf-8")
    assert '--deepspeed_config_file "$here/ds_config.json"' in launch


def test_single_gpu_spec_emits_no_launch_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = _tiny_spec(tiny_model_dir, "ddp").replace("  num_gpus: 2\n  distributed: ddp\n", "")
    emitted = _emit(text, tmp_path)
    assert sorted(p.name for p in emitted.iterdir()) == [
        ".peftgen-emitted.json",
        "merge.py",
        "plan.md",
        "spec.yaml",
        "train.py",
    ]


def test_launch_script_documents_and_passes_multi_node_variables(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    emitted = _emit(_tiny_spec(tiny_model_dir, "ddp"), tmp_path)
    launch = (emitted / "launch.sh").read_text(encoding="utf-8")
    for variable in ("MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT"):
        assert f"#   {variable}" in launch
        assert f"${{{variable}" in launch
    checked = subprocess.run(["bash", "-n", str(emitted / "launch.sh")], check=False)
    assert checked.returncode == 0


@pytest.mark.parametrize(
    ("engine", "precision", "extra", "threads"),
    [
        ("fsdp", "4bit", "", True),  # quantized in host memory, on the CPU
        ("deepspeed-zero2", "bf16", "cpu_offload: true", True),  # the optimizer steps there
        ("ddp", "bf16", "", False),
        ("fsdp", "bf16", "", False),
    ],
)
def test_launch_script_shares_the_cores_where_the_cpu_computes(
    engine: str, precision: str, extra: str, threads: bool, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """torchrun runs each process on one CPU thread unless OMP_NUM_THREADS is set; where
    the run computes on the CPU, launch.sh splits the cores between this machine's
    processes (a machine of 16 cores: 8 each for 2) and keeps a value the user set."""
    text = _tiny_spec(tiny_model_dir, engine, f"  {extra}" if extra else "")
    text = text.replace("precision: bf16", f"precision: {precision}")
    launch = (_emit(text, tmp_path) / "launch.sh").read_text(encoding="utf-8")
    exports = [line for line in launch.splitlines() if line.startswith("export OMP_NUM_THREADS")]
    assert len(exports) == int(threads), launch
    if not threads:
        return
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nproc").write_text("#!/bin/sh\necho 16\n", encoding="utf-8")
    (fake_bin / "nproc").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    for preset, expected in ((None, "8"), ("3", "3")):
        run_env = env if preset is None else {**env, "OMP_NUM_THREADS": preset}
        shown = subprocess.run(
            ["bash", "-c", f'{exports[0]}; echo "$OMP_NUM_THREADS"'],
            env=run_env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.strip() == expected


# --------------------------------------------------------------------------- 2-process DDP run


# The two-process runs share one xdist worker (``--dist loadgroup``): two of them at once on
# two cores starve gloo's workers.
@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")
@pytest.mark.parametrize(
    ("engine", "precision"),
    [
        ("ddp", "bf16"),
        ("deepspeed-zero2", "bf16"),
        ("deepspeed-zero3", "bf16"),
        ("deepspeed-zero3", "4bit"),
    ],
)
def test_launch_sh_trains_on_two_cpu_processes(
    engine: str, precision: str, tiny_model_dir: Path, tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    """The emitted launch.sh: two processes (gloo on the CPU; DeepSpeed's CPU accelerator for
    ZeRO), one adapter. ZeRO-3 builds a 16-bit model under zero.Init and gathers the
    partitioned adapter to save it (stage3_gather_16bit_weights_on_model_save), with every
    tensor partitioned (``_partition_every_tensor``, the one change to the emitted files);
    its bf16 case installs ChatML on a base model, so resized embeddings train as
    modules_to_save and are gathered whole to be saved. QLoRA under ZeRO-3 runs on
    bitsandbytes' CPU path: quantized in host memory, no zero.Init."""
    from safetensors import safe_open

    spec = _tiny_spec(tiny_model_dir, engine).replace("precision: bf16", f"precision: {precision}")
    chatml = (engine, precision) == ("deepspeed-zero3", "bf16")
    if chatml:
        spec = _tiny_spec(tiny_base_model_dir, engine).replace(
            "  format: messages\n", "  format: messages\n  chat_template: chatml\n"
        )
    emitted = _emit(spec, tmp_path)
    if engine == "deepspeed-zero3":
        _partition_every_tensor(emitted)
    ran = _launch(emitted, tmp_path)
    # Each rank prints the effective batch: 2 per device x 1 accumulated x 2 processes.
    assert ran.stdout.count("= 2 per device x 1 accumulated x 2 processes") == 2, ran.stdout
    # ZeRO-3 (16-bit): each rank builds its model partitioned, under zero.Init, because the
    # script registers DeepSpeed's config before from_pretrained (what the plan's loading
    # peak assumes); the other engines never do.
    zero_init = ran.stderr.count("Detected DeepSpeed ZeRO-3: activating zero.init()")
    assert zero_init == (2 if engine == "deepspeed-zero3" and precision == "bf16" else 0), (
        ran.stderr[-4000:]
    )
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    saved = list(adapter.glob("*.safetensors"))
    assert [p.name for p in saved] == ["adapter_model.safetensors"]
    with safe_open(str(saved[0]), framework="pt") as tensors:
        keys = list(tensors.keys())
        lora_b = [tensors.get_tensor(k) for k in keys if "lora_B" in k]
        shapes = {k: tensors.get_slice(k).get_shape() for k in keys}
    # Whole tensors, not a rank's empty part; LoRA B starts at zero: training moved it.
    assert all(0 not in shape for shape in shapes.values()), shapes
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 0
    if chatml:  # the grown embeddings, gathered whole to be saved
        from transformers import AutoTokenizer

        with safe_open(str(saved[0]), framework="pt") as tensors:
            rows = {tensors.get_slice(k).get_shape()[0] for k in keys if "embed_tokens" in k}
        assert rows == {len(AutoTokenizer.from_pretrained(adapter))}, rows


def _partition_every_tensor(emitted: Path) -> None:
    """Set ZeRO-3's persistence threshold to 0 in the emitted ds_config.json. Every tensor
    of the tiny model is below the emitted threshold (1e5 elements), so ZeRO-3 would keep
    each one whole on every rank and a save that never gathers would still look right; at 0
    they are partitioned, as a real model's large tensors are."""
    path = emitted / "ds_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] > 0
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path.write_text(json.dumps(config), encoding="utf-8")


def _launch(emitted: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``bash launch.sh`` on this machine's CPU, as a user would start it."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("MAIN_PROCESS_IP", None)
    # launch.sh's own variable: a free port, not the default another run may hold.
    env["MAIN_PROCESS_PORT"] = str(_free_port())
    env["TRANSFORMERS_VERBOSITY"] = "info"  # transformers says when it uses zero.Init
    ran = subprocess.run(
        ["bash", str(emitted / "launch.sh")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    return ran


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")
def test_full_finetuning_under_zero3_trains_on_two_cpu_processes(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    """Full fine-tuning's ZeRO-3 launch, with ChatML installed on a base model: the fp32
    model is built partitioned (zero.Init) and its embeddings resized after loading (plain
    parameters until training starts), every weight trains, every tensor is partitioned
    (``_partition_every_tensor``), and the gathered 16-bit model loads with plain
    transformers, grown to the tokenizer's length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = _tiny_spec(tiny_base_model_dir, "deepspeed-zero3").replace(
        "method: sft\n", "method: sft\nfinetuning: full\n"
    )
    text = text.replace("  format: messages\n", "  format: messages\n  chat_template: chatml\n")
    text = text.replace("lora:\n  r: 8\n  lora_alpha: 16\n  lora_dropout: 0.0\n", "")
    text = text.replace("learning_rate: 0.01", "learning_rate: 0.001")
    emitted = _emit(text, tmp_path)
    _partition_every_tensor(emitted)
    ran = _launch(emitted, tmp_path)
    assert ran.stderr.count("Detected DeepSpeed ZeRO-3: activating zero.init()") == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir, dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    vocabulary = len(AutoTokenizer.from_pretrained(tmp_path / "adapter"))
    assert trained.get_input_embeddings().weight.shape[0] == vocabulary
    assert vocabulary > base.get_input_embeddings().weight.shape[0]
    total = sum(p.numel() for p in trained.parameters())
    # Counted from the partitioned parameters' full sizes (numel() is a rank's part).
    assert f"trainable params: {total:,} (full fine-tuning: every weight)" in ran.stdout
    before, after = base.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    same_shape = [key for key in before if before[key].shape == after[key].shape]
    moved = [key for key in same_shape if not torch.equal(before[key], after[key])]
    assert len(moved) >= len(before) // 2, moved


def _free_port() -> int:
    """A TCP port free now, for the rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
