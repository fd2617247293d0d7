"""Readers: JSONL (plain, gzip, zstd), Parquet and directories, with malformed records reported by file and line."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from qianwen.data.readers import Doc, Malformed, read_files
from qianwen.util import list_files

RECORDS = [{"text": f"document number {i}", "path": f"src/file{i}.py"} for i in range(5)]


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def read(paths, **kwargs) -> list[Doc | Malformed]:
    return list(read_files(list_files(paths), **kwargs))


@pytest.mark.parametrize(
    "name,compress",
    [
        ("a.jsonl", lambda b: b),
        ("a.jsonl.gz", gzip.compress),
        ("a.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_jsonl_plain_gzip_zstd(tmp_path, name, compress):
    path = tmp_path / name
    path.write_bytes(compress(jsonl_bytes(RECORDS)))
    seen = []
    items = list(read_files([path], progress=seen.append))
    assert [d.text for d in items] == [r["text"] for r in RECORDS]
    assert [d.line for d in items] == [1, 2, 3, 4, 5]
    assert [d.name for d in items] == [r["path"] for r in RECORDS]  # the name field, for choosing a filter profile
    assert sum(seen) == path.stat().st_size


def test_malformed_jsonl_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "good one"}',
        b'{"text": "unterminated',
        b'{"title": "no text field"}',
        b'{"text": 42}',
        b'{"text": "bad utf-8 \xff\xfe here"}',
        b"",
        b'["a", "list"]',
        b'{"text": "good two"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = read([path])
    docs = [i for i in items if isinstance(i, Doc)]
    bad = {i.line: i.reason for i in items if isinstance(i, Malformed)}
    assert [d.text for d in docs] == ["good one", "good two"] and [d.line for d in docs] == [1, 8]
    assert set(bad) == {2, 3, 4, 5, 7}  # the blank line 6 is no record
    assert "not valid JSON" in bad[2]
    assert bad[3] == "no field 'text'"
    assert "int, not a string" in bad[4]
    assert bad[5] == "not valid UTF-8"
    assert "not an object" in bad[7]
    assert all(i.source == str(path) for i in items)
    assert next(i for i in items if isinstance(i, Malformed)).where == f"{path}:2"


def test_text_field_is_configurable(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes([{"content": "in content", "text": 1}]))
    (item,) = read([path], text_field="content")
    assert item.text == "in content"


def test_truncated_gzip_keeps_what_came_before(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(jsonl_bytes(RECORDS * 2000))
    path.write_bytes(whole[: len(whole) // 2])
    items = read([path])
    assert isinstance(items[-1], Malformed) and "unreadable" in items[-1].reason
    docs = items[:-1]
    assert len(docs) > 100 and all(isinstance(d, Doc) for d in docs)
    assert items[-1].line == docs[-1].line + 1


def test_parquet_in_row_batches(tmp_path):
    path = tmp_path / "p.parquet"
    texts = [f"row {i}" for i in range(2500)]
    texts[1700] = None
    pq.write_table(pa.table({"text": texts, "path": [f"f{i}.py" for i in range(2500)]}), path, row_group_size=1000)
    items = read([path])
    assert len(items) == 2500
    assert isinstance(items[1700], Malformed) and items[1700].line == 1701
    assert [d.text for d in items if isinstance(d, Doc)] == [t for t in texts if t is not None]
    assert items[5].name == "f5.py"


def test_parquet_without_the_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    (item,) = read([path])
    assert isinstance(item, Malformed) and "no column 'text'" in item.reason and "body" in item.reason


def test_directories_are_walked_in_sorted_order_and_files_dispatched(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden")
    (tmp_path / "b" / "z.py").write_text("print('z')\n")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(RECORDS[:2]))
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline two caf\xe9\n")
    items = read([tmp_path])
    assert [(i.source.removeprefix(str(tmp_path)), i.line) for i in items] == [
        ("/a.txt", 1),
        ("/c.jsonl", 1),
        ("/c.jsonl", 2),
        ("/latin1.txt", 2),
        ("/b/z.py", 1),
    ]
    assert isinstance(items[3], Malformed) and "not valid UTF-8" in items[3].reason
    assert [p.name for p in list_files([tmp_path], suffixes=[".py"])] == ["z.py"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"does-not-exist does not exist; check the path given to --input\."):
        list_files([tmp_path / "does-not-exist"])
