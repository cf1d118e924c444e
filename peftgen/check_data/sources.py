"""Stream a dataset's rows with where each came from, never holding the whole file.

Every reader yields ``Row``s: the decoded record (or why it could not be decoded) and
its location: the physical line for JSON lines, the line a record starts on for a JSON
array or a CSV file, the 0-based row index for parquet and hub datasets (what
``dataset[index]`` returns). Readers report how many bytes they have consumed so the
caller can draw a progress bar without a second pass over the file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from peftgen.errors import UserError
from peftgen.hub import DATASETS_OFFLINE_FLAGS, hub_offline
from peftgen.stack import LOCAL_DATA_LOADERS

UTF8_BOM = codecs.BOM_UTF8
# Bytes read at a time when a JSON array is parsed incrementally.
JSON_ARRAY_CHUNK_BYTES = 1 << 20
# One array element larger than this is reported instead of buffered further: a
# malformed element would otherwise pull the rest of a 10 GB file into memory.
JSON_ARRAY_MAX_ELEMENT_BYTES = 64 << 20
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Row:
    """One record of the dataset, or the reason it is not one."""

    line: int | None
    """1-based line the record starts on (text formats)."""
    index: int | None
    """0-based row index (parquet and hub datasets)."""
    record: dict[str, Any] | None
    """The decoded record; ``None`` when ``error`` says why it could not be decoded."""
    error: str | None = None


@dataclass(frozen=True)
class SourceNote:
    """Something worth knowing about the file that is not a bad row (e.g. a BOM)."""

    line: int | None
    message: str


class RowSource(ABC):
    """A dataset opened for streaming: rows, notes, progress in bytes."""

    def __init__(self, label: str, total_bytes: int | None) -> None:
        self.label = label
        """How problems name the source: the file path, or ``hub:<id>``."""
        self.total_bytes = total_bytes
        """Size of the file, for the progress bar; ``None`` when unknown (hub)."""
        self.bytes_read = 0
        self.notes: list[SourceNote] = []

    @abstractmethod
    def rows(self) -> Iterator[Row]:
        """Each record once, in file order; updates ``bytes_read`` and ``notes`` as it goes."""


class FileSource(RowSource):
    """A local file of one of ``stack.LOCAL_DATA_LOADERS``'s suffixes."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        super().__init__(str(path), size_bytes)
        self.path = path
        self.columns: list[str] = []
        """Column names, for formats with a header (CSV, parquet); checked once, not per row."""


def open_source(dataset_path: str, split: str) -> RowSource:
    """Pick the reader for ``dataset.path``: a local file by suffix, else a hub dataset."""
    path = Path(dataset_path)
    suffix = path.suffix.lower()
    try:
        is_folder, is_file = path.is_dir(), path.is_file()
    except OSError as error:  # a name too long for the file system, a loop of links
        raise UserError.single(
            f"cannot read the dataset {dataset_path!r}: {error.strerror or error}",
            field_path="dataset.path",
        ) from None
    if is_folder:
        raise UserError.single(
            f"{dataset_path!r} is a folder; give one .jsonl/.json/.csv/.parquet file",
            field_path="dataset.path",
        )
    if suffix in LOCAL_DATA_LOADERS:
        if not is_file:
            raise UserError.single(
                f"dataset file {dataset_path!r} does not exist "
                "(a relative path is relative to the spec's folder)",
                field_path="dataset.path",
            )
        try:
            size_bytes = path.stat().st_size
        except OSError as error:
            raise UserError.single(
                f"cannot read the dataset: {error.strerror or error}", file=dataset_path
            ) from None
        if suffix == ".jsonl":
            return JsonLinesSource(path, size_bytes)
        if suffix == ".json":
            return JsonSource(path, size_bytes)
        if suffix == ".csv":
            return CsvSource(path, size_bytes)
        return ParquetSource(path, size_bytes)
    return HubSource(dataset_path, split)


def _decode_line(raw: bytes, line_number: int) -> Row:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Row(
            line_number, None, None, f"not valid UTF-8 at byte {error.start + 1} of the line"
        )
    return _parse_json_record(text, line_number)


def _parse_json_record(text: str, line_number: int) -> Row:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return Row(line_number, None, None, f"invalid JSON: {error.msg} (column {error.colno})")
    except (RecursionError, ValueError) as error:
        return Row(line_number, None, None, _unreadable_json(error))
    if not isinstance(value, dict):
        return Row(line_number, None, None, f"a row must be a JSON object; got {_json_kind(value)}")
    return Row(line_number, None, value)


