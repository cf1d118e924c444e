"""The throughput model (``peftgen.throughput``): physical bounds, the terms' independent
facts, the calibration's constants against the benchmark that derives them, and what
``plan`` shows.

Oracles that do not restate the implementation: the published parameter counts of the
catalogue (forward FLOPs ~ 2 x parameters per token, Kaplan et al.'s rule), each GPU's
datasheet peak (no estimate may beat it), the benchmark's own derivation of the factors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftgen import throughput
from peftgen.catalog import find_gpu, find_model, gpu_catalogue, model_catalogue
from peftgen.memory import EstimateInput

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

LLAMA3_8B = find_model("meta-llama/Meta-Llama-3-8B-Instruct")
GPUS = gpu_catalogue()
TEXT_MODELS = [m for m in model_catalogue() if m.published_parameters]


def _inputs(**changes: object) -> EstimateInput:
    assert LLAMA3_8B is not None
    base = EstimateInput(arch=LLAMA3_8B, precision="bf16", max_length=2048, micro_batch=1)
    return replace(base, **changes)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- GPU data


def test_every_catalogue_gpu_has_datasheet_peaks_with_sources() -> None:
    for gpu in GPUS:
        figures = gpu.throughput
        assert figures is not None, gpu.name
        assert figures.fp16_source and figures.bandwidth_source, gpu.name
        # bf16 tensor cores exactly where the catalogue says the GPU has bf16.
        assert (figures.dense_bf16_tflops is not None) == gpu.bf16, gpu.name
        assert (figures.bf16_source != "") == gpu.bf16, gpu.name
        # Dense, not the 2:4-sparse figure: no single GPU here reaches 2.5 PFLOP/s dense.
        assert 10 < figures.dense_fp16_tflops < 2500, gpu.name
        assert 250 <= figures.memory_bandwidth_gb_s <= 8000, gpu.name


def test_known_dense_figures() -> None:
    """Spot checks against the datasheets' headline numbers (sparse / 2 where printed)."""
    expected = {"a100-80gb": 312, "h100-sxm": 989.4, "rtx-4090": 165.2, "l4": 121, "t4": 65}
    for name, tflops in expected.items():
        gpu = find_gpu(name)
        assert gpu is not None and gpu.throughput is not None
        assert gpu.throughput.dense_fp16_tflops == pytest.approx(tflops)


# ----------------------------------------------------------------------------- the terms


def test_forward_flops_are_twice_the_multiplied_parameters() -> None:
    """Kaplan's rule: forward ~ 2 N FLOPs per token, N the non-embedding parameters plus
    the head; Llama-3-8B publishes 8.03 B parameters, 0.525 B of them the embedding."""
    flops = throughput.forward_matmul_flops_per_token(_inputs(lora_r=1))
    assert flops == pytest.approx(2 * (8.03e9 - 0.525e9), rel=0.01)


def test_lora_pays_no_weight_gradient_for_frozen_weights() -> None:
    inputs = _inputs(lora_r=16)
    forward = throughput.forward_matmul_flops_per_token(inputs)
    weight_grad = throughput.backward_weight_gradient_flops_per_token(inputs)
    # Full fine-tuning's weight gradient costs a forward; LoRA r16's about 1 % of one.
    assert weight_grad < 0.02 * forward
    assert throughput.backward_input_gradient_flops_per_token(inputs) == forward
    # A trained head (modules_to_save) does pay its weight gradient.
    head = throughput.backward_weight_gradient_flops_per_token(
        _inputs(lora_r=16, modules_to_save=("lm_head",))
    )
    assert head - weight_grad == pytest.approx(2 * 128256 * 4096)


def test_full_finetuning_pays_every_weight_gradient_and_the_casts() -> None:
    full = _inputs(finetuning="full")
    forward = throughput.forward_matmul_flops_per_token(full)
    assert throughput.backward_weight_gradient_flops_per_token(full) == forward
    assert throughput.lora_matmul_parameters(full) == 0
    gpu = find_gpu("a100-80gb")
    assert gpu is not None
    terms = throughput.step_seconds_per_term(full, gpu)
    lora = throughput.step_seconds_per_term(_inputs(), gpu)
    assert terms is not None and lora is not None
    assert terms["weight_cast"] > 0 and lora["weight_cast"] == 0
    # Full fine-tuning's step: about 4/3 of LoRA's matmul work (6N vs 4N per token with the
    # recompute: 8N vs 6N), plus its optimizer over every parameter.
    assert 1.25 < terms["matmul"] / lora["matmul"] < 1.6
    assert terms["optimizer"] > 100 * lora["optimizer"]


