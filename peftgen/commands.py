"""One function per CLI command: load, resolve, compute, print.

Kept apart from ``cli`` so argument parsing stays thin and each command's work is a
plain function tests can call.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftgen.accuracy_interval import UNSCALED
from peftgen.load import load_spec
from peftgen.paths import with_absolute_paths
from peftgen.plan import BREAKDOWN_KEYS, Candidate, Plan
from peftgen.stack import GIB, format_gib
from peftgen.throughput import format_duration

if TYPE_CHECKING:
    from pathlib import Path as _Path

    from rich.console import Console

    from peftgen.load import LoadedSpec
    from peftgen.resolve import Resolved
    from peftgen.simulate import SimulationResult


def _console(**options: Any) -> Console:
    """A rich console whose closed pipe (``| head -1``) is a ``BrokenPipeError`` for the CLI
    to answer with the shell's code (rich's own exits 1, a code that means a bug here)."""
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    return _PipeConsole(**options)


def validate(args: argparse.Namespace) -> int:
    """Check every spec file; report all problems of all files (exit 2), else one ok line each.

    Warnings go to stderr; ``PATH: ok`` lines to stdout.
    """
    from peftgen.errors import UserError
    from peftgen.resolve import resolve

    problems = []
    for path in args.specs:
        try:
            resolved = resolve(load_spec(path))
        except UserError as error:
            problems.extend(error.problems)
            continue
        for warning in resolved.warnings:
            print(warning, file=sys.stderr)
        print(f"{path}: ok")
    if problems:
        raise UserError(problems)
    return 0


def schema(args: argparse.Namespace) -> int:
    """Print the spec's JSON Schema, or write it (``-o specs/peftgen.schema.json``)."""
    from peftgen.spec import schema_text

    text = schema_text()
    if args.output is None:
        sys.stdout.write(text)
        return 0
    write_atomically(args.output, text, "the schema")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _is_folder(path: Path) -> bool:
    """``path.is_dir()``, False where the name cannot even be looked up (too long):
    ``write_atomically`` then names the reason."""
    try:
        return path.is_dir()
    except OSError:
        return False


