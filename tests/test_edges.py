"""Every input gets an answer (issue 15): hostile and odd inputs end in exit 2 with a message.

Each test runs one case through the command line and checks the exit code (2), that no
traceback was printed, what the message says (file, line, field where there is one) and
that nothing was written or deleted. No test touches the network: "no network" is a
monkeypatched connection.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from peftgen import hub, render
from peftgen.cli import main
from peftgen.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "specs" / "tiny-llama"
DATA = REPO / "specs" / "data" / "clinical_sft.jsonl"
GIB = 2**30


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in a scratch folder, hub offline, probe answers 'unreachable' unless a test says."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_unreachable.cache_clear()


def spec_text(
    *,
    model: str = str(TINY_MODEL),
    data: str = str(DATA),
    hardware: str = "  vram_gib: 2",
    extra: str = "",
) -> str:
    return (
        "name: edge\n"
        "method: sft\n"
        "model:\n"
        f"  id: {model}\n"
        "dataset:\n"
        f"  path: {data}\n"
        "  format: messages\n"
        "hardware:\n"
        f"{hardware}\n"
        "training:\n"
        "  max_length: 256\n"
        f"{extra}"
    )


def write(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse refuses an argument with exit 2
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(result: tuple[int, str, str], *needles: str) -> str:
    """Exit 2, no traceback, every needle in stderr; returns stderr."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders): to compare before/after."""
    return {
        str(path.relative_to(folder)): (None if path.is_dir() else path.read_bytes())
        for path in sorted(folder.rglob("*"))
    }


# --- spec files: characters, anchors, locations -----------------------------------------------


@pytest.mark.parametrize(
    ("character", "name"),
    [("\u2028", "U+2028"), ("\u2029", "U+2029"), ("\u0085", "U+0085")],
)
def test_a_line_break_hidden_in_a_comment_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], character: str, name: str
) -> None:
    text = spec_text(extra=f"  # a comment{character}  max_length: 4096\n")
    spec = write(tmp_path, text)
    err = refused(run(capsys, "validate", str(spec)), f"{spec}:12:14: character {name}")
    assert "not allowed in a spec" in err


def test_self_referencing_list_anchor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text(extra="lora:\n  target_modules: &t [q_proj, *t]\n"))
    refused(
        run(capsys, "validate", str(spec)),
        f"{spec}:13:31: alias *t is inside its own anchor &t",
    )


def test_self_referencing_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text(extra="lora: &l {r: 8, <<: *l}\n"))
    refused(run(capsys, "validate", str(spec)), f"{spec}:12:21: alias *l is inside its own")


def test_an_empty_value_is_reported_on_its_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = spec_text(extra="lora:\n  r:\n  lora_alpha: 16\n")
    spec = write(tmp_path, text)
    refused(run(capsys, "validate", str(spec)), f"{spec}:13:5: lora.r: must be a whole number")


def test_an_empty_value_on_the_last_line_is_not_past_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, spec_text(extra="lora:\n  r:\n"))
    err = refused(run(capsys, "validate", str(spec)), f"{spec}:13:5: lora.r:")
    assert "  13 |   r:" in err


def test_a_merged_key_is_quoted_where_the_key_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = spec_text(extra="  <<: &l {learning_rate: 0.001}\nlora:\n  <<: {r: 8}\n  r: 0\n")
    spec = write(tmp_path, text)
    err = refused(run(capsys, "validate", str(spec)), f"{spec}:15:6: lora.r: must be > 0; got 0")
    assert "  15 |   r: 0" in err


def test_a_long_name_states_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text().replace("name: edge", "name: " + "a" * 101))
    refused(run(capsys, "validate", str(spec)), "name: must be at most 100 characters")


def test_a_file_of_only_a_document_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, "---\n")
    err = refused(run(capsys, "validate", str(spec)), f"{spec}: the file is empty")
    assert "line" not in err and ":2:" not in err


def test_a_split_on_a_local_file_fails_at_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(
        tmp_path, spec_text().replace("  format: messages\n", "  format: messages\n  split: test\n")
    )
    refused(
        run(capsys, "validate", str(spec)),
        f"{spec}:8:10: dataset.split: a local file has one split, `train`; got 'test'",
    )


