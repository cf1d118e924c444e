"""The fake-tensor simulation (``plan --simulate``) on a small catalogue model, cut to a few
layers (its ``config.json`` in a local folder: the simulation's cost grows with depth, and
every per-layer byte counted here repeats per layer).

The static part of the simulated peak (frozen weights, LoRA adapters, optimizer state) is
checked byte for byte against sizes computed here from the model's config and the
libraries' storage rules, independently of ``peftgen.memory``. The dynamic part
(activations, temporaries) has no closed form to compare with; it is checked for the
phases and orderings that must hold whatever the numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from peftgen.catalog import ModelArch, arch_from_folder, config_dict, find_model
from peftgen.load import load_spec
from peftgen.resolve import Resolved, resolve

MODEL_ID = "HuggingFaceTB/SmolLM2-135M"
LAYERS = 4
LORA_R = 8
MAX_LENGTH = 32

FORMAT_BY_METHOD = {"sft": "messages", "dpo": "preference", "grpo": "prompt"}

BF16, FP32 = 2, 4


def write_spec(directory: Path, method: str, precision: str, model_id: str = MODEL_ID) -> Path:
    grpo = (
        "grpo:\n  num_generations: 2\n  max_completion_length: 8\n  reward_funcs: [length]\n"
        if method == "grpo"
        else ""
    )
    text = (
        f"name: simulate-{method}-{precision}\n"
        f"method: {method}\n"
        f"model:\n  id: {model_id}\n"
        f"dataset:\n  path: data.jsonl\n  format: {FORMAT_BY_METHOD[method]}\n"
        "hardware:\n  gpu: rtx-4090\n"
        f"precision: {precision}\n"
        "quantization:\n  bnb_4bit_quant_type: nf4\n  bnb_4bit_use_double_quant: true\n"
        f"lora:\n  r: {LORA_R}\n  lora_alpha: 16\n  target_modules: all-linear\n"
        f"training:\n  max_length: {MAX_LENGTH}\n  per_device_train_batch_size: 1\n"
        "  gradient_accumulation_steps: 2\n  gradient_checkpointing: true\n"
        "  optim: adamw_torch\n"
        f"{grpo}"
    )
    path = directory / f"{method}-{precision}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def linear_shapes(arch: ModelArch) -> list[tuple[int, int]]:
    """(in, out) of every decoder linear of a Llama-family model, from its config."""
    c = arch.config
    q_out = c.num_attention_heads * c.head_dim
    kv_out = c.num_key_value_heads * c.head_dim
    per_layer = [
        (c.hidden_size, q_out),
        (c.hidden_size, kv_out),
        (c.hidden_size, kv_out),
        (q_out, c.hidden_size),
        (c.hidden_size, c.intermediate_size),
        (c.hidden_size, c.intermediate_size),
        (c.intermediate_size, c.hidden_size),
    ]
    return per_layer * c.num_hidden_layers


def expected_static_bytes(arch: ModelArch, precision: str) -> dict[str, int]:
    """Weights, adapters and AdamW state as transformers, bitsandbytes, peft and trl store them.

    * unquantized tensors (embeddings, tied to the output head; RMSNorm weights) in bf16,
      plus the rotary embedding's fp32 ``inv_freq`` and ``original_inv_freq`` buffers;
    * 8-bit linears: int8 weight and an fp32 scale per output row (``SCB``);
    * 4-bit NF4 with double quantization: two weights per byte, a uint8 absmax per 64
      weights, an fp32 absmax per 256 of those, the 256-entry fp32 code of the second
      quantization, an fp32 offset and the 16-entry fp32 NF4 code, per linear;
    * LoRA A and B (r x in, out x r): fp32, on a bf16 base because peft upcasts them and
      on a quantized one because the script casts trl's bf16 copies back to fp32;
    * AdamW: exp_avg and exp_avg_sq in the parameter's dtype.
    """
    c = arch.config
    assert c.tie_word_embeddings, "the test model ties its output head to the embeddings"
    linears = linear_shapes(arch)
    unquantized = BF16 * (
        c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size
    )
    rotary = 2 * FP32 * (c.head_dim // 2)
    if precision == "bf16":
        quantized = sum(BF16 * i * o for i, o in linears)
    elif precision == "8bit":
        quantized = sum(i * o + FP32 * o for i, o in linears)
    else:
        quantized = 0
        for i, o in linears:
            blocks = math.ceil(i * o / 64)
            nested_blocks = math.ceil(blocks / 256)
            quantized += (i * o + 1) // 2 + blocks + FP32 * (nested_blocks + 256 + 1 + 16)
    adapter_dtype = FP32
    adapter_numel = sum(LORA_R * (i + o) for i, o in linears)
    return {
        "weights": unquantized + rotary + quantized,
        "adapter": adapter_dtype * adapter_numel,
        "optimizer": 2 * adapter_dtype * adapter_numel,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The catalogue model's config with ``LAYERS`` decoder layers, as a local model folder."""
    found = find_model(MODEL_ID)
    assert found is not None, f"{MODEL_ID} left the catalogue; pick another small model"
    config = config_dict(found) | {"num_hidden_layers": LAYERS}
    folder = tmp_path_factory.mktemp("smollm2-cut")
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def arch(model_dir: Path) -> ModelArch:
    return arch_from_folder(model_dir)


