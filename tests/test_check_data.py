"""`peftgen check-data`: every broken dataset gets its message on the right line, and the
token statistics equal a direct tokenization with the tiny model's tokenizer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from peftgen.check_data import check_dataset, measured_length_percentile, nearest_rank_percentile
from peftgen.check_data.rows import check_row
from peftgen.cli import main
from peftgen.load import load_spec

BROKEN = Path(__file__).parent / "data" / "broken"
# A catalogue id: not a local folder, so with the hub offline the token pass is skipped
# and only the structural checks run (no transformers import).
HUB_MODEL_ID = "meta-llama/Meta-Llama-3-8B"
SENTENCES = [
    "The patient is a 64-year-old man with type 2 diabetes and hypertension.",
    "Summarise the discharge note in three sentences for the general practitioner.",
    "Creatinine clearance estimates kidney function from age, weight and serum creatinine.",
    "Blood pressure 142/88 mmHg, heart rate 76 beats per minute, afebrile.",
    "The hazard ratio for the primary endpoint was 0.78 with a 95% confidence interval.",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_spec(
    directory: Path,
    data_path: Path | str,
    method: str,
    data_format: str,
    *,
    model_id: str | Path = HUB_MODEL_ID,
    max_length: int = 2048,
    extra: str = "",
) -> Path:
    grpo = "grpo:\n  reward_funcs: [length]\n" if method == "grpo" else ""
    spec = directory / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: check-data-test
            method: {method}
            model:
              id: {json.dumps(str(model_id))}
            dataset:
              path: {json.dumps(str(data_path))}
              format: {data_format}
            hardware:
              gpu: rtx-4090
            training:
              max_length: {max_length}
              per_device_train_batch_size: 8
              gradient_accumulation_steps: 1
            """
        )
        + grpo
        + extra,
        encoding="utf-8",
    )
    return spec


def run_cli(capsys: pytest.CaptureFixture[str], spec: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["check-data", str(spec), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- Broken datasets: each message on its line ------------------------------------------

BROKEN_CASES: list[tuple[str, str, str, list[tuple[int, str]]]] = [
    (
        "sft_messages_bad.jsonl",
        "sft",
        "messages",
        [
            (2, "messages[1].role: unknown role 'bot'; use one of: system, user, assistant, tool"),
            (3, "messages[1].role: two 'user' messages in a row"),
            (4, "messages[0].content: is empty"),
            (5, "messages: the conversation ends with 'user'; it must end with 'assistant'"),
            (6, "messages[1]: missing key `content`"),
            # line 7 is blank (skipped, as datasets does); numbering stays physical
            (8, "messages[0].role: the conversation starts with 'assistant'"),
            (9, "missing key `messages` for format 'messages' (the row has `conversation`)"),
            (10, "messages: must be a list of {role, content} messages; got a string"),
            (11, "messages[2].role: a system message may only come first"),
        ],
    ),
    (
        "invalid_json_line7.jsonl",
        "sft",
        "text",
        [(7, "invalid JSON: Expecting property name enclosed in double quotes (column 68)")],
    ),
    (
        "sft_messages_as_preference.jsonl",
        "dpo",
        "preference",
        [
            (1, "missing keys `prompt`, `chosen`, `rejected` for format 'preference'"),
            (2, "the row looks like format 'messages': check dataset.format"),
        ],
    ),
    (
        "prompt_completion_missing_column.csv",
        "sft",
        "prompt_completion",
        [(1, "missing column `completion` for format 'prompt_completion'; the file has columns")],
    ),
    (
        "prompt_completion_bad.csv",
        "sft",
        "prompt_completion",
        # The quoted prompt of line 2 spans two lines, so the next record starts on line 4.
        [(4, "completion: is empty"), (5, "has 3 fields; the header (line 1) names 2")],
    ),
    (
        "preference_bad.jsonl",
        "dpo",
        "preference",
        [
            (2, "`chosen` and `rejected` are identical"),
            (3, "`prompt`, `chosen` and `rejected` must all be strings or all be message lists"),
            (4, "missing key `rejected` for format 'preference'"),
            (5, "chosen[0].role: must be 'assistant'; got 'user'"),
        ],
    ),
    (
        "grpo_prompts_bad.json",
        "grpo",
        "prompt",
        [
            (3, "prompt: is empty"),
            (4, "prompt[1].role: a system message may only come first"),
            (5, "missing key `prompt` for format 'prompt' (the row has `question`)"),
            (6, "the row is plain but the first row (line 2) is conversational"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("file_name", "method", "data_format", "expected"),
    BROKEN_CASES,
    ids=[case[0] for case in BROKEN_CASES],
)
def test_broken_dataset_reports_each_row_on_its_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file_name: str,
    method: str,
    data_format: str,
    expected: list[tuple[int, str]],
) -> None:
    data = BROKEN / file_name
    code, out, err = run_cli(capsys, write_spec(tmp_path, data, method, data_format))
    assert code == 2
    problem_lines = err.splitlines()
    # One problem line per expected message (no extra, none missing), in file order.
    assert len(problem_lines) == len(expected), err
    for line_text, (line, message) in zip(problem_lines, expected, strict=True):
        assert line_text.startswith(f"{data}:{line}: "), line_text
        assert message in line_text, line_text
    assert "token statistics skipped" in out


def test_messages_row_that_alternates_with_tool_calls_is_good() -> None:
    messages = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What is the BMI at 82 kg, 1.75 m?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "bmi"}]},
        {"role": "tool", "content": "26.8"},
        {"role": "assistant", "content": "The BMI is 26.8."},
    ]
    assert check_row({"messages": messages}, "sft", "messages").faults == []
    # A tool answer with no call before it is out of order.
    bad = check_row({"messages": [messages[1], messages[3], messages[4]]}, "sft", "messages")
    assert [fault.field_path for fault in bad.faults] == ["messages[1].role"]