# --- GPU memory --------------------------------------------------------------------------------


def test_a_tiny_vram_gib_in_the_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text(hardware="  vram_gib: 1.0e-12"))
    refused(
        run(capsys, "plan", str(spec)),
        f"{spec}:9:13: hardware.vram_gib: must be a number of GiB from 0.5 to 4096",
    )


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "0", "-1", "0.1", "lots"])
def test_vram_gib_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    spec = write(tmp_path, spec_text())
    refused(run(capsys, "plan", str(spec), "--vram-gib", value), "argument --vram-gib: must be")


def test_vram_gib_override_through_the_api_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftgen.load import load_spec
    from peftgen.plan import make_plan
    from peftgen.resolve import resolve

    monkeypatch.chdir(REPO)
    resolved = resolve(load_spec(Path("specs/tiny-cpu-sft.yaml")))
    with pytest.raises(UserError, match="--vram-gib: must be a number of GiB"):
        make_plan(resolved, None, float("nan"))


# --- local model folders -----------------------------------------------------------------------


def _model_folder(tmp_path: Path, config: bytes | str | dict[str, object]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if isinstance(config, dict):
        config = json.dumps(config)
    raw = config.encode() if isinstance(config, str) else config
    (folder / "config.json").write_bytes(raw)
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[1, 2]", "must hold a JSON object ({...}); got a list"),
        ("null", "must hold a JSON object ({...}); got null"),
        ('"llama"', "must hold a JSON object ({...}); got a string"),
        (b'{"model_type": "llama", "name": "caf\xe9"}', "not UTF-8 (byte 0xe9"),
        ("[" * 10_000 + "]" * 10_000, "nested too deeply"),
        ('{"a": ' * 10_000 + "1" + "}" * 10_000, "nested too deeply"),
        ('{"vocab_size": ' + "9" * 5000 + "}", "a number too long to read"),
        ("{", "not valid JSON"),
    ],
    ids=["list", "null", "string", "latin-1", "deep-list", "deep-object", "5000-digits", "bad"],
)
def test_an_unusable_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str | bytes, message: str
) -> None:
    folder = _model_folder(tmp_path, config)
    spec = write(tmp_path, spec_text(model=str(folder)))
    refused(run(capsys, "validate", str(spec)), f"{spec}:4:7: model.id: ", message)


def _tiny_config(**changes: object) -> dict[str, object]:
    config: dict[str, object] = json.loads((TINY_MODEL / "config.json").read_text())
    config.update(changes)
    return config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_key_value_heads": 8},
            "num_key_value_heads (8) is more than num_attention_heads (4)",
        ),
        ({"num_key_value_heads": 3}, "num_attention_heads (4) is not a multiple of num_key_value"),
        ({"head_dim": 15}, "head_dim (15) is odd"),
        (
            {"num_attention_heads": 3, "num_key_value_heads": 1},
            "hidden_size (64) is not a multiple of num_attention_heads (3)",
        ),
        ({"architectures": 5}, "architectures"),
    ],
    ids=["kv-more-than-heads", "kv-not-dividing", "odd-head-dim", "hidden-not-dividing", "arch"],
)
def test_an_inconsistent_config_is_refused_before_simulate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    message: str,
) -> None:
    folder = _model_folder(tmp_path, _tiny_config(**changes))
    spec = write(tmp_path, spec_text(model=str(folder)))
    refused(run(capsys, "plan", str(spec), "--simulate"), f"{spec}:4:7: model.id: ", message)


