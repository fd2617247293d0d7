"""The keys and values of sequences the serving engine has already run, so that a prompt beginning with one of
them skips that part of its prefill: the same system prompt on every request, the history a chat resends at
every turn (the engine keeps each finished reply with its prompt), the same question asked again.

Entries are whole sequences, matched token by token (the longest common prefix wins), kept while they fit a
byte budget and dropped least recently used first. A sequence that begins another entry is redundant and is
never kept beside it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Entry:
    tokens: np.ndarray  # [n] int64
    k: torch.Tensor  # [layers, kv heads, n, head dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.used = 0
        self.hits = self.reused_tokens = 0
        self._next = 0

    def match(self, prompt: list[int]) -> tuple[int, Entry | None]:
        """The longest prefix of `prompt` some entry begins with: (its length, the entry), or (0, None)."""
        p = np.asarray(prompt, dtype=np.int64)
        best, found = 0, None
        for key, e in self.entries.items():
            m = min(len(e.tokens), len(p))
            if m <= best or e.tokens[0] != p[0]:
                continue
            differ = np.flatnonzero(e.tokens[:m] != p[:m])
            n = int(differ[0]) if len(differ) else m
            if n > best:
                best, found = n, key
        if found is None:
            return 0, None
        self.entries.move_to_end(found)
        return best, self.entries[found]

    def add(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a sequence's keys and values ([layers, kv heads, len(tokens), head dim], not shared with the
        engine's cache), unless an entry already begins with it; entries it begins with go."""
        entry = Entry(np.asarray(tokens, dtype=np.int64), k, v)
        if not len(entry.tokens) or entry.nbytes > self.budget:
            return
        n = len(entry.tokens)
        for key, e in list(self.entries.items()):
            if len(e.tokens) >= n and np.array_equal(e.tokens[:n], entry.tokens):
                self.entries.move_to_end(key)
                return
            if np.array_equal(entry.tokens[: len(e.tokens)], e.tokens):
                self._drop(key)
        self.entries[self._next] = entry
        self._next += 1
        self.used += entry.nbytes
        while self.used > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        self.used -= self.entries.pop(key).nbytes