def test_bom_is_accepted_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = BROKEN / "bom_prompt_completion.jsonl"
    assert data.read_bytes().startswith(b"\xef\xbb\xbf")
    code, out, err = run_cli(capsys, write_spec(tmp_path, data, "sft", "prompt_completion"))
    assert code == 0, err
    assert "2 rows checked" in out and "all good" in out
    assert f"note: {data}:1: the file starts with a UTF-8 byte-order mark; accepted" in out


def test_json_array_rows_are_located_by_their_first_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_text(
        '[\n  {"text": "one"},\n  {\n    "text": ""\n  },\n  {"text": "three"}\n]\n',
        encoding="utf-8",
    )
    report = check_dataset(load_spec(write_spec(tmp_path, data, "sft", "text")).spec)
    assert report.rows_checked == 3
    assert [(p.line, p.field_path, p.message) for p in report.problems] == [(3, "text", "is empty")]


def test_json_array_with_invalid_element_names_its_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_text('[\n{"text": "one"},\n{"text": "two",,}\n]\n', encoding="utf-8")
    report = check_dataset(load_spec(write_spec(tmp_path, data, "sft", "text")).spec)
    assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [(3, "invalid JSON")]


def test_json_array_parsed_in_tiny_chunks_equals_json_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Elements, multi-byte characters and line counts survive any chunk boundary."""
    from peftgen.check_data import sources

    monkeypatch.setattr(sources, "JSON_ARRAY_CHUNK_BYTES", 7)
    rows = [{"text": f"é{index} ü {'x' * index}", "n": [index, {"k": "ß"}]} for index in range(30)]
    data = tmp_path / "rows.json"
    data.write_text("[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]")
    source = sources.JsonSource(data, data.stat().st_size)
    parsed = list(source.rows())
    assert [row.record for row in parsed] == json.loads(data.read_text(encoding="utf-8"))
    assert [row.line for row in parsed] == list(range(2, 32))


def test_json_array_with_bad_utf8_names_its_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
    report = check_dataset(load_spec(write_spec(tmp_path, data, "sft", "text")).spec)
    assert [(p.line, p.message) for p in report.problems] == [(3, "not valid UTF-8")]


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_text('{"text": "one"}\n{"txt": "two"}\n', encoding="utf-8")
    report = check_dataset(load_spec(write_spec(tmp_path, data, "sft", "text")).spec)
    assert [(p.line, p.message) for p in report.problems] == [
        (2, "missing key `text` for format 'text' (the row has `txt`)")
    ]


def test_parquet_rows_are_located_by_row_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow  # the train extra (datasets) brings it: a plain import, never a skip
    import pyarrow.parquet as pq

    data = tmp_path / "rows.parquet"
    table = pyarrow.table({"prompt": ["a", "b", "c", "d"], "completion": ["x", "y", " ", "z"]})
    pq.write_table(table, data, row_group_size=2)
    code, _, err = run_cli(capsys, write_spec(tmp_path, data, "sft", "prompt_completion"))
    assert code == 2
    assert err.strip() == f"{data}: row 2: completion: is empty"


def test_csv_cannot_hold_messages(tmp_path: Path) -> None:
    data = tmp_path / "chat.csv"
    data.write_text('messages\n"[{""role"": ""user""}]"\n', encoding="utf-8")
    report = check_dataset(load_spec(write_spec(tmp_path, data, "sft", "messages")).spec)
    assert [(p.line, p.message.split(",")[0]) for p in report.problems] == [
        (1, "format 'messages' needs lists of {role")
    ]


def test_empty_dataset_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n", encoding="utf-8")
    code, out, err = run_cli(capsys, write_spec(tmp_path, data, "sft", "text"))
    assert code == 2
    assert err.strip() == f"{data}: the file has no rows"
    assert "no rows" in out.splitlines()[0] and "all good" not in out


def test_missing_dataset_file_points_at_the_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, tmp_path / "nope.jsonl", "sft", "text")
    code, _, err = run_cli(capsys, spec)
    assert code == 2
    assert err.startswith(f"{spec}:6:9: dataset.path: ")  # where `path:` is written
    assert "dataset file" in err and "does not exist" in err


def test_hub_dataset_offline_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, write_spec(tmp_path, "someone/clinical-notes", "sft", "text"))
    assert code == 2
    assert "'someone/clinical-notes' is not a local file and the hub is offline" in err


def test_limit_checks_only_the_first_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, BROKEN / "invalid_json_line7.jsonl", "sft", "text")
    code, out, _ = run_cli(capsys, spec, "--limit", "6")
    assert code == 0
    assert "6 rows checked (stopped at --limit)" in out


def test_json_output_lists_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, BROKEN / "preference_bad.jsonl", "dpo", "preference")
    code, out, _ = run_cli(capsys, spec, "--json")
    assert code == 2
    result = json.loads(out)
    assert result["rows_checked"] == 5
    assert result["bad_rows"] == 4
    assert [problem["line"] for problem in result["problems"]] == [2, 3, 4, 5]
    assert result["problems"][3]["field"] == "chosen[0].role"
    assert result["tokens"]["stats"] is None
    assert "hub is offline" in result["tokens"]["skipped_reason"]


def test_printed_problems_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "empty_texts.jsonl"
    data.write_text('{"text": ""}\n' * 120, encoding="utf-8")
    code, _, err = run_cli(capsys, write_spec(tmp_path, data, "sft", "text"))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 51
    assert lines[49].startswith(f"{data}:50: text: is empty")
    assert "... and 70 more problems in 120 bad rows" in lines[50]


# --- Token statistics -------------------------------------------------------------------


def _messages_rows(count: int) -> list[dict[str, Any]]:
    """Conversations of varied length (1-6 sentences per answer)."""
    rows = []
    for index in range(count):
        answer = " ".join(SENTENCES[: 1 + index % 5] * (1 + index % 3))
        question = SENTENCES[index % len(SENTENCES)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def _chat_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_length_statistics_equal_a_direct_tokenization(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy
    from transformers import AutoTokenizer

    rows = _messages_rows(157)
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    max_length = 128
    spec = write_spec(
        tmp_path, data, "sft", "messages", model_id=tiny_model_dir, max_length=max_length
    )
    code, out, err = run_cli(capsys, spec, "--json")
    assert code == 0, err
    stats = json.loads(out)["tokens"]["stats"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = numpy.array([_chat_length(tokenizer, row["messages"]) for row in rows])
    for percentile in (50, 90, 99):
        direct = int(numpy.percentile(lengths, percentile, method="inverted_cdf"))
        assert stats[f"p{percentile}"] == direct
    assert stats["max"] == int(lengths.max())
    assert stats["rows"] == len(rows)
    assert stats["truncated_rows"] == int((lengths > max_length).sum())
    assert 0 < stats["truncated_rows"] < len(rows)  # the data straddles max_length
    assert stats["recommended_max_length"] == min(512, math.ceil(stats["p99"] / 64) * 64)


def test_text_report_shows_trained_tokens_and_stats(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_jsonl(
        tmp_path / "pc.jsonl",
        [{"prompt": "What is the BMI?", "completion": " The BMI is 26.8."}] * 3,
    )
    # model.id is a hub id (offline here); --tokenizer supplies the tokenizer instead.
    spec = write_spec(tmp_path, data, "sft", "prompt_completion")
    code, out, err = run_cli(capsys, spec, "--tokenizer", str(tiny_model_dir))
    assert code == 0, err
    assert f"tokens (tokenizer {tiny_model_dir})" in out
    # A chat tokenizer: the row is a user turn and an assistant turn; the prompt and the
    # template's markers around it are masked, the answer and its end of turn trained.
    example = out[out.index("trained tokens inside") : out.index("length in tokens")]
    assert "<|im_start|>user" in example and "What is the BMI?<|im_end|>" in example
    assert example.index("<|im_start|>assistant") < example.index("⟦ The BMI")
    assert "⟦ The BMI is 26.8.<|im_end|>" in example
    assert "the completion only (training.loss_on: completion)" in out
    assert "training.max_length 2,048 truncates 0 rows (0.0%)" in out
    assert "recommended max_length: 64 (p99" in out


def test_preference_length_is_the_longer_sequence(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    rows = [
        {"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " " + SENTENCES[index]}
        for index in range(len(SENTENCES))
    ]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = load_spec(write_spec(tmp_path, data, "dpo", "preference", model_id=tiny_model_dir)).spec
    report = check_dataset(spec)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def turns(prompt: str, answer: str) -> int:
        # The chat model's rows become a user and an assistant turn, as the script maps them.
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return len(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )

    direct = [
        max(turns(row["prompt"], row["chosen"]), turns(row["prompt"], row["rejected"]))
        for row in rows
    ]
    assert list(report.lengths) == direct


def test_grpo_messages_lengths_are_the_prompt_without_the_answer(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    rows = _messages_rows(9)
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    spec_path = write_spec(
        tmp_path, data, "grpo", "messages", model_id=tiny_model_dir, max_length=16
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    direct = [
        len(
            tokenizer.apply_chat_template(
                row["messages"][:-1], tokenize=True, return_dict=True, add_generation_prompt=True
            )["input_ids"]
        )
        for row in rows
    ]
    report = check_dataset(load_spec(spec_path).spec)
    assert list(report.lengths) == direct
    # Prompts are not truncated by the GRPO script, so the measured length is not capped.
    assert measured_length_percentile(load_spec(spec_path).spec, 100) == max(direct) > 16
    code, out, _ = run_cli(capsys, spec_path)
    assert code == 0
    assert "prompt length in tokens over 9 rows" in out
    assert "9 prompts (100.0%) are longer than training.max_length 16" in out


def test_base_tokenizer_without_template_skips_stats_unless_chatml_is_named(
    tmp_path: Path, tiny_base_model_dir: Path
) -> None:
    data = _write_jsonl(tmp_path / "chat.jsonl", _messages_rows(4))
    spec_path = write_spec(tmp_path, data, "sft", "messages", model_id=tiny_base_model_dir)
    tokens = check_dataset(load_spec(spec_path).spec).tokens
    assert tokens is not None and tokens.stats is None
    assert tokens.skipped_reason is not None and "has no chat template" in tokens.skipped_reason

    named = write_spec(
        tmp_path, data, "sft", "messages", model_id=tiny_base_model_dir, extra=""
    ).read_text(encoding="utf-8")
    spec_path.write_text(
        named.replace("  format: messages\n", "  format: messages\n  chat_template: chatml\n"),
        encoding="utf-8",
    )
    tokens = check_dataset(load_spec(spec_path).spec).tokens
    assert tokens is not None and tokens.stats is not None
    # The ChatML markers are single special tokens, as the generated script installs them.
    first_tokens = [span.text for span in tokens.example]
    assert first_tokens[0].startswith("<|im_start|>user\n")


def test_measured_length_percentile_is_capped_at_max_length(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    rows = _messages_rows(40)
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = sorted(_chat_length(tokenizer, row["messages"]) for row in rows)
    wide = load_spec(write_spec(tmp_path, data, "sft", "messages", model_id=tiny_model_dir)).spec
    assert measured_length_percentile(wide, 50) == lengths[math.ceil(0.5 * len(lengths)) - 1]
    assert measured_length_percentile(wide, 100) == lengths[-1]
    narrow_path = write_spec(
        tmp_path, data, "sft", "messages", model_id=tiny_model_dir, max_length=32
    )
    assert measured_length_percentile(load_spec(narrow_path).spec, 99) == 32


def test_nearest_rank_percentile() -> None:
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert nearest_rank_percentile(values, 50) == 5
    assert nearest_rank_percentile(values, 90) == 9
    assert nearest_rank_percentile(values, 99) == 10
    assert nearest_rank_percentile([7], 1) == 7


@pytest.mark.slow
def test_tokenization_matches_sft_trainer(
    tmp_path: Path, tiny_model_dir: Path, tiny_base_model_dir: Path
) -> None:
    """input_ids and the trained-token mask equal what trl's SFTTrainer collates, with the
    options and row conversion the generated script uses for each ``training.loss_on``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peftgen.chat_templates import CHATML
    from peftgen.check_data.tokens import RowTokenizer, as_conversation

    chat = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat.chat_template = CHATML.training  # what the script installs for this family
    base = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": SENTENCES[0]}
    answer = {"role": "assistant", "content": SENTENCES[1]}
    system = {"role": "system", "content": SENTENCES[2]}
    plain_pc = [{"prompt": SENTENCES[0], "completion": " " + SENTENCES[4]}]
    # (tokenizer, format, shape, loss_on, rows as check-data reads them, trl options)
    cases: list[tuple[Any, str, str, str, list[dict[str, Any]], dict[str, bool]]] = [
        (
            chat,
            "messages",
            "conversational",
            "assistant",
            [{"messages": [system, question, answer]}],
            {"assistant_only_loss": True},
        ),
        (chat, "messages", "conversational", "all", [{"messages": [question, answer]}], {}),
        (
            chat,
            "text",
            "plain",
            "all",
            [{"text": SENTENCES[2]}, {"text": SENTENCES[3] + chat.eos_token}],
            {},
        ),
        (base, "prompt_completion", "plain", "completion", plain_pc, {}),
        (chat, "prompt_completion", "plain", "completion", plain_pc, {}),
        (
            chat,
            "prompt_completion",
            "conversational",
            "all",
            [{"prompt": [question], "completion": [answer]}],
            {"completion_only_loss": False},
        ),
    ]
    for tokenizer, data_format, shape, loss_on, rows, options in cases:
        # The script converts plain rows into turns when the model has a chat template.
        trainer_rows = [as_conversation(row) for row in rows] if tokenizer is chat else rows
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=str(tmp_path / "out"),
                max_length=256,
                report_to="none",
                bf16=False,
                use_cpu=True,
                **options,
            ),
            train_dataset=Dataset.from_list(trainer_rows),
            processing_class=tokenizer,
        )
        row_tokenizer = RowTokenizer(tokenizer, "sft", data_format, loss_on=loss_on)
        for index, row in enumerate(rows):
            collated = trainer.data_collator([trainer.train_dataset[index]])
            mine = row_tokenizer.tokenize(row, shape)
            case = (data_format, shape, loss_on)
            assert mine.input_ids == collated["input_ids"][0].tolist(), case
            assert mine.trained_mask == (collated["labels"][0] != -100).tolist(), case


