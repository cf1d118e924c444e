"""Sharded runs (issue 13): FSDP / ZeRO memory per GPU, the loading phase and host memory.

Properties of the estimator's distributed terms (``peftgen.memory``), the planner's
``load_peak_bytes`` / ``host_memory_bytes`` and the emitted FSDP-QLoRA loading recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftgen.catalog import find_model
from peftgen.cli import main as peftgen_main
from peftgen.memory import (
    EstimateInput,
    StackProfile,
    adapter_dtype,
    estimate,
    fsdp_gathered_layer_units,
    gathered_parameter_bytes,
    load_peak_bytes,
    per_gpu_parts,
)
from peftgen.memory.weights import trainable_tensors

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_70B = REPO / "specs" / "llama3-70b-qlora-fsdp-2x24gb.yaml"
MODELS = ("llama3-70b", "llama3-8b", "mistral-7b", "qwen2.5-1.5b")
WORLD_SIZES = (2, 3, 4, 8, 16, 64)


def _inputs(model: str, precision: str, **changes: Any) -> EstimateInput:
    arch = find_model(model)
    assert arch is not None
    return replace(EstimateInput(arch=arch, precision=precision), **changes)  # type: ignore[arg-type]


def _benchmark(name: str) -> Any:
    """A module of ``benchmarks/`` (not a package), loaded from its file."""
    import importlib.util
    import sys

    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"peftgen_benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _persistent(inputs: EstimateInput) -> int:
    """What stays on the GPU across steps: shards or replicas of weights, adapters,
    gradients and optimizer state (not the gathered working set, not the buffers)."""
    parts = per_gpu_parts(inputs)
    return (
        parts.weights_bytes
        - parts.gathered_weight_bytes
        + parts.adapter_bytes
        + parts.gradient_bytes
        - parts.communication_bytes
        + parts.optimizer_bytes
    )


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero3", "deepspeed-zero2"])
@pytest.mark.parametrize("precision", ["bf16", "4bit"])
@pytest.mark.parametrize("model", MODELS)
def test_sharded_parts_and_loading_never_rise_with_more_gpus(
    model: str, precision: str, engine: str, offload: bool
) -> None:
    rows = []
    for n in WORLD_SIZES:
        inputs = _inputs(model, precision, distributed=engine, world_size=n, cpu_offload=offload)
        parts = per_gpu_parts(inputs)
        rows.append(
            (
                parts.weights_bytes - parts.gathered_weight_bytes,
                parts.adapter_bytes,
                parts.gradient_bytes,
                parts.optimizer_bytes,
                load_peak_bytes(inputs),
            )
        )
    for column in zip(*rows, strict=True):
        assert list(column) == sorted(column, reverse=True), column


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("precision", ["bf16", "4bit"])
@pytest.mark.parametrize("model", MODELS)
def test_persistent_terms_order_zero3_fsdp_below_zero2_below_ddp(
    model: str, precision: str, world: int
) -> None:
    def inputs(engine: str) -> EstimateInput:
        return _inputs(model, precision, distributed=engine, world_size=world)

    def persistent(engine: str) -> int:
        return _persistent(inputs(engine))

    def optimizer(engine: str) -> int:
        return per_gpu_parts(inputs(engine)).optimizer_bytes

    ddp, zero2 = persistent("ddp"), persistent("deepspeed-zero2")
    assert persistent("deepspeed-zero3") <= zero2
    assert persistent("fsdp") <= zero2
    # DeepSpeed steps fp32 partitions (master copy and fp32 AdamW states, 12 B per trained
    # element / N): with bf16 adapters on few GPUs that outweighs DDP's bf16 states, so
    # ZeRO-2 <= DDP holds for everything but the optimizer.
    assert zero2 - optimizer("deepspeed-zero2") <= ddp - optimizer("ddp")


def test_prefetch_depth_sets_the_gathered_layers() -> None:
    base = _inputs("llama3-8b", "bf16", distributed="fsdp", world_size=4)
    pre = gathered_parameter_bytes(base)
    none = gathered_parameter_bytes(
        replace(base, stack=StackProfile(fsdp_backward_prefetch="NONE"))
    )
    assert fsdp_gathered_layer_units(StackProfile()) == 2
    assert none < pre
    unlimited = replace(
        base, stack=StackProfile(fsdp_forward_prefetch=True, fsdp_limit_all_gathers=False)
    )
    assert gathered_parameter_bytes(unlimited) > pre


def test_deepspeed_trains_adapters_in_the_compute_dtype() -> None:
    """deepspeed.initialize casts the module, adapters included, to bf16 (engine.py
    ``_configure_distributed_model``: ``self.module.bfloat16()``) under ZeRO-2 and ZeRO-3;
    FSDP and one GPU keep peft's fp32 upcast."""
    for engine in ("deepspeed-zero2", "deepspeed-zero3"):
        assert adapter_dtype(_inputs("llama3-8b", "bf16", distributed=engine)) == "bf16"
        assert adapter_dtype(_inputs("llama3-8b", "4bit", distributed=engine)) == "bf16"
    assert adapter_dtype(_inputs("llama3-8b", "bf16", distributed="fsdp")) == "fp32"
    assert adapter_dtype(_inputs("llama3-8b", "bf16")) == "fp32"
    # The cast covers every trained tensor: DoRA magnitudes and full copies too.
    extras: dict[str, Any] = {"use_dora": True, "modules_to_save": ("lm_head",)}
    zero2 = _inputs("llama3-8b", "bf16", distributed="deepspeed-zero2", **extras)
    assert set(trainable_tensors(zero2).numel_by_bytes) == {2}
    assert (
        4
        in trainable_tensors(
            _inputs("llama3-8b", "bf16", distributed="fsdp", **extras)
        ).numel_by_bytes
    )


