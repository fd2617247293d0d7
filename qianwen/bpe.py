"""Byte-level BPE training that writes a Qwen-format vocabulary (QWEN_SPEC.md section 3).

Ids: the BPE ranks come first (0..255 are the single bytes, in byte order; then one rank per merge, in the
order training learned them), then Qwen's 208 special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
`<|extra_0|>`..`<|extra_204|>`). `vocab_size` counts them all, so a model with that many embedding rows fits
exactly, and the specials sit where `Tokenizer` puts them for any vocabulary by default (right after the
ranks): `Tokenizer.from_file(out)` needs no special-token sidecar.

Engine: rustbpe (karpathy/rustbpe), picked by `benchmarks/bench_bpe.py` (2 CPUs): on 8 MB of standard-library
source with 8,192 ids it learns the vocabulary in 0.50 s where Hugging Face `tokenizers` (BpeTrainer with an
NFC normaliser and the same Split + ByteLevel pre-tokenizer) takes 1.37 s; on 31.5 MB with 32,768 ids, 1.95 s
vs 5.15 s. Both learn the same tokens (all of them at 8,192 ids, all but 3 at 32,768), so bytes per token on
held-out text agree to four digits. rustbpe also splits text with fancy-regex, the regex engine tiktoken runs,
so training sees exactly the pieces that encoding will (`tokenizers` splits with Oniguruma), and it emits
tiktoken ranks directly. What it lacks is done here: NFC normalisation (the tokenizer normalises before
encoding, so training does too), and bounded inputs: its regex gives up on pieces of about a million
characters, so text reaches it in blocks of at most BLOCK_CHARS characters, cut where the pre-tokenizer would
cut anyway, which leaves the counts those of whole files.

Corpus: files and directories (walked in sorted order, hidden entries skipped), or by default the running
Python's standard-library sources. A first pass checks that each file is UTF-8 text, so a binary or
undecodable file is skipped whole (and counted) rather than half-trained on; a second pass streams blocks.
Every HOLD_OUT_EVERY-th block (up to HELD_OUT_MAX_BYTES) is held out of training and used to report bytes
per token for the new vocabulary and for Qwen's. Both engines count pairs in 32 bits, so training text is
limited to 2 GiB, below which no count can overflow; a larger corpus needs `max_bytes` to pick a sample.
"""

from __future__ import annotations

import codecs
import importlib.metadata
import json
import os
import re
import sysconfig
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import rustbpe

from qianwen.tokenizer import PATTERN, SPECIAL_NAMES, VOCAB_FILE, Tokenizer, qwen_vocabulary
from qianwen.util import atomic_write, list_files, stdlib_files

ENGINE = "rustbpe"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_NAMES) + 1  # every byte, every special token, at least one merge
BLOCK_CHARS = 1 << 14
HOLD_OUT_EVERY = 20
HELD_OUT_MAX_BYTES = 8_000_000
MAX_TRAIN_BYTES = 2**31 - 1
ENGINE_BUFFER_BLOCKS = 1024  # blocks handed to the engine per parallel batch: at most 16M characters in flight
READ_BYTES = 1 << 20
OUTPUT_FILES = (
    VOCAB_FILE,
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "bpe.json",
)
# After this newline a new line starts with horizontal space then a non-space character; Qwen's pattern
# always ends a piece there, so a block cut here gives the same pieces as the whole text.
_LINE_START = re.compile(r"[^\S\r\n]*\S")

Log = Callable[[str], None]


@dataclass
class Corpus:
    """The text files to train on, in reading order, and what was passed over."""

    files: list[Path]
    bytes: int  # on disk, up to max_bytes
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    source: str = ""


@dataclass
class Split:
    """Counts kept while blocks stream past, and the held-out text itself."""

    train_bytes: int = 0
    blocks: int = 0
    held_out: list[str] = field(default_factory=list)
    held_out_bytes: int = 0


# ---------------------------------------------------------------------------
# The corpus


