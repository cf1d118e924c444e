"""Command line: thin. Parses arguments, calls one function, prints, exits.

The only module that prints or exits. Artifacts go to stdout, diagnostics to stderr.
A ``UserError`` becomes its message and exit 2; ``NothingFitsError`` exit 3; anything
else is a bug in peftgen and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from peftgen import __version__
from peftgen.errors import NothingFitsError, UserError

Command = Callable[[argparse.Namespace], int]


def _cmd_validate(args: argparse.Namespace) -> int:
    from peftgen.commands import validate

    return validate(args)


def _cmd_schema(args: argparse.Namespace) -> int:
    from peftgen.commands import schema

    return schema(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from peftgen.commands import plan

    return plan(args)


def _cmd_emit(args: argparse.Namespace) -> int:
    from peftgen.commands import emit

    return emit(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from peftgen.commands import report

    return report(args)


def _cmd_check_data(args: argparse.Namespace) -> int:
    from peftgen.commands import check_data

    return check_data(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from peftgen.commands import calibrate

    return calibrate(args)


def _vram_gib(text: str) -> float:
    """``--vram-gib``: a finite number of GiB a GPU can have (argparse exits 2 otherwise)."""
    from peftgen.stack import vram_gib_problem

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GiB; got {text!r}") from None
    problem = vram_gib_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _add_gpu_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", help="plan for this catalogue GPU instead of the spec's")
    parser.add_argument(
        "--vram-gib", type=_vram_gib, metavar="GIB", help="plan for a GPU with this much memory"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftgen",
        description="Compile a LoRA/QLoRA experiment spec into a memory plan, "
        "a standalone trl training script and a VRAM report.",
    )
    parser.add_argument("--version", action="version", version=f"peftgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check spec files and report every problem")
    p.add_argument("specs", nargs="+", type=Path, metavar="SPEC")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the spec's JSON Schema")
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("plan", help="predict peak GPU memory and pick a precision")
    p.add_argument("spec", type=Path, metavar="SPEC")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="also run one training step on fake tensors and show its peak (needs torch)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="plan with this spec key changed (dotted, e.g. training.max_length=4096; "
        "repeatable; the file is not edited)",
    )
    _add_gpu_overrides(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("emit", help="write the standalone training script")
    p.add_argument("spec", type=Path, metavar="SPEC")
    p.add_argument("-o", "--output-dir", type=Path, help="write train.py, merge.py, plan.md ...")
    p.add_argument("--force", action="store_true", help="emit even when nothing fits")
    p.add_argument(
        "--overwrite-edits",
        action="store_true",
        help="replace emitted files edited since (emit refuses otherwise)",
    )
    _add_gpu_overrides(p)
    p.set_defaults(func=_cmd_emit)

    p = sub.add_parser("report", help="write the VRAM advisor report")
    p.add_argument("spec", type=Path, metavar="SPEC")
    p.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    p.add_argument(
        "--format",
        choices=["html", "md"],
        help="default: md for an -o file named .md, else html",
    )
    p.add_argument(
        "--price-per-hour",
        action="append",
        default=[],
        metavar="[GPU=]PRICE",
        help="your price per GPU-hour, for the target GPU or a named one (repeatable): the "
        "GPU matrix then shows the run's cost",
    )
    _add_gpu_overrides(p)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("check-data", help="check the dataset against the method and format")
    p.add_argument("spec", type=Path, metavar="SPEC")
    p.add_argument("--limit", type=int, help="check only the first N rows")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: model.id)"
    )
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser("calibrate", help="compare memory receipts with their predictions")
    p.add_argument("receipts", nargs="+", type=Path, metavar="RECEIPT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except UserError as error:
        print(error.render(unlocated=f"peftgen {args.command}"), file=sys.stderr)
        return error.exit_code
    except NothingFitsError as error:
        print(str(error), file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        return _closed_pipe_exit_code()


CLOSED_PIPE_EXIT_CODE = 141
"""128 + SIGPIPE: what a shell reports for a program whose reader closed the pipe
(``| head -1``); Python turns SIGPIPE into BrokenPipeError instead of dying of it."""


def _closed_pipe_exit_code() -> int:
    """Point stdout at /dev/null, so the interpreter's final flush of what the closed pipe
    did not take does not print a second error."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return CLOSED_PIPE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