def test_grpo_generation_under_zero3_holds_the_whole_model_on_every_gpu() -> None:
    """trl gathers every parameter for GRPO's generate under ZeRO-3 (GatheredParameters over
    model.parameters(), ds3_gather_for_generation True by default, which the script keeps):
    the generation phase holds the whole model beside the partitions on each GPU, however
    many GPUs. FSDP1 summons only its root unit (recurse=False) and gathers layers as in
    training, so its generation phase keeps the sharded weights."""
    import dataclasses

    from trl import GRPOConfig

    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    assert default["ds3_gather_for_generation"] is True
    script = (REPO / "templates" / "train_grpo.py.j2").read_text(encoding="utf-8")
    assert "ds3_gather_for_generation" not in script
    whole = estimate(_inputs("llama3-8b", "bf16", method="grpo")).weights_bytes
    for world in (2, 8):
        zero3 = _inputs(
            "llama3-8b", "bf16", method="grpo", distributed="deepspeed-zero3", world_size=world
        )
        fsdp = replace(zero3, distributed="fsdp")
        generating = estimate(zero3)
        assert generating.phase == "generation"
        assert generating.weights_bytes >= whole + whole // world - 2**20
        assert generating.gathered_weight_bytes >= whole - 2**20
        assert estimate(fsdp).weights_bytes < whole


@pytest.mark.parametrize("precision", ["bf16", "4bit"])
def test_zero3_without_zero_init_loads_the_whole_model_on_every_gpu(precision: str) -> None:
    """Without zero.Init (a quantized model, whatever the script's order; a script that
    builds its model first) deepspeed.initialize moves the whole module to each GPU
    (engine.py ``self.module.to(self.device)``) and partitions it there, and every process
    reads it into host memory. With it (the emitted 16-bit script) each parameter is
    partitioned as it is created and rank 0 alone reads the checkpoint."""
    world = 8
    zero3 = _inputs("llama3-8b", precision, distributed="deepspeed-zero3", world_size=world)
    if precision == "bf16":
        zero3 = replace(zero3, stack=StackProfile(zero3_init=False))
    one_gpu_weights = estimate(_inputs("llama3-8b", precision)).weights_bytes
    assert load_peak_bytes(zero3) > one_gpu_weights
    assert estimate(zero3).host_memory_bytes >= world * one_gpu_weights
    # The caching allocator keeps the whole model's blocks: reserved stays above it.
    assert estimate(zero3).torch_reserved_bytes > one_gpu_weights
    if precision == "bf16":  # rank 0 reads, units sharded while wrapped / under zero.Init
        assert load_peak_bytes(replace(zero3, distributed="fsdp")) < one_gpu_weights / 2
        init = replace(zero3, stack=StackProfile())
        assert load_peak_bytes(init) < one_gpu_weights / 2
        assert estimate(init).host_memory_bytes <= one_gpu_weights * 1.1
    else:  # the default stack changes nothing for a quantized model
        assert load_peak_bytes(replace(zero3, stack=StackProfile(zero3_init=False))) == (
            load_peak_bytes(zero3)
        )


