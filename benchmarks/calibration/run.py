"""Calibrate the planner on a real GPU: emit, run and measure a grid of generated scripts.

For every configuration of the grid this harness builds a random-initialised model of a
catalogue architecture locally (``peftgen.catalog.config_dict`` + transformers
``from_config``, a small BPE tokenizer trained on the spot: no hub, no network), writes
fixed-length synthetic data and a spec, emits the script with ``peftgen emit`` and runs it
unchanged for a few optimizer steps. Each run leaves the ``memory_receipt.json`` the
script writes; the receipts are copied into ``benchmarks/results/<name>/`` and compared
with ``peftgen calibrate`` (table printed, ``calibration.json`` and ``table.txt`` saved).

The measured side is the generated script itself, as a user runs it: nothing here
measures memory, so the receipts test the estimator against the code path it models.

    python benchmarks/calibration/run.py                # the GPU grid (see GPU_GRID_NOTE)
    python benchmarks/calibration/run.py --dry          # CPU: tiny model, 3 configs, 2 steps
    python benchmarks/calibration/run.py --only llama-3.2-1b-sft-4bit

Runs share the GPU (``--jobs``, default 4) as far as the plan's predicted peaks fit in
``--gpu-budget-gib``: torch's peak counters are per process, so sharing does not blur the
receipts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peftgen.catalog import config_dict, find_model
from peftgen.cli import main as peftgen_main
from peftgen.load import load_spec
from peftgen.plan import make_plan
from peftgen.resolve import resolve

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
GIB = 2**30
TOKENIZER_VOCAB = 512
WORDS = [
    "patient",
    "pressure",
    "glucose",
    "insulin",
    "renal",
    "cardiac",
    "dose",
    "infusion",
    "score",
    "trial",
    "cohort",
    "hazard",
    "ratio",
    "interval",
    "discharge",
    "summary",
    "imaging",
    "lesion",
    "biopsy",
    "margin",
    "stage",
    "grade",
]

MODELS = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
}
DRY_MODEL = "tiny-llama"
"""``--dry``: Llama-3.2-1B's config shrunk to hidden 64, 2 layers, the tokenizer's vocab."""
DRY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 8192,
}

GPU_GRID_NOTE = """\
GPU grid (18 runs, ~10 optimizer steps each, micro-batch 2, LoRA r=16 on all linear layers):
  Llama-3.2-1B SFT: bf16 / 8-bit / 4-bit x max_length 512 / 2048 x checkpointing on / off (12)
  Qwen2.5-0.5B SFT bf16 2048; Llama-3.2-3B SFT bf16 and 4-bit 2048; Llama-3-8B SFT 4-bit 2048
  Llama-3.2-1B DPO bf16 512; Qwen2.5-0.5B GRPO bf16 (4 generations of 128 tokens, 4 steps)
Estimate on one H200 with --jobs 4 (not yet measured): model builds ~1.5 min (the 8B one
dominates: 16 GB written), 18 runs of 30-60 s each (imports ~15 s, load, 10 steps) four at
a time ~4 min; with the wheel install about 6-7 minutes in all."""


@dataclass(frozen=True)
class Config:
    """One run of the grid."""

    model: str
    method: str = "sft"
    precision: str = "bf16"
    max_length: int = 512
    gradient_checkpointing: bool = True
    steps: int = 10
    batch: int = 2
    num_generations: int = 4
    max_completion_length: int = 128

    @property
    def name(self) -> str:
        checkpointing = "gc" if self.gradient_checkpointing else "nogc"
        return f"{self.model}-{self.method}-{self.precision}-{self.max_length}-{checkpointing}"


def gpu_grid() -> list[Config]:
    grid = [
        Config("llama-3.2-1b", precision=p, max_length=n, gradient_checkpointing=gc)
        for p in ("bf16", "8bit", "4bit")
        for n in (512, 2048)
        for gc in (True, False)
    ]
    grid += [
        Config("qwen2.5-0.5b", max_length=2048),
        Config("llama-3.2-3b", max_length=2048),
        Config("llama-3.2-3b", precision="4bit", max_length=2048),
        Config("llama-3-8b", precision="4bit", max_length=2048),
        Config("llama-3.2-1b", method="dpo"),
        Config("qwen2.5-0.5b", method="grpo", max_length=128, steps=4, batch=4),
    ]
    return grid


def dry_grid() -> list[Config]:
    """Three configurations on the tiny model that cover SFT, 4-bit loading and DPO."""
    tiny = Config(DRY_MODEL, max_length=64, steps=2)
    return [
        tiny,
        replace(tiny, precision="4bit", gradient_checkpointing=False),
        replace(tiny, method="dpo"),
    ]


# --- Model, tokenizer, data -----------------------------------------------------------------


def build_tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer trained on the harness's words (as tests/tiny_model.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([" ".join(WORDS)] * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def model_config(model: str, tokenizer: Any) -> dict[str, Any]:
    """The catalogue architecture as a config dict, special tokens set to the tokenizer's."""
    catalogue_id = MODELS.get(model, "meta-llama/Llama-3.2-1B")
    fields = config_dict(find_model(catalogue_id))
    if model == DRY_MODEL:
        fields.update(DRY_SHAPE, vocab_size=len(tokenizer))
    fields.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return fields