def write_atomically(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: a full disk or an interruption leaves the old file (or none), never a
    truncated one. A new file gets the umask's permissions, a replaced one keeps its own.
    Every OS error is a ``UserError`` naming the file."""
    import errno
    import os
    import tempfile

    from peftgen.errors import UserError

    def refuse(reason: str) -> UserError:
        return UserError.single(f"cannot write {what}: {reason}", file=str(path))

    try:
        if path.is_dir():
            raise refuse("it is a folder; give a file name")
        if path.is_symlink():  # write the file it names; the link stays
            path = path.resolve()
        if path.exists() and not path.is_file():
            # /dev/null, /dev/stdout, a FIFO: written through, never replaced by a file.
            with path.open("w", encoding="utf-8") as stream:
                stream.write(text)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~umask
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(descriptor)
        staging = Path(name)
        try:
            staging.write_text(text, encoding="utf-8")
            os.chmod(staging, mode)
            os.replace(staging, path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    except OSError as error:
        reason = {
            errno.ENOSPC: "no space left on the device",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "the file system is read-only",
            errno.ENOTDIR: "a parent of it is a file, not a folder",
            errno.EEXIST: "a parent of it is a file, not a folder",
        }.get(error.errno or 0, error.strerror or str(error))
        if error.errno == errno.ENOENT and path.parent.is_dir():
            reason = f"{path.parent} does not accept new files"
        raise refuse(f"{reason}; nothing was written") from None


def _for_planning(resolved: Resolved) -> Resolved:
    """The resolved spec the planner sizes. With ``training.length_source: p99`` its
    max_length becomes the data's measured 99th-percentile token length; the script still
    truncates at the spec's own max_length, so only the plan's numbers change."""
    training = resolved.spec.training
    if training.length_source == "max_length":
        return resolved
    from peftgen.check_data import measured_length_percentile
    from peftgen.errors import UserError

    loaded = resolved.loaded
    try:
        measured = measured_length_percentile(
            with_absolute_paths(resolved.spec, loaded.path.parent), 99.0
        )
    except UserError as error:
        # Unplaced problems (no tokenizer, no dataset file) are about a spec field: point
        # there; bad rows keep their data file's line, under one located at length_source.
        located = [
            loaded.problem(p.field_path or "training.length_source", p.message, p.hint)
            if p.file is None
            else p
            for p in error.problems
        ]
        if any(p.file is not None for p in error.problems):
            located.insert(
                0,
                loaded.problem(
                    "training.length_source",
                    "p99 measures the dataset's token lengths, and the dataset has problems "
                    "(below)",
                    "fix them (`peftgen check-data` lists them), or set length_source: max_length",
                ),
            )
        raise UserError(located) from None
    print(
        f"note: training.length_source p99: planning for {measured} tokens per sequence (the "
        f"data's 99th percentile) instead of max_length {training.max_length}; batches of "
        "longer rows can peak higher",
        file=sys.stderr,
    )
    measured_training = training.model_copy(update={"max_length": measured})
    spec = resolved.spec.model_copy(update={"training": measured_training})
    return replace(resolved, loaded=replace(resolved.loaded, spec=spec))


def _resolve_with_set(path: _Path, arguments: list[str]) -> Resolved:
    """Load and resolve the spec with ``plan --set KEY=VALUE`` edits applied to the file's
    mapping before it is validated (so an edit can repair what the file gets wrong), every
    problem about an edited key named by its ``--set`` argument."""
    from dataclasses import replace as replaced

    from peftgen.errors import UserError
    from peftgen.overrides import parse_set_edits
    from peftgen.resolve import resolve

    if not arguments:
        return resolve(load_spec(path))
    edits, labels, malformed = parse_set_edits(arguments)

    def label_of(field_path: str | None) -> str | None:
        """The edit a problem is about: at its key or below it, or at a key above it that
        the edit created or turned into a mapping (``--set foo.bar=1``, ``lora.r.x=3``)."""
        if field_path is None:
            return None
        return (
            labels.get(field_path)
            or next((v for k, v in labels.items() if field_path.startswith(k + ".")), None)
            or next(
                (
                    v
                    for k, v in labels.items()
                    if k.startswith(field_path + ".") and not _file_has_mapping(path, field_path)
                ),
                None,
            )
        )

    try:
        resolved = resolve(load_spec(path, edits))
    except UserError as error:
        problems = list(malformed)
        for p in error.problems:
            label = label_of(p.field_path)
            if label is not None:
                p = replaced(p, file=label, line=None, column=None, source_line=None)
            problems.append(p)
        raise UserError(problems) from None
    if malformed:
        raise UserError(malformed)
    return resolved


def _file_has_mapping(path: _Path, field_path: str) -> bool:
    """The spec file itself holds a mapping at ``field_path`` (a dotted key)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        node: Any = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError, ValueError):
        return False  # the file's own problems are load_spec's to report
    for part in field_path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict)


def _refuse_what_the_named_gpu_cannot_run(resolved: Resolved, args: argparse.Namespace) -> None:
    """``--gpu`` / ``--vram-gib`` plan for another card: the spec's demands of a card
    (bf16, FlashAttention-2) are checked against it as ``validate`` checks the spec's own,
    instead of planning a precision the spec does not allow (a bf16 spec planned 4-bit for
    a T4, and emitted as such with --force)."""
    if args.gpu is None and args.vram_gib is None:
        return
    from peftgen.errors import UserError
    from peftgen.plan import target_gpu
    from peftgen.resolve import gpu_problems

    problems = gpu_problems(resolved.loaded, target_gpu(resolved, args.gpu, args.vram_gib))
    if problems:
        flag = f"--gpu {args.gpu}" if args.gpu is not None else f"--vram-gib {args.vram_gib:g}"
        raise UserError(
            [replace(p, hint=f"{p.hint} ({flag} plans for this card)") for p in problems]
        )


