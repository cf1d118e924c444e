"""Read a spec file: YAML with positions -> validated ``Spec``, or a ``UserError``.

(Minimal first version: the positions/did-you-mean machinery is being built in issue 2.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from peftgen.errors import Problem, UserError
from peftgen.spec import SPEC_ADAPTER, AnySpec


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec plus where it came from."""

    spec: AnySpec
    path: Path
    text: str
    sha256: str
    positions: dict[tuple[str | int, ...], tuple[int, int]] = field(default_factory=dict)
    """(line, column), 1-based, of every key/value by its path in the document."""
    warnings: tuple[str, ...] = ()


def load_spec(path: Path) -> LoadedSpec:
    """Load and validate one spec file; every problem found is raised at once."""
    try:
        raw_bytes = path.read_bytes()
    except OSError as error:
        raise UserError.single(f"cannot read spec: {error.strerror}", file=str(path)) from None
    text = raw_bytes.decode("utf-8")
    try:
        document = YAML(typ="safe").load(text)
    except YAMLError as error:
        raise UserError.single(f"malformed YAML: {error}", file=str(path)) from None
    try:
        spec = SPEC_ADAPTER.validate_python(document)
    except ValidationError as error:
        problems = [
            Problem(
                item["msg"],
                file=str(path),
                field_path=".".join(str(part) for part in item["loc"][1:]),
            )
            for item in error.errors()
        ]
        raise UserError(problems) from None
    return LoadedSpec(spec, path, text, hashlib.sha256(raw_bytes).hexdigest())
