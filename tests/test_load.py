"""Loading specs: positions, readable errors, malformed input, aliases, and the invalid cases.

Every ``tests/cases/invalid/**/NAME.yaml`` is run through ``peftgen validate`` and must exit
2, print no traceback, and print what ``NAME.expected`` holds. The expected file lists
lines that must appear in stderr, in order (a line ending in ``...`` matches any line
starting with what precedes it); every problem header stderr prints (``path:line:col:``)
must be among them, so an extra or a missing problem fails the case. To record a case's
output after a deliberate message change:
``peftgen validate tests/cases/invalid/NAME.yaml 2> tests/cases/invalid/NAME.expected``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftgen.cli import main
from peftgen.errors import UserError
from peftgen.load import MAX_EXPANDED_NODES, MAX_SPEC_BYTES, load_spec

REPO = Path(__file__).resolve().parents[1]
CASES_DIR = REPO / "tests" / "cases" / "invalid"
CASES = sorted(CASES_DIR.rglob("*.yaml"))

VALID_SPEC = """\
# yaml-language-server: $schema=peftgen.schema.json
name: clinical-qlora
method: sft
model:
  id: meta-llama/Meta-Llama-3-8B-Instruct
dataset:
  path: specs/data/clinical_sft.jsonl
  format: messages
hardware:
  gpu: rtx-4090
lora:
  r: 16
  target_modules: [q_proj, v_proj]
training:
  max_length: 1024
"""


@pytest.fixture(autouse=True)
def _offline_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cases are named relative to the repository root; the hub is never asked."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> UserError:
    with pytest.raises(UserError) as caught:
        load_spec(path)
    return caught.value


# --- the invalid cases ------------------------------------------------------------------------


def test_there_are_enough_invalid_cases() -> None:
    assert len(CASES) >= 32, [case.name for case in CASES]
    for case in CASES:
        assert case.with_suffix(".expected").is_file(), f"{case} has no .expected file"
    # docs/spec.md counts them (it once said 66 of 68).
    doc = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    assert f"one mistake class each ({len(CASES)} cases)" in doc


@pytest.mark.parametrize("case", CASES, ids=[str(c.relative_to(CASES_DIR)) for c in CASES])
def test_invalid_case(case: Path, capsys: pytest.CaptureFixture[str]) -> None:
    relative = case.relative_to(REPO).as_posix()
    exit_code = main(["validate", relative])
    captured = capsys.readouterr()
    assert exit_code == 2, captured.err
    assert captured.out == ""
    assert "Traceback" not in captured.err
    _assert_expected(captured.err, case.with_suffix(".expected").read_text(encoding="utf-8"))


def _assert_expected(stderr: str, expected_text: str) -> None:
    actual = [line.rstrip() for line in stderr.splitlines()]
    expected = [line.rstrip() for line in expected_text.splitlines() if line.strip()]
    assert expected, "the .expected file is empty"
    position = 0
    for wanted in expected:
        while position < len(actual) and not _matches(wanted, actual[position]):
            position += 1
        assert position < len(actual), f"missing (in order): {wanted!r}\n--- stderr:\n{stderr}"
        position += 1
    header_prefix = expected[0].split(":", 1)[0] + ":"
    headers = [line for line in actual if line.startswith(header_prefix)]
    unexpected = [line for line in headers if not any(_matches(w, line) for w in expected)]
    assert not unexpected, f"problems not in .expected: {unexpected}\n--- stderr:\n{stderr}"


def _matches(wanted: str, line: str) -> bool:
    if wanted.endswith("..."):
        return line.startswith(wanted[:-3])
    return line == wanted


SYNONYM_SPEC = """\
name: s
method: sft
model:
  id: meta-llama/Meta-Llama-3-8B-Instruct
dataset:
  path: specs/data/clinical_sft.jsonl
  format: {format}
hardware:
  gpu: rtx-4090
  distributed: {distributed}