def _why_not_text(path: Path, limit: int) -> str | None:
    """Why the first `limit` bytes of a file are not UTF-8 text, or None when they are."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = 0
    try:
        with open(path, "rb") as f:
            while seen < limit and (chunk := f.read(min(READ_BYTES, limit - seen))):
                if b"\x00" in chunk:
                    return "binary"
                decoder.decode(chunk)
                seen += len(chunk)
            if seen < limit:  # the whole file was read, so it must also end on a whole character
                decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def scan(inputs: Sequence[str | os.PathLike], max_bytes: int | None = None) -> Corpus:
    """The corpus the inputs make (the standard library if there are none): text files up to `max_bytes`."""
    files = list_files(inputs) if inputs else stdlib_files()
    source = (
        ", ".join(str(p) for p in inputs) if inputs else f"Python standard library ({sysconfig.get_paths()['stdlib']})"
    )
    limit = max_bytes or MAX_TRAIN_BYTES + 1
    corpus = Corpus([], 0, source=source)
    for path in files:
        if corpus.bytes >= limit:
            break
        why = _why_not_text(path, limit - corpus.bytes)
        if why:
            corpus.skipped.append((str(path), why))
            continue
        corpus.files.append(path)
        corpus.bytes = min(corpus.bytes + path.stat().st_size, limit)
    if corpus.bytes > MAX_TRAIN_BYTES:
        raise ValueError(
            f"{source} holds more than {MAX_TRAIN_BYTES:,} bytes of text, more than BPE training can count "
            f"without overflow; pass --max-bytes {MAX_TRAIN_BYTES} (or less) to train on a sample."
        )
    if not corpus.bytes:
        raise ValueError(
            f"{source} holds no UTF-8 text ({len(corpus.skipped)} file(s) skipped as binary, not UTF-8 or "
            "unreadable); give text files or directories that hold some."
        )
    return corpus


def _cut(text: str) -> int:
    """Where to end a block: after the last newline that starts a new piece, else at the end."""
    pos = len(text)
    while (pos := text.rfind("\n", 0, pos)) >= 0:
        if _LINE_START.match(text, pos + 1):
            return pos + 1
    return len(text)


def _file_blocks(path: Path) -> Iterator[str]:
    # newline="" keeps \r\n as it is in the file: the pre-tokenizer treats it differently from \n.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rest = ""
        while chunk := f.read(BLOCK_CHARS - len(rest)):
            text = rest + chunk
            if len(text) < BLOCK_CHARS:  # the end of the file
                rest = text
                break
            end = _cut(text)
            yield text[:end]
            rest = text[end:]
        if rest:
            yield rest


def blocks(corpus: Corpus, max_bytes: int | None = None) -> Iterator[tuple[str, int]]:
    """(text, UTF-8 bytes) of each block of the corpus, at most BLOCK_CHARS characters, at most
    `max_bytes` in all."""
    left = max_bytes or MAX_TRAIN_BYTES
    for path in corpus.files:
        for text in _file_blocks(path):
            size = len(text.encode("utf-8"))
            if size >= left:
                if size > left:
                    text = text.encode("utf-8")[:left].decode("utf-8", errors="ignore")
                yield text, len(text.encode("utf-8"))
                return
            left -= size
            yield text, size


def hold_out(stream: Iterable[tuple[str, int]], split: Split) -> Iterator[str]:
    """The training blocks of `stream`; every HOLD_OUT_EVERY-th block goes to `split.held_out` instead,
    until HELD_OUT_MAX_BYTES are held out."""
    for text, size in stream:
        if split.blocks % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 and split.held_out_bytes < HELD_OUT_MAX_BYTES:
            split.held_out.append(text)
            split.held_out_bytes += size
        else:
            split.train_bytes += size
            yield text
        split.blocks += 1


# ---------------------------------------------------------------------------
# Training


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: it must hold 256 byte tokens, {len(SPECIAL_NAMES)} special "
            f"tokens and at least one merge, so give {MIN_VOCAB_SIZE} or more."
        )


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def learn_ranks(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """BPE ranks (token bytes -> rank) learned from `texts`, NFC-normalised, with Qwen's pre-tokenizer:
    `vocab_size - 208` of them, leaving room for the special tokens. Each text should be at most a few
    hundred thousand characters (the engine's regex gives up on pieces near a million)."""
    check_vocab_size(vocab_size)
    want = vocab_size - len(SPECIAL_NAMES)
    engine = rustbpe.Tokenizer()
    engine.train_from_iterator((_nfc(t) for t in texts), want, buffer_size=ENGINE_BUFFER_BLOCKS, pattern=PATTERN)
    ranks = {bytes(token): rank for token, rank in engine.get_mergeable_ranks()}
    if len(ranks) < want:
        merges = len(ranks) - 256
        raise ValueError(
            f"the training text only gives {merges:,} merges where --vocab-size {vocab_size:,} needs "
            f"{want - 256:,}; lower --vocab-size to {merges + MIN_VOCAB_SIZE - 1:,} or less, or add text."
        )
    return ranks


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the vocabulary.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; give a new directory, or --force to overwrite the files in it.")


def _bytes_per_token(tok: Tokenizer, texts: list[str]) -> tuple[int, float]:
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens, sum(len(t.encode("utf-8")) for t in texts) / tokens


def _read(corpus: Corpus, max_bytes: int | None, log: Log) -> Iterator[tuple[str, int]]:
    """`blocks` with a progress bar; the engine counts pieces as it reads, then learns the merges."""
    from tqdm import tqdm

    start = time.perf_counter()
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    with tqdm(total=corpus.bytes, unit="B", unit_scale=True, disable=None, desc="reading", dynamic_ncols=True) as bar:
        for text, size in blocks(corpus, max_bytes):
            bar.update(size)
            yield text, size
    log(f"read the corpus in {time.perf_counter() - start:.1f} s; counting pieces and learning merges")


def train(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    max_bytes: int | None = None,
    force: bool = False,
    log: Log = print,
) -> dict:
    """Train a vocabulary of `vocab_size` ids on the inputs (files and directories; none: the standard
    library) and write it to `out_dir` with Hugging Face files and `bpe.json`; return bpe.json's content."""
    start = time.perf_counter()
    out = Path(out_dir)
    check_vocab_size(vocab_size)
    if max_bytes is not None and not 0 < max_bytes <= MAX_TRAIN_BYTES:
        raise ValueError(
            f"--max-bytes {max_bytes} is outside 1 to {MAX_TRAIN_BYTES}, the most text BPE training can count "
            "without overflow; give a value in that range."
        )
    _check_out_dir(out, force)
    reference = qwen_vocabulary()

    corpus = scan(inputs, max_bytes)
    skipped = f", {len(corpus.skipped)} skipped (binary, not UTF-8 or unreadable)" if corpus.skipped else ""
    files = f"{len(corpus.files):,} text file{'s' if len(corpus.files) != 1 else ''}"
    log(f"corpus: {corpus.source}: {files}, {corpus.bytes / 1e6:.2f} MB{skipped}")
    n_ranks = vocab_size - len(SPECIAL_NAMES)
    log(f"learning {n_ranks - 256:,} merges with {ENGINE}, holding out every {HOLD_OUT_EVERY}th block of text")
    split = Split()
    ranks = learn_ranks(hold_out(_read(corpus, max_bytes, log), split), vocab_size)
    trained = time.perf_counter()
    log(
        f"learned {len(ranks):,} BPE ranks + {len(SPECIAL_NAMES)} special tokens = {vocab_size:,} ids from "
        f"{split.train_bytes / 1e6:.2f} MB in {trained - start:.1f} s"
    )

    tok = Tokenizer(ranks)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    saved = time.perf_counter()

    held_out = [_nfc(t) for t in split.held_out]
    measured: dict = {"blocks": len(held_out), "bytes": sum(len(t.encode("utf-8")) for t in held_out)}
    if held_out:
        qwen = Tokenizer.from_file(reference)
        measured["tokens"], bpt = _bytes_per_token(tok, held_out)
        measured["qwen_tokens"], qwen_bpt = _bytes_per_token(qwen, held_out)
        measured |= {"bytes_per_token": round(bpt, 4), "qwen_bytes_per_token": round(qwen_bpt, 4)}
    else:
        measured |= {"bytes_per_token": None, "qwen_bytes_per_token": None}
    measured["qwen_vocabulary"] = str(reference)
    done = time.perf_counter()

    meta = {
        "engine": f"{ENGINE} {importlib.metadata.version(ENGINE)}",
        "vocab_size": vocab_size,
        "bpe_ranks": len(ranks),
        "special_tokens": {"first_id": len(ranks), "count": len(SPECIAL_NAMES)},
        "pattern": PATTERN,
        "normalization": "NFC",
        "corpus": {
            "source": corpus.source,
            "files": len(corpus.files),
            "bytes": split.train_bytes + split.held_out_bytes,
            "train_bytes": split.train_bytes,
            "max_bytes": max_bytes,
            "skipped_files": len(corpus.skipped),
            "skipped_examples": [f"{path} ({why})" for path, why in corpus.skipped[:20]],
        },
        "held_out": {
            "rule": f"every {HOLD_OUT_EVERY}th block of up to {BLOCK_CHARS:,} characters, "
            f"up to {HELD_OUT_MAX_BYTES:,} bytes",
            **measured,
        },
        "seconds": {
            "read_and_learn": round(trained - start, 3),
            "save": round(saved - trained, 3),
            "measure": round(done - saved, 3),
        },
    }
    atomic_write(out / "bpe.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {out}: {', '.join(OUTPUT_FILES)}")
    if held_out:
        log(
            f"bytes per token on {measured['bytes'] / 1e6:.2f} MB held out: {measured['bytes_per_token']:.3f} "
            f"with this vocabulary ({vocab_size:,} ids), {measured['qwen_bytes_per_token']:.3f} with Qwen's "
            f"({qwen.vocab_size:,} ids)"
        )
    else:
        log(
            f"bytes per token not measured: the corpus makes {split.blocks} block(s), fewer than the "
            f"{HOLD_OUT_EVERY} it takes to hold one out; give more text to measure it."
        )
    return meta
