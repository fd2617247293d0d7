"""The held-out-text tasks: `bpb` against a plain computation with transformers on the exported checkpoint, and
`longctx` on a tiny model trained here at a short length."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_token_shards

import qianwen
from qianwen.eval.harness import TaskOptions
from qianwen.eval.tasks import bpb, longctx
from qianwen.tokenizer import Tokenizer
from qianwen.train.pretrain import load_config, pretrain

SEQ = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, model dir): byte-level shards of standard-library source (every tenth file held out, 3,000
    characters of each) and a small model trained on them for a few seconds at a context of 32 tokens."""
    root = tmp_path_factory.mktemp("longctx")
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    splits: dict[str, list[int]] = {"train": [], "val": []}
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")[:20000]
        if i % 10 == 3:
            splits["val"] += tok.encode(text[:3000]) + [tok.eod_id]
        else:
            splits["train"] += tok.encode(text) + [tok.eod_id]
    write_token_shards(root / "data", splits, tok)
    settings = [
        f"data={root / 'data'}",
        f"out={root / 'run'}",
        "model.preset=tiny-1m",
        f"seq_length={SEQ}",
        "batch_size=16",
        "steps=300",
        "lr=1e-2",
        "warmup_steps=20",
        "log_every=100",
        "eval_batches=1",
    ]
    pretrain(*load_config(None, settings))
    return root / "data", root / "run" / "base"


def options(limit=None, batch_size=4, **extra) -> TaskOptions:
    return TaskOptions(data_dir=None, limit=limit, batch_size=batch_size, extra=extra)


def hf_nats(model_dir: Path, stream: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token nats and targets of `stream` cut into windows of `length` + 1 tokens sharing one token
    (and a shorter tail), scored by transformers."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stream = torch.from_numpy(stream.astype(np.int64))
    full = (len(stream) - 1) // length
    windows = [stream[w * length : w * length + length + 1][None] for w in range(full)]
    batches = [torch.cat(windows)] if windows else []
    if full * length < len(stream) - 1:
        batches.append(stream[full * length :][None])
    nats, targets = [], []
    for batch in batches:
        with torch.no_grad():
            logits = hf(batch[:, :-1]).logits.double()
        nats.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").flatten())
        targets.append(batch[:, 1:].flatten())
    return torch.cat(nats), torch.cat(targets)


def test_bits_per_byte_match_transformers(trained, tmp_path):
    data, model_dir = trained
    model, tok = qianwen.load(model_dir)
    val = np.fromfile(data / "val-00000.bin", dtype="<u4")
    stream = np.concatenate([val[:600], [tok.eod_id], val[600:999]])  # 31 windows of 32 and a tail of 7
    write_token_shards(tmp_path, {"train": [], "val": stream.tolist()}, tok)
    result = bpb.evaluate(model, tok, options(data=str(tmp_path)))

    nats, targets = hf_nats(model_dir, stream, SEQ)
    ordinary = torch.tensor([not tok.is_special(int(t)) for t in targets])
    nbytes = sum(len(tok.token_bytes(int(t))) for t in targets[ordinary])
    assert len(targets) == len(stream) - 1  # every token but the first is a target once, the tail included
    assert result.metrics["tokens"] == len(targets)
    assert result.metrics["bytes"] == nbytes == int(ordinary.sum()) < len(targets)  # byte-level: 1 byte a token
    assert result.metrics["bpb"] == pytest.approx(nats[ordinary].sum().item() / math.log(2) / nbytes, abs=1e-5)
    assert result.metrics["loss"] == pytest.approx(nats.mean().item(), abs=1e-5)
    assert len(result.samples) == 32 and sum(s["targets"] for s in result.samples) == len(targets)

    limited = bpb.evaluate(model, tok, options(limit=3, data=str(tmp_path)))
    assert limited.metrics["tokens"] == 3 * SEQ
    assert limited.metrics["loss"] == pytest.approx(nats[: 3 * SEQ].mean().item(), abs=1e-5)


def test_text_files_score_like_shards_of_the_same_text(trained, tmp_path):
    """Text files are encoded by the model's tokenizer, each closed by <|endoftext|>, and scored like a
    validation split holding those tokens; a directory given as --data-dir reads every file under it."""
    _, model_dir = trained
    model, tok = qianwen.load(model_dir)
    texts = ["def f(x):\n    return x + 1\n" * 20, "import os\n\nprint(os.getcwd())  # é ü 中\n" * 15]
    (tmp_path / "text").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "text" / f"{i}.txt").write_text(text, encoding="utf-8")
    ids = [t for text in texts for t in tok.encode(text) + [tok.eod_id]]
    write_token_shards(tmp_path / "shards", {"val": ids}, tok)

    from_files = bpb.evaluate(model, tok, options(files=",".join(str(tmp_path / "text" / f"{i}.txt") for i in (0, 1))))
    from_dir = bpb.evaluate(model, tok, TaskOptions(data_dir=tmp_path / "text", limit=None))
    from_shards = bpb.evaluate(model, tok, options(data=str(tmp_path / "shards")))
    for result in (from_files, from_dir):
        assert result.metrics == pytest.approx(from_shards.metrics, abs=1e-9)
    first = len(tok.token_bytes(ids[0]))  # the first token is only ever context
    assert from_shards.metrics["bytes"] == sum(len(t.encode("utf-8")) for t in texts) - first


