"""The output directory: shards and index, byte-identical reruns, resuming after an interruption, the same
output from worker processes, refusing another run's directory; and `qianwen data prep` on the command line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from qianwen.cli import main
from qianwen.data.config import load_config
from qianwen.data.prep import prep
from qianwen.tokenizer import qwen_vocabulary

SMALL_SHARDS = ["pack.shard_tokens=3000", "pack.val_fraction=0.1"]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return qwen_vocabulary().parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL file of distinct prose documents plus a few Python files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    vocab = [f"{a}{b}" for a in ("river", "stone", "bread", "light", "cloud", "field") for b in range(60)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(60, 400))) + "." for _ in range(120)]
    (root / "prose.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("colorsys.py", "bisect.py", "keyword.py"):
        shutil.copy(stdlib / name, root / name)
    return root


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def run_prep(corpus: Path, tokenizer_dir: Path, out: Path, workers: int = 0, overrides=SMALL_SHARDS) -> dict:
    return prep([corpus], tokenizer_dir, out, load_config(None, overrides), workers=workers, progress=False)


@pytest.fixture(scope="module")
def first(corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    run_prep(corpus, tokenizer_dir, out)
    return out, snapshot(out)


def test_index_describes_the_shards(first, tokenizer_dir):
    out, _ = first
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "qianwen-tokens/1" and index["dtype"] == "uint32"
    assert index["vocab_size"] == 151851 and index["eod_id"] == 151643
    assert index["tokenizer"] == str(tokenizer_dir.resolve())
    assert len(index["splits"]["train"]) > 3 and len(index["splits"]["val"]) >= 1
    for split, shards in index["splits"].items():
        for i, shard in enumerate(shards):
            assert shard["file"] == f"{split}-{i:05d}.bin"
            ids = np.fromfile(out / shard["file"], dtype="<u4")
            assert len(ids) == shard["tokens"] and (ids == 151643).sum() == shard["documents"]
            # Shards stay within shard_tokens unless one document alone is longer.
            assert shard["tokens"] <= 3000 or shard["documents"] == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["output"]["val"]["documents"] == sum(s["documents"] for s in index["splits"]["val"])


def test_rerun_and_resume_give_identical_bytes(first, corpus, tokenizer_dir, monkeypatch):
    import qianwen.data.prep as prep_module

    encoded = []
    real = prep_module.encode_documents
    monkeypatch.setattr(prep_module, "encode_documents", lambda tok, texts: encoded.extend(texts) or real(tok, texts))
    out, files = first
    run_prep(corpus, tokenizer_dir, out)  # a full rerun: every shard verified and skipped
    assert snapshot(out) == files
    assert encoded == []
    last = sorted(name for name in files if name.startswith("train-"))[-1]
    middle = sorted(name for name in files if name.startswith("train-"))[1]
    (out / last).unlink()  # an interrupted run: the last shard and the index never written
    (out / "index.json").unlink()
    (out / middle).write_bytes(b"\0" * 8)  # and a damaged shard, which must be made again
    run_prep(corpus, tokenizer_dir, out)
    assert snapshot(out) == files
    index = json.loads((out / "index.json").read_text())
    first_shard = index["splits"]["train"][0]["documents"]
    remade = sum(s["documents"] for s in index["splits"]["train"][1:])
    assert len(encoded) == remade  # the documents of train-00000.bin (and of val) were not encoded again
    assert first_shard > 0


def test_worker_processes_give_the_same_output(first, corpus, tokenizer_dir, tmp_path):
    _, files = first
    run_prep(corpus, tokenizer_dir, tmp_path, workers=2)
    assert snapshot(tmp_path) == files


def test_an_out_dir_holding_another_run_is_refused(first, corpus, tokenizer_dir, tmp_path):
    out, _ = first
    with pytest.raises(ValueError, match=r"holds a data prep run with other inputs, config or tokenizer"):
        run_prep(corpus, tokenizer_dir, out, overrides=["pack.shard_tokens=5000"])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that data prep did not write \(notes.txt\)"):
        run_prep(corpus, tokenizer_dir, tmp_path)


def test_changed_input_is_detected_when_resuming(corpus, tokenizer_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    lines = (corpus / "prose.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    run_prep(data, tokenizer_dir, tmp_path / "out")
    data.write_text("".join(lines[:5] + lines[6:]))
    with pytest.raises(ValueError, match=r"was made from other documents than this run reads"):
        run_prep(data, tokenizer_dir, tmp_path / "out")


# ---------------------------------------------------------------------------
# the command line


def test_cli_data_prep(corpus, tokenizer_dir, tmp_path, capsys):
    code = main(
        ["data", "prep", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path)]
        + ["--workers", "0", "pack.val_fraction=0.2"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "read 4 file(s): 123 documents" in out
    assert "near_dedup" in out and "wrote train:" in out
    assert (tmp_path / "index.json").is_file()
    config = json.loads((tmp_path / "progress.json").read_text())
    assert config["shards"]["val"]


def test_cli_overrides_after_input_paths(corpus, tokenizer_dir, tmp_path, capsys):
    args = ["data", "prep", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path), "--workers", "0"]
    assert main([*args, "--input", str(corpus / "colorsys.py"), "filters.enabled=false"]) == 0
    assert "filters      off" in capsys.readouterr().out


def test_cli_reports_malformed_records(tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    # One record that passes the filters (a document they all drop would leave nothing to train on: an error).
    fine = (
        "The river runs past the old mill, and in the spring the water rises over the stones where the children "
        "used to play. Every morning the miller opened the doors, looked at the sky and decided whether the wheel "
        "would turn that day. His daughter kept a notebook of the weather, the birds she saw and the boats that "
        "went down to the town, so that years later the family could read what each season had been like."
    )
    data.write_bytes(json.dumps({"text": fine}).encode() + b'\n{"text": "broken\n{"other": 1}\n')
    args = ["data", "prep", "--input", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")]
    assert main([*args, "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 2 malformed record(s), e.g. {data}:2: not valid JSON" in out
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert [e["where"] for e in stats["read"]["malformed_examples"]] == [f"{data}:2", f"{data}:3"]


def test_inputs_that_leave_nothing_to_train_on_are_an_error(tokenizer_dir, tmp_path, capsys):
    """Text the filters drop entirely (one short line) writes no shard set a trainer could open, and says so."""
    data = tmp_path / "short.txt"
    data.write_text("too short\n")
    out = tmp_path / "o"
    code = main(["data", "prep", "--input", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out)])
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert code == 2
    assert last.startswith(
        "error: the inputs gave nothing to train on: 1 document(s) read from 1 file(s), 0 malformed, 0 kept"
    )
    assert (out / "stats.json").is_file() and not (out / "index.json").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--input", "/no/such/dir"], "error: input /no/such/dir does not exist; check the path given to --input."),
        (["nonsense.key=1"], "error: unknown config key nonsense; valid keys in the top level are "),
        (["--workers", "-1"], "error: --workers must be 0 or more, got -1."),
    ],
)
def test_cli_errors_are_one_line(extra, message, tokenizer_dir, tmp_path, capsys):
    code = main(["data", "prep", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_missing_tokenizer(tmp_path, capsys):
    assert main(["data", "prep", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: tokenizer {tmp_path / 'tok'} does not exist; give --tokenizer a directory")
