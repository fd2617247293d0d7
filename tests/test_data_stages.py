"""The per-document stages on their own: normalisation, the quality rules (checked against plain-Python
re-implementations), decontamination n-grams, and the config loader."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter

import numpy as np
import pytest

from qianwen.data.config import load_config
from qianwen.data.decontam import Decontaminator, humaneval_items
from qianwen.data.filters import Thresholds, _ngram_rule, check, code_thresholds
from qianwen.data.normalize import normalize, word_tokens

# ---------------------------------------------------------------------------
# normalize


def test_normalize_whitespace_and_unicode():
    text = "\n\n  def f():\r\n      return 1   \r\n\r\n\r\n\r\n\r\n\r\nx = 'cafe\u0301'\t \n\n"
    assert normalize(text) == "  def f():\n      return 1\n\n\nx = 'café'"
    assert normalize(normalize(text)) == normalize(text)
    assert unicodedata.is_normalized("NFC", normalize(unicodedata.normalize("NFD", "Ångström résumé")))
    assert normalize("a\rb") == "a\nb"
    assert normalize(" \n\t\n") == ""


def test_word_tokens_are_lowercase_words():
    assert word_tokens("Def has_close(numbers: List[float]) -> bool:") == [
        "def",
        "has_close",
        "numbers",
        "list",
        "float",
        "bool",
    ]


# ---------------------------------------------------------------------------
# filters

WORDS = ["the", "river", "carried", "sediment", "downstream", "and", "built", "fertile", "plains", "where", "farmers"]


def prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)) + ".")
    return "\n".join(lines)


def test_prose_and_code_pass_their_profiles():
    rng = random.Random(1)
    vocab = [f"{w}{i}" for i in range(40) for w in WORDS[:5]]
    text = "\n".join(" ".join(rng.choice(vocab) for _ in range(12)) + "." for _ in range(30))
    assert check(text, Thresholds()) is None


def test_code_profile_keeps_the_standard_library_that_text_rules_reject():
    from qianwen.util import stdlib_files

    texts = [normalize(p.read_text(encoding="utf-8", errors="replace")) for p in stdlib_files()[::6]]
    texts = [t for t in texts if len(t.split()) >= 50]  # past the two profiles' different min_words
    as_code = sum(check(t, code_thresholds()) is None for t in texts) / len(texts)
    as_text = sum(check(t, Thresholds()) is None for t in texts) / len(texts)
    assert as_code > 0.97 and as_text < 0.8, (as_code, as_text)


@pytest.mark.parametrize(
    "text,rule",
    [
        ("too few words here", "min_words"),
        (" ".join(["a"] * 60), "mean_word_length"),
        (" ".join(["supercalifragilistic"] * 60), "mean_word_length"),
        ("\n".join(f"#tag{i} #more{i} word{i}" for i in range(30)), "symbol_word_ratio"),
        ("\n".join(f"- item number {i} in the list of things" for i in range(30)), "bullet_lines"),
        (
            "\n".join(
                f"and then the long story of the river went on and on, chapter {i}" + "..." * (i % 2) for i in range(30)
            ),
            "ellipsis_lines",
        ),
        ("\n".join(f"item{i}: {i * 7919}.{i % 97} ({i}%) -> {i * 31};" for i in range(30)), "non_alpha_chars"),
    ],
)
def test_each_rule_drops_its_kind_of_junk(text, rule):
    assert check(text, Thresholds()) == rule


def test_repetition_rules():
    lines_only = Thresholds(max_top_ngram_chars=[1] * 3, max_dup_ngram_chars=[1] * 6)  # these lines share n-grams
    unique = [f"line {w} number {i} says something different" for i, w in enumerate(WORDS * 3)]
    assert check("\n".join(unique), lines_only) is None
    assert check("\n".join(unique[:20] + ["the same line again and again"] * 20), lines_only) == "dup_lines"
    paragraphs = ["\n".join(unique[i : i + 3]) for i in range(0, 30, 3)]
    repeated = "\n\n".join(paragraphs + [paragraphs[0]] * 6)
    lines_only.max_dup_lines = lines_only.max_dup_line_chars = 1
    assert check(repeated, lines_only) == "dup_paragraphs"


def _reference_top_ngram(words: list[str], n: int) -> float:
    """Characters in the most frequent n-gram (the longest if tied), over all word characters."""
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    top = max(grams.values())
    if top < 2:
        return 0.0
    chars = max(sum(map(len, g)) for g, c in grams.items() if c == top)
    return top * chars / sum(map(len, words))


def _reference_dup_ngram(words: list[str], n: int) -> float:
    """Characters of words covered by a repeated occurrence of an n-gram, over all word characters."""
    seen, covered = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))


@pytest.mark.parametrize("seed", range(6))
def test_ngram_rules_match_a_plain_python_reference(seed):
    rng = random.Random(seed)
    vocab = [rng.choice(WORDS) + str(rng.randint(0, 3)) for _ in range(rng.choice([6, 20, 200]))]
    words = [rng.choice(vocab) for _ in range(rng.randint(20, 400))]
    if seed % 2:  # plant a repeated passage
        words[100:100] = words[10:40] * 2
    for n in (2, 3, 4):
        value = _reference_top_ngram(words, n)
        for k in (max(value - 1e-9, 0), value + 1e-9):
            limits = Thresholds(max_top_ngram_chars=[1, 1, 1], max_dup_ngram_chars=[1] * 6)
            limits.max_top_ngram_chars[n - 2] = k
            assert (_ngram_rule(words, limits) == f"top_{n}gram_chars") == (value > k), (n, value, k)
    for n in range(5, 11):
        value = _reference_dup_ngram(words, n)
        for k in (max(value - 1e-9, 0), value + 1e-9):
            limits = Thresholds(max_top_ngram_chars=[1, 1, 1], max_dup_ngram_chars=[1] * 6)
            limits.max_dup_ngram_chars[n - 5] = k
            assert (_ngram_rule(words, limits) == f"dup_{n}gram_chars") == (value > k), (n, value, k)


# ---------------------------------------------------------------------------
# decontamination


def test_decontamination_needs_a_whole_13_gram():
    d = Decontaminator([("eval/1", "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi")], 13)
    words = word_tokens("Intro text. Alpha, beta; gamma delta epsilon zeta eta theta iota kappa lambda mu nu. End")
    assert d.match(words) == "eval/1: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
    words = word_tokens("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu and nu xi")
    assert d.match(words) is None


def test_humaneval_solutions_are_found_inside_other_code():
    items = list(humaneval_items())
    assert len(items) == 164
    d = Decontaminator(items)
    name, text = items[17]
    host = "import os\n\n" + text + "\n\nprint('done')\n"
    assert d.match(word_tokens(normalize(host))).startswith(f"{name}: ")
    assert d.match(word_tokens(normalize(open(np.__file__, encoding="utf-8").read()))) is None


# ---------------------------------------------------------------------------
# config


def test_config_from_toml_and_overrides(tmp_path):
    path = tmp_path / "prep.toml"
    path.write_text(
        "examples = 2\n[filters]\nprofile = 'code'\n[filters.text]\nmin_words = 7\nmax_top_ngram_chars = [0.3, 0.3, 0.3]\n"
        "[pack]\nshard_tokens = 1000\n"
    )
    config = load_config(
        path, ["pack.val_fraction=0.1", "filters.code.max_symbol_word_ratio=inf", "read.suffixes=['.py']"]
    )
    assert config.examples == 2 and config.filters.profile == "code"
    assert config.filters.text.min_words == 7 and config.filters.text.max_top_ngram_chars == [0.3, 0.3, 0.3]
    assert config.filters.text.max_words == 100_000  # untouched defaults stay
    assert config.pack.shard_tokens == 1000 and config.pack.val_fraction == 0.1
    assert config.filters.code.max_symbol_word_ratio == float("inf") and config.read.suffixes == [".py"]
    # A whole-run recipe holds the same sections under [data].
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[model]\nhidden_size = 64\n[data.near_dedup]\nenabled = false\n")
    assert load_config(recipe).near_dedup.enabled is False


@pytest.mark.parametrize(
    "override,message",
    [
        ("filters.text.min_word=3", "unknown config key filters.text.min_word; valid keys in [filters.text] are "),
        ("nonsense=1", "unknown config key nonsense; valid keys in the top level are "),
        ("pack.shard_tokens=many", "config key pack.shard_tokens must be an integer, got 'many'"),
        ("near_dedup.enabled=1", "config key near_dedup.enabled must be true or false, got 1"),
        ("filters.profile=prose", "filters.profile must be one of auto, text, code"),
        ("pack.val_fraction=1.5", "pack.val_fraction must be in [0, 1)"),
        ("filters=3", "config key filters is a section"),
        ("novalue", "override 'novalue' is not key=value"),
    ],
)
def test_config_errors_are_one_clear_sentence(override, message):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert text.startswith(message) and text.endswith(".") and "\n" not in text


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; pass a TOML file to --config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pack\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(bad)