def test_a_path_to_a_folder_is_never_a_catalogue_alias(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    shutil.copytree(TINY_MODEL, tmp_path / "tiny-llama")
    spec = write(tmp_path, spec_text(model="./tiny-llama"))
    code, out, err = run(capsys, "plan", str(spec), "--json")
    assert code == 0, err
    assert json.loads(out)["model_id"] != "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert json.loads(out)["total_parameters"] < 10**6
    assert "catalogue" not in err


def test_a_bare_name_that_is_a_folder_and_an_alias_takes_the_folder_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    shutil.copytree(TINY_MODEL, tmp_path / "tiny-llama")
    spec = write(tmp_path, spec_text(model="tiny-llama"))
    code, out, err = run(capsys, "plan", str(spec), "--json")
    assert code == 0, err
    assert json.loads(out)["total_parameters"] < 10**6  # the tiny folder, not TinyLlama-1.1B
    code, out, err = run(capsys, "validate", str(spec))
    assert code == 0, err
    assert f"{spec}:4:7: warning: model.id: 'tiny-llama' is both the local folder" in err
    assert "'./tiny-llama'" in err


def test_a_missing_folder_written_as_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder exists in the working directory, not beside the spec: refused, and the
    message says the spec's folder is the one read (it once claimed to have looked in the
    current directory too)."""
    spec = write(tmp_path, spec_text(model="./tiny-llama"))
    elsewhere = tmp_path / "cwd"
    (elsewhere / "tiny-llama").mkdir(parents=True)
    (elsewhere / "tiny-llama" / "config.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    err = refused(run(capsys, "validate", str(spec)), "model folder './tiny-llama' does not exist")
    assert "never the current directory" in " ".join(err.split())


# --- check-data ----------------------------------------------------------------------------------


def _data_spec(tmp_path: Path, data: Path) -> Path:
    return write(tmp_path, spec_text(data=str(data)))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_row_nested_100000_deep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    row = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    data = tmp_path / f"data{suffix}"
    data.write_text(row if suffix == ".jsonl" else f"[{row}]", encoding="utf-8")
    refused(
        run(capsys, "check-data", str(_data_spec(tmp_path, data))),
        f"{data}:1: unreadable JSON: nested too deeply",
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_row_with_a_5000_digit_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    good = DATA.read_text(encoding="utf-8").splitlines()[0]
    row = '{"messages": ' + "1" * 5000 + "}"
    data = tmp_path / f"data{suffix}"
    text = f"{good}\n{row}\n" if suffix == ".jsonl" else f"[{good},\n{row}]"
    data.write_text(text, encoding="utf-8")
    refused(
        run(capsys, "check-data", str(_data_spec(tmp_path, data))),
        f"{data}:2: unreadable JSON: a number with more than 4300 digits",
    )


def test_an_unreadable_data_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "locked.jsonl"
    data.write_text(DATA.read_text(encoding="utf-8"), encoding="utf-8")
    original = Path.open

    def locked(self: Path, *args: object, **kwargs: object) -> object:
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", locked)
    code, out, err = run(capsys, "check-data", str(_data_spec(tmp_path, data)))
    refused((code, out, err), f"{data}: cannot read the dataset: Permission denied")
    assert "all good" not in out


def test_a_folder_as_the_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "rows.jsonl"
    data.mkdir()
    refused(
        run(capsys, "check-data", str(_data_spec(tmp_path, data))),
        "dataset.path: ",
        "is a folder; give one .jsonl/.json/.csv/.parquet file",
    )


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", ""), ("empty.json", "[]")])
def test_an_empty_data_file_says_it_has_no_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str
) -> None:
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    spec = _data_spec(tmp_path, data)
    code, out, err = run(capsys, "check-data", str(spec))
    refused((code, out, err), f"{data}: the file has no rows")
    assert "all good" not in out and "no rows" in out.splitlines()[0]
    code, out, err = run(capsys, "check-data", str(spec), "--json")
    refused((code, out, err), f"{data}: the file has no rows")
    report = json.loads(out)
    assert report["empty"] is True and report["problems"][0]["message"] == "the file has no rows"


def test_length_source_p99_without_a_tokenizer_is_located(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = spec_text(model="llama3-8b", hardware="  gpu: rtx-4090", extra="  length_source: p99\n")
    spec = write(tmp_path, text)
    refused(
        run(capsys, "plan", str(spec)),
        f"{spec}:12:18: training.length_source: p99 measures the data's token lengths",
    )


def test_length_source_p99_on_bad_rows_points_at_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": 1}\n', encoding="utf-8")
    spec = write(tmp_path, spec_text(data=str(data), extra="  length_source: p99\n"))
    refused(
        run(capsys, "plan", str(spec)),
        f"{spec}:12:18: training.length_source: p99 measures the dataset's token lengths",
        f"{data}:1: ",
    )


# --- writing files -------------------------------------------------------------------------------

FILES = {"train.py": "print('train')\n", "merge.py": "print('merge')\n", "plan.md": "# plan\n"}


def _disk_full(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """Every ``Path.write_text`` after the first ``after`` fails with ENOSPC."""
    original = Path.write_text
    calls = {"n": 0}

    def full(self: Path, *args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)


def test_emit_under_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("mine", encoding="utf-8")
    spec = write(tmp_path, spec_text())
    before = tree(tmp_path)
    refused(run(capsys, "emit", str(spec), "-o", str(blocker / "out")), "is a file, not a folder")
    assert tree(tmp_path) == before


def test_emit_into_proc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text())
    refused(run(capsys, "emit", str(spec), "-o", "/proc/peftgen-out"), "cannot write the folder")


def test_emit_into_an_unwritable_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    def denied(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # what a 0555 folder does (tests run as root)
    spec = write(tmp_path, spec_text())
    before = tree(tmp_path)
    refused(run(capsys, "emit", str(spec), "-o", str(tmp_path / "out")), "permission denied")
    assert tree(tmp_path) == before


def test_emit_on_a_full_disk_leaves_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    render.write_output_dir(out, FILES)
    before = tree(tmp_path)
    _disk_full(monkeypatch, after=1)
    with pytest.raises(UserError, match="no space left on the device"):
        render.write_output_dir(out, {name: "new" for name in FILES})
    assert tree(tmp_path) == before


def test_emit_keeps_a_folder_named_like_an_emitted_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "plan.md").mkdir(parents=True)
    (out / "plan.md" / "notes.txt").write_text("mine", encoding="utf-8")
    before = tree(tmp_path)
    with pytest.raises(UserError, match=r"plan\.md \(a folder\)"):
        render.write_output_dir(out, FILES)
    assert tree(tmp_path) == before


def test_emit_keeps_a_link_named_like_an_emitted_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.py"
    target.write_text("mine", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.py").symlink_to(target)
    with pytest.raises(UserError, match="did not write"):
        render.write_output_dir(out, FILES)
    assert target.read_text(encoding="utf-8") == "mine"
    assert (out / "train.py").is_symlink()


def test_emit_replaces_only_its_own_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    render.write_output_dir(out, FILES)
    render.write_output_dir(out, {"train.py": "new\n"})
    assert sorted(p.name for p in out.iterdir()) == [render.EMITTED_MANIFEST, "train.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_emit_refuses_to_overwrite_a_file_edited_since_it_wrote_it(tmp_path: Path) -> None:
    """The script says to edit the spec, not the file; a user who edited it anyway keeps
    the edit until they say to drop it."""
    out = tmp_path / "out"
    render.write_output_dir(out, FILES)
    (out / "train.py").write_text("my own change\n", encoding="utf-8")
    before = tree(tmp_path)
    with pytest.raises(UserError) as caught:
        render.write_output_dir(out, {name: "new" for name in FILES})
    (problem,) = caught.value.problems
    assert problem.message.startswith("train.py: changed since emit wrote the folder")
    assert problem.hint is not None and "--overwrite-edits" in problem.hint
    assert tree(tmp_path) == before
    render.write_output_dir(out, {name: "new" for name in FILES}, overwrite_edits=True)
    assert (out / "train.py").read_text(encoding="utf-8") == "new"
    # Unedited files are replaced without asking, as before.
    render.write_output_dir(out, {name: "newer" for name in FILES})
    assert (out / "train.py").read_text(encoding="utf-8") == "newer"


def test_emitted_folder_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        render.write_output_dir(tmp_path / "out", FILES)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "train.py").stat().st_mode) == 0o644


def _report_or_schema(kind: str, spec: Path, output: Path) -> list[str]:
    if kind == "report":
        return ["report", str(spec), "-o", str(output), "--format", "md"]
    return ["schema", "-o", str(output)]


@pytest.mark.parametrize("kind", ["report", "schema"])
def test_a_full_disk_leaves_no_truncated_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    spec = write(tmp_path, spec_text())
    output = tmp_path / "out" / "result.md"
    output.parent.mkdir()
    output.write_text("the previous version\n", encoding="utf-8")
    before = tree(tmp_path)
    _disk_full(monkeypatch)
    refused(run(capsys, *_report_or_schema(kind, spec, output)), "no space left on the device")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["report", "schema"])
def test_writing_under_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    spec = write(tmp_path, spec_text())
    blocker = tmp_path / "afile"
    blocker.write_text("mine", encoding="utf-8")
    before = tree(tmp_path)
    refused(run(capsys, *_report_or_schema(kind, spec, blocker / "x.md")), "cannot write")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["report", "schema"])
def test_writing_into_an_unwritable_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    import tempfile

    spec = write(tmp_path, spec_text())

    def denied(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    before = tree(tmp_path)
    refused(run(capsys, *_report_or_schema(kind, spec, tmp_path / "x.md")), "permission denied")
    assert tree(tmp_path) == before


def test_report_into_proc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text())
    refused(run(capsys, "report", str(spec), "-o", "/proc/peftgen.html"), "cannot write")


# --- calibrate -----------------------------------------------------------------------------------


def _receipt(**changes: object) -> dict[str, object]:
    receipt: dict[str, object] = {
        "receipt_version": 1,
        "spec_name": "run",
        "stage": "end",
        "optimizer_steps": 10,
        "device": {"type": "cuda", "name": "NVIDIA H200"},
        "measured": {
            "max_memory_allocated_bytes": 10 * GIB,
            "max_memory_reserved_bytes": 20 * GIB,
        },
        "predicted": {
            "gpu": "NVIDIA H200",
            "precision": "bf16",
            "peak_allocated_bytes": 11 * GIB,
            "torch_reserved_bytes": 16 * GIB,
        },
    }
    receipt.update(changes)
    return receipt


@pytest.mark.parametrize("markup", ["[/]", "[bold red]loud[/bold red]", "[link=http://x]y"])
def test_calibrate_prints_markup_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], markup: str
) -> None:
    receipt = tmp_path / "r.json"
    receipt.write_text(json.dumps(_receipt(spec_name=markup)), encoding="utf-8")
    code, out, err = run(capsys, "calibrate", str(receipt))
    assert code == 0, err
    assert markup in out


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            json.dumps(_receipt()).replace(str(11 * GIB), str(10**400), 1),
            "predicted.peak_allocated_bytes: must be a byte count from 0 to 2**60; got a 401-digit",
        ),
        (
            json.dumps(_receipt()).replace(str(10 * GIB), str(10**400), 1),
            "measured.max_memory_allocated_bytes: must be a positive byte count",
        ),
        (
            json.dumps(_receipt()).replace(str(10 * GIB), "NaN", 1),
            "measured.max_memory_allocated_bytes: has the wrong type (float: nan)",
        ),
        ("[" * 100_000 + "]" * 100_000, "not a memory receipt: JSON nested too deeply"),
        (
            json.dumps(_receipt()).replace(str(10 * GIB), "9" * 5000, 1),
            "not a memory receipt: it holds a number with more than 4300 digits",
        ),
    ],
    ids=["10**400-predicted", "10**400-measured", "nan", "deep", "5000-digits"],
)
def test_calibrate_refuses_an_unusable_receipt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: str, message: str
) -> None:
    receipt = tmp_path / "r.json"
    receipt.write_text(raw, encoding="utf-8")
    for flags in ([], ["--json"]):
        refused(run(capsys, "calibrate", *flags, str(receipt)), f"{receipt}: {message}")


# --- slow failures: no network -----------------------------------------------------------------


def _no_network(monkeypatch: pytest.MonkeyPatch, behaviour: str) -> None:
    """The hub is unreachable: the connection fails at once, or hangs (a black-holed route)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def connect(host: str, port: int, timeout_s: float) -> None:
        if behaviour == "hangs":
            time.sleep(30)
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(hub, "_connect", connect)
    hub.hub_unreachable.cache_clear()