def build_model(model: str, folder: Path) -> Path:
    """A random-initialised bf16 checkpoint of ``model`` in ``folder`` (kept between runs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    started = time.monotonic()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = build_tokenizer(staging)
    config = AutoConfig.for_model(**model_config(model, tokenizer))
    # Initialise on the GPU when there is one: an 8B model initialises in seconds there.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        network = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    network.generation_config.pad_token_id = tokenizer.pad_token_id
    network.save_pretrained(staging)
    del network
    staging.rename(folder)
    print(f"built {model} in {time.monotonic() - started:.0f} s -> {folder}", flush=True)
    return folder


def text_of_tokens(tokenizer: Any, count: int, offset: int) -> str:
    """Text that the tokenizer reads as about ``count`` tokens (words cycled from ``offset``)."""
    words = [WORDS[(offset + i) % len(WORDS)] for i in range(count * 2)]
    ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids[:count]
    return str(tokenizer.decode(ids))


def write_data(config: Config, tokenizer: Any, path: Path) -> None:
    """Fixed-length rows: every SFT/DPO sequence is truncated to exactly max_length tokens;
    GRPO prompts are max_length tokens long (the prompt length the plan assumes)."""
    rows_needed = config.steps * config.batch + config.batch
    rows: list[dict[str, str]] = []
    for index in range(rows_needed):
        if config.method == "sft":
            rows.append({"text": text_of_tokens(tokenizer, config.max_length + 32, index)})
        elif config.method == "dpo":
            rows.append(
                {
                    "prompt": text_of_tokens(tokenizer, config.max_length // 2, index),
                    "chosen": text_of_tokens(tokenizer, config.max_length, index + 1),
                    "rejected": text_of_tokens(tokenizer, config.max_length, index + 2),
                }
            )
        else:
            rows.append({"prompt": text_of_tokens(tokenizer, config.max_length, index)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def spec_text(config: Config, model_dir: Path, data: Path, output_dir: Path, gpu: str) -> str:
    data_format = {"sft": "text", "dpo": "preference", "grpo": "prompt"}[config.method]
    lines = [
        f"name: {config.name}",
        f"method: {config.method}",
        "model:",
        f"  id: {json.dumps(model_dir.as_posix())}",
        "dataset:",
        f"  path: {json.dumps(data.as_posix())}",
        f"  format: {data_format}",
        "hardware:",
        f"  gpu: {gpu}",
        f"precision: {config.precision}",
        "lora:",
        "  r: 16",
        "  lora_alpha: 32",
        "  lora_dropout: 0.0",
        "  target_modules: all-linear",
        "training:",
        f"  max_length: {config.max_length}",
        f"  per_device_train_batch_size: {config.batch}",
        "  gradient_accumulation_steps: 1",
        f"  max_steps: {config.steps}",
        "  learning_rate: 1.0e-4",
        "  warmup_ratio: 0.0",
        f"  gradient_checkpointing: {str(config.gradient_checkpointing).lower()}",
        "  logging_steps: 1",
        '  save_strategy: "no"',
    ]
    if config.method == "grpo":
        lines += [
            "grpo:",
            f"  num_generations: {config.num_generations}",
            f"  max_completion_length: {config.max_completion_length}",
            "  reward_funcs: [length]",
        ]
    lines.append(f"output_dir: {json.dumps(output_dir.as_posix())}")
    return "\n".join(lines) + "\n"


# --- Running ------------------------------------------------------------------------------


@dataclass
class Run:
    config: Config
    folder: Path
    predicted_reserved_bytes: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None

    @property
    def receipt(self) -> Path:
        return self.folder / "adapter" / "memory_receipt.json"


def prepare(config: Config, work: Path, gpu: str) -> Run:
    """Model, data, spec and emitted script for one configuration."""
    model_dir = build_model(config.model, work / "models" / config.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folder = work / "runs" / config.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_data(config, tokenizer, folder / "data.jsonl")
    spec = folder / "spec.yaml"
    spec.write_text(
        spec_text(config, model_dir, folder / "data.jsonl", folder / "adapter", gpu),
        encoding="utf-8",
    )
    if peftgen_main(["emit", str(spec), "-o", str(folder / "emitted"), "--force"]) != 0:
        raise SystemExit(f"peftgen emit failed for {config.name}")
    plan = make_plan(resolve(load_spec(spec)))
    candidate = plan.chosen or next(c for c in plan.candidates if c.precision == config.precision)
    return Run(config, folder, candidate.peak_reserved_bytes)


def start(run: Run, timeout_s: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("PEFTGEN_SMOKE_STEPS", None)
    log = (run.folder / "train.log").open("wb")
    run.started = time.monotonic()
    run.process = subprocess.Popen(
        ["timeout", str(timeout_s), sys.executable, str(run.folder / "emitted" / "train.py")],
        cwd=run.folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def run_all(runs: list[Run], jobs: int, budget_bytes: int, timeout_s: int) -> None:
    """Largest first; start a run while fewer than ``jobs`` run and the predicted peaks fit."""
    waiting = sorted(runs, key=lambda run: run.predicted_reserved_bytes, reverse=True)
    active: list[Run] = []
    while waiting or active:
        for run in list(active):
            assert run.process is not None
            if run.process.poll() is not None:
                run.returncode = run.process.returncode
                run.seconds = time.monotonic() - run.started
                active.remove(run)
                status = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
                print(f"{run.config.name}: {status} in {run.seconds:.0f} s", flush=True)
        in_use = sum(run.predicted_reserved_bytes for run in active)
        while waiting and len(active) < jobs:
            candidate = waiting[0]
            if active and in_use + candidate.predicted_reserved_bytes > budget_bytes:
                break
            waiting.pop(0)
            start(candidate, timeout_s)
            active.append(candidate)
            in_use += candidate.predicted_reserved_bytes
        time.sleep(0.5)


def collect(
    runs: list[Run], results: Path, elapsed_s: float, arguments: dict[str, Any]
) -> list[Path]:
    """Copy receipts and failed runs' log tails into ``results``; write manifest.json."""
    results.mkdir(parents=True, exist_ok=True)
    receipts: list[Path] = []
    manifest: dict[str, Any] = {
        "arguments": arguments,
        "elapsed_s": round(elapsed_s, 1),
        "runs": [],
    }
    for run in runs:
        entry: dict[str, Any] = {
            **asdict(run.config),
            "name": run.config.name,
            "returncode": run.returncode,
            "seconds": round(run.seconds, 1),
            "predicted_reserved_bytes": run.predicted_reserved_bytes,
        }
        if run.receipt.is_file():
            target = results / f"{run.config.name}.json"
            shutil.copyfile(run.receipt, target)
            receipts.append(target)
            entry["receipt"] = target.name
        if run.returncode != 0:
            log = (run.folder / "train.log").read_text(encoding="utf-8", errors="replace")
            (results / f"{run.config.name}.log").write_text(log[-8000:], encoding="utf-8")
            entry["log_tail"] = f"{run.config.name}.log"
        manifest["runs"].append(entry)
    (results / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return receipts


def calibrate(receipts: list[Path], results: Path) -> None:
    """Print the calibrate table and keep it, with the --json form, next to the receipts."""
    if not receipts:
        print("no receipts to calibrate", file=sys.stderr)
        return
    names = [
        str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path) for path in receipts
    ]
    for flag, target in (([], "table.txt"), (["--json"], "calibration.json")):
        done = subprocess.run(
            [sys.executable, "-m", "peftgen", "calibrate", *names, *flag],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        (results / target).write_text(done.stdout, encoding="utf-8")
        if not flag:
            print(done.stdout, end="")
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=GPU_GRID_NOTE)
    parser.add_argument("--dry", action="store_true", help="CPU: tiny model, 3 configs, 2 steps")
    parser.add_argument("--name", help="results folder under benchmarks/results (default: time)")
    parser.add_argument("--results-root", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="models and runs (default: a temp folder)")
    parser.add_argument("--only", nargs="+", default=[], help="configs whose name contains any")
    parser.add_argument("--jobs", type=int, help="runs at a time (default 4 on a GPU, 1 dry)")
    parser.add_argument("--gpu", default="h200", help="catalogue GPU the specs plan for")
    parser.add_argument("--gpu-budget-gib", type=float, default=120.0)
    parser.add_argument("--timeout-s", type=int, default=300, help="per run")
    parser.add_argument("--list", action="store_true", help="print the grid and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = dry_grid() if args.dry else gpu_grid()
    if args.only:
        grid = [config for config in grid if any(part in config.name for part in args.only)]
    if args.list or not grid:
        print("\n".join(config.name for config in grid) or "no configuration matches --only")
        return 0 if grid else 2
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = args.name or f"{'dry-' if args.dry else ''}{stamp}"
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "peftgen-calibration"
    jobs = args.jobs or (1 if args.dry else 4)
    started = time.monotonic()
    runs = [prepare(config, work.resolve(), args.gpu) for config in grid]
    print(f"prepared {len(runs)} runs in {time.monotonic() - started:.0f} s", flush=True)
    run_all(runs, jobs, int(args.gpu_budget_gib * GIB), args.timeout_s)
    elapsed = time.monotonic() - started
    arguments = {"dry": args.dry, "jobs": jobs, "gpu": args.gpu, "only": args.only}
    results = args.results_root / name
    receipts = collect(runs, results, elapsed, arguments)
    calibrate(receipts, results)
    failed = [run.config.name for run in runs if run.returncode != 0]
    print(
        f"{len(receipts)} receipts in {results} after {elapsed:.0f} s; failed: {failed or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
