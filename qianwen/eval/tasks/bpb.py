"""`bpb`: bits per byte on held-out text.

The text is the validation split of a `qianwen data prep` output (`data=DIR`, or `--data-dir DIR` when DIR holds
an index.json) or any UTF-8 text files (`files=A,B`, or every file under `--data-dir DIR`), each file encoded
with the model's tokenizer and closed by <|endoftext|> as data prep does. The token stream is cut into the
windows the pretraining loop validates on: window w holds tokens [wT, wT + T + 1) for the model's seq_length T,
T inputs and their T next-token targets, plus one shorter window for the tail. `--limit N` scores the first N
windows.

Bits per byte = total nats / ln 2 / total UTF-8 bytes, both over the targets that are ordinary tokens: a special
token (<|endoftext|>) stands for no bytes of text, so it is left out, as `qianwen pretrain` does for val_bpb.
`loss` is the mean nats per target over every target, specials included (pretraining's val_loss).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import qianwen
from qianwen.eval.harness import TaskOptions, TaskResult

NAME = "bpb"
OPTIONS: dict[str, object] = {
    "data": "",  # a `qianwen data prep` output directory: its validation split is scored
    "files": "",  # comma-separated text files
}
SHARD_FORMAT = "qianwen-tokens/1"
LOGIT_ROWS = 1024  # positions per output-head slice: bounds the [rows, vocab] logits of a 152k vocabulary


# ---------------------------------------------------------------------------
# Held-out tokens (shared with the long-context task)


def held_out_tokens(
    tokenizer: qianwen.Tokenizer, options: TaskOptions, task: str, max_tokens: int | None = None
) -> tuple[np.ndarray, str]:
    """The held-out token stream (int64, at most `max_tokens`) and a phrase naming where it came from."""
    data, files = options.extra.get("data") or None, options.extra.get("files") or None
    if data and files:
        raise ValueError(f"{task} got both data= and files=; give one source of held-out text.")
    if files:
        paths = [Path(p) for p in (files.split(",") if isinstance(files, str) else files) if str(p).strip()]
        return _text_tokens(tokenizer, paths, max_tokens), f"{len(paths)} text file(s)"
    if data is None and options.data_dir is not None:
        data_dir = Path(options.data_dir)
        if (data_dir / "index.json").is_file():
            data = data_dir
        elif data_dir.is_dir():
            paths = sorted(p for p in data_dir.rglob("*") if p.is_file() and not _hidden(p.relative_to(data_dir)))
            if not paths:
                raise ValueError(f"{data_dir} holds no files; put held-out text files in it or pass data=DIR.")
            return _text_tokens(tokenizer, paths, max_tokens), f"{len(paths)} text file(s) under {data_dir}"
        else:
            raise ValueError(f"--data-dir {data_dir} is not a directory; give a directory of text files.")
    if data is None:
        raise ValueError(
            f"{task} needs held-out text: pass data=DIR (a `qianwen data prep` output), files=A,B (text files) "
            "or --data-dir DIR."
        )
    return _validation_split(Path(data), max_tokens), f"the validation split of {data}"


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _text_tokens(tokenizer: qianwen.Tokenizer, paths: list[Path], max_tokens: int | None) -> np.ndarray:
    ids: list[int] = []
    for path in paths:
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        if not path.is_file():
            raise ValueError(f"{path} does not exist; give existing text files.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text; convert it or leave it out.") from None
        ids += tokenizer.encode(text) + [tokenizer.eod_id]
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def _validation_split(directory: Path, max_tokens: int | None) -> np.ndarray:
    """The val split's shards (little-endian uint32, in index order), memory-mapped and read only as far as needed."""
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise ValueError(f"{directory} holds no index.json; pass data= a `qianwen data prep` output directory.")
    index = json.loads(index_path.read_text())
    if index.get("format") != SHARD_FORMAT or index.get("dtype") != "uint32":
        raise ValueError(f"{index_path} is not a {SHARD_FORMAT} uint32 index; re-run `qianwen data prep`.")
    pieces, total = [], 0
    for entry in index.get("splits", {}).get("val", []):
        if max_tokens is not None and total >= max_tokens:
            break
        path = directory / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["tokens"] * 4:
            raise ValueError(f"shard {path} is missing or not {entry['tokens'] * 4} bytes; re-run `qianwen data prep`.")
        if entry["tokens"]:
            shard = np.memmap(path, dtype="<u4", mode="r")
            take = len(shard) if max_tokens is None else min(len(shard), max_tokens - total)
            pieces.append(np.asarray(shard[:take], dtype=np.int64))
            total += take
    if total < 2:
        raise ValueError(
            f"the validation split of {directory} holds {total} tokens; prepare data with a validation split "
            "(`qianwen data prep`) or score text files with files=."
        )
    return np.concatenate(pieces)


