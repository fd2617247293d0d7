"""Stage 6: token shards. Documents are encoded in order, each followed by
`<|endoftext|>`, and packed into raw little-endian uint32 files of at most
`shard_tokens` tokens (a document never straddles two shards; one longer than
a shard gets a shard of its own). Shard boundaries therefore follow from the
document order alone, which is what lets a rerun skip finished shards: each
finished shard is recorded with its token count, its SHA-256 and a digest of
the documents in it, and a rerun checks all three before trusting it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qianwen.tokenizer import Tokenizer
from qianwen.util import atomic_write

FORMAT = "qianwen-tokens/1"
DTYPE = np.dtype("<u4")


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text followed by the end-of-document id. Special-token text in a document
    stays plain text, so a corpus cannot plant control tokens."""
    eod = tokenizer.eod_id
    return [np.array([*tokenizer.encode(text), eod], dtype=DTYPE) for text in texts]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verified_prefix(out: Path, entries: list[dict]) -> list[dict]:
    """The recorded shards, in order, up to the first one that is missing or differs from its record."""
    good = []
    for entry in entries:
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["tokens"] * DTYPE.itemsize:
            break
        if file_sha256(path) != entry["sha256"]:
            break
        good.append(entry)
    return good


class ShardWriter:
    """Packs one split's documents into `<split>-NNNNN.bin` files. The first documents, those the
    shards already `done` hold, are only checked against the record (`cover`), not encoded again."""

    def __init__(self, out: Path, split: str, shard_tokens: int, done: list[dict], on_shard: Callable[[], None]):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.done, self.on_shard = done, on_shard
        self.shards: list[dict] = []  # finished shards, re-confirmed or written by this run
        self._parts: list[np.ndarray] = []
        self._tokens = 0
        self._docs = hashlib.blake2b(digest_size=16)
        self._count = 0

    @property
    def covering(self) -> bool:
        """Whether the next document belongs to a shard that a previous run finished."""
        return len(self.shards) < len(self.done)

    def cover(self, key: bytes) -> None:
        entry = self.done[len(self.shards)]
        self._docs.update(key)
        self._count += 1
        if self._count == entry["documents"]:
            if self._docs.hexdigest() != entry["docs"]:
                self._changed(entry)
            self.shards.append(entry)
            self._reset()

    def finish(self) -> None:
        """Write the last, partly filled shard."""
        if self.covering:  # the input ended inside a shard that a previous run filled
            self._changed(self.done[len(self.shards)])
        self.flush()

    def _changed(self, entry: dict) -> None:
        raise ValueError(
            f"{self.out / entry['file']} was made from other documents than this run reads (the input changed "
            f"since it was written); delete {self.out} or choose a new --out."
        )

    def add(self, ids: np.ndarray, key: bytes) -> None:
        if self._tokens and self._tokens + len(ids) > self.shard_tokens:
            self.flush()
        self._parts.append(ids)
        self._tokens += len(ids)
        self._docs.update(key)
        self._count += 1

    def flush(self) -> None:
        if not self._count:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        data = np.concatenate(self._parts).astype(DTYPE, copy=False).tobytes()
        atomic_write(self.out / name, data)
        entry = {
            "file": name,
            "tokens": self._tokens,
            "documents": self._count,
            "sha256": hashlib.sha256(data).hexdigest(),
            "docs": self._docs.hexdigest(),
        }
        self.shards.append(entry)
        self._reset()
        self.on_shard()

    def _reset(self) -> None:
        self._parts, self._tokens, self._count = [], 0, 0
        self._docs = hashlib.blake2b(digest_size=16)

    @property
    def record(self) -> list[dict]:
        """The finished shards to note in the progress file: those still to be re-confirmed count too."""
        return self.shards + self.done[len(self.shards) :]

    @property
    def tokens(self) -> int:
        return sum(entry["tokens"] for entry in self.shards) + self._tokens

    @property
    def documents(self) -> int:
        return sum(entry["documents"] for entry in self.shards) + self._count
