"""GRPO with vLLM generation (``grpo.use_vllm``): the spec's rules, the estimate's vLLM
share (``vllm_gpu_memory_utilization`` x the GPU's memory, trl's colocate mode; sleep mode
releases it while the policy trains; server mode moves it off the training GPU), the plan's
notes and suggestions, and the pinned trl accepting the emitted configuration (vLLM itself
is not installed here: GRPOConfig does not import it, GRPOTrainer does)."""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from warm_python import run_python

from peftgen.cli import main
from peftgen.load import load_spec
from peftgen.memory import (
    estimate,
    grpo_generation_bytes,
    vllm_share_bytes,
)
from peftgen.plan import estimate_input, make_plan
from peftgen.render import grpo_vllm_kwargs
from peftgen.resolve import resolve
from peftgen.spec import SPEC_ADAPTER, GrpoRunSpec
from peftgen.stack import GIB

REPO = Path(__file__).resolve().parent.parent
VLLM_SPEC = REPO / "specs" / "qwen2.5-1.5b-grpo-vllm.yaml"

BASE: dict[str, Any] = {
    "name": "x",
    "method": "grpo",
    "model": {"id": "Qwen/Qwen2.5-1.5B-Instruct"},
    "dataset": {"path": "p.jsonl", "format": "prompt"},
    "hardware": {"gpu": "a100-40gb"},
    "precision": "bf16",
    "training": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
}


def _spec(**grpo: Any) -> GrpoRunSpec:
    spec = SPEC_ADAPTER.validate_python({**BASE, "grpo": {"reward_funcs": ["format"], **grpo}})
    assert isinstance(spec, GrpoRunSpec)
    return spec


def _resolved(**grpo: Any) -> Any:
    base = resolve(load_spec(VLLM_SPEC))
    spec = base.loaded.spec
    updated = spec.model_copy(update={"grpo": spec.grpo.model_copy(update=grpo)})
    return replace(base, loaded=replace(base.loaded, spec=updated))


@pytest.mark.parametrize(
    ("grpo", "words"),
    [
        ({"vllm_enable_sleep_mode": True}, "applies to use_vllm: colocate only"),
        ({"use_vllm": "server", "vllm_enable_sleep_mode": True}, "colocate only"),
        ({"use_vllm": "colocate", "vllm_server_port": 9000}, "use_vllm: server only"),
        ({"vllm_gpu_memory_utilization": 0.5}, "use_vllm is false"),
        ({"use_vllm": "fast"}, "'colocate' or 'server'"),
        ({"use_vllm": "colocate", "vllm_gpu_memory_utilization": 1.0}, "less than 1"),
    ],
)
def test_vllm_options_are_checked(grpo: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as error:
        _spec(**grpo)
    assert words in str(error.value)


def test_vllm_refuses_8bit_loading() -> None:
    with pytest.raises(ValidationError) as error:
        SPEC_ADAPTER.validate_python(
            {
                **BASE,
                "precision": "8bit",
                "grpo": {"reward_funcs": ["format"], "use_vllm": "colocate"},
            }
        )
    assert "8-bit" in str(error.value)


def test_colocate_share_is_the_utilisation_of_the_whole_gpu() -> None:
    resolved = _resolved(use_vllm="colocate", vllm_enable_sleep_mode=False)
    inputs = estimate_input(resolved, "bf16")
    share = vllm_share_bytes(inputs)
    # vLLM's gpu_memory_utilization: a fraction of the GPU's total memory for this instance
    assert share == int(0.3 * resolved.gpu.memory_bytes)
    awake = estimate(inputs)
    assert awake.vllm_bytes == share and awake.phase == "train"
    # vLLM's share sits outside torch's counters: allocated excludes it, reserved includes it
    none = estimate(replace(inputs, vllm_mode="none"))
    assert awake.peak_allocated_bytes <= none.peak_allocated_bytes  # no model.generate phase
    assert awake.peak_reserved_bytes - awake.torch_reserved_bytes >= share


def test_sleep_mode_releases_the_share_while_training() -> None:
    inputs = estimate_input(_resolved(use_vllm="colocate", vllm_enable_sleep_mode=True), "bf16")
    asleep = estimate(inputs)
    share = vllm_share_bytes(inputs)
    awake = estimate(replace(inputs, vllm_enable_sleep_mode=False))
    assert asleep.peak_reserved_bytes < awake.peak_reserved_bytes
    # the generation round: vLLM's share next to weights and optimizer state, no gradients
    assert asleep.phase == "generation" and asleep.vllm_bytes == share
    assert asleep.gradient_bytes == 0 and asleep.activation_bytes == 0


def test_server_mode_takes_generation_off_the_training_gpu() -> None:
    resolved = _resolved(use_vllm="server")
    inputs = estimate_input(resolved, "bf16")
    result = estimate(inputs)
    local = estimate(replace(inputs, vllm_mode="none"))
    assert result.vllm_bytes == 0 and result.phase == "train"
    assert result.peak_reserved_bytes <= local.peak_reserved_bytes
    assert grpo_generation_bytes(inputs) > 0  # what model.generate would have needed


def test_plan_notes_show_both_phases_and_the_server_command() -> None:
    plan = make_plan(_resolved(use_vllm="colocate", vllm_enable_sleep_mode=True))
    note = next(n for n in plan.notes if n.startswith("grpo.use_vllm: colocate"))
    assert "0.3 x 40.0 GiB = 12.0 GiB" in note and "asleep during training" in note
    assert not any(n.startswith("grpo: the table shows") for n in plan.notes)
    server = make_plan(_resolved(use_vllm="server"))
    note = next(n for n in server.notes if n.startswith("grpo.use_vllm: server"))
    assert "trl vllm-serve --model Qwen/Qwen2.5-1.5B-Instruct" in note


def test_vllm_share_that_does_not_fit_is_refused_with_fixes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(
            [
                "plan",
                str(VLLM_SPEC),
                "--gpu",
                "l4",
                "--set",
                "grpo.vllm_enable_sleep_mode=false",
                "--set",
                "grpo.vllm_gpu_memory_utilization=0.9",
                "--json",
            ]
        )
        == 3
    )
    data = json.loads(capsys.readouterr().out)
    assert not data["fits"]
    fitting = [s["change"] for s in data["suggestions"] if s["fits"]]
    assert {"grpo.use_vllm": "server"} in fitting
    assert any("grpo.vllm_gpu_memory_utilization" in c for c in fitting)
    # sleeping does not help here: the generation round alone needs the 0.9 share
    sleep = next(
        s for s in data["suggestions"] if s["change"] == {"grpo.vllm_enable_sleep_mode": True}
    )
    assert not sleep["fits"]