precision: {precision}
"""


@pytest.mark.parametrize(
    ("field", "written", "meant"),
    [
        ("distributed", "zero3", "'deepspeed-zero3'"),
        ("distributed", "zero", "'deepspeed-zero2' or 'deepspeed-zero3'"),
        ("distributed", "fsdp2", "'fsdp'"),
        ("format", "chat", "'messages'"),
        ("format", "sharegpt", "'messages'"),
        ("format", "dpo", "'preference'"),
        ("precision", "nf4", "'4bit'"),
        ("precision", "bfloat16", "'bf16'"),
    ],
)
def test_words_other_tools_use_for_a_choice_get_a_did_you_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, written: str, meant: str
) -> None:
    values = {"format": "messages", "distributed": "none", "precision": "4bit", field: written}
    path = _write(tmp_path, SYNONYM_SPEC.format(**values))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"got '{written}'" in err
    assert f"hint: did you mean {meant}?" in err


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        # Another trainer's name: the supported method of its kind, not the closest spelling.
        ("method: sft", "method: ppo", ("got 'ppo'\n", "hint: did you mean 'grpo'?")),
        ("precision: 4bit", "precision: 4", ("got 4\n", "hint: did you mean '4bit'?")),
        # Other tools' key names: peft's rank, an lr, a batch size.
        ("precision: 4bit", "precision: 4bit\nlora:\n  rank: 8", ("`rank`", "mean 'r'?")),
        (
            "precision: 4bit",
            "precision: 4bit\ntraining:\n  lr: 0.0001",
            ("`lr`", "did you mean 'learning_rate'?"),
        ),
    ],
)
def test_a_number_or_another_trainer_s_name_gets_the_choice_it_means(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    old: str,
    new: str,
    said: tuple[str, str],
) -> None:
    values = {"format": "messages", "distributed": "none", "precision": "4bit"}
    path = _write(tmp_path, SYNONYM_SPEC.format(**values).replace(old, new))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert said[0] in err and said[1] in err


def test_validate_in_a_real_process_reports_every_file() -> None:
    """The installed entry point, several files at once: all problems, exit 2, no traceback."""
    names = ["lora_r_zero.yaml", "unknown_method.yaml", "non_utf8.yaml"]
    valid = REPO / "specs" / "llama3-8b-clinical-qlora.yaml"
    command = [
        sys.executable,
        "-m",
        "peftgen",
        "validate",
        str(valid.relative_to(REPO)),
        *(f"tests/cases/invalid/{name}" for name in names),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == "specs/llama3-8b-clinical-qlora.yaml: ok\n"
    for name in names:
        assert f"tests/cases/invalid/{name}:" in result.stderr
    assert "tests/cases/invalid/lora_r_zero.yaml:12:6: lora.r: must be > 0; got 0" in result.stderr


def test_a_bug_still_prints_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only user errors are turned into messages; anything else escapes to the top."""
    import peftgen.load

    def broken(*_: object) -> None:
        raise RuntimeError("a bug in peftgen")

    monkeypatch.setattr(peftgen.load, "parse", broken)
    with pytest.raises(RuntimeError):
        main(["validate", "tests/cases/invalid/lora_r_zero.yaml"])


# --- positions --------------------------------------------------------------------------------


def test_positions_of_keys_values_and_list_items(tmp_path: Path) -> None:
    loaded = load_spec(_write(tmp_path, VALID_SPEC))
    assert loaded.positions[("name",)] == (2, 7)
    assert loaded.key_positions[("lora", "r")] == (12, 3)
    assert loaded.positions[("lora", "r")] == (12, 6)
    assert loaded.positions[("lora", "target_modules", 1)] == (13, 28)
    assert loaded.position("lora.target_modules.0") == (13, 20)
    # A section points at its key; a field left out points at its section.
    assert loaded.position("lora") == (11, 1)
    assert loaded.position("lora.lora_dropout") == (11, 1)


def test_loaded_problem_quotes_the_line_with_a_caret(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID_SPEC)
    rendered = load_spec(path).problem("hardware.gpu", "no such card", "try t4").render()
    assert rendered == (
        f"{path}:10:8: hardware.gpu: no such card\n"
        "  10 |   gpu: rtx-4090\n"
        "     |        ^\n"
        "    hint: try t4"
    )


def test_valid_spec_has_no_warnings_and_a_stable_hash(tmp_path: Path) -> None:
    loaded = load_spec(_write(tmp_path, VALID_SPEC))
    assert loaded.warnings == ()
    assert loaded.spec.lora.target_modules == ["q_proj", "v_proj"]
    assert loaded.sha256 == load_spec(_write(tmp_path, VALID_SPEC, "b.yaml")).sha256


def test_problems_are_sorted_by_line(tmp_path: Path) -> None:
    text = VALID_SPEC.replace("max_length: 1024", "max_length: 2") + "precision: fp8\n"
    text = text.replace("r: 16", "r: -4").replace("name: clinical-qlora", "name: Bad Name")
    lines = [problem.line or 0 for problem in _problems(_write(tmp_path, text)).problems]
    assert lines == sorted(lines) and len(lines) == 4


# --- malformed input --------------------------------------------------------------------------


def test_a_100_mb_file_is_refused_by_size_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as stream:
        stream.truncate(100 * 1024 * 1024)  # sparse: 100 MB by size, no disk written
    started = time.perf_counter()
    error = _problems(path)
    assert time.perf_counter() - started < 1.0
    assert "file is 104.9 MB; a spec may be at most 1024 KiB" in error.render()


def test_just_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("#" * MAX_SPEC_BYTES + "\n", encoding="utf-8")
    assert "a spec may be at most" in _problems(path).render()