def _with_command_line_gpu(resolved: Resolved, args: argparse.Namespace) -> LoadedSpec:
    """The spec emit writes, with ``--gpu`` / ``--vram-gib`` as its hardware, so the
    emitted spec.yaml renders the train.py beside it (it kept the file's GPU)."""
    if args.gpu is None and args.vram_gib is None:
        return resolved.loaded
    from dataclasses import replace as replaced

    from peftgen.overrides import apply_changes
    from peftgen.plan import target_gpu

    changes: dict[str, object] = {"hardware.vram_gib": args.vram_gib}
    if args.gpu is not None:  # the named card's own memory unless --vram-gib says otherwise
        gpu = target_gpu(resolved, args.gpu, None)
        changes["hardware.gpu"] = gpu.aliases[0] if gpu.aliases else gpu.name
    loaded = resolved.loaded
    return replaced(loaded, spec=apply_changes(loaded.spec, changes))


def plan(args: argparse.Namespace) -> int:
    """Print the memory plan (a table, or ``--json``); exit 3 when nothing fits.

    ``--simulate`` also runs one training step on fake tensors for the chosen precision
    (the last candidate when nothing fits); only then are torch and friends imported.
    """
    from peftgen.plan import make_plan

    resolved = _for_planning(_resolve_with_set(args.spec, getattr(args, "set", None) or []))
    _refuse_what_the_named_gpu_cannot_run(resolved, args)
    for warning in resolved.warnings:
        print(warning, file=sys.stderr)
    result = make_plan(resolved, args.gpu, args.vram_gib)
    simulation = None
    sharded = None
    if args.simulate:
        from peftgen.plan import target_gpu

        _require_simulation_stack()
        from peftgen.simulate import simulate_candidate

        precision = result.chosen_precision or result.candidates[-1].precision
        gpu = target_gpu(resolved, args.gpu, args.vram_gib)
        simulation = simulate_candidate(resolved, precision, gpu)
        if resolved.spec.hardware.distributed == "fsdp":
            from peftgen.simulate_sharded import simulate_sharded

            sharded = simulate_sharded(resolved, precision, gpu)
    if args.json:
        data = result.to_json()
        if simulation is not None:
            for candidate in data["candidates"]:
                if candidate["precision"] == simulation.precision:
                    candidate["simulated"] = simulation.to_json()
                    if sharded is not None:
                        candidate["simulated_sharded"] = sharded.to_json()
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0 if result.fits else 3
    _print_plan(result, resolved.spec.model.id)
    if simulation is not None:
        _print_simulation(result, simulation)
    if sharded is not None:
        print(
            f"sharded step (FSDP2 on a fake process group, rank 0 of {sharded.world_size}): "
            f"simulated {format_gib(sharded.peak_allocated_bytes, 2)} allocated per GPU, "
            f"analytic {format_gib(sharded.analytic_allocated_bytes, 2)} "
            f"({100 * sharded.error:+.1f}%)"
        )
    return 0 if result.fits else 3


def _require_simulation_stack() -> None:
    """``--simulate`` runs a real training step: say what to install when it cannot."""
    import importlib.util

    from peftgen.errors import UserError

    missing = [
        name for name in ("torch", "transformers", "peft") if not importlib.util.find_spec(name)
    ]
    if missing:
        raise UserError.single(
            f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            "installed: pip install 'peftgen[train]' (the plan without --simulate needs none)",
            field_path="--simulate",
        )