# --- Streaming ---------------------------------------------------------------------------

STREAM_SCRIPT = """
import resource, sys
from peftgen.check_data import check_dataset
from peftgen.load import load_spec

spec = load_spec(__import__("pathlib").Path(sys.argv[1])).spec
before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = check_dataset(spec)
after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(report.rows_checked, report.bad_rows, before_kib, after_kib)
"""


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_200_mb_file_streams_in_bounded_memory(tmp_path: Path, suffix: str) -> None:
    """JSON lines, and a JSON array parsed element by element: peak RSS barely moves."""
    data = tmp_path / f"big{suffix}"
    row = {
        "messages": [
            {"role": "user", "content": " ".join(SENTENCES)},
            {"role": "assistant", "content": " ".join(SENTENCES * 4)},
        ]
    }
    separator = b"\n" if suffix == ".jsonl" else b",\n"
    line = json.dumps(row).encode() + separator
    rows = 200 * 2**20 // len(line) + 1
    with data.open("wb") as handle:
        handle.write(b"" if suffix == ".jsonl" else b"[\n")
        block = line * 1000
        for _ in range(rows // 1000):
            handle.write(block)
        handle.write(line * (rows % 1000))
        handle.write(b'{"messages": []}\n' if suffix == ".jsonl" else b'{"messages": []}\n]\n')
    assert data.stat().st_size > 200 * 2**20
    spec = write_spec(tmp_path, data, "sft", "messages")
    result = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT, str(spec)],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    checked, bad, before_kib, after_kib = map(int, result.stdout.split())
    assert checked == rows + 1
    assert bad == 1  # the empty conversation on the last line
    growth_mib = (after_kib - before_kib) / 1024
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.0f} MiB reading a 200 MB file"


