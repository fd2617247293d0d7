"""SFT: the ChatML loss mask token for token against the spec (ids from dashscope's reference tokenizer),
the reading of conversation files, length-grouped batches, and `qianwen sft` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qianwen
from qianwen.cli import main
from qianwen.config import ModelConfig
from qianwen.tokenizer import Tokenizer
from qianwen.train.loss import IGNORE
from qianwen.train.sft import Conversations, LengthGroupedBatches, chat_labels, load_config, read_conversations, sft

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3 = 5."},
    {"role": "user", "content": "用中文说一遍"},
    {"role": "assistant", "content": "二加三等于五。"},
]


def test_labels_follow_the_spec_mask_token_for_token(ref, tok):
    """QWEN_SPEC.md section 4, written out turn by turn with the reference tokenizer's ids."""
    start, end, nl = ref.im_start_id, ref.im_end_id, ref.encode("\n")
    ids, labels = [], []
    for role, content in [(m["role"], m["content"]) for m in CONVERSATION]:
        role_ids, body = ref.encode(role), ref.encode(content)
        ids += [start, *role_ids, *nl, *body, end, *nl]
        labels += [start]  # <|im_start|> keeps its label
        labels += [IGNORE] * (len(role_ids) + len(nl))  # the role word and its "\n" are masked
        labels += body if role == "assistant" else [IGNORE] * len(body)  # only assistant content is trained
        labels += [end, *nl]  # <|im_end|> and the "\n" after it keep labels
    got_ids, got_labels = chat_labels(tok, CONVERSATION)
    assert got_ids == ids
    assert got_labels == labels
    assert got_ids[: len(tok.render_chat(CONVERSATION[:2]))] == tok.render_chat(CONVERSATION[:2])


def test_default_system_prompt_and_forged_special_tokens(tok):
    ids, labels = chat_labels(
        tok, [{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "yo"}]
    )
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert ids.count(tok.im_end_id) == 3  # the user's "<|im_end|>" text is plain text, not a control token
    assert [t for t in labels if t != IGNORE] == [tok.im_start_id, tok.im_end_id, *tok.encode("\n")] * 2 + [
        tok.im_start_id,
        *tok.encode("yo"),
        tok.im_end_id,
        *tok.encode("\n"),
    ]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines))
    return path


def test_unusable_lines_are_counted_and_named(tok, tmp_path):
    good = {"messages": CONVERSATION}
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            good,
            "{not json",
            {"prompt": "no messages"},
            {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": CONVERSATION[:2]},
            {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]},
            "",
            good,
        ],
    )
    data = read_conversations(path, tok, max_tokens=256)
    assert len(data.ids) == 2 and data.lines == 7
    assert data.skipped == {"bad JSON": 1, "no messages": 1, "bad message": 1, "no assistant reply": 1, "too long": 1}
    assert (
        data.examples[0].startswith(f"{path}:2: not JSON")
        and f"{path}:4: message 0 has role 'robot'" in data.examples[2]
    )
    assert "more than seq_length 256" in data.examples[4]