def _timed(call: Callable[[], tuple[int, str, str]]) -> tuple[tuple[int, str, str], float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


@pytest.mark.parametrize("behaviour", ["fails", "hangs"])
def test_plan_of_a_hub_model_without_network_answers_quickly(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
) -> None:
    _no_network(monkeypatch, behaviour)
    spec = write(tmp_path, spec_text(model="someorg/not-in-the-catalogue"))
    result, seconds = _timed(lambda: run(capsys, "plan", str(spec)))
    refused(
        result,
        f"{spec}:4:7: model.id: model 'someorg/not-in-the-catalogue' is not in the catalogue "
        "and the hub cannot be reached",
        "HF_HUB_OFFLINE=1",
        "config.json",
    )
    assert seconds < 5


@pytest.mark.parametrize("behaviour", ["fails", "hangs"])
def test_check_data_of_a_hub_dataset_without_network_answers_quickly(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
) -> None:
    _no_network(monkeypatch, behaviour)
    spec = write(tmp_path, spec_text(model="llama3-8b", data="someorg/some-dataset"))
    result, seconds = _timed(lambda: run(capsys, "check-data", str(spec)))
    refused(
        result,
        f"{spec}:6:9: dataset.path: 'someorg/some-dataset' is not a local file and the hub "
        "cannot be reached",
        "HF_HUB_OFFLINE=1",
    )
    assert seconds < 5


def test_check_data_of_a_hub_tokenizer_without_network_answers_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_network(monkeypatch, "hangs")
    spec = write(tmp_path, spec_text(model="llama3-8b"))
    (code, out, err), seconds = _timed(lambda: run(capsys, "check-data", str(spec)))
    assert code == 0, err
    assert "the hub cannot be reached" in out and "--tokenizer DIR" in out
    assert seconds < 5


def test_a_hub_config_without_transformers_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_connect", lambda host, port, timeout_s: None)
    hub.hub_unreachable.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails like a missing package
    spec = write(tmp_path, spec_text(model="someorg/not-in-the-catalogue"))
    err = refused(run(capsys, "validate", str(spec)), "pip install 'peftgen[train]'")
    assert "No module named" not in err


def test_simulate_without_torch_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    spec = write(tmp_path, spec_text())
    err = refused(run(capsys, "plan", str(spec), "--simulate"), "--simulate: needs torch")
    assert "pip install 'peftgen[train]'" in err and "No module named" not in err


def test_vram_gib_argument_type_is_argparse_friendly() -> None:
    from peftgen.cli import _vram_gib

    assert _vram_gib("24") == 24.0
    with pytest.raises(argparse.ArgumentTypeError):
        _vram_gib("nan")


def test_hub_calls_run_with_short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    before = constants.HF_HUB_ETAG_TIMEOUT
    with hub.quick_timeouts():
        assert constants.HF_HUB_ETAG_TIMEOUT == 5
        assert os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] == "10"
    assert before == constants.HF_HUB_ETAG_TIMEOUT
    assert "HF_HUB_ETAG_TIMEOUT" not in os.environ


