"""The reward model: pairs read with bad lines counted, a separable set separated in both stages, and the
exported directory scored by transformers' Qwen2ForSequenceClassification exactly as by us."""

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
from qianwen.train.reward import (
    PairBatches,
    Pairs,
    compare_replies,
    load_config,
    load_reward_model,
    read_pairs,
    reply_ids,
    reward_model,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    config = ModelConfig(
        vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_length=128
    )
    model = qianwen.Transformer(config)
    model.init_weights(0)
    qianwen.save(model, tok, out)
    return out


def pairs_file(path: Path, n: int, seed: int, flip: float = 0.0) -> Path:
    """Correct sums are chosen, wrong ones rejected (flipped for a fraction: the noisy PMP set)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        good, bad = f"{a + b}", f"{a + b + int(rng.integers(1, 9))}"
        if rng.random() < flip:
            good, bad = bad, good
        lines.append(json.dumps({"prompt": f"{a}+{b}=?", "chosen": f"It is {good}.", "rejected": f"um {bad}..."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairs_are_rendered_in_chatml_and_bad_lines_counted(base_dir, tmp_path):
    _, tok = qianwen.load(base_dir)
    record = {"prompt": "hi", "chosen": "yes", "rejected": "no", "rejected_ended": False}
    assert reply_ids(tok, record, "chosen") == tok.render_chat([{"role": "user", "content": "hi"}]) + [
        *tok.encode("yes"),
        tok.im_end_id,
    ]
    assert reply_ids(tok, record, "rejected")[-1] != tok.im_end_id  # a reply that never ends shows no end
    spelled = {"prompt": "hi", "chosen": "yes<|im_end|>", "chosen_ended": True}
    assert reply_ids(tok, spelled, "chosen") == reply_ids(tok, record, "chosen")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n{bad\n" + json.dumps({"prompt": "x", "chosen": 3, "rejected": "y"}) + "\n")
    pairs = read_pairs(path, tok, max_tokens=128)
    assert len(pairs) == 1 and pairs.skipped == {"bad JSON": 1, "bad record": 1}
    assert pairs.examples[0].startswith(f"{path}:2: not JSON")


def test_both_stages_separate_pairs_and_export_a_sequence_classifier(base_dir, tmp_path, capsys):
    from transformers import Qwen2ForSequenceClassification

    pmp = pairs_file(tmp_path / "pmp.jsonl", 200, seed=1, flip=0.1)
    clean = pairs_file(tmp_path / "clean.jsonl", 100, seed=2)
    settings = [f"model={base_dir}", f"data={clean}", f"pmp_data={pmp}", f"out={tmp_path}", "lr=3e-3", "batch_size=8"]
    history = reward_model(load_config(None, [*settings, "pmp_steps=40", "steps=30", "log_every=5"]))
    accuracy = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    assert len(accuracy) == 2 and accuracy[-1] >= 0.9, accuracy
    assert "rm-pmp: 180 pairs to train on, 20 held out" in capsys.readouterr().out
    for stage in ("rm-pmp", "rm"):
        assert (tmp_path / stage / "qianwen.json").is_file() and (tmp_path / "metrics" / f"{stage}.jsonl").is_file()
    meta = json.loads((tmp_path / "rm" / "qianwen.json").read_text())
    assert meta["stage"] == "rm" and meta["val_accuracy"] == accuracy[-1] and meta["reward"]["std"] > 0

    rm, tok, stats = load_reward_model(tmp_path / "rm")
    assert stats == meta["reward"]
    with pytest.raises(ValueError, match=r"is not a reward model: its weights have no score head"):
        load_reward_model(base_dir)  # a causal LM given where PPO wants the reward model
    hf = Qwen2ForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    ids = torch.tensor([reply_ids(tok, {"prompt": "3+4=?", "chosen": "It is 7."}, "chosen")])
    with torch.no_grad():
        ours = rm(ids, torch.tensor([ids.shape[1] - 1]), pairwise=False)
        theirs = hf(ids).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_held_out_replies_of_two_models_are_compared_by_the_reward_model(base_dir, tmp_path):
    clean = pairs_file(tmp_path / "clean.jsonl", 100, seed=2)
    reward_model(load_config(None, [f"model={base_dir}", f"data={clean}", f"out={tmp_path}", "lr=3e-3", "steps=30"]))
    rm, tok, stats = load_reward_model(tmp_path / "rm")
    # "sft" answers right; "ppo" answers the same on the first 4 prompts, wrongly on the next 8, the last unended.
    rng = np.random.default_rng(5)
    sums = [(int(a), int(b)) for a, b in rng.integers(0, 50, (12, 2))]
    right = [{"prompt": f"{a}+{b}=?", "reply": f"It is {a + b}.", "ended": True} for a, b in sums]
    other = right[:4] + [{**r, "reply": f"um {a + b + 3}..."} for r, (a, b) in zip(right[4:], sums[4:])]
    other[-1] = {**other[-1], "ended": False}
    files = {}
    for model, rows in (("sft", right), ("ppo", other)):
        files[model] = {"sums": tmp_path / f"{model}.sums.jsonl"}
        files[model]["sums"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for model, rows in (("sft", right[:3]), ("ppo", right[1:4])):  # scored on different prompts: not compared
        files[model]["other"] = tmp_path / f"{model}.other.jsonl"
        files[model]["other"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    compared = compare_replies(tmp_path / "rm", files)
    assert set(compared["tasks"]) == {"sums"} and "different prompts" in compared["skipped"]["other"]
    result = compared["tasks"]["sums"]

    def score(r):  # one row at a time, no padding: the reward at the reply's last token
        ids = torch.tensor([reply_ids(tok, {**r, "reply_ended": r["ended"]}, "reply")])
        with torch.no_grad():
            return (rm(ids, torch.tensor([ids.shape[1] - 1]), pairwise=False).item() - stats["mean"]) / stats["std"]

    alone = {m: np.array([score(r) for r in rows]) for m, rows in (("sft", right), ("ppo", other))}
    assert result["prompts"] == 12 and result["different_replies"] == 8
    for model in ("sft", "ppo"):
        assert result["mean"][model] == pytest.approx(alone[model].mean(), abs=1e-3)
    assert result["preferred"] == {
        "sft": int((alone["sft"] > alone["ppo"])[4:].sum()),
        "ppo": 8 - result["preferred"]["sft"],
    }
    assert result["preferred"]["sft"] >= 7  # the trained model prefers right sums


def test_a_held_out_file_scores_both_stages_whole_and_per_rejection_kind(base_dir, tmp_path):
    train, held = pairs_file(tmp_path / "train.jsonl", 120, seed=3), pairs_file(tmp_path / "held.jsonl", 30, seed=4)
    records = [json.loads(line) for line in held.read_text().splitlines()]
    for i, record in enumerate(records):  # two kinds of rejected reply, the second never ending
        record["rejection"] = ["wrong_answer", "unended"][i % 2]
        record["rejected_ended"] = i % 2 == 0
    held.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = [f"model={base_dir}", f"data={train}", f"pmp_data={train}", f"eval_data={held}", f"out={tmp_path}"]
    reward_model(load_config(None, [*settings, "lr=3e-3", "pmp_steps=10", "steps=10", "eval_batches=1"]))
    meta = json.loads((tmp_path / "rm" / "qianwen.json").read_text())
    assert meta["pairs"]["train"] == 120 and meta["pairs"]["val"] == 30 and meta["pairs"]["val_from"] == str(held)

    rm, tok, _ = load_reward_model(tmp_path / "rm")  # every held-out pair scored again, one at a time
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for record in records:
            chosen, rejected = (torch.tensor([reply_ids(tok, record, side)]) for side in ("chosen", "rejected"))
            margin = rm(chosen, torch.tensor([chosen.shape[1] - 1]), pairwise=False) - rm(
                rejected, torch.tensor([rejected.shape[1] - 1]), pairwise=False
            )
            right.setdefault(record["rejection"], []).append(bool(margin.item() > 0))
    assert meta["val_accuracy_by_rejection"] == {k: round(sum(v) / len(v), 4) for k, v in right.items()}
    assert meta["val_accuracy"] == round(sum(sum(v) for v in right.values()) / len(records), 4)


def test_batches_grouped_by_length_hold_every_pair_once_an_epoch_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = rng.choice([20, 30, 400], size=203)  # short replies and a few long transcripts, as in tiny
    # a prompt of all but the last 5 tokens, then two replies of 5 that differ
    rows = [[1] * (int(n) - 5) + [side + 2] * 5 for n in lengths for side in (0, 1)]
    pairs = Pairs(rows, [""] * len(lengths), len(lengths), {}, [])
    train = [i for i in range(len(lengths)) if i % 10]
    batches = PairBatches(pairs, train, 8, pad_id=0, seed=5)
    for epoch in (0, 1):
        seen = [i for b in range(batches.per_epoch) for i in batches.members(epoch * batches.per_epoch + b)]
        assert sorted(seen) == train  # every training pair once, none held out
    again = PairBatches(pairs, train, 8, pad_id=0, seed=5)
    assert [again.members(b) for b in range(40)] == [batches.members(b) for b in range(40)]
    assert batches.members(0) != batches.members(batches.per_epoch)  # a new order each epoch

    def padded(order: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] + 5 for i in b) for b in order)

    grouped = [batches.members(b) for b in range(batches.per_epoch)]
    plain = np.random.default_rng(1).permutation(train).tolist()
    assert padded(grouped) < 0.6 * padded([plain[i : i + 8] for i in range(0, len(plain), 8)])
    ids, last, mask = batches.get(3)
    members = batches.members(3)
    assert last.tolist() == [[lengths[i] - 1, lengths[i] + 4] for i in members]  # each row: prompt, chosen, rejected
    assert ids.shape == (len(members), max(lengths[i] + 5 for i in members)) and mask.shape == (
        *ids.shape,
        ids.shape[1],
    )
    in_order = [batches.members(b, shuffle=False) for b in range(batches.per_epoch)]
    assert [lengths[i] for b in in_order for i in b] == sorted(lengths[train])


def test_a_pair_run_as_one_row_scores_and_trains_as_the_two_sequences_run_apart(base_dir):
    """Shared prompt, replies of other lengths, a rejected reply that is the chosen one without its end (a prefix
    of it), one the chosen reply is a prefix of, and a pair sharing nothing; padding in the batch."""
    rm_model, _ = qianwen.load(base_dir, dtype=torch.float32)
    from qianwen.train.reward import RewardModel

    rm = RewardModel(rm_model.requires_grad_(True), seed=3).train()
    prompt = [5, 6, 7, 8, 9, 10]
    rows = [
        *(prompt + [20, 21, 22], prompt + [30, 31]),
        *(prompt + [40, 41, 42, 2], prompt + [40, 41, 42]),
        *(prompt + [50], prompt + [50, 51, 52, 53]),
        *([60, 61, 62], [70, 71, 72, 73, 74, 75, 76]),
    ]
    pairs = Pairs(rows, [""] * 4, 4, {}, [])
    ids, last, mask = PairBatches(pairs, [0, 1, 2, 3], 4, pad_id=0, seed=0).get(0, shuffle=False)
    assert ids.shape[0] == 4 and ids.shape[1] == max(
        len(a) + len(b) - s for a, b, s in zip(rows[::2], rows[1::2], (6, 9, 7, 0))
    )

    def apart() -> torch.Tensor:
        out = []
        for row in rows:
            out.append(rm(torch.tensor([row]), torch.tensor([len(row) - 1]), pairwise=False))
        return torch.cat(out)

    order = PairBatches(pairs, [0, 1, 2, 3], 4, pad_id=0, seed=0).members(0, shuffle=False)
    together = rm(ids, last, pairwise=False, mask=mask)
    expected = apart().view(4, 2)[order].flatten()
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)
    unshared = PairBatches(pairs, [0, 1, 2, 3], 4, pad_id=0, seed=0, share=False)  # rm.share_prompt=false
    rows_ids, rows_last, no_mask = unshared.get(0, shuffle=False)
    assert no_mask is None and rows_ids.shape == (8, 10)
    in_order = apart().view(4, 2)[unshared.members(0, shuffle=False)].flatten()
    torch.testing.assert_close(rm(rows_ids, rows_last, pairwise=False), in_order, atol=1e-5, rtol=1e-5)

    rm.eval()  # inference: attention windows (by position, so a tree's branches keep theirs)
    rm_model.config.attention_windows = [4, 3]
    with torch.no_grad():
        torch.testing.assert_close(
            rm(ids, last, pairwise=False, mask=mask), apart().view(4, 2)[order].flatten(), atol=1e-5, rtol=1e-5
        )
    rm_model.config.attention_windows = None
    rm.train()

    grads = []
    for loss in (
        lambda: rm(ids, last, mask=mask),
        lambda: -torch.nn.functional.logsigmoid(apart()[0::2] - apart()[1::2]).mean(),
    ):
        rm.zero_grad()
        loss().backward()
        grads.append(torch.cat([p.grad.flatten() for p in rm.parameters() if p is not rm_model.lm_head.weight]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_cli_errors_are_one_line(base_dir, tmp_path, capsys):
    assert main(["rm", f"model={base_dir}"]) == 2
    assert capsys.readouterr().err == "error: rm.data is not set; pass data=PATH.\n"
    assert main(["rm", f"model={base_dir}", f"data={tmp_path}/none.jsonl", f"out={tmp_path}"]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