def resolved_spec(tmp_path: Path, model_dir: Path, method: str, precision: str) -> Resolved:
    return resolve(load_spec(write_spec(tmp_path, method, precision, str(model_dir))))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit"])
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_simulated_static_part_is_exact(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    model_dir: Path,
    arch: ModelArch,
    method: str,
    precision: str,
) -> None:
    """``plan --simulate --json``: the simulated candidate's weights, adapters and
    optimizer state equal the hand count, at the peak and in every phase."""
    from peftgen.cli import main

    spec = write_spec(tmp_path, method, precision, str(model_dir))
    exit_code = main(["plan", str(spec), "--simulate", "--json"])
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    # bitsandbytes logs a line per simulated 8-bit matmul (416 for a 7B model); none shown.
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert "MatMul8bitLt" not in captured.err

    assert exit_code == 0
    assert plan["chosen_precision"] == precision
    simulated = [c["simulated"] for c in plan["candidates"] if "simulated" in c]
    assert len(simulated) == 1
    result = simulated[0]
    expected = expected_static_bytes(arch, precision)
    at_peak = result["breakdown"]
    assert at_peak["weights_bytes"] == expected["weights"]
    assert at_peak["adapter_bytes"] == expected["adapter"]
    assert at_peak["optimizer_bytes"] == expected["optimizer"]
    # gradient accumulation: earlier micro-batches' gradients are alive through training
    # (not through GRPO's generation, which follows the optimizer step's zero_grad)
    in_training = result["peak_phase"] != "generation"
    assert at_peak["gradient_bytes"] == (expected["adapter"] if in_training else 0)
    assert result["peak_allocated_bytes"] == sum(at_peak.values())

    phases = result["phases"]
    assert set(phases) == {"forward", "backward", "optimizer_step"} | (
        {"generation"} if method == "grpo" else set()
    )
    static = sum(expected.values())
    for name, phase in phases.items():
        assert phase["parameters_bytes"] == expected["weights"] + expected["adapter"], name
        assert phase["optimizer_state_bytes"] == expected["optimizer"], name
        assert static < phase["peak_allocated_bytes"] <= result["peak_allocated_bytes"], name
    assert result["seconds"] > 0


@pytest.mark.slow
def test_simulation_result_static_bytes(tmp_path: Path, model_dir: Path, arch: ModelArch) -> None:
    """The API the planner calls: static bytes reported apart from the peak."""
    from peftgen.simulate import simulate_candidate

    result = simulate_candidate(resolved_spec(tmp_path, model_dir, "sft", "4bit"), "4bit")

    assert result.static_bytes == expected_static_bytes(arch, "4bit")
    assert result.managed_bytes == 0
    assert set(result.to_json()) >= {"peak_allocated_bytes", "breakdown", "phases", "seconds"}


def test_simulation_never_imports_into_the_analytic_plan(tmp_path: Path) -> None:
    """The analytic path stays torch-free: simulate is imported only when asked for."""
    import subprocess

    spec = write_spec(tmp_path, "sft", "4bit")
    code = (
        "import sys\n"
        "from peftgen.cli import main\n"
        f"main(['plan', {str(spec)!r}, '--json'])\n"
        "assert 'torch' not in sys.modules, 'plan imported torch'\n"
        "assert 'peftgen.simulate' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "simulated" not in json.loads(done.stdout)["candidates"][0]