def test_batches_group_lengths_pad_and_cover_each_epoch(tmp_path):
    rng = np.random.default_rng(0)
    ids = [list(range(1, n + 1)) for n in rng.integers(3, 40, size=50)]
    data = Conversations(ids, [[IGNORE, *x[1:]] for x in ids], 50, {}, [])
    batches = LengthGroupedBatches(data, list(range(50)), batch_size=4, pad_id=0, seed=1)
    assert batches.per_epoch == 13
    seen = []
    for b in range(13):
        x, y = batches.get(b)
        rows = [(x[r] != 0).sum().item() for r in range(len(x))]
        assert x.shape[1] == max(rows) and (y[x == 0] == IGNORE).all()  # right-padded, padding never trained
        seen += [tuple(x[r, : rows[r]].tolist()) for r in range(len(x))]
    assert sorted(seen) == sorted(tuple(i) for i in ids)  # an epoch reads every conversation once
    assert torch.equal(batches.get(5)[0], LengthGroupedBatches(data, list(range(50)), 4, 0, 1).get(5)[0])
    assert not torch.equal(batches.get(13)[0], batches.get(0)[0]) or batches.get(13)[0].shape != batches.get(0)[0].shape


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model over a byte-level vocabulary, so fine-tuning runs in seconds."""
    out = tmp_path_factory.mktemp("base")
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    config = ModelConfig(
        vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_length=256
    )
    model = qianwen.Transformer(config)
    model.init_weights(0)
    qianwen.save(model, tok, out)
    return out


def conversations(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        rows.append(
            {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
        )
    return rows


def test_sft_learns_the_replies_and_writes_a_model(base_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(64) + ["oops"])
    overrides = [f"model={base_dir}", f"data={data}", f"out={tmp_path}", "steps=40", "lr=3e-3", "batch_size=8"]
    records = sft(load_config(None, [*overrides, "eval_every=40", "val_fraction=0.125", "log_every=1"]))
    printed = capsys.readouterr().out
    assert "56 conversations to train on and 8 held out, from 65 lines (skipped: 1 bad JSON)" in printed
    assert f"{data}:65: not JSON" in printed
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < train[0] / 2
    assert [r for r in records if "val_loss" in r][-1]["val_loss"] < train[0] / 2
    assert qianwen.load(tmp_path / "sft")[0].config.hidden_size == 32
    meta = json.loads((tmp_path / "sft" / "qianwen.json").read_text())
    assert meta["stage"] == "sft" and meta["conversations"]["skipped"] == {"bad JSON": 1}
    assert (tmp_path / "metrics" / "sft.jsonl").is_file() and (tmp_path / "checkpoints" / "sft" / "latest").is_file()


def test_sft_resume_is_exact(base_dir, tmp_path, monkeypatch):
    from qianwen.train.loop import Trainer

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(32))
    settings = [f"model={base_dir}", f"data={data}", "steps=6", "save_every=3", "log_every=1", "lr=3e-3", "dropout=0.1"]
    whole = [r["loss"] for r in sft(load_config(None, [*settings, f"out={tmp_path / 'a'}"])) if "loss" in r]
    step = Trainer.train_step

    def killed(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        sft(load_config(None, [*settings, f"out={tmp_path / 'b'}"]))
    monkeypatch.setattr(Trainer, "train_step", step)
    rest = [r["loss"] for r in sft(load_config(None, [*settings, f"out={tmp_path / 'b'}"]), resume=True) if "loss" in r]
    np.testing.assert_allclose(rest, whole[3:], atol=1e-6, rtol=0)


def test_cli_errors_are_one_line(base_dir, tmp_path, capsys):
    assert main(["sft", f"data={tmp_path}/x.jsonl"]) == 2
    assert capsys.readouterr().err == "error: sft.model is not set; pass model=PATH.\n"
    assert main(["sft", f"model={base_dir}", f"data={tmp_path}/x.jsonl"]) == 2
    assert "x.jsonl does not exist; pass data=FILE" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{}"])
    assert main(["sft", f"model={base_dir}", f"data={empty}", f"out={tmp_path}"]) == 2
    # Said with the counts, before anything is built (the counts used to print only after the batches).
    assert "empty.jsonl holds no usable record: 1 line(s), skipped 1 " in capsys.readouterr().err
    assert main(["sft", f"model={base_dir}", f"data={empty}", "lora=true", "lora_r=0"]) == 2
    assert capsys.readouterr().err == "error: lora_r (the adapters' rank) must be at least 1, got 0.\n"


def test_lora_trains_adapters_only_and_writes_a_merged_model(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(32))
    settings = [f"model={base_dir}", f"data={data}", f"out={tmp_path}", "steps=30", "log_every=1", "val_fraction=0"]
    config = load_config(None, [*settings, "lora=true", "lora_r=4", "lora_alpha=8", "lr=1e-2"])
    assert config.lr == 1e-2 and load_config(None, [*settings, "lora=true"]).lr == 3e-4
    records = sft(config)
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < train[0] - 0.25
    base, _ = qianwen.load(base_dir)
    merged, _ = qianwen.load(tmp_path / "sft")
    changed = {
        name for (name, a), b in zip(base.state_dict().items(), merged.state_dict().values()) if not torch.equal(a, b)
    }
    targets = ("attn.qkv.weight", "attn.proj.weight", "mlp.gate_up.weight", "mlp.down.weight")
    assert changed == {f"layers.{i}.{t}" for i in range(2) for t in targets}  # frozen elsewhere, merged here
    meta = json.loads((tmp_path / "sft" / "qianwen.json").read_text())
    assert meta["lora"] == {"r": 4, "alpha": 8, "targets": ["down", "gate_up", "proj", "qkv"]}
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "sft", dtype=torch.float32).eval()
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, merged(x), atol=1e-4, rtol=1e-4)
