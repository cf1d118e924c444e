"""Where the files a spec names live, whatever the working directory.

Every relative path in a spec (a local ``model.id`` folder, a local ``dataset.path``,
the files of ``grpo.reward_funcs``, ``output_dir``) is relative to the spec's own folder,
the way a Makefile or a ``pyproject.toml`` names its files. The emitted scripts refer to
the same files relative to their own folder (or by absolute path when printed to stdout),
so ``cd anywhere && python path/to/train.py`` finds them, and the ``spec.yaml`` written next
to them names them relative to *its* folder, so it resolves to the same files again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from peftgen.spec import (
    USER_REWARD_PATTERN,
    AnySpec,
    GrpoRunSpec,
    from_spec_dir,
    is_local_dataset,
)


@dataclass(frozen=True)
class RunPaths:
    """The absolute paths of the local files a run reads and writes."""

    model_dir: Path | None
    """The local model folder; None for a hub model."""
    dataset_file: Path | None
    """The local data file; None for a hub dataset."""
    reward_files: dict[str, Path]
    """User reward files as the spec writes them -> absolute path."""
    output_dir: Path


def run_paths(spec: AnySpec, spec_dir: Path, local_model_dir: Path | None) -> RunPaths:
    """The spec's files, absolute. ``local_model_dir`` is the folder the catalogue lookup
    found for ``model.id`` (None for a catalogue or hub model)."""
    rewards: dict[str, Path] = {}
    if isinstance(spec, GrpoRunSpec):
        for item in spec.grpo.reward_funcs:
            match = USER_REWARD_PATTERN.match(item)
            if match is not None:
                rewards[match["path"]] = from_spec_dir(match["path"], spec_dir)
    dataset = spec.dataset.path
    return RunPaths(
        model_dir=Path(os.path.abspath(local_model_dir)) if local_model_dir else None,
        dataset_file=from_spec_dir(dataset, spec_dir) if is_local_dataset(dataset) else None,
        reward_files=rewards,
        output_dir=from_spec_dir(spec.resolved_output_dir, spec_dir),
    )


def relative_to(target: Path, anchor_dir: Path) -> str | None:
    """``target`` relative to ``anchor_dir`` with forward slashes (``../data/x.jsonl``), or
    None when the two share no folder below the filesystem root.

    A relative path keeps a run folder and its data movable together; once it would climb
    to the root (``../../../../work/data``) it is only a longer absolute path that breaks
    when either moves, and across Windows drives it cannot be written at all."""
    try:
        common = Path(os.path.commonpath([target, anchor_dir]))
    except ValueError:  # different drives, or one path relative and one absolute
        return None
    if common == Path(common.anchor):
        return None
    return Path(os.path.relpath(target, anchor_dir)).as_posix()


def placed(target: Path, anchor_dir: Path | None) -> str:
    """How a file written into ``anchor_dir`` names ``target``: relative where
    ``relative_to`` can, else absolute (always absolute without an anchor)."""
    relative = relative_to(target, anchor_dir) if anchor_dir is not None else None
    return relative if relative is not None else target.as_posix()


def relocated_spec(
    spec: AnySpec, paths: RunPaths, model_id: str, anchor_dir: Path | None
) -> AnySpec:
    """The spec with its model resolved (an alias becomes the hub id) and its local paths
    rewritten relative to ``anchor_dir`` (absolute when None), so a copy of the spec saved
    in ``anchor_dir`` names the same files."""

    def place(path: Path) -> str:
        return placed(path, anchor_dir)

    model = spec.model.model_copy(
        update={"id": place(paths.model_dir) if paths.model_dir else model_id}
    )
    dataset = spec.dataset
    if paths.dataset_file is not None:
        dataset = dataset.model_copy(update={"path": place(paths.dataset_file)})
    update: dict[str, object] = {
        "model": model,
        "dataset": dataset,
        "output_dir": place(paths.output_dir),
    }
    if isinstance(spec, GrpoRunSpec) and paths.reward_files:
        rewards = []
        for item in spec.grpo.reward_funcs:
            match = USER_REWARD_PATTERN.match(item)
            if match is None:
                rewards.append(item)
            else:
                rewards.append(f"{place(paths.reward_files[match['path']])}:{match['func']}")
        update["grpo"] = spec.grpo.model_copy(update={"reward_funcs": rewards})
    return spec.model_copy(update=update)


def with_absolute_paths(spec: AnySpec, spec_dir: Path) -> AnySpec:
    """The spec with its local data file and a local model folder written absolute, for
    readers that open them from here (check-data, the p99 length measurement)."""
    dataset = spec.dataset
    if is_local_dataset(dataset.path):
        absolute = from_spec_dir(dataset.path, spec_dir).as_posix()
        dataset = dataset.model_copy(update={"path": absolute})
    model = spec.model
    folder = from_spec_dir(model.id, spec_dir)
    if not Path(model.id).is_dir() and folder.is_dir():
        model = model.model_copy(update={"id": folder.as_posix()})
    return spec.model_copy(update={"dataset": dataset, "model": model})