def _unreadable_json(error: Exception) -> str:
    """Valid JSON Python cannot hold: nesting past the recursion limit, a 4300+ digit number."""
    if isinstance(error, RecursionError):
        return "unreadable JSON: nested too deeply (a row is a flat object of messages or text)"
    return "unreadable JSON: a number with more than 4300 digits"


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


class JsonLinesSource(FileSource):
    """One JSON object per physical line; blank lines are skipped, as ``datasets`` does."""

    def rows(self) -> Iterator[Row]:
        with self.path.open("rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                self.bytes_read += len(raw)
                if line_number == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]
                    self.notes.append(_bom_note())
                if not raw.strip():
                    continue
                yield _decode_line(raw, line_number)


def _bom_note() -> SourceNote:
    return SourceNote(
        1,
        "the file starts with a UTF-8 byte-order mark; accepted (datasets.load_dataset skips it "
        "too), but other tools may not",
    )


class JsonSource(FileSource):
    """A ``.json`` file: a JSON array of objects, or JSON lines (both load with ``datasets``)."""

    def rows(self) -> Iterator[Row]:
        with self.path.open("rb") as handle:
            has_bom = handle.read(len(UTF8_BOM)) == UTF8_BOM
            if not has_bom:
                handle.seek(0)
            if _peek_first_non_space(handle) == b"[":
                if has_bom:
                    self.notes.append(_bom_note())
                yield from self._array_rows(handle)
                return
        lines = JsonLinesSource(self.path, self.total_bytes or 0)
        lines.notes = self.notes
        for row in lines.rows():
            self.bytes_read = lines.bytes_read
            yield row

    def _array_rows(self, handle: BinaryIO) -> Iterator[Row]:
        reader = _JsonArrayReader(handle)
        try:
            for row in reader.rows():
                self.bytes_read = handle.tell()
                yield row
        except _NotUtf8 as error:
            yield Row(error.line, None, None, "not valid UTF-8")