@pytest.mark.parametrize("precision", ["bf16", "4bit"])
def test_emitted_zero3_script_registers_deepspeeds_config_before_a_16_bit_load(
    precision: str, tmp_path: Path
) -> None:
    """What ``zero3_loads_whole_model`` assumes of the script: a 16-bit model is built after
    ``SFTConfig`` registers DeepSpeed's config (zero.Init; the 2-process ZeRO-3 run in
    test_multigpu sees transformers use it), a quantized one before it (its CPU device map
    would be refused under a registered ZeRO-3 config)."""
    spec = tmp_path / "z3.yaml"
    data = REPO / "specs" / "data" / "clinical_sft.jsonl"
    spec.write_text(
        "name: z3\nmethod: sft\nmodel:\n  id: meta-llama/Meta-Llama-3-8B-Instruct\n"
        f"dataset:\n  path: {json.dumps(str(data))}\n  format: messages\n"
        "hardware:\n  gpu: a100-80gb\n  num_gpus: 2\n  distributed: deepspeed-zero3\n"
        f"precision: {precision}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert peftgen_main(["emit", str(spec), "-o", str(out), "--force"]) == 0
    script = (out / "train.py").read_text(encoding="utf-8")
    assert '"zero_optimization"' in (out / "ds_config.json").read_text(encoding="utf-8")
    assert script.count("SFTConfig(") == 1
    model_load = script.index("AutoModelForCausalLM.from_pretrained(")
    assert (script.index("SFTConfig(") < model_load) is (precision == "bf16")


def test_single_gpu_has_no_sharded_reserve_nor_host_memory() -> None:
    result = estimate(_inputs("llama3-8b", "4bit"))
    assert result.sharded_reserve_bytes == 0
    assert result.host_memory_bytes == 0
    assert result.load_peak_bytes <= result.peak_reserved_bytes


def _plan_json(spec: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = peftgen_main(["plan", str(spec), "--json"])
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code in (0, 3)
    return data


@pytest.mark.parametrize("spec", sorted((REPO / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_specs_loading_peak_fits_the_training_budget(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _plan_json(spec, capsys)
    chosen = next(c for c in data["candidates"] if c["precision"] == data["chosen_precision"])
    assert 0 < chosen["load_peak_bytes"] <= data["budget_bytes"]
    assert "host_memory_bytes" in chosen


def test_70b_fsdp_qlora_loads_on_two_24gb_gpus_only_with_the_recipe(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _plan_json(EXAMPLE_70B, capsys)
    chosen = next(c for c in data["candidates"] if c["precision"] == "4bit")
    assert chosen["load_peak_bytes"] <= data["budget_bytes"]
    # Every process reads the 4-bit model in host memory (transformers 5.24 has no meta
    # path for quantized models): two 4-bit 70B models, ~2 x 37 GiB.
    assert chosen["host_memory_bytes"] > 2 * 35 * 2**30
    # The old recipe (each rank loads the whole 4-bit model on its own GPU) cannot start.
    arch = find_model("llama3-70b")
    assert arch is not None
    per_rank = EstimateInput(
        arch=arch,
        precision="4bit",
        distributed="fsdp",
        world_size=2,
        cpu_offload=True,
        stack=StackProfile(fsdp_load_on_cpu=False),
    )
    assert load_peak_bytes(per_rank) > data["budget_bytes"]


def test_host_memory_too_small_does_not_fit_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = EXAMPLE_70B.read_text(encoding="utf-8")
    assert "cpu_offload: true" in text
    spec = tmp_path / "small-host.yaml"
    spec.write_text(
        text.replace("cpu_offload: true", "cpu_offload: true\n  host_memory_gib: 32"),
        encoding="utf-8",
    )
    data = _plan_json(spec, capsys)
    assert data["fits"] is False
    assert all(not c["host_fits"] for c in data["candidates"])
    assert any(s["change"] == {"hardware.cpu_offload": False} for s in data["suggestions"])
    # The GPU peaks fit: the reason names host memory as what is over, not the GPU budget.
    assert all(c["peak_reserved_bytes"] <= data["budget_bytes"] for c in data["candidates"])
    (reason,) = (d["reason"] for d in data["decisions"] if d["knob"] == "precision")
    assert "of host memory per node, over the 32 GiB hardware.host_memory_gib" in reason
    assert "budget" not in reason.split("(peaks:")[0]
    roomy = tmp_path / "roomy-host.yaml"
    roomy.write_text(
        text.replace("cpu_offload: true", "cpu_offload: true\n  host_memory_gib: 256"),
        encoding="utf-8",
    )
    assert _plan_json(roomy, capsys)["fits"] is True


def test_when_loading_is_what_the_host_cannot_hold_the_advice_is_a_bigger_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """64 GiB of host RAM: the offloaded state (about 39 GiB) fits, loading (every process
    reads the 4-bit 70B, about 76 GiB) does not. Turning offload off does not help (it was
    the only suggestion, and off it suggested on again); the RAM the run needs does."""
    text = EXAMPLE_70B.read_text(encoding="utf-8")
    spec = tmp_path / "host-64.yaml"
    spec.write_text(
        text.replace("cpu_offload: true", "cpu_offload: true\n  host_memory_gib: 64"),
        encoding="utf-8",
    )
    data = _plan_json(spec, capsys)
    assert data["fits"] is False
    changes = [s["change"] for s in data["suggestions"]]
    assert {"hardware.cpu_offload": False} not in changes
    (bigger,) = (c for c in changes if "hardware.host_memory_gib" in c)
    applied = tmp_path / "host-bigger.yaml"
    applied.write_text(
        text.replace(
            "cpu_offload: true",
            f"cpu_offload: true\n  host_memory_gib: {bigger['hardware.host_memory_gib']}",
        ),
        encoding="utf-8",
    )
    assert _plan_json(applied, capsys)["fits"] is True


def test_emitted_fsdp_qlora_script_quantizes_in_host_memory(tmp_path: Path) -> None:
    out = tmp_path / "70b"
    assert peftgen_main(["emit", str(EXAMPLE_70B), "-o", str(out), "--force"]) == 0
    script = (out / "train.py").read_text(encoding="utf-8")
    assert 'device_map = {"": "cpu"}' in script
    assert "local_process_index} if torch.cuda" not in script
    assert "bnb_4bit_quant_storage=torch.bfloat16" in script
    config = (out / "accelerate_config.yaml").read_text(encoding="utf-8")
    assert "fsdp_cpu_ram_efficient_loading: true" in config
    assert "fsdp_version: 1" in config


def test_every_sharded_row_is_in_the_published_table() -> None:
    """Each measured number the sharded rows compare with is in its row of
    ``benchmarks/published.md`` (GB or GiB, as published)."""
    import re

    sharded_rows = _benchmark("accuracy").sharded_rows
    table: dict[int, str] = {}
    for line in (REPO / "benchmarks" / "published.md").read_text(encoding="utf-8").splitlines():
        found = re.match(r"\| (\d+) \|", line)
        if found:
            table[int(found.group(1))] = line
    rows = sharded_rows()
    assert len(rows) >= 6
    for row in rows:
        number = re.match(r"\d+", row.label)
        assert number is not None and int(number.group()) in table, row.label
        line = table[int(number.group())]
        shown = [f"{row.measured_bytes / 1e9:.2f}", f"{row.measured_bytes / 2**30:.2f}"]
        short = [f"{row.measured_bytes / 1e9:.1f}", f"{row.measured_bytes / 2**30:.1f}"]
        assert any(text in line for text in shown + short), (row.label, shown, line)
        assert row.note, row.label


def test_a_4bit_model_loaded_on_the_cpu_has_no_device_map_for_accelerate_to_refuse() -> None:
    """The recipe's load: bitsandbytes quantizes on the CPU (bf16 storage), and a one-device
    map is not dispatched (transformers modeling_utils: only maps with several devices or
    disk), so the model carries no ``hf_device_map`` and accelerate's check that a 4-bit
    model sits on the process's GPU (accelerator.py ``prepare_model``) does not apply;
    FSDP / ZeRO-3 place the units."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        REPO / "specs" / "tiny-llama",
        dtype=torch.bfloat16,
        quantization_config=config,
        device_map={"": "cpu"},
    )
    assert getattr(model, "hf_device_map", None) is None
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert packed.dtype == torch.bfloat16 and packed.device.type == "cpu"
    assert packed.quant_state is not None


@pytest.mark.slow
def test_sharded_simulation_agrees_with_the_analytic_figure(tmp_path: Path) -> None:
    """One FSDP step on fake tensors (fake process group, rank 0 of 2) for Llama-3-8B
    QLoRA: the analytic per-GPU allocated peak of the same engine is within 5 %."""
    result = _benchmark("simulate_sharded").run("llama3-8b", "4bit", 2)
    assert result.by_category.get("All Gather", 0) > 0
    assert abs(result.error) <= 0.05, result.to_json()


# --------------------------------------------------------------------------- issue 13 rows


def _live_peaks(run: Any) -> tuple[int, int, int]:
    """Run ``run(tracker, mode)`` on fake tensors with the simulation's storage tracker fed
    by every op's outputs; return the live bytes ``run`` records as its base and the peaks
    of the two phases it opens (forward, backward)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from peftgen.simulate import _StorageTracker

    tracker = _StorageTracker()

    class Live(TorchDispatchMode):  # type: ignore[misc]
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    tracker.track(leaf)
            return out

    with FakeTensorMode(allow_non_fake_inputs=True):
        base = run(tracker, Live)
    forward, backward = tracker.phases
    return base, forward.peak_bytes, backward.peak_bytes


LOSS_ROWS, LOSS_SEQ, LOSS_HIDDEN, LOSS_VOCAB = 2, 256, 16, 2048


def _loss_peaks_per_entry(loss_lines: Any, held: bool) -> tuple[float, float]:
    """Forward and backward peaks, in bytes per (token x vocabulary entry) above the inputs,
    of ``loss_lines(states, head, labels) -> (loss, logits)`` on torch's autograd over fake
    tensors; ``held``: the loop still holds ``[loss, logits]`` through the backward."""
    import torch

    def run(tracker: Any, live: Any) -> int:
        states = torch.empty(LOSS_ROWS, LOSS_SEQ, LOSS_HIDDEN, dtype=torch.bfloat16).requires_grad_(
            True
        )
        head = torch.empty(LOSS_VOCAB, LOSS_HIDDEN, dtype=torch.bfloat16)
        labels = torch.zeros(LOSS_ROWS, LOSS_SEQ, dtype=torch.long)
        for tensor in (states, head, labels):
            tracker.track(tensor)
        base = int(tracker.live_bytes)
        with live():
            with tracker.phase("forward"):
                loss, logits = loss_lines(states, head, labels)
                output = [loss, logits]
                del logits
            if not held:
                output.clear()
            with tracker.phase("backward"):
                loss.backward()
        return base

    base, forward, backward = _live_peaks(run)
    entries = LOSS_ROWS * LOSS_SEQ * LOSS_VOCAB
    return (forward - base) / entries, (backward - base) / entries


@pytest.mark.parametrize("held", [False, True])
def test_shifted_loss_backward_peak_matches_torch_autograd(held: bool) -> None:
    """transformers < 4.46's loss lines (``logits.float()``, the contiguous shifted copy,
    ``CrossEntropyLoss``) run through torch's own autograd on fake tensors: the forward
    peaks at FULL_LOGITS_BYTES_PER_ENTRY and the backward at loss_backward_bytes_per_entry
    bytes per (token x vocabulary entry), 4 B more when the loop holds the output."""
    import torch

    from peftgen.memory import FULL_LOGITS_BYTES_PER_ENTRY, loss_backward_bytes_per_entry

    def shifted(states: Any, head: Any, labels: Any) -> tuple[Any, Any]:
        logits = torch.nn.functional.linear(states, head).float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, LOSS_VOCAB), shift_labels.view(-1))
        return loss, logits

    forward, backward = _loss_peaks_per_entry(shifted, held)
    stack = StackProfile(loss_path="full_logits_fp32_shifted", loss_output_held=held)
    assert forward == pytest.approx(
        FULL_LOGITS_BYTES_PER_ENTRY["full_logits_fp32_shifted"], rel=0.02
    )
    assert backward == pytest.approx(loss_backward_bytes_per_entry(stack), rel=0.02)


@pytest.mark.parametrize("held", [False, True])
def test_plain_fp32_loss_backward_peak_matches_torch_autograd(held: bool) -> None:
    """transformers >= 4.46's ``ForCausalLMLoss`` (loss/loss_utils.py: ``logits.float()``,
    labels padded and shifted instead of the logits, ``cross_entropy``) on torch's own
    autograd over fake tensors: the forward peaks at FULL_LOGITS_BYTES_PER_ENTRY (the
    model's bf16 logits, their fp32 copy, the saved log-softmax) and the backward at
    loss_backward_bytes_per_entry, 2 B more when the loop still holds the bf16 output."""
    import torch

    from peftgen.memory import FULL_LOGITS_BYTES_PER_ENTRY, loss_backward_bytes_per_entry

    def plain(states: Any, head: Any, labels: Any) -> tuple[Any, Any]:
        logits = torch.nn.functional.linear(states, head)
        padded = torch.nn.functional.pad(labels, (0, 1), value=-100)
        shift_labels = padded[..., 1:].contiguous()
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, LOSS_VOCAB), shift_labels.view(-1), ignore_index=-100
        )
        return loss, logits

    forward, backward = _loss_peaks_per_entry(plain, held)
    stack = StackProfile(loss_path="full_logits_fp32", loss_output_held=held)
    assert forward == pytest.approx(FULL_LOGITS_BYTES_PER_ENTRY["full_logits_fp32"], rel=0.02)
    assert backward == pytest.approx(loss_backward_bytes_per_entry(stack), rel=0.02)


def test_transformers_4_38_mask_is_max_positions_sized_and_checkpointed() -> None:
    """StackProfile.causal_mask_max_positions: every SDPA layer gets a mask, the model's
    mask is [rows, 1, P, P] whatever the sequence, kept with checkpointing only, and the
    bool buffer is replicated (never sharded) per GPU."""
    from peftgen.memory import (
        kept_activation_bytes,
        masked_attention_layer_count,
        max_positions_causal_mask_bytes,
        model_buffer_bytes,
    )

    stack = StackProfile(causal_mask_max_positions=True)
    inputs = _inputs("llama3-8b", "4bit", stack=stack, micro_batch=2, max_length=512)
    positions = inputs.arch.config.max_position_embeddings
    assert masked_attention_layer_count(inputs) == inputs.arch.config.num_hidden_layers
    assert max_positions_causal_mask_bytes(inputs) == 2 * positions * positions * 2
    assert max_positions_causal_mask_bytes(replace(inputs, max_length=1024)) == (
        max_positions_causal_mask_bytes(inputs)
    )
    pinned = replace(inputs, stack=StackProfile())
    assert masked_attention_layer_count(pinned) == 0
    grown = kept_activation_bytes(inputs) - kept_activation_bytes(pinned)
    assert grown == max_positions_causal_mask_bytes(inputs)
    no_gc = replace(inputs, gradient_checkpointing=False)
    assert (
        kept_activation_bytes(no_gc) - kept_activation_bytes(replace(no_gc, stack=StackProfile()))
        == inputs.arch.config.num_hidden_layers * 2 * 512 * 512 * 2
    )  # the per-layer slices
    assert model_buffer_bytes(inputs) == positions * positions
    for world in (2, 8):  # buffers are moved with their unit, never sharded
        parts = per_gpu_parts(replace(inputs, distributed="fsdp", world_size=world))
        pinned_parts = per_gpu_parts(replace(pinned, distributed="fsdp", world_size=world))
        assert parts.weights_bytes - pinned_parts.weights_bytes == model_buffer_bytes(inputs)


def test_fsdp_no_sync_keeps_unsharded_gradients_as_torchs_fsdp_does() -> None:
    """torch's FSDP2 (fake process group, rank 0 of 2, FSDPMemTracker) keeps each unit's
    whole gradient under ``set_requires_gradient_sync(False)`` and only the shard after the
    syncing micro-batch; the estimate counts the unsharded gradients for gradient
    accumulation under FSDP, whatever the GPU count, and nothing without accumulation."""
    import torch
    from torch import nn
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import fully_shard

    from peftgen.memory import fsdp_no_sync_gradient_bytes
    from peftgen.simulate_sharded import fake_process_group

    with fake_process_group(2) as mesh:
        model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        full = sum(p.numel() for p in model.parameters()) * 4

        def grads(snapshot: dict[Any, dict[Any, int]]) -> tuple[int, int]:
            kinds = {str(k): v for per_device in snapshot.values() for k, v in per_device.items()}
            return kinds["_FSDPRefType.UNSHARDED_GRAD"], kinds["_FSDPRefType.SHARDED_GRAD"]

        with FSDPMemTracker(model) as tracker:
            model.set_requires_gradient_sync(False)  # type: ignore[operator]
            model(torch.randn(4, 64)).sum().backward()
            assert grads(tracker.get_tracker_snapshot("current")) == (full, 0)
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
            model(torch.randn(4, 64)).sum().backward()
            assert grads(tracker.get_tracker_snapshot("current")) == (0, full // 2)

    base = _inputs("llama3-8b", "4bit", distributed="fsdp", gradient_accumulation_steps=4)
    numel = sum(trainable_tensors(base).numel_by_bytes.values())
    for world in (2, 8):
        inputs = replace(base, world_size=world)
        # the unsharded gradients in the compute dtype (bf16 under mixed precision)
        assert fsdp_no_sync_gradient_bytes(inputs) == 2 * numel
        parts = per_gpu_parts(inputs)
        assert parts.gradient_bytes - parts.communication_bytes == 2 * numel
        offloaded = per_gpu_parts(replace(inputs, cpu_offload=True))
        assert offloaded.gradient_bytes - offloaded.communication_bytes == 2 * numel
    assert fsdp_no_sync_gradient_bytes(replace(base, gradient_accumulation_steps=1)) == 0
    assert fsdp_no_sync_gradient_bytes(replace(base, distributed="deepspeed-zero3")) == 0


def test_deepspeed_buckets_are_reduce_bucket_sized_however_few_are_trained() -> None:
    """stage_1_and_2.py / stage3.py allocate ``torch.empty(reduce_bucket_size)``: the
    buffers do not shrink with the adapter; peftgen's ds_config writes the profile's
    default; ZeRO-3 adds a bucket-sized copy only when the trained elements overflow it."""
    from peftgen.launch import deepspeed_config_dict
    from peftgen.memory import DEEPSPEED_BUCKET_ELEMENTS, zero_bucket_bytes

    assert StackProfile().zero_reduce_bucket_elements == DEEPSPEED_BUCKET_ELEMENTS
    spec = SimpleNamespace(
        hardware=SimpleNamespace(distributed="deepspeed-zero3", cpu_offload=False)
    )
    zero = deepspeed_config_dict(spec)["zero_optimization"]  # type: ignore[arg-type]
    assert zero["reduce_bucket_size"] == StackProfile().zero_reduce_bucket_elements
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    for engine, buffers in (("deepspeed-zero2", 2), ("deepspeed-zero3", 1)):
        small = _inputs("llama3-8b", "4bit", distributed=engine, world_size=2, lora_r=4)
        large = replace(small, lora_r=16)  # still under one bucket
        assert zero_bucket_bytes(small) == zero_bucket_bytes(large)
        assert zero_bucket_bytes(small) == buffers * DEEPSPEED_BUCKET_ELEMENTS * 2
    full = _inputs("llama3-8b", "bf16", distributed="deepspeed-zero3", finetuning="full")
    assert zero_bucket_bytes(full) == 2 * DEEPSPEED_BUCKET_ELEMENTS * 2
    default = replace(small, stack=StackProfile(zero_reduce_bucket_elements=500_000_000))
    assert zero_bucket_bytes(default) == 10 * zero_bucket_bytes(small)


def test_zero3_keeps_the_last_layer_within_the_reuse_distance() -> None:
    """PartitionedParameterCoordinator.__params_to_release: the last layer is met again
    (the head twice, then its recompute) within stage3_max_reuse_distance elements, the one
    below it is not; no retention with a zero distance; more with a larger one. Llama 3's
    128k-entry head alone (twice) exceeds the default distance: nothing retained."""
    from peftgen.memory import layer_unit_bytes, zero3_reuse_retained_bytes

    inputs = _inputs("mistral-7b", "bf16", distributed="deepspeed-zero3", world_size=2)
    layer = layer_unit_bytes(inputs)
    assert zero3_reuse_retained_bytes(inputs) == layer
    llama3 = _inputs("llama3-8b", "bf16", distributed="deepspeed-zero3", world_size=2)
    assert zero3_reuse_retained_bytes(llama3) == 0
    none = replace(inputs, stack=StackProfile(zero3_max_reuse_distance=0))
    assert zero3_reuse_retained_bytes(none) == 0
    far = replace(inputs, stack=StackProfile(zero3_max_reuse_distance=10**10))
    assert zero3_reuse_retained_bytes(far) > layer
    assert gathered_parameter_bytes(inputs) - gathered_parameter_bytes(none) == layer


def test_deepspeed_steps_fp32_optimizer_states() -> None:
    """ZeRO's optimizer steps DeepSpeed's fp32 partitions: AdamW states are fp32 (8 B per
    trained element) next to the fp32 master (4 B), sharded, even for bf16 adapters."""
    inputs = _inputs("llama3-8b", "4bit", distributed="deepspeed-zero2", world_size=4)
    numel = sum(trainable_tensors(inputs).numel_by_bytes.values())
    assert per_gpu_parts(inputs).optimizer_bytes == math.ceil(12 * numel / 4)


def test_fsdp_offload_copies_take_a_pool_of_their_own() -> None:
    """FSDP1 CPU offload: the pre-unshard stream's copies of the CPU shards are reserved
    (the larger of the root's shard and two layer shards), never allocated at the peak."""
    from peftgen.memory import fsdp_offload_copy_pool_bytes, layer_unit_bytes, root_unit_bytes

    inputs = _inputs("llama3-8b", "4bit", distributed="fsdp", world_size=2)
    offload = replace(inputs, cpu_offload=True)
    assert fsdp_offload_copy_pool_bytes(inputs) == 0
    expected = max(
        math.ceil(root_unit_bytes(offload) / 2), 2 * math.ceil(layer_unit_bytes(offload) / 2)
    )
    assert fsdp_offload_copy_pool_bytes(offload) == expected
    fsdp2 = replace(offload, stack=StackProfile(fsdp_version=2))
    assert fsdp_offload_copy_pool_bytes(fsdp2) == 0
    with_pool, without = (
        estimate(offload),
        estimate(replace(offload, stack=StackProfile(collectives_on_own_stream=False))),
    )
    assert with_pool.peak_allocated_bytes == without.peak_allocated_bytes
    assert with_pool.torch_reserved_bytes - without.torch_reserved_bytes >= expected


# ------------------------------------------------- the LoRA adapter saved under FSDP1 (2 CPUs)

ADAPTER_WORKER = '''\
"""One rank: a LoRA model wrapped as accelerate and transformers wrap it under FSDP1 (the
emitted plugin settings from the environment, peft's auto-wrap policy), then the adapter
as the Trainer saves it (final save, checkpoint) and loads it (--resume)."""
import importlib.util
import json
import os
import sys

import accelerate.utils.dataclasses as accelerate_dataclasses
import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import _get_model_state_dict, _set_model_state_dict
from peft import LoraConfig, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors import safe_open
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM

model_dir, script, out_dir, mode = sys.argv[1:5]
if mode == "patched":  # the emitted script's fixes, imported from the script itself
    spec = importlib.util.spec_from_file_location("emitted_train", script)
    emitted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emitted)
    emitted.fix_peft_adapter_io_under_fsdp()
    emitted.keep_fsdp_buffers_fp32()
dist.init_process_group("gloo")
rank = dist.get_rank()
accelerate_dataclasses.is_cuda_available = lambda: True
torch.cuda.current_device = lambda: 0
plugin = FullyShardedDataParallelPlugin()
plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])  # accelerate/state.py
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
torch.manual_seed(0)
trained = {}
for name, param in model.named_parameters():
    if "lora_B" in name:
        param.data.normal_(0, 0.02)  # what training does to lora_B (it starts at zero)
        trained[name] = param.detach().clone()
wrapped = FSDP(
    model,
    sharding_strategy=plugin.sharding_strategy,
    auto_wrap_policy=fsdp_auto_wrap_policy(model),  # transformers' update_fsdp_plugin_peft
    use_orig_params=plugin.use_orig_params,
    limit_all_gathers=plugin.limit_all_gathers,
    mixed_precision=plugin.mixed_precision_policy,
    device_id=torch.device("cpu"),
)
# FSDP casts the buffers at its first forward (under the Trainer's bf16 autocast).
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    wrapped(input_ids=torch.tensor([[1, 2, 3]]))
report_rope = str(wrapped.module.base_model.model.model.rotary_emb.inv_freq.dtype)
config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
    full = wrapped.state_dict()  # accelerate's get_state_dict, what save_model passes on
    checkpoint = _get_model_state_dict(wrapped, adapter_only=True)  # save_fsdp_model
report = {"checkpoint_keys": len(checkpoint), "inv_freq": report_rope}
adapter_dir = os.path.join(out_dir, mode)
if rank == 0:
    wrapped.module.save_pretrained(adapter_dir, state_dict=full)  # Trainer._save
dist.barrier()
with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as saved:
    report["saved_lora_b"] = sum("lora_B" in key for key in saved.keys())
# --resume: zero the adapter, then load the checkpoint's adapter back (load_fsdp_model).
with FSDP.summon_full_params(wrapped, writeback=True):
    for name, param in wrapped.module.named_parameters():
        if "lora_B" in name:
            param.data.zero_()
with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
    _set_model_state_dict(wrapped, checkpoint, adapter_only=True)
with FSDP.summon_full_params(wrapped):
    restored = {
        name.replace("_fsdp_wrapped_module.", ""): param.detach().clone()
        for name, param in wrapped.module.named_parameters()
        if "lora_B" in name
    }
report["restored"] = all(torch.equal(restored[name], value) for name, value in trained.items())
report["lora_b"] = len(trained)
with open(os.path.join(out_dir, f"{mode}-rank{rank}.json"), "w") as f:
    json.dump(report, f)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")
@pytest.mark.parametrize("mode", ["peft", "patched"])
def test_lora_adapter_and_rope_under_fsdp_are_kept_whole(
    mode: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """peft 0.21.2 alone saves an FSDP1 LoRA adapter empty (the control, ``peft``): module
    names inside FSDP's nested units keep their ``_fsdp_wrapped_module.`` segment, and no
    state-dict key matches. With the emitted script's ``fix_peft_adapter_io_under_fsdp``
    (``patched``) the final save and the checkpoint hold every LoRA weight, and loading the
    checkpoint into the FSDP wrapper (what --resume does) restores them. The same control
    shows accelerate's mixed precision rounding RoPE's inv_freq to bf16; the script's
    ``keep_fsdp_buffers_fp32`` keeps it fp32.
    Two CPU processes (gloo), the emitted FSDP settings. When peft fixes this, the control
    fails: drop the patch (``stack.peft_misses_adapter_keys_under_fsdp``)."""
    import os
    import subprocess
    import sys

    from test_full_sharded import _free_port, _fsdp_environment
    from test_multigpu import _tiny_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(_tiny_spec(tiny_model_dir, "fsdp"), encoding="utf-8")
    emitted = tmp_path / "emitted"
    assert peftgen_main(["emit", str(spec), "-o", str(emitted)]) == 0
    assert "fix_peft_adapter_io_under_fsdp()" in (emitted / "train.py").read_text()
    worker = tmp_path / "worker.py"
    worker.write_text(ADAPTER_WORKER, encoding="utf-8")
    env = {
        **os.environ,
        **_fsdp_environment(emitted / "accelerate_config.yaml"),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(_free_port()), str(worker), str(tiny_model_dir)]
    command += [str(emitted / "train.py"), str(tmp_path), mode]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{mode}-rank{rank}.json").read_text())
        if mode == "peft":
            assert report["checkpoint_keys"] == report["saved_lora_b"] == 0, report
            assert report["inv_freq"] == "torch.bfloat16", report
        else:
            assert report["inv_freq"] == "torch.float32", report
            assert report["saved_lora_b"] == report["lora_b"] > 0, report
            assert report["checkpoint_keys"] == 2 * report["lora_b"], report
            assert report["restored"], report


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dataset": {"chat_template": "chatml"}}, "dataset.chat_template"),
        ({"lora": {"modules_to_save": ["lm_head"]}}, "lora.modules_to_save"),
    ],
)
def test_whole_modules_next_to_lora_are_refused_under_fsdp_only(
    changes: dict[str, dict[str, object]], field: str
) -> None:
    """peft 0.21.2 lists a modules_to_save copy's keys through its state_dict() while the
    main process alone saves: under FSDP that is an all-gather the other processes never
    join, and the save hangs (seen on two CPU processes: rank 0 in FSDP's
    ``_all_gather_flat_param`` from ``ModulesToSaveWrapper.adapter_state_dict``, rank 1 at
    the barrier). Refused with the engines that can run it; DeepSpeed and DDP are not."""
    from pydantic import ValidationError

    from peftgen.spec import SPEC_ADAPTER

    def spec(engine: str, **extra: object) -> dict[str, object]:
        dataset = {"path": "rows.jsonl", "format": "messages", **changes.get("dataset", {})}
        return {
            "name": "x",
            "method": "sft",
            "model": {"id": "HuggingFaceTB/SmolLM2-360M"},
            "dataset": dataset,
            "hardware": {"gpu": "rtx-4090", "num_gpus": 2, "distributed": engine},
            **({"lora": changes["lora"]} if "lora" in changes else {}),
            **extra,
        }

    with pytest.raises(ValidationError, match=f"{field}: .* under fsdp .* deepspeed-zero3"):
        SPEC_ADAPTER.validate_python(spec("fsdp"))
    for engine in ("ddp", "deepspeed-zero2", "deepspeed-zero3"):
        assert SPEC_ADAPTER.validate_python(spec(engine)).hardware.distributed == engine
    if "lora" not in changes:  # full fine-tuning trains every weight: nothing to list
        full = SPEC_ADAPTER.validate_python(spec("fsdp", finetuning="full"))
        assert full.finetuning == "full"
