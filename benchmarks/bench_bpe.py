"""BPE training time on Python standard-library source (the first --size-mb of it, whole files) with
--vocab-size ids, every implementation on the same NFC text with Qwen's pre-tokenizer regex:

- qianwen `bpe.learn_ranks` (rustbpe, plus NFC and the rank dict): the goal is no overhead over the engine
  it wraps, and at most 1.1x the time of Hugging Face `tokenizers` used directly;
- Hugging Face `tokenizers` used directly (BpeTrainer, NFC normaliser, Split on the regex + ByteLevel);
- rustbpe used directly;
- qianwen `bpe.train` end to end (check and stream the files, hold out every 20th block, learn, write the
  vocabulary and Hugging Face files, measure bytes per token against Qwen's vocabulary), for reference.

    python -m benchmarks.bench_bpe [--size-mb 8] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import tempfile
import time
import unicodedata
from pathlib import Path

import rustbpe
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from benchmarks.common import write_result
from qianwen import bpe
from qianwen.tokenizer import PATTERN, SPECIAL_NAMES, _from_unicode


def read(path: Path) -> str:
    # newline="" as qianwen reads: the pre-tokenizer treats \r\n apart from \n.
    with open(path, encoding="utf-8-sig", newline="") as f:
        return f.read()


def hf_ranks(texts: list[str], n_ranks: int) -> dict[bytes, int]:
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return {_from_unicode(token, "hf"): i for token, i in tok.get_vocab().items()}


def rustbpe_ranks(texts: list[str], n_ranks: int) -> dict[bytes, int]:
    engine = rustbpe.Tokenizer()
    engine.train_from_iterator([unicodedata.normalize("NFC", t) for t in texts], n_ranks, pattern=PATTERN)
    return dict(engine.get_mergeable_ranks())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=8.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    corpus = bpe.scan([], max_bytes=int(args.size_mb * 1_000_000))
    files = corpus.files
    texts = [read(p) for p in files]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    n_ranks = args.vocab_size - len(SPECIAL_NAMES)

    ours = bpe.learn_ranks(texts, args.vocab_size)
    # Same engine and same text: the wrapper must not change the result.
    assert ours == rustbpe_ranks(texts, n_ranks)
    hf = hf_ranks(texts, n_ranks)
    assert len(hf) == len(ours) == n_ranks
    in_common = len(set(hf) & set(ours))

    out = tempfile.TemporaryDirectory()
    end_to_end: list[dict] = []

    def train_end_to_end() -> None:
        target = Path(out.name) / "tok"
        end_to_end.append(bpe.train(files, args.vocab_size, target, force=True, log=lambda line: None))

    runs = {
        "HF tokenizers BpeTrainer, directly": lambda: hf_ranks(texts, n_ranks),
        "rustbpe, directly": lambda: rustbpe_ranks(texts, n_ranks),
        "qianwen bpe.learn_ranks": lambda: bpe.learn_ranks(texts, args.vocab_size),
        "qianwen bpe.train, end to end": train_end_to_end,
    }
    for fn in runs.values():
        fn()
    # Rounds interleave the implementations so load from other processes hits all of them alike.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    hf_s, rust_s = seconds["HF tokenizers BpeTrainer, directly"], seconds["rustbpe, directly"]
    rows = []
    for name, s in seconds.items():
        rows.append(
            {
                "impl": name,
                "seconds": round(s, 3),
                "mb_per_s": round(megabytes / s, 2),
                "speed_vs_hf": round(hf_s / s, 3),
                "speed_vs_rustbpe": round(rust_s / s, 3),
            }
        )
    phases = {k: round(statistics.median(m["seconds"][k] for m in end_to_end), 3) for k in end_to_end[0]["seconds"]}
    held = end_to_end[-1]["held_out"]
    notes = (
        f"{len(files)} files, {megabytes:.2f} MB, {args.vocab_size:,} ids ({n_ranks:,} BPE ranks + 208 special "
        f"tokens); median of {args.repeats} interleaved rounds. rustbpe {importlib.metadata.version('rustbpe')}, "
        f"tokenizers {importlib.metadata.version('tokenizers')}. learn_ranks gives exactly rustbpe's ranks; HF's "
        f"vocabulary shares {in_common:,} of {n_ranks:,} tokens with it. End to end, bpe.train's phases (median "
        f"seconds): read and learn {phases['read_and_learn']} (on 95% of the text; every 20th block is held out), "
        f"save {phases['save']}, measure {phases['measure']}; held-out bytes per token "
        f"{held['bytes_per_token']} with the new vocabulary vs {held['qwen_bytes_per_token']} with Qwen's."
    )
    for row in rows:
        print(json.dumps(row))
    print(notes)
    write_result("bpe", rows, command="python -m benchmarks.bench_bpe", notes=notes)


if __name__ == "__main__":
    main()