def check_vocabulary(tokens: np.ndarray, model: qianwen.Transformer, source: str) -> None:
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(
            f"{source} holds token id {int(tokens.max())}, outside the model's {model.config.vocab_size}-id "
            "vocabulary; score data prepared with this model's tokenizer."
        )


# ---------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def token_nats(model: qianwen.Transformer, windows: torch.Tensor) -> torch.Tensor:
    """Next-token loss in nats (float64) of every target of `windows` [B, T + 1]: [B, T]. The output head runs
    on slices of positions, so a large vocabulary never needs all B * T logits at once."""
    device = model.embed.weight.device
    windows = windows.to(device)
    hidden = model.hidden_states(windows[:, :-1]).flatten(0, 1)
    targets = windows[:, 1:].flatten()
    nats = torch.empty(targets.shape, dtype=torch.float64, device=device)
    for start in range(0, len(targets), LOGIT_ROWS):
        rows = slice(start, start + LOGIT_ROWS)
        logits = model.lm_head(hidden[rows]).float()
        nats[rows] = F.cross_entropy(logits, targets[rows], reduction="none").double()
    return nats.view(windows.shape[0], -1)


def windows_of(tokens: np.ndarray, length: int, tail: bool) -> Iterator[np.ndarray]:
    """Non-overlapping windows of `length` + 1 tokens (consecutive windows share one token: the last target of
    one is the first input of the next), and with `tail` the shorter last one, so every token is a target once."""
    for start in range(0, len(tokens) - 1, length):
        window = tokens[start : start + length + 1]
        if len(window) < length + 1 and not tail:
            return
        yield window


def byte_counts(tokenizer: qianwen.Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each id stands for; 0 for special tokens and the padding rows past the tokenizer."""
    sizes = [0 if tokenizer.is_special(i) else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(sizes + [0] * (vocab_size - len(sizes)), dtype=torch.float64)


def evaluate(model: qianwen.Transformer, tokenizer: qianwen.Tokenizer, options: TaskOptions) -> TaskResult:
    T = model.config.seq_length
    needed = None if options.limit is None else options.limit * T + 1
    tokens, source = held_out_tokens(tokenizer, options, NAME, needed)
    check_vocabulary(tokens, model, source)
    sizes = byte_counts(tokenizer, model.config.vocab_size)
    windows = list(windows_of(tokens, T, tail=True))[: options.limit]
    was_training = model.training
    model.eval()
    samples, nats, ordinary_nats, targets, nbytes = [], 0.0, 0.0, 0, 0.0
    try:
        # Windows are all T + 1 long except the tail, which gets a batch of its own.
        full = [w for w in windows if len(w) == T + 1]
        batches = [full[i : i + options.batch_size] for i in range(0, len(full), options.batch_size)]
        batches += [[w] for w in windows if len(w) < T + 1]
        for batch in tqdm(batches, desc=f"{NAME} ({source})", unit="batch", file=sys.stderr, disable=None):
            ids = torch.from_numpy(np.stack(batch))
            loss = token_nats(model, ids).cpu()
            byte = sizes[ids[:, 1:]]
            for row_loss, row_bytes in zip(loss, byte):
                ordinary = float((row_loss * (row_bytes > 0)).sum())
                samples.append(
                    {
                        "window": len(samples),
                        "targets": len(row_loss),
                        "nats": round(float(row_loss.sum()), 6),
                        "ordinary_nats": round(ordinary, 6),
                        "bytes": int(row_bytes.sum()),
                    }
                )
                nats += float(row_loss.sum())
                ordinary_nats += ordinary
                targets += len(row_loss)
                nbytes += float(row_bytes.sum())
    finally:
        model.train(was_training)
    if nbytes == 0:
        raise ValueError(f"{source} holds no ordinary text tokens to score; give held-out text.")
    metrics = {
        "bpb": ordinary_nats / math.log(2) / nbytes,
        "loss": nats / targets,
        "tokens": float(targets),
        "bytes": nbytes,
    }
    return TaskResult(NAME, metrics, samples)