def _print_simulation(result: Plan, simulation: SimulationResult) -> None:
    """Analytic and simulated side by side: per category at the peak, then per phase."""
    from rich.table import Table

    from peftgen.simulate import CATEGORIES

    analytic = next(c for c in result.candidates if c.precision == simulation.precision)
    console = _console(highlight=False)
    console.print(
        f"[bold]simulated one step[/] at {simulation.precision} on fake tensors in "
        f"{simulation.seconds:.0f} s: peak allocated "
        f"{format_gib(simulation.peak_allocated_bytes, 2)} in {simulation.peak_phase} "
        f"(analytic {format_gib(analytic.peak_allocated_bytes, 2)}, {analytic.phase})"
    )
    b = analytic.breakdown
    analytic_by_category = {
        "parameters": b.weights_bytes + b.adapter_bytes,
        "gradients": b.gradient_bytes,
        "optimizer_state": b.optimizer_bytes,
        "activations": b.activation_bytes,
        "temporaries": b.logits_bytes,
    }
    at_peak = simulation.phases[simulation.peak_phase].by_category
    table = Table(title="at the peak, per category (GiB)")
    for column in ("category", "analytic", "simulated", "difference"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name in CATEGORIES:
        a, s = analytic_by_category[name], at_peak[name]
        table.add_row(name.replace("_", " "), f"{a / GIB:.2f}", f"{s / GIB:.2f}", _diff(a, s))
    table.add_section()
    # the split between what is kept for backward and what is transient differs by
    # definition; their sum is comparable
    a = analytic_by_category["activations"] + analytic_by_category["temporaries"]
    s = at_peak["activations"] + at_peak["temporaries"]
    table.add_row("activ. + temp.", f"{a / GIB:.2f}", f"{s / GIB:.2f}", _diff(a, s))
    a, s = analytic.peak_allocated_bytes, simulation.peak_allocated_bytes
    table.add_row("peak allocated", f"{a / GIB:.2f}", f"{s / GIB:.2f}", _diff(a, s))
    console.print(table)
    phases = Table(title="simulated peak per phase (GiB)")
    phases.add_column("phase", no_wrap=True)
    for name in ("peak", "params", "grads", "optim", "activ", "temp"):
        phases.add_column(name, justify="right")
    for phase, peak in simulation.phases.items():
        phases.add_row(
            phase.replace("optimizer_step", "optim step"),
            f"{peak.peak_allocated_bytes / GIB:.2f}",
            *(f"{peak.by_category[name] / GIB:.2f}" for name in CATEGORIES),
        )
    console.print(phases)
    console.print(
        "analytic temporaries = its logits/loss term; the analytic estimate has one peak "
        f"({analytic.phase}), not one per phase"
    )


def _diff(analytic_bytes: int, simulated_bytes: int) -> str:
    if simulated_bytes == 0:
        return "-" if analytic_bytes == 0 else "+inf"
    return f"{100 * (analytic_bytes - simulated_bytes) / simulated_bytes:+.1f}%"


def _shown(value: object) -> str:
    """A value as the spec would spell it (``true``, ``null``), never Python's ``None``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def plan_header(result: Plan, written_model_id: str | None = None) -> str:
    """The plan's first line: what was planned (the resolved model, length, micro-batch)
    and for which GPU."""
    gpu = result.gpu
    model = result.model_id
    if written_model_id is not None and written_model_id != model:
        model = f"{model} (model.id {written_model_id})"
    count = f"{gpu.count} x " if gpu.count > 1 else ""
    return (
        f"{result.spec}: {model}, max_length {result.max_length}, micro-batch "
        f"{result.micro_batch}, on {count}{gpu.name} ({format_gib(gpu.vram_bytes)}, budget "
        f"{format_gib(result.budget_bytes)}{' per GPU' if gpu.count > 1 else ''})"
    )


def tight_text(result: Plan) -> str | None:
    """What a tight plan says: the margin at the estimate and at the interval's upper end."""
    chosen = result.chosen
    if chosen is None or not result.tight:
        return None
    margin = result.budget_bytes - chosen.peak_reserved_bytes
    over = chosen.peak_reserved_bytes_high - result.budget_bytes
    return (
        f"tight: {chosen.precision} peaks at {format_gib(chosen.peak_reserved_bytes)}, "
        f"{format_gib(margin)} under the {format_gib(result.budget_bytes)} budget, but the upper "
        f"end of the prediction interval (x{result.interval_factor:g}, the 90th percentile of "
        f"{result.interval_evidence}) is {format_gib(chosen.peak_reserved_bytes_high)}, "
        f"{format_gib(over)} "
        "over: the run may run out of memory"
    )


def full_finetuning_text(result: Plan) -> str | None:
    """A LoRA plan's comparison line: what ``finetuning: full`` would need (never chosen)."""
    full = result.full_finetuning
    if full is None:
        return None
    b = full.breakdown
    verdict = "fits" if full.fits_high else "fits, tight" if full.fits else "does not fit"
    return (
        "full fine-tuning (finetuning: full, not chosen): peak "
        f"{format_gib(full.peak_reserved_bytes, 2)}, up to "
        f"{format_gib(full.peak_reserved_bytes_high, 2)}, {verdict} (weights "
        f"{b.weights_bytes / GIB:.2f}, gradients {b.gradient_bytes / GIB:.2f}, optimizer "
        f"{b.optimizer_bytes / GIB:.2f}, activations {b.activation_bytes / GIB:.2f}, at the "
        f"LM head {b.logits_bytes / GIB:.2f} GiB: logits, the head's fp32 gradient buffer "
        "and, with gradient checkpointing, autocast's cached 16-bit copy of every weight; "
        f"fp32 masters under {full.precision} autocast)"
    )


def _print_plan(
    result: Plan, written_model_id: str | None = None, console: Console | None = None
) -> None:
    """The rich table: components x precisions, fit marks, chosen column highlighted."""
    from rich.markup import escape
    from rich.table import Table

    console = console or _console(highlight=False)
    console.print(escape(plan_header(result, written_model_id)))
    trainable, total = result.trainable_parameters, result.total_parameters
    console.print(
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    table = Table(title="peak GPU memory per component (GiB)")
    table.add_column("component")
    for candidate in result.candidates:
        chosen = candidate.precision == result.chosen_precision
        table.add_column(
            f"{candidate.precision}{' (chosen)' if chosen else ''}",
            justify="right",
            style="bold green" if chosen else None,
        )
    for key in BREAKDOWN_KEYS:
        table.add_row(
            key.removesuffix("_bytes"),
            *(f"{getattr(c.breakdown, key) / GIB:.2f}" for c in result.candidates),
        )
    table.add_section()
    table.add_row(
        "peak allocated", *(f"{c.peak_allocated_bytes / GIB:.2f}" for c in result.candidates)
    )
    table.add_row(
        "peak reserved", *(f"{c.peak_reserved_bytes / GIB:.2f}" for c in result.candidates)
    )
    table.add_row(
        "upper end",
        *(f"{c.peak_reserved_bytes_high / GIB:.2f}" for c in result.candidates),
    )
    table.add_row("loading peak", *(f"{c.load_peak_bytes / GIB:.2f}" for c in result.candidates))
    if any(c.host_memory_bytes for c in result.candidates):
        table.add_row(
            "host RAM / node", *(f"{c.host_memory_bytes / GIB:.2f}" for c in result.candidates)
        )
    if any(c.managed_bytes for c in result.candidates):
        table.add_row(
            "paged (managed, outside)",
            *(f"{c.managed_bytes / GIB:.2f}" for c in result.candidates),
        )
    table.add_row(
        "fits",
        *(
            "yes"
            if c.fits_high
            else "[yellow]tight[/]"
            if c.fits
            else f"[red]{_no_fit(c, result.budget_bytes)}[/]"
            for c in result.candidates
        ),
    )
    timed = [c.time for c in result.candidates]
    if all(t is not None for t in timed):
        table.add_section()
        table.add_row("tokens/s", *(f"{t.tokens_per_second:,.0f}" for t in timed if t))
        table.add_row("s / step", *(f"{t.step_seconds:.1f}" for t in timed if t))
        if all(t.total_hours is not None for t in timed if t):
            table.add_row("total", *(format_duration(t.total_hours or 0.0) for t in timed if t))
    console.print(table)
    time_line = time_text(result)
    if time_line is not None:
        console.print(escape(time_line))
    console.print(
        f"upper end: the peak x{result.interval_factor:g} ({UNSCALED}), the 90th "
        f"percentile of measured / predicted over {result.interval_evidence}; tight: fits at "
        "the estimate, not at the upper end"
    )
    if any(c.breakdown.logits_bytes == 0 and c.phase == "train" for c in result.candidates):
        console.print(
            "logits 0: the peak is a decoder layer's backward; the LM head's tensors are "
            "freed by then"
        )
    full_line = full_finetuning_text(result)
    if full_line is not None:
        console.print(escape(full_line))
    for default in result.defaults:
        console.print(
            f"[bold]default[/] {escape(default.knob)}: {escape(_shown(default.value))} "
            f"(not in the spec): {escape(default.reason)}"
        )
    for decision in result.decisions:
        value = "nothing fits" if decision.value is None else _shown(decision.value)
        console.print(
            f"[bold]{escape(decision.knob)}[/] = {escape(value)}: {escape(decision.reason)}"
        )
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    for warning in result.warnings:
        console.print(f"[yellow]warning[/]: {escape(warning)}")
    tight = tight_text(result)
    if tight is not None:
        console.print(f"[yellow bold]{escape(tight)}[/]")
        if result.suggestions:
            console.print("To be safe, each of these alone makes the upper end fit:")
    if not result.fits:
        console.print("[red bold]nothing fits.[/] Suggestions, best first:")
    for number, suggestion in enumerate(result.suggestions, 1):
        change = ", ".join(f"{k}: {_shown(v)}" for k, v in suggestion.change.items())
        console.print(
            f"  {number}. {escape(suggestion.action)} ({escape(change)}) - "
            f"{escape(suggestion.detail)}"
        )


def _no_fit(candidate: Candidate, budget_bytes: int) -> str:
    """Why a candidate does not fit: plain "no" for the training peak alone, else every
    phase that is over (``no (loading)``, ``no (training, loading)``, ``no (host RAM)``)."""
    over = candidate.phases_over(budget_bytes)
    return "no" if over in ((), ("training",)) else f"no ({', '.join(over)})"


def time_text(result: Plan) -> str | None:
    """What the time rows assume: the range, the run's length, what is not modelled."""
    from peftgen.throughput import RATIO_HIGH, RATIO_LOW, format_duration_range

    shown = result.chosen or result.candidates[-1]
    t = shown.time
    if t is None:
        return "time: not estimated (the GPU has no datasheet figures; name one with --gpu)"
    text = (
        f"time ({shown.precision}): {t.tokens_per_second_low:,.0f}-"
        f"{t.tokens_per_second_high:,.0f} tokens/s, {t.step_seconds_low:.1f}-"
        f"{t.step_seconds_high:.1f} s per optimizer step of {t.tokens_per_step:,} tokens "
        f"(datasheet peak {t.peak_tflops:g} TFLOP/s x {t.efficiency:g} calibrated "
        f"efficiency, range x{RATIO_LOW:g}-{RATIO_HIGH:g}: benchmarks/throughput.py)"
    )
    if t.total_hours is not None:
        low, high = t.total_hours_low or 0.0, t.total_hours_high or 0.0
        text += (
            f"; {t.optimizer_steps:,} steps ({t.steps_source}, max_length tokens per row): "
            f"{format_duration_range(low, high)}"
        )
    else:
        text += f"; total unknown: {t.steps_source}"
    if result.gpu.count > 1:
        text += "; communication between GPUs not modelled"
    return text


def plan_command(args: argparse.Namespace) -> str:
    """The ``peftgen plan`` command line that shows the suggestions for what ``args``
    planned: the same spec and the same ``--gpu`` / ``--vram-gib``."""
    import shlex

    parts = ["peftgen", "plan", str(args.spec)]
    if getattr(args, "gpu", None) is not None:
        parts += ["--gpu", args.gpu]
    if getattr(args, "vram_gib", None) is not None:
        parts += ["--vram-gib", f"{args.vram_gib:g}"]
    return shlex.join(parts)


def emit(args: argparse.Namespace) -> int:
    """Render the training script (stdout) or every emitted file (``-o DIR``, atomically).

    A plan where nothing fits is refused (exit 3) unless ``--force``: a script that runs
    out of memory an hour in is worse than no script.
    """
    from peftgen.errors import NothingFitsError
    from peftgen.plan import make_plan
    from peftgen.render import model_source, render_all, render_train_script, write_output_dir
    from peftgen.report import render_plan_markdown
    from peftgen.resolve import resolve

    resolved = resolve(load_spec(args.spec))
    _refuse_what_the_named_gpu_cannot_run(resolved, args)
    planned = _for_planning(resolved)
    result = make_plan(planned, args.gpu, args.vram_gib)
    for warning in resolved.warnings:
        print(warning, file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    tight = tight_text(result)
    if tight is not None:
        print(f"warning: {tight}; `{plan_command(args)}` lists what makes it fit", file=sys.stderr)
    if not result.fits:
        peaks = ", ".join(
            f"{c.precision} {format_gib(c.peak_reserved_bytes)}" for c in result.candidates
        )
        message = (
            f"{args.spec}: nothing fits the {format_gib(result.budget_bytes)} budget on "
            f"{result.gpu.name} (peaks: {peaks}); `{plan_command(args)}` lists what to change"
        )
        if not args.force:
            raise NothingFitsError(message + ", or emit anyway with --force")
        print(f"warning: {message}; emitting anyway (--force)", file=sys.stderr)
    if args.output_dir is None:
        sys.stdout.write(render_train_script(resolved.loaded, result, model_source(resolved)))
        return 0
    files = render_all(
        _with_command_line_gpu(resolved, args),
        result,
        render_plan_markdown(result, planned),
        model_source(resolved),
        args.output_dir,
    )
    write_output_dir(args.output_dir, files, getattr(args, "overwrite_edits", False))
    for name in files:
        print(f"wrote {args.output_dir / name}", file=sys.stderr)
    return 0


def report(args: argparse.Namespace) -> int:
    """Write the VRAM advisor report (HTML, or Markdown with its chart files beside it)."""
    from peftgen.plan import make_plan
    from peftgen.report import render_html, render_markdown, report_data
    from peftgen.resolve import resolve

    resolved = resolve(load_spec(args.spec))
    _refuse_what_the_named_gpu_cannot_run(resolved, args)
    for warning in resolved.warnings:
        print(warning, file=sys.stderr)
    planned = _for_planning(resolved)
    result = make_plan(planned, args.gpu, args.vram_gib)
    prices = parse_prices(getattr(args, "price_per_hour", None) or [], result.gpu.name)
    data = report_data(planned, result, prices)
    output: Path | None = args.output
    charts: dict[str, str] = {}
    if report_format(args.format, output) == "html":
        text = render_html(data)
    elif output is None:
        text = render_markdown(data, charts="inline").text
    else:
        markdown = render_markdown(data, charts="files", chart_stem=output.stem)
        text, charts = markdown.text, markdown.charts
    if output is None:
        sys.stdout.write(text)
        return 0
    if _is_folder(output):  # refused before any chart is written
        write_atomically(output, text, "the report")
    for name, svg in charts.items():  # the charts first: the report names them
        write_atomically(output.parent / name, svg, "a chart of the report")
    write_atomically(output, text, "the report")
    for path in (output, *(output.parent / name for name in charts)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def report_format(chosen: str | None, output: Path | None) -> str:
    """``--format``, else what the output file's name says (``-o report.md`` is Markdown;
    it got HTML), else HTML."""
    if chosen is not None:
        return chosen
    return "md" if output is not None and output.suffix.lower() in (".md", ".markdown") else "html"


MAX_PRICE_PER_HOUR = 1e6
"""A price per GPU-hour at or above this is a typo, not a rental."""


def parse_prices(arguments: list[str], target_gpu: str) -> dict[str, float]:
    """``--price-per-hour`` values: ``PRICE`` (the target GPU) or ``GPU=PRICE`` (a catalogue
    name or alias), by catalogue GPU name. A bad value is a user error naming the flag."""
    from peftgen.catalog import lookup_gpu
    from peftgen.errors import UserError

    prices: dict[str, float] = {}
    for argument in arguments:
        name, _, text = argument.rpartition("=")
        try:
            price = float(text)
        except ValueError:
            price = -1.0
        if not 0 <= price < MAX_PRICE_PER_HOUR or price != price:
            raise UserError.single(
                f"must be a price per GPU-hour (a number from 0 to under "
                f"{MAX_PRICE_PER_HOUR:,.0f}, e.g. 1.89 or a100-80gb=1.89); got {argument!r}",
                field_path="--price-per-hour",
            )
        if not name.strip():
            prices[target_gpu] = price
            continue
        try:
            gpu = lookup_gpu(
                name.strip(),
                instead=None,
                memory_override="the price is per catalogue card: {gpu}=PRICE",
            )
            prices[gpu.name] = price
        except UserError as error:
            raise UserError(
                [replace(p, field_path="--price-per-hour", file=None) for p in error.problems]
            ) from None
    return prices


def check_data(args: argparse.Namespace) -> int:
    """Check the spec's dataset row by row; exit 2 (via ``UserError``) when any row is bad."""
    from peftgen.check_data import check_dataset
    from peftgen.check_data.output import printed_problems, progress_bar, report_json, report_text
    from peftgen.errors import UserError
    from peftgen.resolve import unloadable_data_problems

    if args.limit is not None and args.limit < 1:
        raise UserError.single(f"must be at least 1; got {args.limit}", field_path="--limit")
    loaded = load_spec(args.spec)
    unloadable = unloadable_data_problems(loaded)  # validate's rule, before any hub call
    if unloadable:
        raise UserError(unloadable)
    try:
        with progress_bar(f"checking {loaded.spec.dataset.path}") as progress:
            result = check_dataset(
                with_absolute_paths(loaded.spec, loaded.path.parent),
                limit=args.limit,
                tokenizer_dir=args.tokenizer,
                progress=progress,
            )
    except UserError as error:
        # A missing file or an offline hub is a problem with the spec's dataset.path: point there.
        raise UserError(
            [
                loaded.problem(p.field_path, p.message, p.hint)
                if p.file is None and p.field_path
                else p
                for p in error.problems
            ]
        ) from None
    if args.json:
        sys.stdout.write(json.dumps(report_json(result), indent=2) + "\n")
    else:
        sys.stdout.write(report_text(result))
    if result.problems_total:
        raise UserError(printed_problems(result))
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """Predicted vs measured peak memory per receipt, and the error statistics (or ``--json``)."""
    from rich.markup import escape
    from rich.table import Table

    from peftgen.calibrate import allocator_lines, calibrate_receipts, summary_lines, table_rows
    from peftgen.errors import printable

    result = calibrate_receipts(args.receipts)
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return 0
    header, *body = table_rows(result)
    table = Table(title="memory receipts: predicted vs measured peak per GPU")
    for index, name in enumerate(header):
        # The spec name stays on one line (what a reader looks for); the rest may fold.
        table.add_column(
            name, justify="left" if index < 4 else "right", overflow="fold", no_wrap=index == 1
        )
    for cells in body:
        # Receipt strings (spec name, device, file name) are data: never rich markup.
        table.add_row(*(escape(printable(cell)) for cell in cells))
    console = _console(highlight=False, width=200)
    console.print(table)
    for line in [*summary_lines(result), *allocator_lines(result)]:
        console.print(escape(printable(line)), soft_wrap=True)
    return 0