def test_checkpointing_recomputes_the_decoder_forward() -> None:
    on = throughput.training_flops_per_token(_inputs(gradient_checkpointing=True))
    off = throughput.training_flops_per_token(_inputs(gradient_checkpointing=False))
    head = 2 * 128256 * 4096
    forward = throughput.forward_matmul_flops_per_token(_inputs())
    attention = throughput.attention_forward_flops_per_token(_inputs())
    assert on - off == pytest.approx(forward - head + attention)
    # A LoRA step's forward is about a third of it: recomputing it costs 40-50 % more.
    assert 1.35 < on / off < 1.5


def test_the_plan_quotes_the_recompute_the_time_model_counts() -> None:
    """plan's gradient_checkpointing reason says how much more compute the throughput
    model counts for the spec (it once said ~30 % for every spec: LoRA's is ~45 %)."""
    from peftgen.load import load_spec
    from peftgen.plan import estimate_input, make_plan
    from peftgen.resolve import resolve

    for name in ("llama3-8b-clinical-qlora.yaml", "qwen2.5-0.5b-instruct-full.yaml"):
        resolved = resolve(load_spec(REPO / "specs" / name))
        plan = make_plan(resolved)
        assert plan.chosen_precision is not None
        inputs = estimate_input(resolved, plan.chosen_precision)
        on = throughput.training_flops_per_token(replace(inputs, gradient_checkpointing=True))
        off = throughput.training_flops_per_token(replace(inputs, gradient_checkpointing=False))
        reason = next(d.reason for d in plan.decisions if d.knob == "gradient_checkpointing")
        assert f"~{on / off - 1:.0%} more compute" in reason, (name, reason)


def test_eager_attention_computes_the_masked_half() -> None:
    flash = throughput.attention_forward_flops_per_token(_inputs(attn_implementation="sdpa"))
    eager = throughput.attention_forward_flops_per_token(_inputs(attn_implementation="eager"))
    assert eager == pytest.approx(2 * flash)
    # Quadratic: twice the length, twice the attention FLOPs per token.
    longer = throughput.attention_forward_flops_per_token(_inputs(max_length=4096))
    assert longer == pytest.approx(2 * flash)


def test_quantised_loading_adds_dequantisation_and_slows_the_step() -> None:
    gpu = find_gpu("a100-80gb")
    assert gpu is not None
    seconds = {}
    for precision in ("bf16", "8bit", "4bit"):
        terms = throughput.step_seconds_per_term(_inputs(precision=precision), gpu)
        assert terms is not None
        seconds[precision] = terms
    assert seconds["bf16"]["dequantization"] == 0
    assert seconds["4bit"]["dequantization"] > 0 and seconds["8bit"]["dequantization"] > 0
    assert sum(seconds["4bit"].values()) > sum(seconds["bf16"].values())


def test_dpo_pays_chosen_rejected_and_a_reference_forward() -> None:
    gpu = find_gpu("a100-80gb")
    assert gpu is not None
    sft = throughput.estimate_time(_inputs(), gpu)
    dpo = throughput.estimate_time(_inputs(method="dpo"), gpu)
    assert sft is not None and dpo is not None
    assert dpo.tokens_per_step == 2 * sft.tokens_per_step
    assert dpo.seconds_per_term["reference"] > 0
    # Per token the reference forward costs about a third of a training token.
    assert 1.2 < dpo.flops_per_token / sft.flops_per_token < 1.45


def test_grpo_generation_is_bandwidth_bound() -> None:
    """Decoding reads the weights once per generated token: a GPU with more bandwidth and
    the same compute generates faster, and longer completions take proportionally longer."""
    a100_40, a100_80 = find_gpu("a100-40gb"), find_gpu("a100-80gb")  # 1555 vs 2039 GB/s
    assert a100_40 is not None and a100_80 is not None
    inputs = _inputs(method="grpo", micro_batch=4, gradient_accumulation_steps=2, max_length=64)
    slow = throughput.step_seconds_per_term(inputs, a100_40)
    fast = throughput.step_seconds_per_term(inputs, a100_80)
    assert slow is not None and fast is not None
    assert slow["matmul"] == pytest.approx(fast["matmul"])  # same peak FLOP/s
    # The host's per-layer launch overhead is the same on both: the rest scales with
    # bandwidth (2039 / 1555 = 1.31).
    host = 256 * 32 * throughput.DECODE_STEP_OVERHEAD_SECONDS_PER_LAYER
    assert (slow["generation"] - host) / (fast["generation"] - host) == pytest.approx(
        2039 / 1555, rel=0.05
    )
    short = throughput.step_seconds_per_term(replace(inputs, max_completion_length=128), a100_80)
    assert short is not None
    assert fast["generation"] == pytest.approx(2 * short["generation"], rel=0.05)


