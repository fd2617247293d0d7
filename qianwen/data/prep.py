"""`qianwen data prep`: read, normalise, drop exact and near duplicates, filter,
decontaminate, then tokenise into shards (QWEN_SPEC.md section 5).

Work on one document at a time (normalising, hashing, the MinHash signature,
the filter rules, the n-gram lookup, and later encoding) runs in worker
processes. Decisions that depend on earlier documents (the dedup indexes,
the train/val split, shard packing) are made here in document order, so the
output is the same for any number of workers and a rerun reproduces it byte
for byte. Every stage's counts go to OUT/stats.json; OUT/index.json, written
last, lists the shards for the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
import sysconfig
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from qianwen.data import decontam
from qianwen.data.config import PrepConfig
from qianwen.data.dedup import ExactDedup, NearDedup, digest, signature
from qianwen.data.filters import check
from qianwen.data.normalize import normalize, word_tokens
from qianwen.data.pack import DTYPE, FORMAT, ShardWriter, encode_documents, verified_prefix
from qianwen.data.readers import Doc, Malformed, read_files
from qianwen.tokenizer import Tokenizer
from qianwen.util import atomic_write, list_files, stdlib_files

SPLITS = ("train", "val")
BATCH_DOCS, BATCH_BYTES = 256, 1 << 20  # per task sent to a worker: large enough to amortise the pickling
EXAMPLE_CHARS = 200
_OUR_FILES = re.compile(r"(index|stats|progress)\.json|(train|val)-\d{5}\.bin|\..+\.tmp")


def default_workers() -> int:
    return min(os.cpu_count() or 1, 4)


# ---------------------------------------------------------------------------
# Statistics


@dataclass
class StageStats:
    enabled: bool
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def passed(self, bytes_in: int, bytes_out: int | None = None) -> None:
        self.documents_in += 1
        self.bytes_in += bytes_in
        self.documents_out += 1
        self.bytes_out += bytes_in if bytes_out is None else bytes_out

    def dropped(self, bytes_in: int, rule: str, doc: Doc, detail: str, text: str, limit: int) -> None:
        self.documents_in += 1
        self.bytes_in += bytes_in
        self.removed[rule] += 1
        if len(self.examples) < limit:
            short = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"
            self.examples.append({"where": doc.where, "rule": rule, "detail": detail, "text": short})

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "removed": dict(sorted(self.removed.items()))}


# ---------------------------------------------------------------------------
# Worker processes


class Analysis(NamedTuple):
    text: str  # normalised
    nbytes: int  # UTF-8 bytes of `text`
    key: bytes  # digest of `text`
    minhash: object  # rensa.RMinHash, or None
    rule: str | None  # the filter rule the document breaks
    contamination: str | None  # the evaluation item and n-gram it shares


_worker: dict = {}


def _init_worker(
    tokenizer_path: str | None, config: PrepConfig, decontaminator: decontam.Decontaminator | None
) -> None:
    _worker.update(tokenizer_path=tokenizer_path, config=config, decontaminator=decontaminator)
    _worker.setdefault("tokenizer", None)  # a forked worker has the parent's; a spawned one loads its own


def _analyse(batch: list[tuple[str, str]]) -> list[Analysis]:
    config: PrepConfig = _worker["config"]
    near, filters, decontaminator = config.near_dedup, config.filters, _worker["decontaminator"]
    results = []
    for raw, name in batch:
        text = normalize(raw) if config.normalize.enabled else raw
        if not text.strip():
            results.append(Analysis(text, 0, b"", None, None, None))
            continue
        words = word_tokens(text) if near.enabled or decontaminator else []
        results.append(
            Analysis(
                text,
                len(text.encode("utf-8")),
                digest(text),
                signature(words, near.ngram, near.bands * near.rows, near.seed) if near.enabled else None,
                check(text, filters.thresholds(name)) if filters.enabled else None,
                decontaminator.match(words) if decontaminator else None,
            )
        )
    return results


def _encode(texts: list[str]):
    if _worker["tokenizer"] is None:
        _worker["tokenizer"] = Tokenizer.from_file(_worker["tokenizer_path"])
    return encode_documents(_worker["tokenizer"], texts)


class _Done:
    """A finished result with the interface of multiprocessing's AsyncResult, for in-process runs."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


class Workers:
    """A process pool (n >= 1) or this process (n = 0) holding what the per-document work needs."""

    def __init__(
        self,
        n: int,
        config: PrepConfig,
        decontaminator: decontam.Decontaminator | None = None,
        tokenizer: Tokenizer | None = None,
        tokenizer_path: str | os.PathLike | None = None,
    ):
        self.n = n
        _worker.clear()
        _worker["tokenizer"] = tokenizer
        initargs = (str(tokenizer_path) if tokenizer_path else None, config, decontaminator)
        if n:
            # Forking a single-threaded process is safe and starts workers at once, with the modules and the
            # tokenizer already loaded; a spawned worker re-imports qianwen (and torch with it), about a second.
            safe = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
            self.pool = multiprocessing.get_context("fork" if safe else "spawn").Pool(n, _init_worker, initargs)
        else:
            _init_worker(*initargs)

    def submit(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)) if self.n else _Done(fn(arg))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self.n:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------
