"""`qianwen tokenizer train` against independent references: the trained vocabulary run by tiktoken (through
qianwen's Tokenizer), by Hugging Face `tokenizers` and by `transformers` gives the same ids; Qwen's bytes per
token on the held-out text is recounted with dashscope's reference tokenizer; and every user error is one
`error:` line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from conftest import CHINESE_PROSE, EMOJI, MIXED_SCRIPTS, NFD_TEXT, _stdlib_sources, mixed_documents

from qianwen import bpe
from qianwen.cli import main
from qianwen.tokenizer import PATTERN, SPECIAL_NAMES, Tokenizer

VOCAB = 1024
VOCAB_FILES = ["qwen.tiktoken", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
CODE = '''def fib(n: int) -> int:
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
'''
TEXTS = [
    CODE,
    "The quick brown fox jumps over the lazy dog. It's John's; they'VE gone, we'll see.",
    CHINESE_PROSE[:400],
    "Digits: 1234567890, 3.14159265, 1,000,000 and ٠١٢٣ ０１２３ ½ ²³",
    "   \n\n\t\t  x\r\n\r\n   \u3000\u00a0y" + " " * 300 + "\n" * 40 + "z",
    " " * 20_000 + "end",
    "Special text is plain text: <|endoftext|><|im_start|>user\nhi<|im_end|><|extra_204|>",
    NFD_TEXT,
    "".join(EMOJI),
    *MIXED_SCRIPTS,
]


def write_corpus(root: Path, total_bytes: int = 300_000) -> Path:
    """The mixed test corpus as files, plus a binary file, a Latin-1 file and hidden entries to pass over."""
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(mixed_documents(total_bytes, seed=3)):
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8", newline="")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    (root / ".hidden.txt").write_text("never read")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("never read")
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out = tmp_path_factory.mktemp("trained") / "tok"
    lines: list[str] = []
    meta = bpe.train([corpus_dir], VOCAB, out, log=lines.append)
    return out, meta, lines


@pytest.fixture(scope="module")
def ours(trained) -> Tokenizer:
    return Tokenizer.from_file(trained[0])


# ---------------------------------------------------------------------------
# The vocabulary


def test_three_runtimes_give_the_same_ids(trained, ours):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    out = trained[0]
    raw = HFTokenizer.from_file(str(out / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == auto.encode(text, add_special_tokens=False, split_special_tokens=True), text[:40]
        raw.encode_special_tokens = True
        assert ids == raw.encode(text, add_special_tokens=False).ids, text[:40]
        assert ours.decode(ids) == auto.decode(ids) == raw.decode(ids)
        # With special tokens allowed, all three turn the special-token text into the special ids.
        full = ours.encode(text, allowed_special="all")
        raw.encode_special_tokens = False
        assert full == raw.encode(text, add_special_tokens=False).ids == auto.encode(text, add_special_tokens=False)
    plain = ours.encode(TEXTS[6])
    assert not any(ours.is_special(i) for i in plain)
    assert sum(ours.is_special(i) for i in ours.encode(TEXTS[6], allowed_special="all")) == 4


def test_every_digit_is_its_own_token(ours):
    digits = [token for token in ours.ranks if any(0x30 <= b <= 0x39 for b in token)]
    assert sorted(digits) == [bytes([b]) for b in range(0x30, 0x3A)]
    ids = ours.encode("x = 1234567890")
    assert [ours.decode([i]) for i in ids][-10:] == list("1234567890")


def test_layout_specials_after_the_ranks(trained, ours):
    out, meta, _ = trained
    first = VOCAB - len(SPECIAL_NAMES)
    assert ours.vocab_size == VOCAB and len(ours.ranks) == first
    assert sorted(ours.ranks.values()) == list(range(first))
    assert all(ours.ranks[bytes([b])] == b for b in range(256))
    assert ours.special_tokens == {name: first + i for i, name in enumerate(SPECIAL_NAMES)}
    assert (ours.eod_id, ours.im_start_id, ours.im_end_id) == (VOCAB - 208, VOCAB - 207, VOCAB - 206)
    assert ours.pattern == PATTERN
    # The standard layout needs no sidecar: the loader puts the specials right after the ranks.
    assert not (out / "special_tokens.json").exists()
    assert {p.name for p in out.iterdir()} == set(bpe.OUTPUT_FILES)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        first + i: name for i, name in enumerate(SPECIAL_NAMES)
    }
    assert meta == json.loads((out / "bpe.json").read_text())
    assert (meta["vocab_size"], meta["bpe_ranks"], meta["special_tokens"]) == (
        VOCAB,
        first,
        {"first_id": first, "count": 208},
    )


def test_corpus_skips_and_counts_what_is_not_text(trained, corpus_dir):
    meta, lines = trained[1], trained[2]
    corpus = meta["corpus"]
    texts = sorted(p for p in corpus_dir.glob("doc*.txt"))
    assert corpus["files"] == len(texts)
    assert corpus["bytes"] == sum(p.stat().st_size for p in texts)
    assert corpus["skipped_files"] == 2
    assert sorted(corpus["skipped_examples"]) == [
        f"{corpus_dir / 'image.png'} (binary)",
        f"{corpus_dir / 'latin1.txt'} (not UTF-8)",
    ]
    assert any("2 skipped" in line for line in lines)


def test_held_out_text_is_measured_against_qwen(trained, corpus_dir, ref):
    meta, lines = trained[1], trained[2]
    held = meta["held_out"]
    # Recount independently: every 20th block of the corpus, encoded by dashscope's reference tokenizer.
    corpus = bpe.scan([corpus_dir])
    all_blocks = [text for text, _ in bpe.blocks(corpus)]
    held_out = [
        unicodedata.normalize("NFC", t)
        for i, t in enumerate(all_blocks)
        if i % bpe.HOLD_OUT_EVERY == bpe.HOLD_OUT_EVERY - 1
    ]
    assert held["blocks"] == len(held_out) >= 2
    assert held["bytes"] == sum(len(t.encode()) for t in held_out)
    assert meta["corpus"]["train_bytes"] + held["bytes"] == meta["corpus"]["bytes"]
    assert held["qwen_tokens"] == sum(len(ref.encode(t, allowed_special=set())) for t in held_out)
    assert held["qwen_bytes_per_token"] == round(held["bytes"] / held["qwen_tokens"], 4)
    assert held["bytes_per_token"] == round(held["bytes"] / held["tokens"], 4)
    assert held["bytes_per_token"] > 1 and held["qwen_bytes_per_token"] > 1
    summary = lines[-1]
    assert f"{held['bytes_per_token']:.3f}" in summary and f"{held['qwen_bytes_per_token']:.3f}" in summary


def test_training_is_deterministic(trained, corpus_dir, tmp_path):
    first, meta, _ = trained
    again = bpe.train([corpus_dir], VOCAB, tmp_path / "again", log=lambda line: None)
    for name in VOCAB_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes(), name
    assert {**again, "seconds": None} == {**meta, "seconds": None}


def test_blocks_count_like_whole_files(tmp_path):
    """Cutting a file into blocks must not change the pieces the engine counts."""
    sources = _stdlib_sources(300_000)
    text = "".join(sources) + sources[0].replace("\n", "\r\n") + "\n  \n\t\n" * 500
    (tmp_path / "a.py").write_text(text, encoding="utf-8", newline="")
    pieces = [piece for piece, _ in bpe.blocks(bpe.scan([tmp_path]))]
    assert len(pieces) > 10 and "".join(pieces) == text
    assert all(len(p) <= bpe.BLOCK_CHARS for p in pieces)
    assert bpe.learn_ranks(pieces, 700) == bpe.learn_ranks([text], 700)
    # A run with nowhere to cut is cut at the block size: the engine never sees an unbounded piece.
    (tmp_path / "a.py").write_text(" " * (3 * bpe.BLOCK_CHARS) + "x")
    assert [len(p) for p, _ in bpe.blocks(bpe.scan([tmp_path]))] == [bpe.BLOCK_CHARS] * 3 + [1]


def test_max_bytes_caps_the_corpus(corpus_dir, tmp_path):
    meta = bpe.train([corpus_dir], 600, tmp_path / "capped", max_bytes=120_000, log=lambda line: None)
    # The cut falls on a character boundary, up to 3 bytes short of the cap.
    assert 120_000 - 3 <= meta["corpus"]["bytes"] <= 120_000 and meta["corpus"]["max_bytes"] == 120_000


# ---------------------------------------------------------------------------
# The command line


def test_cli_trains_and_writes_a_loadable_vocabulary(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["tokenizer", "train", "--input", str(corpus_dir), "--vocab-size", "700", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bytes per token" in printed and "with Qwen's" in printed
    assert Tokenizer.from_file(out).vocab_size == 700
    (out / "qwen.tiktoken").write_text("stale")
    assert main([*args, "--force"]) == 0
    assert Tokenizer.from_file(out).vocab_size == 700


def test_cli_subprocess_on_the_standard_library(tmp_path):
    out = tmp_path / "stdlib"
    result = subprocess.run(
        [sys.executable, "-m", "qianwen.cli", "tokenizer", "train", "--vocab-size", "600", "--out", str(out)]
        + ["--max-bytes", "400000"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Python standard library" in result.stdout and "bytes per token" in result.stdout
    meta = json.loads((out / "bpe.json").read_text())
    assert meta["corpus"]["bytes"] == 400_000 and meta["engine"].startswith("rustbpe")
    assert Tokenizer.from_file(out).encode("def f(x):\n    return x\n")


def _bad_inputs(tmp_path: Path, corpus_dir: Path) -> dict[str, tuple[list[str], str]]:
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.bin").write_bytes(b"\x00\x01\x02")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello hello hello")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "out")
    return {
        "missing input": (["--input", str(tmp_path / "nope"), "--vocab-size", "600", "--out", out], "does not exist"),
        "vocab too small": (["--input", str(corpus_dir), "--vocab-size", "464", "--out", out], "give 465 or more"),
        "no text": (["--input", str(binary), "--vocab-size", "600", "--out", out], "holds no UTF-8 text"),
        "too few merges": (["--input", str(tiny), "--vocab-size", "600", "--out", out], "lower --vocab-size"),
        "out not empty": (["--input", str(corpus_dir), "--vocab-size", "600", "--out", str(full)], "--force"),
        "out is a file": (["--input", str(corpus_dir), "--vocab-size", "600", "--out", str(a_file)], "is a file"),
        "max bytes zero": (["--vocab-size", "600", "--out", out, "--max-bytes", "0"], "--max-bytes"),
        "vocab not a number": (["--vocab-size", "many", "--out", out], "--vocab-size"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing input",
        "vocab too small",
        "no text",
        "too few merges",
        "out not empty",
        "out is a file",
        "max bytes zero",
        "vocab not a number",
    ],
)
def test_bad_input_is_one_error_line(case, corpus_dir, tmp_path, capsys):
    args, expected = _bad_inputs(tmp_path, corpus_dir)[case]
    assert main(["tokenizer", "train", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "out").exists()