class _NotUtf8(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _JsonArrayReader:
    """``[obj, obj, ...]`` parsed element by element from a bounded text buffer.

    ``json.load`` would hold the whole array; here the buffer holds the unread rest of
    the current chunk plus, at most, one element (``JSON_ARRAY_MAX_ELEMENT_BYTES``).
    """

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.decoder = json.JSONDecoder()
        self.buffer = ""
        self.position = 0
        self.line_number = 1
        """Line of ``buffer[position]`` in the file."""
        self.at_eof = False

    def rows(self) -> Iterator[Row]:
        self._skip_space()
        self.position += 1  # the '[' that JsonSource saw
        self._skip_space()
        if self._peek() == "]":
            return
        while True:
            start_line = self.line_number
            value, error = self._next_value()
            if error is not None:
                yield Row(error[0], None, None, error[1])
                return
            if isinstance(value, dict):
                yield Row(start_line, None, value)
            else:
                message = f"a row must be a JSON object; got {_json_kind(value)}"
                yield Row(start_line, None, None, message)
            self._skip_space()
            separator = self._peek()
            if separator == "]":
                return
            if separator != ",":
                found = repr(separator) if separator else "the end of the file"
                yield Row(
                    self.line_number, None, None, f"invalid JSON: expected ',' or ']', got {found}"
                )
                return
            self.position += 1
            self._skip_space()

    def _refill(self) -> bool:
        raw = self.handle.read(JSON_ARRAY_CHUNK_BYTES)
        try:
            chunk = self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as error:
            pending = self.buffer.count("\n", self.position)
            raise _NotUtf8(self.line_number + pending + raw.count(b"\n", 0, error.start)) from None
        if not chunk:
            self.at_eof = True
            return False
        self.buffer = self.buffer[self.position :] + chunk
        self.position = 0
        return True

    def _peek(self) -> str:
        return self.buffer[self.position] if self.position < len(self.buffer) else ""

    def _skip_space(self) -> None:
        while True:
            while self.position < len(self.buffer) and self.buffer[self.position] in " \t\r\n":
                if self.buffer[self.position] == "\n":
                    self.line_number += 1
                self.position += 1
            if self.position < len(self.buffer) or not self._refill():
                return

    def _next_value(self) -> tuple[Any, tuple[int, str] | None]:
        """The next JSON value, or (line, message) of why it is not one."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.position)
            except json.JSONDecodeError as error:
                # Incomplete is indistinguishable from invalid until more text is read.
                too_big = len(self.buffer) - self.position > JSON_ARRAY_MAX_ELEMENT_BYTES
                if too_big or not self._refill():
                    lines_before = self.buffer.count("\n", 0, self.position)
                    line = self.line_number + error.lineno - 1 - lines_before
                    return None, (line, f"invalid JSON: {error.msg}")
                continue
            except (RecursionError, ValueError) as error:
                return None, (self.line_number, _unreadable_json(error))
            self.line_number += self.buffer.count("\n", self.position, end)
            self.position = end
            return value, None


def _peek_first_non_space(handle: BinaryIO) -> bytes:
    """The first non-whitespace byte, leaving the handle where it was."""
    start = handle.tell()
    while True:
        chunk = handle.read(4096)
        if not chunk:
            handle.seek(start)
            return b""
        stripped = chunk.lstrip()
        if stripped:
            handle.seek(start)
            return stripped[:1]


class CsvSource(FileSource):
    """A CSV file with a header line; each record is located by the line it starts on."""

    def rows(self) -> Iterator[Row]:
        with self.path.open("rb") as binary:
            if binary.read(len(UTF8_BOM)) == UTF8_BOM:
                self.notes.append(_bom_note())
            else:
                binary.seek(0)
            text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
            reader = csv.reader(text)
            try:
                header = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as error:
                yield Row(1, None, None, f"unreadable CSV header: {error}")
                return
            if header is None:
                return
            self.columns = [name.strip() for name in header]
            previous_line = reader.line_num
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as error:
                    yield Row(previous_line + 1, None, None, f"unreadable CSV record: {error}")
                    return
                start_line = previous_line + 1
                previous_line = reader.line_num
                self.bytes_read = binary.tell()
                if not fields:
                    continue
                if len(fields) != len(self.columns):
                    yield Row(
                        start_line,
                        None,
                        None,
                        f"has {len(fields)} fields; the header (line 1) names {len(self.columns)}",
                    )
                    continue
                yield Row(start_line, None, dict(zip(self.columns, fields, strict=True)))


class ParquetSource(FileSource):
    """A parquet file read one row group batch at a time (pyarrow, from ``peftgen[train]``)."""

    def rows(self) -> Iterator[Row]:
        try:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
        except ImportError:
            raise UserError.single(
                "reading .parquet needs pyarrow: pip install 'peftgen[train]' (or pyarrow)",
                file=str(self.path),
            ) from None
        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises several types for a bad file
            raise UserError.single(
                f"not a readable parquet file: {error}", file=str(self.path)
            ) from None
        self.columns = list(parquet.schema_arrow.names)
        total_rows = max(parquet.metadata.num_rows, 1)
        index = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield Row(None, index, record)
                index += 1
            # Bytes are not known per row; scale the row count to the file size instead.
            self.bytes_read = (self.total_bytes or 0) * index // total_rows


class HubSource(RowSource):
    """A hub dataset streamed with ``datasets`` (needs the network and ``peftgen[train]``)."""

    def __init__(self, dataset_id: str, split: str) -> None:
        super().__init__(f"hub:{dataset_id}", None)
        self.dataset_id = dataset_id
        self.split = split

    def rows(self) -> Iterator[Row]:
        if hub_offline(DATASETS_OFFLINE_FLAGS):
            raise UserError.single(
                f"{self.dataset_id!r} is not a local file and the hub is offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); point dataset.path at a local "
                ".jsonl/.json/.csv/.parquet file",
                field_path="dataset.path",
            )
        from peftgen.hub import hub_unreachable, quick_timeouts

        unreachable = hub_unreachable()
        if unreachable is not None:
            raise UserError.single(
                f"{self.dataset_id!r} is not a local file and the hub cannot be reached "
                f"({unreachable}); point dataset.path at a local .jsonl/.json/.csv/.parquet "
                "file (and set HF_HUB_OFFLINE=1 to skip the hub)",
                field_path="dataset.path",
            )
        try:
            import datasets
        except ImportError:
            raise UserError.single(
                f"{self.dataset_id!r} is not a local file; streaming a hub dataset needs "
                "`pip install 'peftgen[train]'`",
                field_path="dataset.path",
            ) from None
        try:
            with quick_timeouts():
                stream = datasets.load_dataset(self.dataset_id, split=self.split, streaming=True)
            for index, record in enumerate(stream):
                yield Row(None, index, dict(record))
        except Exception as error:  # network, auth, missing split: all the user's to fix
            raise UserError.single(
                f"cannot stream hub dataset {self.dataset_id!r} (split {self.split!r}): {error}",
                field_path="dataset.path",
            ) from None