def test_held_out_text_errors_name_the_fix(trained, tmp_path):
    _, model_dir = trained
    model, tok = qianwen.load(model_dir)
    with pytest.raises(ValueError, match=r"needs held-out text: pass data=DIR"):
        bpb.evaluate(model, tok, options())
    with pytest.raises(ValueError, match=r"holds no index.json; pass data= a `qianwen data prep` output"):
        bpb.evaluate(model, tok, options(data=str(tmp_path)))
    with pytest.raises(ValueError, match=r"missing.txt does not exist"):
        bpb.evaluate(model, tok, options(files=str(tmp_path / "missing.txt")))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text"):
        bpb.evaluate(model, tok, options(files=str(tmp_path / "latin1.txt")))
    write_token_shards(tmp_path / "big", {"val": [0, 1, 5000, 2]}, tok)
    with pytest.raises(ValueError, match=r"holds token id 5000, outside the model's 512-id vocabulary"):
        bpb.evaluate(model, tok, options(data=str(tmp_path / "big")))


def test_long_context_tricks_hold_perplexity_past_the_training_length(trained):
    data, model_dir = trained
    model, tok = qianwen.load(model_dir)
    before = model.config
    result = longctx.evaluate(model, tok, options(batch_size=8, data=str(data)))
    assert model.config is before and not model.training  # the switches were set on a copy, then put back

    ppl = {(s["variant"], s["length"]): s["ppl"] for s in result.samples}
    lengths = [16, 32, 64, 128, 256]
    assert {s["length"] for s in result.samples} == set(lengths)
    for L in lengths:  # every length scores the same 4 x 256 tokens of text
        assert {s["targets"] for s in result.samples if s["length"] == L} == {4 * 256}
    for L in (16, 32):  # NTK and LogN change nothing within the training length; windows shorter than it little
        assert ppl[("ntk", L)] == ppl[("ntk_logn", L)] == pytest.approx(ppl[("baseline", L)], rel=1e-6)
        assert ppl[("ntk_logn_window", L)] == pytest.approx(ppl[("baseline", L)], rel=0.02)
    baseline = [ppl[("baseline", L)] for L in lengths]
    assert baseline[3] > baseline[1] * 1.02 and baseline[4] > baseline[3], baseline
    for L in (128, 256):
        assert ppl[("ntk", L)] < ppl[("baseline", L)], ppl
        assert ppl[("ntk_logn_window", L)] < ppl[("baseline", L)], ppl
        assert ppl[("window", L)] < ppl[("baseline", L)], ppl
    assert result.metrics["ppl@256/ntk"] == ppl[("ntk", 256)]

    rows = result.table_md.splitlines()
    assert rows[0] == "| | 16 | 32 | 64 | 128 | 256 |" and rows[1] == "|---|---|---|---|---|---|"
    assert [r.split(" | ")[0] for r in rows[2:7]] == [
        "| baseline",
        "| + dynamic NTK",
        "| + dynamic NTK + LogN",
        "| + dynamic NTK + LogN + window",
        "| window alone",
    ]
    assert rows[2].split(" | ")[4] == f"{ppl[('baseline', 128)]:.2f}"
    png = result.files["longctx.png"]
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_window_schedules_and_lengths():
    config = qianwen.preset("tiny-10m", seq_length=64)  # 6 layers
    assert longctx.window_schedule(config, (0.25, 1.0)) == [16, 26, 35, 45, 54, 64]
    assert longctx.window_schedule(config, "0.5:2") == [32, 51, 70, 90, 109, 128]
    assert longctx.window_schedule(config, "8,8,16,16,64,64") == [8, 8, 16, 16, 64, 64]
    with pytest.raises(ValueError, match="needs 6 positive windows, one per layer"):
        longctx.window_schedule(config, "8,8")
    with pytest.raises(ValueError, match="is not LO:HI"):
        longctx.window_schedule(config, "a:b")
    assert longctx.window_schedule(config) == [32, 38, 45, 51, 58, 64]  # the default, 0.5:1
    assert longctx.lengths_of(config, "0.5,1,2,1") == [32, 64, 128]
    for bad in ("abc", "0", "inf", "", "1,x"):
        with pytest.raises(ValueError, match=r"must be positive multiples of seq_length \(64\), comma-separated"):
            longctx.lengths_of(config, bad)
