"""Token shards written by `qianwen data prep`, read as fixed-length training windows.

The shards of a split are one token stream (documents end with <|endoftext|>). Window w is tokens
[w*T, w*T + T + 1): T inputs and their T next-token targets. Which windows a step reads is a pure
function of (seed, step), so the position in the data is just the step count: resuming, and running
on any number of processes with the same global batch, read exactly the same windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

FORMAT = "qianwen-tokens/1"


class TokenShards:
    """One split of a data directory as a random-access token stream (memory-mapped, never loaded whole)."""

    def __init__(self, directory: str | os.PathLike, split: str):
        directory = Path(directory)
        index_path = directory / "index.json"
        if not index_path.is_file():
            raise ValueError(f"{directory} holds no index.json; prepare the data first with `qianwen data prep`.")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("dtype") != "uint32":
            raise ValueError(f"{index_path} is not a {FORMAT} uint32 index; re-run `qianwen data prep`.")
        entries = index["splits"].get(split, [])
        self.index = index
        self.vocab_size: int = index["vocab_size"]
        self.eod_id: int = index["eod_id"]
        self.tokenizer_dir: str = index.get("tokenizer", "")
        self.maps: list[np.memmap] = []
        for entry in entries:
            path = directory / entry["file"]
            expected = entry["tokens"] * 4
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(f"shard {path} is missing or not {expected} bytes; re-run `qianwen data prep`.")
            if entry["tokens"]:
                self.maps.append(np.memmap(path, dtype="<u4", mode="r"))
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.num_tokens = int(self.starts[-1])
        self.documents = sum(entry.get("documents", 0) for entry in entries)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            offset = start - self.starts[shard]
            take = min(stop - start, len(self.maps[shard]) - offset)
            pieces.append(self.maps[shard][offset : offset + take])
            start += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])

    def unigram_entropy(self, max_tokens: int = 1 << 26) -> float:
        """Entropy in nats of the token distribution (of the first `max_tokens`): the loss of a model that
        knows token frequencies and nothing else, the bar a language model must clear."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        seen = 0
        for m in self.maps:
            part = m[: max(0, max_tokens - seen)]
            counts += np.bincount(part, minlength=self.vocab_size)[: self.vocab_size]
            seen += len(part)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


class WindowSampler:
    """Windows of `seq_length` for global sample indices, shuffled once per epoch by a seeded permutation."""

    def __init__(self, shards: TokenShards, seq_length: int, seed: int, shuffle: bool = True):
        self.shards = shards
        self.seq_length = seq_length
        self.num_windows = (shards.num_tokens - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(
                f"the split holds {shards.num_tokens} tokens, fewer than one window of {seq_length + 1}; "
                "use more data or a shorter seq_length."
            )
        self.seed = seed
        self.shuffle = shuffle
        self._epoch: int | None = None
        self._order: np.ndarray | None = None

    def window(self, sample: int) -> int:
        epoch, position = divmod(sample, self.num_windows)
        if not self.shuffle:
            return position
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order = order.astype(np.uint32 if self.num_windows < 2**32 else np.int64)
            self._epoch = epoch
        return int(self._order[position])

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        """[size, seq_length + 1] int64 tokens for samples first_sample .. first_sample + size - 1."""
        T = self.seq_length
        rows = [
            self.shards.tokens(w * T, w * T + T + 1) for w in map(self.window, range(first_sample, first_sample + size))
        ]
        return torch.from_numpy(np.stack(rows).astype(np.int64))