def test_the_hub_probe_gives_up_after_two_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch, "hangs")
    started = time.perf_counter()
    reason = hub.hub_unreachable()
    assert reason is not None and "within 2 s" in reason
    assert time.perf_counter() - started < 3


def test_a_model_id_too_long_for_the_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, spec_text(model="a" * 290))
    refused(run(capsys, "validate", str(spec)), f"{spec}:4:7: model.id: unknown model")


def test_a_data_path_too_long_for_the_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, spec_text(data="d" * 290 + ".jsonl"))
    refused(
        run(capsys, "check-data", str(spec)),
        f"{spec}:6:9: dataset.path: cannot read the dataset",
        "File name too long",
    )


@pytest.mark.parametrize("kind", ["report", "schema"])
def test_writing_to_a_name_too_long(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    spec = write(tmp_path, spec_text())
    before = tree(tmp_path)
    refused(
        run(capsys, *_report_or_schema(kind, spec, tmp_path / ("x" * 300))),
        "cannot write",
        "nothing was written",
    )
    assert tree(tmp_path) == before


def test_emit_to_a_name_too_long(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, spec_text())
    before = tree(tmp_path)
    refused(run(capsys, "emit", str(spec), "-o", str(tmp_path / ("x" * 300))), "cannot write")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("form", ["html", "md"])
def test_report_onto_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    spec = write(tmp_path, spec_text())
    (tmp_path / "report.html").mkdir()
    before = tree(tmp_path)
    refused(
        run(capsys, "report", str(spec), "--format", form, "-o", str(tmp_path / "report.html")),
        "cannot write the report: it is a folder",
    )
    assert tree(tmp_path) == before  # no chart of the markdown report either


@pytest.mark.parametrize("root", ["/", "/tmp/.."])
def test_an_output_dir_at_the_filesystem_root_is_refused_at_emit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: str
) -> None:
    spec = write(tmp_path, spec_text(extra=f"output_dir: {json.dumps(root)}\n"))
    before = tree(tmp_path)
    refused(
        run(capsys, "emit", str(spec), "-o", str(tmp_path / "out")),
        "output_dir: is the filesystem root",
    )
    assert tree(tmp_path) == before