def test_vllm_generation_beats_eager_generate() -> None:
    """vLLM's CUDA graphs remove the per-layer host overhead of eager ``generate``; it pays
    a weight sync per step instead."""
    gpu = find_gpu("a100-80gb")
    assert gpu is not None
    inputs = _inputs(method="grpo", micro_batch=4, gradient_accumulation_steps=2)
    eager = throughput.step_seconds_per_term(inputs, gpu)
    vllm = throughput.step_seconds_per_term(replace(inputs, vllm_mode="colocate"), gpu)
    assert eager is not None and vllm is not None
    assert vllm["generation"] < eager["generation"]
    sync = throughput.vllm_weight_sync_bytes(replace(inputs, vllm_mode="colocate"))
    assert sync >= 3 * 2 * 8.03e9 * 0.99  # three bf16 copies of Llama-3-8B's weights


# ----------------------------------------------------------------------------- physics


@settings(max_examples=150, deadline=None)
@given(
    gpu=st.sampled_from(GPUS),
    arch=st.sampled_from(TEXT_MODELS),
    precision=st.sampled_from(["bf16", "8bit", "4bit"]),
    method=st.sampled_from(["sft", "dpo", "grpo"]),
    micro_batch=st.integers(1, 8),
    max_length=st.sampled_from([128, 512, 2048, 8192]),
    checkpointing=st.booleans(),
    attn=st.sampled_from(["sdpa", "eager", "flash_attention_2"]),
    world=st.sampled_from([1, 2, 8]),
    full=st.booleans(),
)
def test_predicted_tokens_per_second_never_beats_the_peak(
    gpu, arch, precision, method, micro_batch, max_length, checkpointing, attn, world, full
) -> None:
    inputs = EstimateInput(
        arch=arch,
        finetuning="full" if full else "lora",
        precision="bf16" if full else precision,
        method=method,
        compute_dtype="bf16" if gpu.bf16 else "fp16",
        micro_batch=micro_batch,
        max_length=max_length,
        gradient_checkpointing=checkpointing,
        attn_implementation=attn,
        world_size=world,
        distributed="ddp" if world > 1 else "none",
    )
    estimate = throughput.estimate_time(inputs, gpu)
    assert estimate is not None
    peak = estimate.peak_tflops * 1e12
    bound = world * peak / estimate.flops_per_token
    assert estimate.tokens_per_second <= bound
    assert estimate.tokens_per_second_high <= bound * (1 + 1e-9)
    assert (
        estimate.tokens_per_second_low
        <= estimate.tokens_per_second
        <= estimate.tokens_per_second_high
    )
    assert estimate.step_seconds_low <= estimate.step_seconds <= estimate.step_seconds_high


# ----------------------------------------------------------------------------- calibration


def test_efficiency_constants_are_the_benchmarks_derivation() -> None:
    import throughput as benchmark  # benchmarks/throughput.py

    assert benchmark.derived_efficiency() == throughput.EFFICIENCY
    rows = [benchmark.compare(row) for row in benchmark.ROWS]
    assert benchmark.derived_range(rows) == (throughput.RATIO_LOW, throughput.RATIO_HIGH)


def test_benchmark_holds_back_rows_and_keeps_sources() -> None:
    from throughput_rows import ROWS

    assert sum(not row.calibration for row in ROWS) >= 5
    assert all(row.source and row.measured_tokens_per_second > 0 for row in ROWS)
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert "held-back rows: median |error|" in out


def test_docs_quote_the_benchmarks_current_table() -> None:
    """docs/plan.md's calibration table is the benchmark's output, not a stale copy."""
    import contextlib
    import io

    import throughput as benchmark  # benchmarks/throughput.py

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        benchmark.main([])
    docs = (REPO / "docs" / "plan.md").read_text(encoding="utf-8")
    summary = f"{len(benchmark.ROWS)} rows"
    quoted = [line for line in out.getvalue().splitlines() if line.startswith(("|", summary))]
    assert quoted and all(line in docs for line in quoted), "update docs/plan.md's table"


# ----------------------------------------------------------------------------- run length


def test_run_length_arithmetic() -> None:
    assert throughput.run_length(
        100, max_steps=7, num_train_epochs=3, sequences_per_step=8
    ) == throughput.RunLength(7, "max_steps")
    steps = throughput.run_length(
        100, max_steps=-1, num_train_epochs=3, sequences_per_step=8, eval_fraction=0.1
    )
    assert steps.optimizer_steps == 3 * 12  # 90 training rows: 12 steps of 8 per epoch
    unknown = throughput.run_length(None, max_steps=-1, num_train_epochs=1, sequences_per_step=8)
    assert unknown.optimizer_steps is None


