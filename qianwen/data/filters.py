"""Stage 4: rule-based quality filters in the style of Gopher (Rae et al. 2021,
appendix A) and C4.

Each rule has a threshold in `Thresholds`; `check` returns the name of the
first rule a document breaks, so the stats say why each one went. There are
two profiles: "text" keeps Gopher's values, "code" relaxes what source files
legitimately do (`#` comments, symbols and digits, long identifiers, repeated
lines such as `else:` or `return None`). With profile "auto" a document whose
file name ends in a code suffix gets "code".

Words are whitespace-separated runs, except that each Chinese or Japanese
character is a word of its own, so CJK text has a word count comparable to
other languages. The mean word length is over runs of letters and digits
outside CJK (punctuation attached to a word does not count), and applies only
to documents where such runs are at least half of the words.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_WORDS = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_ALNUM_RUNS = re.compile(rf"[^\W_{_CJK}]+")  # [^\W_] is a letter or digit
_NOT_LETTER = re.compile(r"[\W\d_]+")
# Pure-ASCII text (most code) takes byte-level paths that are 3-10x faster than the regular expressions.
_ASCII_PUNCT_TO_SPACE = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))
_ASCII_NOT_LETTER = bytes(set(range(256)) - set(string.ascii_letters.encode()))
_BULLETS = ("•", "-", "*", "·", "‣", "◦", "▪", "●")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd, so the rolling n-gram hash below is a bijection per step


@dataclass
class Thresholds:
    """Limits for one profile; a document breaking any is dropped. A maximum of `inf` (TOML
    accepts `inf`) or a minimum of 0 turns a rule off, and so does max_words = 0."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' per word, and '...' or '…' per word
    max_bullet_lines: float = 0.9  # fraction of non-blank lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of non-blank lines ending with an ellipsis
    max_non_alpha_chars: float = 0.4  # fraction of non-space characters that are not letters
    max_dup_lines: float = 0.3  # fraction of non-blank lines that repeat an earlier line
    max_dup_line_chars: float = 0.2  # ... as a fraction of characters
    max_dup_paragraphs: float = 0.3
    max_dup_paragraph_chars: float = 0.2
    # Fraction of word characters in the most frequent 2-, 3- and 4-gram.
    max_top_ngram_chars: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # Fraction of word characters in repeated 5- to 10-grams.
    max_dup_ngram_chars: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])


def code_thresholds() -> Thresholds:
    """Limits for source code, set so that nearly all of the Python standard library passes."""
    return Thresholds(
        min_words=20,
        max_words=200_000,
        min_mean_word_length=2.0,
        max_mean_word_length=20.0,
        max_symbol_word_ratio=float("inf"),
        max_non_alpha_chars=0.7,
        max_dup_lines=0.6,
        max_dup_line_chars=0.5,
        max_dup_paragraphs=0.6,
        max_dup_paragraph_chars=0.5,
        max_top_ngram_chars=[0.4, 0.4, 0.4],
        max_dup_ngram_chars=[0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
    )


def check(text: str, limits: Thresholds) -> str | None:
    """The name of the first rule `text` breaks, or None when it passes them all."""
    ascii_bytes = text.encode("ascii") if text.isascii() else None
    words = text.split() if ascii_bytes is not None else _WORDS.findall(text)
    n_words = len(words)
    if n_words < max(limits.min_words, 1):  # a document with no words has nothing to measure
        return "min_words"
    if limits.max_words and n_words > limits.max_words:
        return "max_words"
    runs = (
        ascii_bytes.translate(_ASCII_PUNCT_TO_SPACE).split() if ascii_bytes is not None else _ALNUM_RUNS.findall(text)
    )
    if len(runs) * 2 >= n_words:  # a mostly-CJK document has few such runs, often numbers, and skips this rule
        mean = sum(map(len, runs)) / len(runs)
        if mean < limits.min_mean_word_length or mean > limits.max_mean_word_length:
            return "mean_word_length"
    ellipses = text.count("...") + text.count("…")
    if max(text.count("#"), ellipses) / n_words > limits.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    if sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines) > limits.max_bullet_lines:
        return "bullet_lines"
    if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > limits.max_ellipsis_lines:
        return "ellipsis_lines"
    non_space = len("".join(text.split()))
    if ascii_bytes is not None:
        letters = len(ascii_bytes.translate(None, _ASCII_NOT_LETTER))
    else:
        letters = len(_NOT_LETTER.sub("", text))
    if 1 - letters / non_space > limits.max_non_alpha_chars:
        return "non_alpha_chars"
    rule = _repeats(lines, "line", limits.max_dup_lines, limits.max_dup_line_chars, len(text))
    if rule:
        return rule
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    rule = _repeats(paragraphs, "paragraph", limits.max_dup_paragraphs, limits.max_dup_paragraph_chars, len(text))
    if rule:
        return rule
    return _ngram_rule(words, limits)


def _repeats(parts: list[str], what: str, max_fraction: float, max_chars: float, n_chars: int) -> str | None:
    seen: set[str] = set()
    count = chars = 0
    for part in parts:
        if part in seen:
            count += 1
            chars += len(part)
        else:
            seen.add(part)
    if count / len(parts) > max_fraction:
        return f"dup_{what}s"
    if chars / n_chars > max_chars:
        return f"dup_{what}_chars"
    return None


def _ngram_rule(words: list[str], limits: Thresholds) -> str | None:
    # Python's string hash differs between processes, but the outcome does not: equal words get equal ids,
    # first occurrences are found by position, and ties for the top n-gram are broken by length.
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = lengths.sum()
    ends = np.concatenate([[0], np.cumsum(lengths)])
    for n, limit in enumerate(limits.max_top_ngram_chars, 2):
        if n > len(words) or limit >= 1:  # a fraction never exceeds 1
            continue
        _, first, counts = np.unique(_ngram_hashes(ids, n), return_index=True, return_counts=True)
        top = counts.max()
        if top > 1:
            # Among the n-grams tied for most frequent, the one covering most characters.
            chars = (ends[first + n] - ends[first])[counts == top].max()
            if top * chars / total > limit:
                return f"top_{n}gram_chars"
    for n, limit in enumerate(limits.max_dup_ngram_chars, 5):
        if n > len(words) or limit >= 1:  # a fraction never exceeds 1
            continue
        _, first = np.unique(_ngram_hashes(ids, n), return_index=True)
        repeat = np.ones(len(words) - n + 1, dtype=np.int64)
        repeat[first] = 0
        # A word counts once however many repeated n-grams cover it.
        covered = np.convolve(repeat, np.ones(n, dtype=np.int64))[: len(words)] > 0
        if lengths[covered].sum() / total > limit:
            return f"dup_{n}gram_chars"
    return None


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per window of n word ids."""
    count = len(ids) - n + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        hashes = hashes * _MULT + ids[k : k + count] + np.uint64(1)
    return hashes