@pytest.mark.parametrize(
    "grpo",
    [
        {"use_vllm": "colocate"},
        {
            "use_vllm": "colocate",
            "vllm_gpu_memory_utilization": 0.5,
            "vllm_enable_sleep_mode": True,
        },
        {"use_vllm": "server", "vllm_server_host": "10.0.0.2", "vllm_server_port": 8001},
        {},
    ],
)
def test_pinned_trl_accepts_the_emitted_vllm_configuration(
    grpo: dict[str, Any], tmp_path: Path
) -> None:
    from trl import GRPOConfig  # the pinned trl is part of the test install: never a skip

    kwargs = grpo_vllm_kwargs(_spec(**grpo))
    config = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=8,
        use_cpu=True,
        report_to="none",
        **kwargs,
    )
    for key, value in kwargs.items():
        assert getattr(config, key) == value
    assert config.use_vllm == bool(grpo.get("use_vllm"))
    assert "vllm" not in sys.modules  # GRPOConfig does not need vLLM; the trainer does


def test_emitted_script_wires_trls_options(tmp_path: Path) -> None:
    assert main(["emit", str(VLLM_SPEC), "-o", str(tmp_path / "out")]) == 0
    script = (tmp_path / "out" / "train.py").read_text(encoding="utf-8")
    assert '"vllm>=0.22.0,<=0.31.0"' in script.split('"""')[0]
    assert "pip install vllm" in script
    for line in (
        "use_vllm=True,",
        'vllm_mode="colocate",',
        "vllm_gpu_memory_utilization=0.3,",
        "vllm_enable_sleep_mode=True,",
    ):
        assert line in script


STUB_SHIM = """
import json, runpy, sys
import trl

script, out = sys.argv[1], sys.argv[2]


class Recorder:
    def __init__(self, model=None, reward_funcs=None, args=None, **kwargs):
        fields = {k: getattr(args, k) for k in (
            "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode",
            "vllm_server_host", "vllm_server_port", "num_generations")}
        fields["config_class"] = type(args).__name__
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(fields, handle)
        raise SystemExit(0)


trl.GRPOTrainer = Recorder
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_emitted_script_builds_its_grpo_config_with_the_pinned_trl(
    mode: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The script itself constructs GRPOConfig (trl 1.16); only the trainer, which would
    start vLLM, is replaced."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(8)),
        encoding="utf-8",
    )
    extra = (
        "  vllm_gpu_memory_utilization: 0.4\n  vllm_enable_sleep_mode: true\n"
        if mode == "colocate"
        else "  vllm_server_port: 8123\n"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: vllm-{mode}
            method: grpo
            model:
              id: {tiny_model_dir}
            dataset:
              path: prompts.jsonl
              format: prompt
            hardware:
              vram_gib: 24
            precision: bf16
            training:
              max_length: 64
              per_device_train_batch_size: 4
              gradient_accumulation_steps: 1
              max_steps: 1
            grpo:
              num_generations: 4
              max_completion_length: 16
              reward_funcs: [length]
              use_vllm: {mode}
            """
        )
        + extra,
        encoding="utf-8",
    )
    assert main(["emit", str(spec), "-o", str(tmp_path / "out")]) == 0
    shim = tmp_path / "shim.py"
    shim.write_text(STUB_SHIM, encoding="utf-8")
    out = tmp_path / "config.json"
    result = run_python(shim, tmp_path / "out" / "train.py", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    fields = json.loads(out.read_text(encoding="utf-8"))
    assert fields["config_class"] == "GRPOConfig"
    assert fields["use_vllm"] is True and fields["vllm_mode"] == mode
    if mode == "colocate":
        assert fields["vllm_gpu_memory_utilization"] == 0.4
        assert fields["vllm_enable_sleep_mode"] is True
    else:
        assert fields["vllm_server_port"] == 8123


def test_vllm_share_is_in_gib_of_the_gpu() -> None:
    inputs = estimate_input(_resolved(use_vllm="colocate", vllm_gpu_memory_utilization=0.5), "bf16")
    assert vllm_share_bytes(inputs) / GIB == pytest.approx(20.0, abs=0.01)
