"""One function per CLI command: load, resolve, compute, print.

Kept apart from ``cli`` so argument parsing stays thin and each command's work is a
plain function tests can call.
"""

from __future__ import annotations

import argparse
import json
import sys

from peftgen.load import load_spec
from peftgen.spec import spec_json_schema


def validate(args: argparse.Namespace) -> int:
    from peftgen.resolve import resolve

    for path in args.specs:
        resolve(load_spec(path))
        print(f"{path}: ok", file=sys.stderr)
    return 0


def schema(args: argparse.Namespace) -> int:
    text = json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def plan(args: argparse.Namespace) -> int:
    raise NotImplementedError("issue 3")


def emit(args: argparse.Namespace) -> int:
    raise NotImplementedError("issue 4")


def report(args: argparse.Namespace) -> int:
    raise NotImplementedError("issue 5")


def check_data(args: argparse.Namespace) -> int:
    raise NotImplementedError("issue 9")


def calibrate(args: argparse.Namespace) -> int:
    raise NotImplementedError("issue 7")
