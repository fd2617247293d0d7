"""Streaming readers: directories of text and code files, JSONL (plain, gzip,
zstd) and Parquet, one document at a time in a fixed order.

A record that cannot be read (bad JSON, a missing or non-string field,
undecodable bytes, an unreadable file) becomes a `Malformed` item with its file
and line, so the caller counts and reports it: nothing vanishes silently and
nothing stops the run.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
PARQUET_BATCH_ROWS = 1024
# What a truncated or corrupt compressed stream raises part-way through a file.
STREAM_ERRORS = (OSError, EOFError, ValueError, zstandard.ZstdError)


@dataclass
class Doc:
    text: str
    source: str  # the file
    line: int  # 1-based line (JSONL), row (Parquet) or 1 (a whole file)
    name: str  # the file name the text came from, for choosing a filter profile by extension

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class Malformed:
    source: str
    line: int
    reason: str

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


Item = Doc | Malformed
Progress = Callable[[int], None]


def read_files(
    files: Sequence[Path], text_field: str = "text", name_field: str = "path", progress: Progress | None = None
) -> Iterator[Item]:
    """Documents and malformed records of `files`, in order. `progress` is told the on-disk bytes consumed."""
    tell = progress or (lambda n: None)
    for path in files:
        name = path.name
        try:
            if name.endswith(JSONL_SUFFIXES):
                yield from _read_jsonl(path, text_field, name_field, tell)
            elif name.endswith(PARQUET_SUFFIX):
                yield from _read_parquet(path, text_field, name_field, tell)
            else:
                yield from _read_text(path, tell)
        except OSError as exc:
            yield Malformed(str(path), 1, f"unreadable: {exc.strerror or exc}")


def _read_text(path: Path, tell: Progress) -> Iterator[Item]:
    data = path.read_bytes()
    tell(len(data))
    try:
        yield Doc(data.decode("utf-8"), str(path), 1, path.name)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield Malformed(str(path), line, f"not valid UTF-8 (byte {exc.start})")


def _open_jsonl(raw: io.BufferedReader, name: str) -> io.BufferedIOBase:
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _read_jsonl(path: Path, text_field: str, name_field: str, tell: Progress) -> Iterator[Item]:
    source = str(path)
    with open(path, "rb") as raw:
        stream, done, lineno = _open_jsonl(raw, path.name), 0, 0
        try:
            for lineno, line in enumerate(stream, 1):
                position = raw.tell()
                tell(position - done)
                done = position
                if line.strip():
                    yield _record(line, text_field, name_field, source, lineno, path.name)
        except STREAM_ERRORS as exc:
            # What came before the damage is kept; the rest of the file is reported as one malformed item.
            yield Malformed(source, lineno + 1, f"unreadable from here on: {_short(exc)}")
        tell(raw.tell() - done)


def _record(line: bytes, text_field: str, name_field: str, source: str, lineno: int, fallback_name: str) -> Item:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return Malformed(source, lineno, "not valid UTF-8")
    except json.JSONDecodeError as exc:
        return Malformed(source, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return Malformed(source, lineno, f"a JSON {type(record).__name__}, not an object")
    return _field(record, text_field, name_field, source, lineno, fallback_name)


def _field(record: dict, text_field: str, name_field: str, source: str, lineno: int, fallback_name: str) -> Item:
    text = record.get(text_field)
    if text is None:
        return Malformed(source, lineno, f"no field {text_field!r}")
    if not isinstance(text, str):
        return Malformed(source, lineno, f"field {text_field!r} is a {type(text).__name__}, not a string")
    name = record.get(name_field)
    return Doc(text, source, lineno, name if isinstance(name, str) else fallback_name)


def _read_parquet(path: Path, text_field: str, name_field: str, tell: Progress) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(path)
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield Malformed(source, 1, f"not a readable Parquet file: {_short(exc)}")
        tell(path.stat().st_size)
        return
    columns = set(table.schema_arrow.names)
    if text_field not in columns:
        yield Malformed(source, 1, f"no column {text_field!r} (columns: {', '.join(sorted(columns))})")
        tell(path.stat().st_size)
        return
    wanted = [text_field] + ([name_field] if name_field in columns and name_field != text_field else [])
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        for record in batch.to_pylist():
            row += 1
            yield _field(record, text_field, name_field, source, row, path.name)
        tell(round(path.stat().st_size * batch.num_rows / max(table.metadata.num_rows, 1)))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