# The run


def prep(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    config: PrepConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Prepare `inputs` (the standard library's Python sources when empty) into token shards in `out`;
    return the statistics also written to OUT/stats.json. `workers` 0 runs everything in this process."""
    config = config or PrepConfig()
    config.check()
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}.")
    tokenizer_path = Path(tokenizer)
    if not tokenizer_path.exists():
        raise ValueError(
            f"tokenizer {tokenizer_path} does not exist; give --tokenizer a directory holding qwen.tiktoken "
            "(or tokenizer.json), e.g. a run's tokenizer/ directory."
        )
    tok = Tokenizer.from_file(tokenizer_path)
    files = list_files(inputs, config.read.suffixes) if inputs else stdlib_files()
    if not files:
        raise ValueError(f"the inputs {', '.join(map(str, inputs))} hold no files to read; check --input.")
    out = Path(out)
    fingerprint = _fingerprint(config, files, tok)
    done = _open_out(out, fingerprint)
    decontaminator = _decontaminator(config) if config.decontam.enabled else None

    read = {"files": len(files), "documents": 0, "bytes": 0, "malformed": 0, "malformed_examples": []}
    stages = stage_stats(config)
    writers: dict[str, ShardWriter] = {}

    def save_progress() -> None:
        shards = {split: writer.record for split, writer in writers.items()}
        atomic_write(out / "progress.json", json.dumps({"fingerprint": fingerprint, "shards": shards}, indent=1))

    for split in SPLITS:
        writers[split] = ShardWriter(out, split, config.pack.shard_tokens, done[split], save_progress)

    total = sum(f.stat().st_size for f in files)
    if config.read.max_bytes:
        total = min(total, config.read.max_bytes)
    # The pool comes first: it forks, and tqdm starts a thread.
    with Workers(workers, config, decontaminator, tok, tokenizer_path) as pool:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="data prep", file=sys.stderr, disable=not progress)
        items = read_files(files, config.read.text_field, config.read.name_field, bar.update)
        router = _Router(writers, pool, config)
        try:
            for key, text in clean(documents(items, read, config), config, stages, pool):
                router.keep(key, text)
                if router.kept % 256 == 0:
                    bar.set_postfix(kept=router.kept, refresh=False)
            router.finish()
        finally:
            bar.close()

    stats = {
        "inputs": [str(p) for p in inputs] or [f"{sysconfig.get_paths()['stdlib']} (standard library, *.py)"],
        "read": read,
        "stages": {name: stage.to_json() for name, stage in stages.items()},
        "output": {
            split: {"documents": w.documents, "tokens": w.tokens, "shards": len(w.shards)}
            for split, w in writers.items()
        },
    }
    save_progress()
    atomic_write(out / "stats.json", json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
    if not writers["train"].tokens:  # no index.json then: the directory is no shard set a trainer would read
        kept = sum(w.documents for w in writers.values())
        raise ValueError(
            f"the inputs gave nothing to train on: {read['documents']} document(s) read from {read['files']} "
            f"file(s), {read['malformed']} malformed, {kept} kept after the filters ({out / 'stats.json'} says what "
            "each stage removed); give text or code to --input, or loosen the filters."
        )
    index = {
        "format": FORMAT,
        "dtype": DTYPE.name,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "tokenizer": str(tokenizer_path.resolve()),
        "splits": {
            split: [{key: entry[key] for key in ("file", "tokens", "documents")} for entry in writer.shards]
            for split, writer in writers.items()
        },
    }
    atomic_write(out / "index.json", json.dumps(index, indent=1) + "\n")
    return stats


def documents(items: Iterable[Doc | Malformed], read: dict, config: PrepConfig) -> Iterator[tuple[Doc, int]]:
    """The readable documents with their UTF-8 sizes, counting (and keeping examples of) malformed records."""
    for item in items:
        if isinstance(item, Malformed):
            read["malformed"] += 1
            if len(read["malformed_examples"]) < config.examples:
                read["malformed_examples"].append({"where": item.where, "reason": item.reason})
            continue
        size = len(item.text.encode("utf-8"))
        read["documents"] += 1
        read["bytes"] += size
        yield item, size
        if config.read.max_bytes and read["bytes"] >= config.read.max_bytes:
            return


def _batches(docs: Iterable[tuple[Doc, int]]) -> Iterator[list[tuple[Doc, int]]]:
    batch, size = [], 0
    for doc, nbytes in docs:
        batch.append((doc, nbytes))
        size += nbytes
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered(pool: Workers, fn, batches: Iterable[list[tuple[Doc, int]]], depth: int):
    """(batch, fn(batch texts)) in input order, with at most `depth` batches in flight so memory stays flat
    (Pool.imap would read the whole corpus ahead)."""
    pending: deque = deque()
    for batch in batches:
        pending.append((batch, pool.submit(fn, [(doc.text, doc.name) for doc, _ in batch])))
        if len(pending) >= depth:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def stage_stats(config: PrepConfig) -> dict[str, StageStats]:
    return {
        "normalize": StageStats(config.normalize.enabled),
        "exact_dedup": StageStats(config.exact_dedup.enabled),
        "near_dedup": StageStats(config.near_dedup.enabled),
        "filters": StageStats(config.filters.enabled),
        "decontam": StageStats(config.decontam.enabled),
    }


def clean(
    docs: Iterable[tuple[Doc, int]], config: PrepConfig, stages: dict[str, StageStats], pool: Workers
) -> Iterator[tuple[bytes, str]]:
    """(digest, normalised text) of each document that every stage keeps, in input order; `docs` are
    (document, UTF-8 size) pairs and `stages` collects the counts."""
    decide = _Decider(config, stages)
    for batch, results in _ordered(pool, _analyse, _batches(docs), depth=2 * max(pool.n, 1)):
        for (doc, raw_bytes), analysis in zip(batch, results):
            if decide(doc, raw_bytes, analysis):
                yield analysis.key, analysis.text


class _Decider:
    """Applies the stages, in order, to each analysed document."""

    def __init__(self, config: PrepConfig, stages: dict[str, StageStats]):
        self.config, self.stages = config, stages
        self.exact = ExactDedup()
        self.near = NearDedup(config.near_dedup.bands, config.near_dedup.rows)

    def __call__(self, doc: Doc, raw_bytes: int, a: Analysis) -> bool:
        """Whether the document is kept."""
        s, limit = self.stages, self.config.examples
        if not a.nbytes:
            s["normalize"].dropped(raw_bytes, "empty", doc, "nothing but whitespace", doc.text, limit)
            return False
        s["normalize"].passed(raw_bytes, a.nbytes)
        for name, verdict_of in (
            ("exact_dedup", self._exact),
            ("near_dedup", self._near),
            ("filters", self._filters),
            ("decontam", self._decontam),
        ):
            verdict = verdict_of(a, doc)  # called only while the document survives: _near indexes what it passes
            if verdict:
                s[name].dropped(a.nbytes, verdict[0], doc, verdict[1], a.text, limit)
                return False
            s[name].passed(a.nbytes)
        return True

    def _exact(self, a: Analysis, doc: Doc) -> tuple[str, str] | None:
        if self.config.exact_dedup.enabled and (first := self.exact.original(a.key, doc.where)):
            return "duplicate", f"same text as {first}"
        return None

    def _near(self, a: Analysis, doc: Doc) -> tuple[str, str] | None:
        if self.config.near_dedup.enabled and (first := self.near.original(a.minhash, doc.where)):
            return "near_duplicate", f"near-duplicate of {first}"
        return None

    def _filters(self, a: Analysis, doc: Doc) -> tuple[str, str] | None:
        if not a.rule:
            return None
        return a.rule, f"breaks the {a.rule} rule of the {self.config.filters.profile_for(doc.name)} profile"

    @staticmethod
    def _decontam(a: Analysis, doc: Doc) -> tuple[str, str] | None:
        return ("benchmark_overlap", f"shares an n-gram with {a.contamination}") if a.contamination else None


class _Router:
    """Sends kept documents to the train or val split, encoding them in the workers and handing the ids to
    each split's ShardWriter in document order."""

    def __init__(self, writers: dict[str, ShardWriter], pool: Workers, config: PrepConfig):
        self.writers, self.pool = writers, pool
        self.val_fraction = config.pack.val_fraction
        self.depth = 2 * max(pool.n, 1)
        self.kept = 0
        self.routed: Counter = Counter()
        self._held: tuple[bytes, str] | None = None
        self._batch: list[tuple[str, bytes, str]] = []
        self._batch_bytes = 0
        self._encoding: deque = deque()

    def keep(self, key: bytes, text: str) -> None:
        self.kept += 1
        if int.from_bytes(key[:8], "little") < self.val_fraction * 2**64:
            self._send("val", key, text)
            return
        # The latest train document waits, so that it can become the validation split's only document
        # if the corpus ends with none there.
        if self._held:
            self._send("train", *self._held)
        self._held = (key, text)

    def finish(self) -> None:
        if self._held:
            wants_val = self.val_fraction > 0 and self.kept >= 2 and not self.routed["val"]
            self._send("val" if wants_val else "train", *self._held)
        self._submit()
        self.drain(block=True)
        for writer in self.writers.values():
            writer.finish()

    def _send(self, split: str, key: bytes, text: str) -> None:
        writer = self.writers[split]
        self.routed[split] += 1
        if writer.covering:
            writer.cover(key)
            return
        self._batch.append((split, key, text))
        self._batch_bytes += len(text)
        if len(self._batch) >= BATCH_DOCS or self._batch_bytes >= BATCH_BYTES:
            self._submit()
            self.drain(block=False)

    def _submit(self) -> None:
        if self._batch:
            order = [(split, key) for split, key, _ in self._batch]
            self._encoding.append((order, self.pool.submit(_encode, [text for _, _, text in self._batch])))
            self._batch, self._batch_bytes = [], 0

    def drain(self, block: bool) -> None:
        while self._encoding and (block or self._encoding[0][1].ready() or len(self._encoding) > self.depth):
            order, result = self._encoding.popleft()
            for (split, key), ids in zip(order, result.get()):
                self.writers[split].add(ids, key)


# ---------------------------------------------------------------------------
# The output directory


def _fingerprint(config: PrepConfig, files: Sequence[Path], tok: Tokenizer) -> str:
    """What decides the output: the config, the files read, and the tokenizer's vocabulary."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for path in files:
        h.update(str(path.resolve()).encode() + b"\0")
    for token, rank in sorted(tok.ranks.items(), key=lambda item: item[1]):
        h.update(len(token).to_bytes(2, "little") + token + rank.to_bytes(4, "little"))
    h.update(json.dumps(tok.special_tokens, sort_keys=True).encode())
    return h.hexdigest()


def _open_out(out: Path, fingerprint: str) -> dict[str, list[dict]]:
    """Make or check the output directory; the finished shards a previous run of the same prep left there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the shards.")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not _OUR_FILES.fullmatch(p.name))
    if foreign:
        raise ValueError(
            f"{out} holds files that data prep did not write ({foreign[0]}); choose an empty or new --out directory."
        )
    progress = out / "progress.json"
    done: dict[str, list[dict]] = {split: [] for split in SPLITS}
    if progress.is_file():
        try:
            record = json.loads(progress.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = {}
        if record.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds a data prep run with other inputs, config or tokenizer; choose a new --out directory, "
                f"or delete {out} to start over."
            )
        done = {split: verified_prefix(out, record["shards"].get(split, [])) for split in SPLITS}
    elif any(out.iterdir()):
        raise ValueError(
            f"{out} holds data prep output without its progress.json, so it cannot be resumed; delete {out} "
            "or choose a new --out directory."
        )
    for leftover in out.glob(".*.tmp"):  # halves of writes that a crash interrupted
        leftover.unlink()
    # A trainer must not read an index.json from before this run's shards are all in place.
    (out / "index.json").unlink(missing_ok=True)
    return done


def _decontaminator(config: PrepConfig) -> decontam.Decontaminator:
    items: list[tuple[str, str]] = []
    if config.decontam.humaneval:
        items.extend(decontam.humaneval_items())
    for path in config.decontam.eval_files:
        items.extend(decontam.file_items(path, config.decontam.fields))
    return decontam.Decontaminator(items, config.decontam.ngram)


def summary(stats: dict, out: str | os.PathLike, seconds: float) -> str:
    """What a run did, in a few lines for the terminal."""
    read = stats["read"]
    lines = [f"read {read['files']} file(s): {read['documents']} documents, {read['bytes'] / 1e6:.2f} MB"]
    if read["malformed"]:
        first = read["malformed_examples"][0]
        lines[0] += (
            f"; skipped {read['malformed']} malformed record(s), e.g. {first['where']}: {first['reason']} "
            f"(more in {Path(out) / 'stats.json'})"
        )
    for name, stage in stats["stages"].items():
        if not stage["enabled"]:
            lines.append(f"  {name:12s} off")
            continue
        removed = ", ".join(f"{rule} {n}" for rule, n in stage["removed"].items()) or "none removed"
        lines.append(
            f"  {name:12s} {stage['documents_in']:>9,} -> {stage['documents_out']:>9,} documents "
            f"{stage['bytes_in'] / 1e6:9.2f} -> {stage['bytes_out'] / 1e6:9.2f} MB  ({removed})"
        )
    parts = [
        f"{s}: {o['documents']:,} documents, {o['tokens']:,} tokens, {o['shards']} shard(s)"
        for s, o in stats["output"].items()
    ]
    lines.append(f"wrote {'; '.join(parts)} to {out} in {seconds:.1f} s")
    return "\n".join(lines)