def test_output_through_a_link_writes_the_file_it_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old", encoding="utf-8")
    link.symlink_to(real)
    assert run(capsys, "schema", "-o", str(link))[0] == 0
    assert link.is_symlink() and json.loads(real.read_text(encoding="utf-8"))["title"]


def test_output_to_a_device_is_written_through_not_replaced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``-o /dev/null`` must leave the device a device (as root, replacing it is possible)."""
    null = Path(os.devnull)
    assert run(capsys, "schema", "-o", str(null))[0] == 0
    assert stat.S_ISCHR(null.stat().st_mode)


def test_use_vllm_true_is_trl_s_default_mode_and_the_choices_say_false(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trl's own ``use_vllm: true`` means its default ``vllm_mode``, colocate; a wrong value
    lists every choice as a spec writes it, ``false`` included."""
    from peftgen.load import load_spec

    source = (REPO / "specs" / "qwen2.5-1.5b-grpo-vllm.yaml").read_text(encoding="utf-8")
    assert "  use_vllm: colocate\n" in source
    spec = tmp_path / "spec.yaml"
    spec.write_text(source.replace("  use_vllm: colocate\n", "  use_vllm: true\n"), "utf-8")
    assert load_spec(spec).spec.grpo.use_vllm == "colocate"  # type: ignore[union-attr]
    spec.write_text(source.replace("  use_vllm: colocate\n", "  use_vllm: fast\n"), "utf-8")
    refused(run(capsys, "validate", str(spec)), "must be one of: false, colocate, server")