def test_alias_bomb_is_refused_fast_in_bounded_memory(tmp_path: Path) -> None:
    # 12 levels of 12 aliases: 12**12 (~9e12) strings once expanded.
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 12) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 12) + "]" for i in range(1, 12)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    tracemalloc.start()
    started = time.perf_counter()
    error = _problems(path)
    elapsed = time.perf_counter() - started
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2.0
    assert peak_bytes < 20 * 2**20
    assert f"past {MAX_EXPANDED_NODES:,} values" in error.render()


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    text = VALID_SPEC.replace("  r: 16\n", "  r: 16\n  r: 32\n")
    (problem,) = _problems(_write(tmp_path, text)).problems
    assert (problem.line, problem.column, problem.field_path) == (13, 3, "lora.r")
    assert "first on line 12" in problem.message


def test_tabs_in_the_indentation_are_named_per_line(tmp_path: Path) -> None:
    text = VALID_SPEC.replace("  r: 16", "\tr: 16").replace("  max_length", "\t max_length")
    problems = _problems(_write(tmp_path, text)).problems
    assert [(p.line, p.column) for p in problems] == [(12, 1), (15, 1)]
    assert all("tab character" in p.message for p in problems)


def test_non_utf8_names_byte_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID_SPEC.replace("rtx-4090", "rtx-4090 caf\xe9").encode("latin-1"))
    (problem,) = _problems(path).problems
    offset = VALID_SPEC.index("rtx-4090") + len("rtx-4090 caf")
    assert problem.message.startswith(f"not UTF-8: byte 0xe9 at offset {offset} (line 10, ")
    assert problem.line == 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("# just a comment\n", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping of keys"),
        ("42\n", "got 42"),
        ("name: x\nname2: [\n", "YAML syntax error"),
        ("name: x\x00\n", "character U+0000 is not allowed"),
        ("x: !custom 3\n", "YAML tag !custom is not allowed"),
        ("x: " + "[" * 200 + "]" * 200 + "\n", "nested more than 32 levels"),
    ],
)
def test_malformed_yaml_gets_a_message(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _problems(_write(tmp_path, text)).render()


def test_a_directory_or_missing_file_is_a_user_error(tmp_path: Path) -> None:
    assert "cannot read spec" in _problems(tmp_path).render()
    assert "cannot read spec" in _problems(tmp_path / "nope.yaml").render()


# --- aliases from other tools -----------------------------------------------------------------


def test_aliases_are_read_with_a_warning_naming_the_canonical_key(tmp_path: Path) -> None:
    text = VALID_SPEC.replace("  max_length: 1024\n", "  micro_batch_size: 4\n") + "lora_r: 8\n"
    text = text.replace("lora:\n  r: 16\n", "lora:\n")
    path = _write(tmp_path, text)
    loaded = load_spec(path)
    assert loaded.spec.training.per_device_train_batch_size == 4
    assert loaded.spec.lora.r == 8
    assert loaded.warnings == (
        f"{path}:14:3: warning: training.micro_batch_size: axolotl's name; read as "
        "training.per_device_train_batch_size (write `per_device_train_batch_size:` under "
        "`training:`)",
        f"{path}:15:1: warning: lora_r: axolotl's name; read as lora.r (write `r:` under `lora:`)",
    )
    # Errors on an aliased value point at the line where the alias is written.
    assert loaded.position("lora.r") == (15, 9)


def test_alias_errors_point_at_the_alias(tmp_path: Path) -> None:
    text = VALID_SPEC.replace("  max_length: 1024\n", "  gradient_checkpointing: true\n")
    (problem,) = _problems(_write(tmp_path, text + "sequence_len: 4\n")).problems
    assert (problem.line, problem.field_path) == (16, "training.max_length")
    assert problem.message.startswith("must be >= 16; got 4")


def test_validate_prints_warnings_on_stderr_and_ok_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = VALID_SPEC.replace("training:\n  max_length: 1024\n", "")
    path = _write(tmp_path, text + "cutoff_len: 512\n")
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok\n"
    assert "warning: cutoff_len: LLaMA-Factory's name; read as training.max_length" in (
        captured.err
    )


# --- any text: a spec or a UserError, never a traceback ---------------------------------------

_YAML_PIECES = [*":-[]{}&*!|>'\"#%@`,?\t\n x0.~<", "&a ", "*a", "<<: ", "!!str ", "!!binary "]
_YAML_PIECES += ["---\n", "...\n", "\x85", "\ufeff", "\x00", "\\", "lora_r: ", "dpo:\n"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    position=st.integers(0, len(VALID_SPEC)),
    insert=st.lists(st.sampled_from(_YAML_PIECES), max_size=6).map("".join),
    cut=st.integers(0, 5),
)
def test_any_edit_of_a_spec_loads_or_raises_a_user_error(
    tmp_path: Path, position: int, insert: str, cut: int
) -> None:
    path = _write(tmp_path, VALID_SPEC[:position] + insert + VALID_SPEC[position + cut :])
    try:
        load_spec(path)
    except UserError as error:
        assert all(problem.message for problem in error.problems)
        error.render()
