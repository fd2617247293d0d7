"""PPO end to end on a tiny model: a programmatic reward rises, value warm-up leaves the policy alone, and the
four-model path (reward model from `qianwen rm`'s format) writes a policy and its metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun

import qianwen
from qianwen.cli import main
from qianwen.config import ModelConfig
from qianwen.tokenizer import Tokenizer
from qianwen.train.ppo import PPO, load_config, ppo
from qianwen.train.ppo_rows import Layout
from qianwen.train.reward import RewardModel, reward_export


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ppo")
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    config = ModelConfig(
        vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_length=128
    )
    model = qianwen.Transformer(config)
    model.init_weights(0)
    qianwen.save(model, tok, root / "sft")
    rm = RewardModel(model, seed=1)
    state = {f"model.{k}": v for k, v in model.state_dict().items()} | {"score.weight": rm.score.weight.detach()}
    reward_export(config, tok, {"stage": "rm", "reward": {"mean": 0.1, "std": 2.0}})(state, root / "rm")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"say something {i}"}) + "\n" for i in range(20)))
    return root


def ascii_share(prompt: str, reply: str, ended: bool) -> float:
    """Of the reply's characters outside special tokens, the share that are ASCII (bytes 128-255 decode to
    replacement characters): dense, learnable from a random model, and capped at 1."""
    text = re.sub(r"<\|[^|]*\|>", "", reply)
    return sum(ch.isascii() for ch in text) / len(text) if text else 0.5


def settings(root: Path, out: str, *more: str) -> list[str]:
    return [
        f"policy={root / 'sft'}",
        f"prompts={root / 'prompts.jsonl'}",
        f"out={root / out}",
        "max_new_tokens=8",
        *more,
    ]


def test_a_programmatic_reward_rises(setup):
    config = load_config(
        None, settings(setup, "a", "steps=30", "value_warmup_steps=2", "lr=1e-2", "value_lr=1e-3", "ppo_epochs=4")
    )
    rewards = [r["reward"] for r in ppo(config, reward_fn=ascii_share)]
    # From about 0.45 to 0.85-1.0 on seeds 0-3; a tenth of that rise would be noise.
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.2, rewards


def test_value_warmup_leaves_the_policy_unchanged(setup):
    history = ppo(load_config(None, settings(setup, "b", "steps=2", "value_warmup_steps=2")), reward_fn=ascii_share)
    assert not any(r["trained_policy"] for r in history) and "policy_loss" not in history[-1]
    before, _ = qianwen.load(setup / "sft")
    after, _ = qianwen.load(setup / "b" / "ppo")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name


def test_reusing_the_first_minibatch_forwards_changes_nothing(setup, monkeypatch):
    """Old log-probabilities and values of the first minibatch's rows come from its training forwards; the run
    must be the one that scores every row in a separate pass (as with dropout, where it has to)."""
    common = ("steps=3", "value_warmup_steps=1", "lr=3e-3", "value_lr=1e-3", "ppo_epochs=2", "dtype=fp32")
    reused = ppo(load_config(None, settings(setup, "reuse", *common)), reward_fn=ascii_share)
    init = PPO.__init__

    def scoring_apart(self, *args, **kwargs):
        init(self, *args, **kwargs)
        assert self.reuse_first
        self.reuse_first = False

    monkeypatch.setattr(PPO, "__init__", scoring_apart)
    apart = ppo(load_config(None, settings(setup, "apart", *common)), reward_fn=ascii_share)
    assert_close_runs(reused, apart, setup / "reuse", setup / "apart", abs_=1e-6)


def assert_close_runs(first: list[dict], second: list[dict], first_dir: Path, second_dir: Path, abs_: float) -> None:
    """The same metrics at every step and the same trained policy, to rounding."""
    for a, b in zip(first, second, strict=True):
        for key in ("reward", "kl", "response_length", "value_loss", "policy_loss", "clip_frac", "entropy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=abs_), (key, a, b)
    x, _ = qianwen.load(first_dir / "ppo")
    y, _ = qianwen.load(second_dir / "ppo")
    for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_a_prompts_replies_in_one_row_train_as_rows_of_their_own(setup):
    """share_prompt lays each prompt's two replies out as branches of one row (the prompt run once): rewards,
    KL, losses and the trained policy equal those of one row per reply (one minibatch per step, so both read the
    replies in any order), to rounding."""
    common = (f"reward_model={setup / 'rm'}", "steps=3", "value_warmup_steps=1", "dtype=fp32", "minibatch_size=16")
    common += ("lr=3e-3", "value_lr=1e-3", "max_new_tokens=12")
    shared = ppo(load_config(None, settings(setup, "shared", *common)))
    apart = ppo(load_config(None, settings(setup, "rows", *common, "share_prompt=false")))
    assert_close_runs(shared, apart, setup / "shared", setup / "rows", abs_=1e-5)


def test_shared_rows_read_each_reply_token_from_the_state_before_it():
    replies = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [4, 5, 30, 31, 32], [4, 5, 30, 40]]
    layout = Layout.build(replies, [3, 3, 2, 2], 2, True, pad_id=0)
    rows = layout.rows
    # the second prompt's replies both begin with 30: it joins the trunk
    assert rows.ids.tolist() == [[1, 2, 3, 10, 11, 20], [4, 5, 30, 31, 32, 40]]
    assert rows.last.tolist() == [[4, 5], [4, 5]]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for n, (reply, p) in enumerate(zip(replies, [3, 3, 2, 2])):
        mask[n, p - 1 : len(reply) - 1] = True
    states = torch.arange(6)[None] + torch.tensor([[0], [100]])  # a state is its column, plus 100 in row 2
    # reply 2 ([20]) is predicted from its prompt's last token (column 2); reply 4's 40 from its 30 (column 2)
    assert rows.read(states, mask).tolist() == [2, 3, 2, 101, 102, 103, 101, 102]
    assert rows.tree[0, 5].tolist() == [True, True, True, False, False, True]
    assert rows.tree[1, 5].tolist() == [True, True, True, False, False, True]
    with pytest.raises(ValueError, match="whole prompts"):
        layout.select(torch.tensor([1, 2]))
    apart = Layout.build(replies, [3, 3, 2, 2], 2, False, pad_id=0)
    assert apart.rows.tree is None and apart.rows.ids.shape == (4, 5)


def test_shared_rows_score_as_rows_of_their_own(setup):
    """Log-probabilities, values and the reward read through shared rows equal those of one row per reply, with
    replies that begin alike, one that another extends, identical ones, and padding."""
    from qianwen.train.ppo import PolicyScorer, token_values

    model, _ = qianwen.load(setup / "sft")
    scorer = PolicyScorer(model).eval()
    rm = RewardModel(model, seed=1).eval()
    prompts = [[7, 8, 9, 10], [7, 8, 9, 10], [3, 4], [3, 4], [5, 6, 7], [5, 6, 7]]
    tails = [[40, 41, 42, 43], [40, 41, 50], [60, 61], [60, 61, 62, 63, 64], [70, 71], [70, 71]]
    replies = [p + t for p, t in zip(prompts, tails)]
    width = max(map(len, replies))
    tokens = torch.zeros(len(replies), width, dtype=torch.long)
    mask = torch.zeros(len(replies), width - 1)
    for n, (row, p) in enumerate(zip(replies, prompts)):
        tokens[n, : len(row)] = torch.tensor(row)
        mask[n, len(p) - 1 : len(row) - 1] = 1
    read = {}
    with torch.no_grad():
        for share in (True, False):
            rows = Layout.build(replies, list(map(len, prompts)), 2, share, pad_id=0).rows
            logp = scorer(tokens, mask, rows=rows)
            rewards = rm(rows.ids, rows.last, pairwise=False, mask=rows.tree)
            read[share] = logp, token_values(rm, rows, mask), rewards
    assert Layout.build(replies, list(map(len, prompts)), 2, True, 0).rows.ids.shape == (3, 9)  # 4 + 2 shared + 2 + 1
    for shared, apart in zip(read[True], read[False]):
        torch.testing.assert_close(shared, apart, rtol=1e-5, atol=1e-5)


def test_ptx_reads_new_windows_for_every_policy_update(setup, monkeypatch):
    """PPO-ptx takes `ptx_batch_size` pretraining windows per policy update, and never the same ones twice."""
    from qianwen.train import ppo as ppo_module

    read = []

    class Windows:
        def __init__(self, shards, seq_length, seed):
            self.seq_length = seq_length

        def batch(self, first, size):
            read.append((first, size))
            return torch.randint(0, 256, (size, self.seq_length + 1))

    monkeypatch.setattr(ppo_module, "TokenShards", lambda *args: None)
    monkeypatch.setattr(ppo_module, "WindowSampler", Windows)
    more = ("steps=3", "value_warmup_steps=1", "ptx_coef=1.0", "ptx_data=shards", "ptx_batch_size=3", "ppo_epochs=2")
    ppo(load_config(None, settings(setup, "ptx", *more, "prompts_per_step=8", "minibatch_size=8")), ascii_share)
    # Two policy steps of 16 replies, two epochs of two minibatches each: eight updates of three windows.
    assert read == [(first, 3) for first in range(12, 36, 3)]


def test_four_models_from_the_reward_model_directory(setup, capsys):
    history = ppo(
        load_config(None, settings(setup, "c", f"reward_model={setup / 'rm'}", "steps=2", "value_warmup_steps=1"))
    )
    record = history[-1]
    for key in ("reward", "kl", "clip_frac", "entropy", "value_loss", "response_length", "ended_fraction"):
        assert key in record
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    lines = (setup / "c" / "metrics" / "ppo.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert json.loads((setup / "c" / "ppo" / "qianwen.json").read_text())["stage"] == "ppo"
    assert "ppo step 2/2" in capsys.readouterr().out


def test_the_checker_rewards_replies_that_end_with_their_prompts_answer(setup, monkeypatch, tmp_path):
    """reward=checker wiring: each reply is checked against its own prompt's record (replies fixed here, since a
    random model never answers right)."""
    import qianwen.train.ppo as ppo_module
    from qianwen.generate import Completion

    records = [
        {"prompt": "Tom has 3 apples and buys 4 more. How many?", "answer": "7"},
        {"prompt": "请将“cat”写成大写字母。", "answer": "CAT", "kind": "uppercase", "lang": "zh"},
    ]
    prompts = tmp_path / "tasks.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    replies = {  # per prompt, its two samples: (text, finish_reason) and the reward the checker must give
        records[0]["prompt"]: [(("The answer is 7.", "stop"), 1.0), (("The answer is 7.", "length"), 0.0)],
        records[1]["prompt"]: [(("大写：CAT", "stop"), 1.0), (("大写：DOG", "stop"), 0.0)],
    }
    seen = []

    def fixed(model, tok, batch, *args, **kwargs):
        out = []
        for i, ids in enumerate(batch):
            prompt = next(p for p in replies if p in tok.decode(ids))
            (text, finish), reward = replies[prompt][i % 2]
            seen.append(reward)
            out.append(Completion(tok.encode(text), text, finish, len(ids)))
        return out

    monkeypatch.setattr(ppo_module, "generate", fixed)
    config = load_config(
        None, [*settings(setup, "checker"), f"prompts={prompts}", "reward=checker", "prompts_per_step=2"]
    )
    trainer = PPO(config)
    assert trainer.reward is None  # no reward model is loaded
    rollout = trainer.rollout(0)
    assert rollout.scores.tolist() == seen and sorted(seen) == [0.0, 0.0, 1.0, 1.0]

    no_answer = tmp_path / "bare.jsonl"
    no_answer.write_text(json.dumps(records[0]) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"bare.jsonl line 2 has no 'answer'; reward=checker checks"):
        PPO(load_config(None, [*settings(setup, "checker"), f"prompts={no_answer}", "reward=checker"]))
    with pytest.raises(ValueError, match="not both"):
        PPO(load_config(None, [*settings(setup, "checker"), f"prompts={prompts}", "reward=checker"]), ascii_share)


def test_cli_errors_are_one_line(setup, capsys):
    assert main(["ppo", f"policy={setup / 'sft'}"]) == 2
    assert capsys.readouterr().err == "error: ppo.prompts is not set; pass prompts=PATH.\n"
    assert main(["ppo", *settings(setup, "d")]) == 2
    assert "ppo.reward_model is not set" in capsys.readouterr().err
    assert main(["ppo", *settings(setup, "d", "kl_estimator=k2")]) == 2
    assert "kl_estimator must be k1 or k3" in capsys.readouterr().err
    assert main(["ppo", *settings(setup, "d", "reward=rm")]) == 2
    assert capsys.readouterr().err == "error: reward must be model or checker, got 'rm'.\n"
    for bad, message in (
        ("kl_coef=-0.1", "kl_coef must be at least 0, got -0.1."),  # would pay the policy to leave the reference
        ("lam=1.5", "lam must be at least 0 and at most 1, got 1.5."),
        ("clip=0", "clip must be more than 0, got 0.0."),
        ("top_p=0", "top_p must be more than 0 and at most 1, got 0.0."),
    ):
        assert main(["ppo", *settings(setup, "d", bad)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_resume_repeats_the_uninterrupted_run(setup):
    common = ("steps=4", "save_every=2", "value_warmup_steps=1", "lr=3e-3", "value_lr=1e-3")
    straight = ppo(load_config(None, settings(setup, "straight", *common)), reward_fn=ascii_share)

    calls = 0

    def crashes_in_step_3(prompt: str, reply: str, ended: bool) -> float:
        nonlocal calls
        calls += 1
        if calls > 2 * 16:  # 8 prompts x 2 samples a step: the third step's rollout
            raise KeyboardInterrupt
        return ascii_share(prompt, reply, ended)

    config = load_config(None, settings(setup, "resumed", *common))
    with pytest.raises(KeyboardInterrupt):
        ppo(config, reward_fn=crashes_in_step_3)
    with pytest.raises(ValueError, match="--resume"):
        ppo(config, reward_fn=ascii_share)
    resumed = ppo(config, reward_fn=ascii_share, resume=True)
    assert_same_run(straight, resumed, setup / "straight", setup / "resumed")
    lines = (setup / "resumed" / "metrics" / "ppo.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_a_checkpoint_in_the_value_warmup_changes_nothing(setup):
    """A checkpoint written while only the value model trains leaves the policy's optimiser unstarted (torch's
    get_state_dict would start it with a zero-rate step and shift Adam's bias correction), so the run is the same
    with or without checkpoints, and resuming from one gives it again."""
    common = ("steps=4", "value_warmup_steps=2", "lr=3e-3", "value_lr=1e-3")
    plain = ppo(load_config(None, settings(setup, "plain", *common, "save_every=0")), reward_fn=ascii_share)
    saving = ppo(load_config(None, settings(setup, "saving", *common, "save_every=1")), reward_fn=ascii_share)
    assert_same_run(plain, saving, setup / "plain", setup / "saving")
    # Stop after step 2, with the checkpoint of step 1 (inside the warm-up) the latest, then resume from it.
    ppo(load_config(None, settings(setup, "resumed-warm", *common, "save_every=1", "steps=2")), ascii_share)
    checkpoint = setup / "resumed-warm" / "checkpoints" / "ppo" / "step-0000001"
    assert json.loads((checkpoint / "trainer.json").read_text())["stepped"] == ["value"]
    config = load_config(None, settings(setup, "resumed-warm", *common, "save_every=1"))
    resumed = ppo(config, reward_fn=ascii_share, resume=True)
    assert_same_run(plain, resumed, setup / "plain", setup / "resumed-warm")


def assert_same_run(first: list[dict], second: list[dict], first_dir: Path, second_dir: Path) -> None:
    """The same metrics at every step (times aside) and the same trained policy, to the bit."""
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in second] == [
        {k: v for k, v in r.items() if k not in drop} for r in first
    ]
    a, _ = qianwen.load(first_dir / "ppo")
    b, _ = qianwen.load(second_dir / "ppo")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_torchrun_fsdp2_matches_one_process(setup):
    """Two gloo processes under FSDP2, each sampling half of every step's prompts, against one process with
    all of them: greedy replies make the rollouts alike, so the logged statistics and the trained policy must be
    too. The two-process checkpoint then resumes in one process."""
    common = (
        f"reward_model={setup / 'rm'}",
        "steps=3",
        "value_warmup_steps=1",
        "temperature=0",
        "ppo_epochs=2",
        "dtype=fp32",  # under bf16, FSDP2's bf16 parameter copies and one process's autocast round differently
    )
    common += ("minibatch_size=16", "lr=3e-3", "value_lr=1e-3", "save_every=2")
    one = ppo(load_config(None, settings(setup, "one", *common)))
    proc = torchrun(["ppo", *settings(setup, "two", *common)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ppo step 3/3") == 1  # the first process alone reports
    two = [json.loads(line) for line in (setup / "two" / "metrics" / "ppo.jsonl").read_text().splitlines()]

    def same(a: list[dict], b: list[dict]) -> None:
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
        for x, y in zip(a, b):
            for key in ("reward", "kl", "response_length", "ended_fraction", "value_loss", "policy_loss", "entropy"):
                if key in x or key in y:
                    assert y[key] == pytest.approx(x[key], abs=1e-4), (key, x, y)
        a_model, _ = qianwen.load(setup / "one" / "ppo")
        b_model, _ = qianwen.load(setup / "two" / "ppo")
        for (name, p), q in zip(a_model.state_dict().items(), b_model.state_dict().values()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)

    same(one, two)
    assert any(r["trained_policy"] for r in two) and not two[0]["trained_policy"]
    assert (setup / "two" / "checkpoints" / "ppo" / "step-0000002" / "rng-1.pt").is_file()
    resumed = ppo(load_config(None, settings(setup, "two", *common)), resume=True)
    same(one, resumed)