def test_a_local_data_file_that_is_not_there_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate, plan and emit do not need the data, but the script reads it at that path:
    a missing local file is a warning naming where it is looked for (the spec's folder),
    not silence until check-data or the run."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: no-data\nmethod: sft\nmodel:\n  id: meta-llama/Meta-Llama-3-8B-Instruct\n"
        "dataset:\n  path: rows.jsonl\n  format: messages\nhardware:\n  gpu: rtx-4090\n",
        encoding="utf-8",
    )
    code, _, err = run(capsys, "validate", str(spec))
    assert code == 0
    assert f"warning: dataset.path: no file at {str(tmp_path / 'rows.jsonl')!r}" in err
    (tmp_path / "rows.jsonl").write_text("", encoding="utf-8")
    code, _, err = run(capsys, "validate", str(spec))
    assert code == 0 and "no file at" not in err


@pytest.mark.parametrize("command", ["plan", "validate"])
def test_a_closed_output_pipe_exits_as_the_shell_reports_it(command: str) -> None:
    """``peftgen plan SPEC | head -1``: the reader is gone before the table is written.
    Rich's own answer was exit 1 (a bug, by the README's exit codes) with nothing said."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails: a reader that has already exited
    try:
        spec = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
        result = subprocess.run(
            [sys.executable, "-m", "peftgen", command, str(spec)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""