def test_plan_sizes_for_the_measured_p99_when_the_spec_asks(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`training.length_source: p99` plans exactly as a spec whose max_length is the p99."""
    import numpy
    from transformers import AutoTokenizer

    rows = _messages_rows(157)
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = numpy.array([_chat_length(tokenizer, row["messages"]) for row in rows])
    p99 = int(numpy.percentile(lengths, 99, method="inverted_cdf"))
    assert p99 < 2048

    measured_dir, fixed_dir = tmp_path / "measured", tmp_path / "fixed"
    measured_dir.mkdir()
    fixed_dir.mkdir()
    measured = write_spec(
        measured_dir,
        data,
        "sft",
        "messages",
        model_id=tiny_model_dir,
        extra="  length_source: p99\n",
    )
    fixed = write_spec(fixed_dir, data, "sft", "messages", model_id=tiny_model_dir, max_length=p99)

    assert main(["plan", str(measured), "--json"]) == 0
    measured_out = capsys.readouterr()
    assert f"planning for {p99} tokens" in measured_out.err
    assert main(["plan", str(fixed), "--json"]) == 0
    fixed_plan = json.loads(capsys.readouterr().out)
    measured_plan = json.loads(measured_out.out)
    assert measured_plan["candidates"] == fixed_plan["candidates"]

    assert (
        main(
            [
                "plan",
                str(write_spec(tmp_path, data, "sft", "messages", model_id=tiny_model_dir)),
                "--json",
            ]
        )
        == 0
    )
    full_plan = json.loads(capsys.readouterr().out)
    full_activation = full_plan["candidates"][0]["breakdown"]["activation_bytes"]
    assert measured_plan["candidates"][0]["breakdown"]["activation_bytes"] < full_activation


SYSTEM_FIRST = [
    {
        "messages": [
            {"role": "system", "content": SENTENCES[0]},
            {"role": "user", "content": SENTENCES[1]},
            {"role": "assistant", "content": SENTENCES[2]},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": SENTENCES[3]},
            {"role": "assistant", "content": SENTENCES[4]},
        ]
    },
]


def test_a_system_turn_the_chat_template_refuses_is_a_bad_row(tmp_path: Path) -> None:
    """Gemma 2's template raises "System role not supported": such rows would stop the
    script at its first batch, so check-data reports them (from the catalogue's record of
    the model's template when no tokenizer is at hand); Llama 3's template takes them."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in SYSTEM_FIRST), encoding="utf-8")
    gemma = load_spec(
        write_spec(tmp_path, data, "sft", "messages", model_id="google/gemma-2-9b-it")
    ).spec
    report = check_dataset(gemma)
    assert report.bad_rows == 1
    (problem,) = report.problems
    assert problem.line == 1 and problem.field_path == "messages[0]"
    assert "System role not supported" in problem.message
    llama = load_spec(
        write_spec(
            tmp_path, data, "sft", "messages", model_id="meta-llama/Meta-Llama-3-8B-Instruct"
        )
    ).spec
    assert check_dataset(llama).bad_rows == 0


def test_a_tokenizer_with_gemma_s_template_refuses_the_system_turn_too(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The tokenizer's own template decides when it is at hand (identified by its text)."""
    import shutil

    from transformers import AutoTokenizer

    from peftgen.chat_templates import read_template

    folder = tmp_path / "gemma-tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = read_template("gemma")
    tokenizer.save_pretrained(folder)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in SYSTEM_FIRST), encoding="utf-8")
    spec = load_spec(write_spec(tmp_path, data, "sft", "messages", model_id=folder)).spec
    report = check_dataset(spec)
    assert (
        report.bad_rows == 1
        and "the tokenizer's chat template (gemma)" in report.problems[0].message
    )


def test_a_tokenizer_folder_that_loads_nothing_is_the_user_s_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tokenizer names the folder to use: one without tokenizer files stops with exit 2,
    not a skipped token pass that exits 0."""
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a note"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(
        capsys, write_spec(tmp_path, data, "sft", "text"), "--tokenizer", str(empty)
    )
    assert code == 2
    assert f"{empty}: no tokenizer loads from this folder (it holds no tokenizer.json" in err
    assert "Traceback" not in err


def test_the_offline_hint_does_not_ask_for_what_is_already_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a note"}])
    code, out, _ = run_cli(capsys, write_spec(tmp_path, data, "sft", "text"))
    assert code == 0
    assert "the hub is offline; pass --tokenizer DIR" in out
    assert "set HF_HUB_OFFLINE=1" not in out


def test_the_example_shows_the_data_s_control_characters_escaped(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data row holding a terminal escape is printed as text, not sent to the terminal."""
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a note\x1b[2J cleared"}])
    spec = write_spec(tmp_path, data, "sft", "text")
    code, out, err = run_cli(capsys, spec, "--tokenizer", str(tiny_model_dir))
    assert code == 0, err
    assert "\x1b" not in out
    assert "a note\\x1b[2J cleared" in out


def test_a_local_file_the_script_cannot_load_is_refused_as_validate_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .txt beside the spec, checked from another folder: validate's message, not "not a
    local file and the hub is offline"."""
    (tmp_path / "notes.txt").write_text("a note\n", encoding="utf-8")
    spec = write_spec(tmp_path, tmp_path / "notes.txt", "sft", "text")
    spec.write_text(
        spec.read_text(encoding="utf-8").replace(str(tmp_path / "notes.txt"), "notes.txt"),
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, spec)
    assert code == 2
    assert "'notes.txt' is a local path, and the script loads a local data file by its" in err
    assert "hub" not in err.split("hub dataset id")[-1]