def test_local_dataset_rows(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert throughput.local_dataset_rows(jsonl) == 2
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "a"}] * 5), encoding="utf-8")
    assert throughput.local_dataset_rows(array) == 5
    table = tmp_path / "c.csv"
    table.write_text('prompt,completion\n"a\nb",c\nd,e\n', encoding="utf-8")
    assert throughput.local_dataset_rows(table) == 2
    assert throughput.local_dataset_rows(tmp_path / "missing.jsonl") is None
    assert throughput.local_dataset_rows(tmp_path / "d.parquet") is None


def test_plan_json_carries_time_per_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    from peftgen.cli import main

    code = main(["plan", str(REPO / "specs" / "llama3-8b-clinical-qlora.yaml"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    for candidate in data["candidates"]:
        time = candidate["time"]
        assert time["tokens_per_second_low"] <= time["tokens_per_second"]
        assert time["tokens_per_second"] <= time["tokens_per_second_high"]
        assert time["step_seconds"] == pytest.approx(
            time["tokens_per_step"] / time["tokens_per_second"]
        )
        # 12 rows in specs/data/clinical_sft.jsonl, 8 per optimizer step, 1 epoch.
        assert time["optimizer_steps"] == 2
        assert time["total_hours"] == pytest.approx(2 * time["step_seconds"] / 3600)


def test_plan_prints_time(capsys: pytest.CaptureFixture[str]) -> None:
    from peftgen.cli import main

    assert main(["plan", str(REPO / "specs" / "llama3-8b-clinical-qlora.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "s / step" in out
    assert "time (4bit):" in out


def test_vram_gib_gpu_has_no_time() -> None:
    gpu = find_gpu("rtx-4090")
    assert gpu is not None
    bare = gpu.model_copy(update={"throughput": None})
    assert throughput.estimate_time(_inputs(), bare) is None


# ----------------------------------------------------------------------------- the report


def test_report_matrix_shows_time_and_the_users_cost(capsys: pytest.CaptureFixture[str]) -> None:
    from peftgen.cli import main

    spec = str(REPO / "specs" / "llama3-8b-clinical-qlora.yaml")
    assert main(["report", spec, "--format", "md"]) == 0
    plain = capsys.readouterr().out
    assert "| Time |" in plain and "| Cost |" not in plain  # no price, no cost
    args = ["--price-per-hour", "0.69", "--price-per-hour", "a100-80gb=1.89"]
    assert main(["report", spec, "--format", "md", *args]) == 0
    priced = capsys.readouterr().out
    assert "| Time | Cost |" in priced
    target = next(line for line in priced.splitlines() if "**(target)**" in line)
    a100 = next(line for line in priced.splitlines() if line.startswith("| NVIDIA A100-SXM4-80GB"))
    assert target.rstrip(" |").split("|")[-1].strip() != "-"
    assert a100.rstrip(" |").split("|")[-1].strip() != "-"


@pytest.mark.parametrize("bad", ["free", "-1", "nan", "no-such-gpu=1.0"])
def test_bad_price_is_a_user_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from peftgen.cli import main

    spec = str(REPO / "specs" / "llama3-8b-clinical-qlora.yaml")
    assert main(["report", spec, "--format", "md", "--price-per-hour", bad]) == 2
    assert "--price-per-hour" in capsys.readouterr().err


def test_spec_run_length_for_local_hub_and_grpo_data(tmp_path: Path) -> None:
    from peftgen.load import load_spec

    text = (REPO / "specs" / "llama3-8b-clinical-qlora.yaml").read_text(encoding="utf-8")
    local = load_spec(REPO / "specs" / "llama3-8b-clinical-qlora.yaml").spec
    # 12 rows, 1 x 8 rows per optimizer step, 1 epoch.
    assert throughput.spec_run_length(local, REPO / "specs").optimizer_steps == 2
    hub_file = tmp_path / "hub.yaml"
    hub_file.write_text(text.replace("data/clinical_sft.jsonl", "org/some-data"), encoding="utf-8")
    hub = throughput.spec_run_length(load_spec(hub_file).spec, tmp_path)
    assert hub.optimizer_steps is None and "hub dataset" in hub.source
    grpo = load_spec(REPO / "specs" / "qwen2.5-1.5b-grpo-lora.yaml").spec
    run = throughput.spec_run_length(grpo, REPO / "specs")
    prompts = throughput.local_dataset_rows(REPO / "specs" / grpo.dataset.path)
    assert prompts is not None and run.optimizer_steps is not None
    training = grpo.training
    completions = training.per_device_train_batch_size * training.gradient_accumulation_steps
    # Every prompt yields num_generations completions; a step trains `completions` of them.
    expected = -(-prompts * grpo.grpo.num_generations // completions)
    assert run.optimizer_steps == expected * training.num_train_epochs
