"""Data prep throughput against datatrove, and the MinHash libraries compared.

Pipeline: read Parquet, normalise, exact dedup, MinHash dedup (5-gram shingles,
14 bands x 8 rows), Gopher-style quality and repetition filters, on 2 worker
processes each side, over the same documents: standard-library source plus
prose assembled from its docstrings and comments, with some planted exact and
near duplicates. qianwen runs `qianwen.data.prep.clean` (everything
`qianwen data prep` does before tokenising, decontamination off); datatrove
runs its own stages: ParquetReader, a normalising step (qianwen's function, so
the work matches), GopherQualityFilter, GopherRepetitionFilter, ParquetWriter,
then ExactDedupSignature / ExactFindDedups / ExactDedupFilter and
MinhashDedupSignature / Buckets / Cluster / Filter, each stage on a
LocalPipelineExecutor with 2 tasks where it can use them. Parquet, because
datatrove's JSONL reader and writer need orjson, which it does not install.
Offline, datatrove's
English word tokenizer (spaCy, or NLTK with its punkt data) cannot be loaded,
so its filters and MinHash get a whitespace tokenizer; its hashing is xxhash
when a version that datatrove can use is installed, else SHA-1 (the notes
say which).

MinHash libraries: signatures for the same shingle sets with rensa,
datasketch and datatrove's signature code, and on planted pairs the error of
each estimate against the exact Jaccard similarity and how often the 14x8
bands flag a pair.

    python -m benchmarks.bench_data [--stdlib-mb 12] [--prose-mb 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import write_result
from qianwen.data.config import load_config
from qianwen.data.dedup import shingles
from qianwen.data.normalize import normalize, word_tokens
from qianwen.data.prep import Workers, clean, documents, stage_stats
from qianwen.data.readers import read_files
from qianwen.util import list_files, stdlib_files

WORKERS = 2
BANDS, ROWS, NGRAM = 14, 8, 5
SHARDS = 4  # input files, so datatrove's 2 tasks each get some
SENTENCE = re.compile(r"[A-Z][^.!?\n]{30,200}[.!?]")


# ---------------------------------------------------------------------------
# The corpus


def corpus(stdlib_mb: float, prose_mb: float, seed: int = 0) -> list[dict]:
    """Records {"text", "path"}: standard-library files, prose paragraphs, and ~5% planted duplicates."""
    rng = random.Random(seed)
    code, size = [], 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        code.append({"text": text, "path": path.name})
        size += len(text.encode())
        if size >= stdlib_mb * 1e6:
            break
    sentences = sorted({s.replace("\n", " ") for r in code for s in SENTENCE.findall(r["text"])})
    prose, size = [], 0
    while size < prose_mb * 1e6:
        paragraphs = [" ".join(rng.sample(sentences, rng.randint(3, 8))) for _ in range(rng.randint(2, 8))]
        text = "\n\n".join(paragraphs)
        prose.append({"text": text, "path": f"prose-{len(prose)}.txt"})
        size += len(text.encode())
    records = code + prose
    for record in rng.sample(records, len(records) // 40):  # exact copies, with whitespace changes
        records.append({"text": record["text"].replace("\n", " \r\n"), "path": record["path"]})
    for record in rng.sample(records, len(records) // 40):  # near copies: a few words changed
        words = record["text"].split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) // 200)):
            words[i] = "changed"
        records.append({"text": " ".join(words), "path": record["path"]})
    rng.shuffle(records)
    return records


def write_shards(records: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True)
    for k in range(SHARDS):
        part = records[k::SHARDS]
        table = pa.table({"text": [r["text"] for r in part], "path": [r["path"] for r in part]})
        pq.write_table(table, folder / f"part-{k}.parquet")


# ---------------------------------------------------------------------------
# qianwen


def run_qianwen(folder: Path) -> int:
    config = load_config(None, ["decontam.enabled=false"])
    read = {"files": 0, "documents": 0, "bytes": 0, "malformed": 0, "malformed_examples": []}
    items = read_files(list_files([folder]), config.read.text_field, config.read.name_field)
    with Workers(WORKERS, config) as pool:
        return sum(1 for _ in clean(documents(items, read, config), config, stage_stats(config), pool))


# ---------------------------------------------------------------------------
# datatrove


def datatrove_hash() -> str:
    """datatrove's default, xxhash, where it works: it needs the xxhash package, below 4.1 (which refuses the
    str shingles datatrove 0.10 hashes); else SHA-1."""
    from datatrove.utils.hashing import HashConfig, create_hash_func

    try:
        create_hash_func(HashConfig(hash_fc="xxhash"))("shingle")
    except (ImportError, TypeError):
        return "sha1"
    return "xxhash"


def run_datatrove(folder: Path, work: Path) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.hashing import HashConfig

    words = _whitespace_tokenizer()
    hashing = HashConfig(precision=64, hash_fc=datatrove_hash())
    minhash = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, hash_config=hashing)
    exact = ExactDedupConfig(content_getter=lambda doc: doc.text, hash_config=hashing)

    def normalise(data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.text = normalize(doc.text)
            if doc.text:
                yield doc

    def stage(pipeline, name, tasks=WORKERS):
        LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=min(tasks, WORKERS), logging_dir=str(work / "logs" / name)
        ).run()

    stage(
        [
            ParquetReader(str(folder)),
            normalise,
            GopherQualityFilter(language=words),
            GopherRepetitionFilter(language=words),
            ParquetWriter(str(work / "filtered")),
        ],
        "filter",
    )
    stage(
        [ParquetReader(str(work / "filtered")), ExactDedupSignature(str(work / "exact_sigs"), config=exact)], "exact1"
    )
    stage([ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact)], "exact2", tasks=1)
    stage(
        [
            ParquetReader(str(work / "filtered")),
            ExactDedupFilter(str(work / "exact_dups"), config=exact),
            ParquetWriter(str(work / "unique")),
        ],
        "exact3",
    )
    stage(
        [
            ParquetReader(str(work / "unique")),
            MinhashDedupSignature(str(work / "sigs"), config=minhash, language=words),
        ],
        "mh1",
    )
    stage([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=minhash)], "mh2", tasks=BANDS)
    stage([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=minhash)], "mh3", tasks=1)
    stage(
        [
            ParquetReader(str(work / "unique")),
            MinhashDedupFilter(str(work / "remove")),
            ParquetWriter(str(work / "final")),
        ],
        "mh4",
    )
    return sum(pq.ParquetFile(path).metadata.num_rows for path in (work / "final").glob("*.parquet"))


def _whitespace_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return Whitespace()


@contextlib.contextmanager
def stderr_to(path: Path):
    """datatrove logs every task to stderr; the log goes to a file instead (its workers inherit the descriptor)."""
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---------------------------------------------------------------------------
# MinHash libraries


def minhash_rows(records: list[dict], seed: int = 0) -> list[dict]:
    import datasketch
    import rensa
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig

    num_perm = BANDS * ROWS
    code = [r["text"] for r in records if r["path"].endswith(".py")][:400]
    grams = [shingles(word_tokens(normalize(t)), NGRAM) for t in code]
    grams = [g for g in grams if g]
    with tempfile.TemporaryDirectory() as tmp:
        config = MinhashConfig(hash_config=HashConfig(precision=64, hash_fc=datatrove_hash()))
        trove = MinhashDedupSignature(tmp, config, _whitespace_tokenizer())

    def with_rensa(sets):
        out = []
        for s in sets:
            m = rensa.RMinHash(num_perm=num_perm, seed=42)
            m.update(s)
            out.append(np.array(m.digest()))
        return out

    def with_datasketch(sets):
        return [
            m.hashvalues for m in datasketch.MinHash.bulk([[x.encode() for x in s] for s in sets], num_perm=num_perm)
        ]

    def with_datatrove(sets):
        hashed = [np.fromiter(map(trove._hash_func, s), dtype=np.uint64).reshape(-1, 1) for s in sets]
        return [np.concatenate(trove.get_signature(h)) for h in hashed]

    pairs = planted_pairs(code, seed)
    exact = np.array([len(a & b) / len(a | b) for a, b in pairs])
    theory = 1 - (1 - exact**ROWS) ** BANDS
    rows = []
    for name, fn in (("rensa", with_rensa), ("datasketch", with_datasketch), ("datatrove", with_datatrove)):
        start = time.perf_counter()
        fn(grams)
        seconds = time.perf_counter() - start
        a = fn([sorted(x) for x, _ in pairs])
        b = fn([sorted(y) for _, y in pairs])
        same = np.array([x == y for x, y in zip(a, b)])
        estimate = same.mean(axis=1)
        flagged = same.reshape(len(pairs), BANDS, ROWS).all(axis=2).any(axis=1)
        rows.append(
            {
                "kind": "minhash",
                "library": name,
                "documents": len(grams),
                "shingles": sum(map(len, grams)),
                "seconds": round(seconds, 3),
                "docs_per_s": round(len(grams) / seconds),
                "pairs": len(pairs),
                "mean_abs_error": round(float(np.abs(estimate - exact).mean()), 4),
                "flagged_at_0.8_up": round(float(flagged[exact >= 0.8].mean()), 3),
                "flagged_0.6_to_0.8": round(float(flagged[(exact >= 0.6) & (exact < 0.8)].mean()), 3),
                "flagged_below_0.6": round(float(flagged[exact < 0.6].mean()), 3),
                "theory_at_0.8_up": round(float(theory[exact >= 0.8].mean()), 3),
                "theory_0.6_to_0.8": round(float(theory[(exact >= 0.6) & (exact < 0.8)].mean()), 3),
                "theory_below_0.6": round(float(theory[exact < 0.6].mean()), 3),
            }
        )
    return rows


def planted_pairs(texts: list[str], seed: int) -> list[tuple[set, set]]:
    """Shingle sets of documents and copies with a growing share of their words replaced."""
    rng = random.Random(seed)
    words = [word_tokens(normalize(t)) for t in texts]
    vocab = sorted({w for ws in words for w in ws})
    pairs = []
    for ws in [w for w in words if len(w) >= 400][:60]:
        for rate in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2):
            edited = list(ws)
            for i in rng.sample(range(len(ws)), int(rate * len(ws))):
                edited[i] = rng.choice(vocab)
            pairs.append((set(shingles(ws, NGRAM)), set(shingles(edited, NGRAM))))
    return pairs


# ---------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stdlib-mb", type=float, default=12)
    parser.add_argument("--prose-mb", type=float, default=4)
    args = parser.parse_args(argv)
    records = corpus(args.stdlib_mb, args.prose_mb)
    mb = sum(len(r["text"].encode()) for r in records) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "input"
        write_shards(records, folder)
        timings = {}
        for name in ("qianwen", "datatrove"):
            for attempt in range(2):  # the median of two is the mean; the second run sees a warm page cache
                work = Path(tmp) / f"{name}-{attempt}"
                work.mkdir()
                start = time.perf_counter()
                if name == "qianwen":
                    kept = run_qianwen(folder)
                else:
                    with stderr_to(Path(tmp) / "datatrove.log"):
                        kept = run_datatrove(folder, work)
                timings.setdefault(name, []).append((time.perf_counter() - start, kept))
        for name, runs in timings.items():
            seconds = min(t for t, _ in runs)
            rows.append(
                {
                    "kind": "pipeline",
                    "impl": name,
                    "documents": len(records),
                    "mb": round(mb, 2),
                    "seconds": round(seconds, 2),
                    "docs_per_s": round(len(records) / seconds),
                    "mb_per_s": round(mb / seconds, 2),
                    "kept": runs[0][1],
                }
            )
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    for row in rows:
        row["ratio_vs_datatrove"] = round(rows[1]["seconds"] / row["seconds"], 2)
        print(f"{row['impl']:10s} {row['docs_per_s']:7d} docs/s {row['mb_per_s']:6.2f} MB/s  kept {row['kept']}")
    print(f"qianwen / datatrove throughput: {ratio:.2f}x")
    minhash = minhash_rows(records)
    for row in minhash:
        print(
            f"{row['library']:10s} {row['seconds']:6.3f} s  MAE {row['mean_abs_error']:.4f}  flagged >=0.8 "
            f"{row['flagged_at_0.8_up']:.3f} 0.6-0.8 {row['flagged_0.6_to_0.8']:.3f} <0.6 {row['flagged_below_0.6']:.3f}"
        )
    notes = (
        f"{len(records)} documents, {mb:.1f} MB; {WORKERS} worker processes each side; the faster of two runs. "
        f"datatrove hashing: {datatrove_hash()}; its word tokenizer: whitespace (spaCy/NLTK data are not available "
        "offline). Kept counts differ because qianwen applies a code profile to .py files and datatrove's Gopher "
        "filters treat everything as English text."
    )
    command = f"python -m benchmarks.bench_data --stdlib-mb {args.stdlib_mb:g} --prose-mb {args.prose_mb:g}"
    write_result("data", rows + minhash, command, notes)


if __name__ == "__main__":
    main()
