"""`qianwen rm`: a reward model in the report's two stages, through the same loop as pretraining.

The model is the transformer with a scalar head read at the last token of prompt + reply (QWEN_SPEC.md
section 6). Pairs `{prompt | messages, chosen, rejected}` (JSONL; a reply ends with <|im_end|> unless the
record says `chosen_ended` / `rejected_ended` = false, which is how a reply that never ends is shown to the
model) train it with the pairwise loss -log sigmoid(r_chosen - r_rejected). Stage 1, preference-model
pretraining (PMP), runs on the large noisy set (`pmp_data`, optional); stage 2 fine-tunes on the clean set
(`data`). Each stage reports held-out pairwise accuracy. The result, `<out>/rm/`, is a Hugging Face
Qwen2ForSequenceClassification directory (one label, `score.weight`) whose qianwen.json also holds the
mean and standard deviation of its rewards on the training replies, for PPO to normalise with.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import qianwen
from qianwen.config import apply_overrides, build, load_recipe
from qianwen.generate import common_prefix
from qianwen.model import Transformer, branch_mask
from qianwen.tokenizer import Tokenizer
from qianwen.train.loop import LoopConfig, Runtime, Stage, Trainer, init_runtime, shutdown
from qianwen.train.records import Skip, read_records
from qianwen.util import atomic_write

SCORE_FILE = "score.safetensors"
# 256 replies at batch 8, enough for a mean within a sixteenth of the spread; 64 batches cost the tiny recipe
# 6 s more per stage for no change PPO could see (whitening follows).
STATS_BATCHES = 16


@dataclass
class RMConfig(LoopConfig):
    model: str = ""  # the model to start from (base/ or sft/)
    data: str = ""  # the clean pairs of stage 2
    pmp_data: str = ""  # the large pairs set of stage 1 (preference-model pretraining); "" = no stage 1
    pmp_steps: int = 200
    eval_data: str = ""  # held-out pairs both stages are scored on, all of them ("" = a val_fraction split)
    out: str = "runs/rm"  # writes rm/ (and rm-pmp/), checkpoints/, metrics/rm*.jsonl
    batch_size: int = 8  # pairs per micro-batch per process
    seq_length: int = 0  # 0 = the model's seq_length
    share_prompt: bool = True  # a pair in one row, its prompt run once (PairBatches)
    val_fraction: float = 0.1  # held out of each stage's own data when there is no eval_data
    eval_batches: int = 8
    lr: float = 1e-5
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"rm.{name} is not set; pass {name}=PATH.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(
                f"val_fraction must be in (0, 1), got {self.val_fraction}: each stage reports held-out accuracy."
            )


def load_config(recipe_path: str | None, overrides: list[str]) -> RMConfig:
    recipe = apply_overrides(load_recipe(recipe_path), overrides, default_section="rm")
    return build(RMConfig, recipe.get("rm", {}), "rm")


class RewardModel(nn.Module):
    """The transformer and a scalar head at the last token. forward(ids, last) is the pairwise loss of a
    batch whose readings alternate chosen, rejected: `last` [rows] reads one reward per row, [rows, 2] two (a
    pair laid out as a tree in one row, under a [rows, T, T] `mask`: see PairBatches). With pairwise=False, the
    rewards, in that order; with last=None, the score at every position. Every use goes through forward, where
    FSDP2 gathers the parameters."""

    def __init__(self, model: Transformer, seed: int = 0):
        super().__init__()
        self.model = model
        self.score = nn.Linear(model.config.hidden_size, 1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.score.weight.copy_(
                torch.randn(self.score.weight.shape, generator=gen) / math.sqrt(model.config.hidden_size + 1)
            )

    def forward(
        self, ids: torch.Tensor, last: torch.Tensor | None, pairwise: bool = True, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.model.hidden_states(ids, mask)
        if last is None:  # the score at every position: PPO's value model
            return self.score(hidden).squeeze(-1).float()
        rows = torch.arange(len(ids), device=ids.device)
        read = hidden[rows[:, None], last] if last.dim() == 2 else hidden[rows, last]
        rewards = self.score(read).squeeze(-1).float().flatten()
        if not pairwise:
            return rewards
        return -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()


@dataclass
class Pairs:
    rows: list[list[int]]  # chosen, rejected, chosen, rejected, ...
    kinds: list[str]  # per pair, the record's `rejection` (what is wrong with the rejected reply), or ""
    lines: int
    skipped: dict[str, int]
    examples: list[str]

    def __len__(self) -> int:
        return len(self.rows) // 2


def reply_ids(tokenizer: Tokenizer, record: dict, side: str) -> list[int]:
    prompt = record.get("messages") or [{"role": "user", "content": record.get("prompt")}]
    reply = record[side]
    if not isinstance(reply, str):
        raise ValueError(f"'{side}' must be a string")
    # A file may spell the end as text; text never becomes a control token, so the id is appended instead.
    ended = record.get(f"{side}_ended", True)
    body = tokenizer.encode(reply.removesuffix("<|im_end|>"))
    return tokenizer.render_chat(prompt) + body + ([tokenizer.im_end_id] if ended else [])


def read_pairs(path: str | Path, tokenizer: Tokenizer, max_tokens: int) -> Pairs:
    def convert(record: object) -> list[list[int]]:
        try:
            if not isinstance(record, dict) or not (record.get("prompt") or record.get("messages")):
                raise ValueError("no 'prompt' or 'messages'")
            pair = [reply_ids(tokenizer, record, "chosen"), reply_ids(tokenizer, record, "rejected")]
        except (ValueError, KeyError, TypeError) as exc:
            raise Skip("bad record", f"not a preference pair ({exc})") from None
        if max(map(len, pair)) > max_tokens:
            raise Skip("too long", f"{max(map(len, pair))} tokens, more than seq_length {max_tokens}")
        return pair, str(record.get("rejection") or "")

    read = read_records(path, convert, "pass a JSONL of {prompt, chosen, rejected}.")
    rows = [row for pair, _ in read.items for row in pair]
    return Pairs(rows, [kind for _, kind in read.items], read.lines, read.skipped, read.examples)


class PairBatches:
    """Batches of pairs, a pure function of (seed, batch index); one row per pair, right-padded.

    A pair's two replies follow the same prompt, which is most of their tokens (68% of the tiny recipe's), so a
    row holds the chosen sequence and then the rejected one's tokens after the prefix they share, under a mask
    in which those tokens see the shared prefix and each other but not the chosen reply (positions restart where
    the prefix ends). The rewards are those of the two sequences run apart, up to rounding; the prompt runs
    once, which made a training step 1.5x faster on the tiny recipe's pairs. With share=False the two are rows
    of their own under plain causal attention (no [T, T] mask, which long pairs on a GPU may not want).

    Shuffled batches are grouped by length, as Hugging Face's LengthGroupedSampler does: each epoch's random
    order is cut into runs of GROUP batches, each run is sorted by its pairs' longer reply and cut into batches,
    and the batches are shuffled. A batch of short replies then no longer pads to a tool transcript (the tiny
    recipe's pairs run from 60 to 600 tokens): both stages at batch 8 took 1 min 57 s there instead of 5 min.
    Unshuffled batches (for evaluation) go in order of length."""

    GROUP = 50

    def __init__(self, pairs: Pairs, indices: list[int], batch_size: int, pad_id: int, seed: int, share=True):
        if not indices:
            raise ValueError("no usable preference pairs; check the data (see the skipped counts).")
        self.pairs, self.indices, self.batch_size, self.pad_id, self.seed = pairs, indices, batch_size, pad_id, seed
        self.share = share
        self.per_epoch = math.ceil(len(indices) / batch_size)
        rows = pairs.rows
        self._shared = {i: common_prefix(rows[2 * i], rows[2 * i + 1]) if share else 0 for i in indices}
        if share:
            self._length = {i: len(rows[2 * i]) + len(rows[2 * i + 1]) - self._shared[i] for i in indices}
        else:
            self._length = {i: max(len(rows[2 * i]), len(rows[2 * i + 1])) for i in indices}
        by_length = sorted(indices, key=self._length.__getitem__)
        self._in_order = self._cut(by_length)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _cut(self, order: list[int]) -> list[list[int]]:
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _shuffled(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = [self.indices[i] for i in rng.permutation(len(self.indices))]
            run = self.GROUP * self.batch_size
            batches = [
                b
                for i in range(0, len(order), run)
                for b in self._cut(sorted(order[i : i + run], key=self._length.__getitem__))
            ]
            self._epoch = epoch, [batches[i] for i in rng.permutation(len(batches))]
        return self._epoch[1]

    def members(self, index: int, shuffle: bool = True) -> list[int]:
        """The pairs of batch `index`."""
        epoch, position = divmod(index, self.per_epoch)
        return (self._shuffled(epoch) if shuffle else self._in_order)[position]

    def get(self, index: int, shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids [pairs, T], last [pairs, 2]: where the chosen and the rejected sequence end, mask [pairs, T, T]);
        with share=False, (ids [2 * pairs, T], last [2 * pairs], None), the rows alternating chosen, rejected."""
        members = self.members(index, shuffle)
        T = max(self._length[i] for i in members)
        if not self.share:
            rows = [self.pairs.rows[2 * i + side] for i in members for side in (0, 1)]
            ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            return ids, torch.tensor([len(row) - 1 for row in rows]), None
        ids = torch.full((len(members), T), self.pad_id, dtype=torch.long)
        segments = torch.full((len(members), T), -1, dtype=torch.long)
        last = []
        for r, i in enumerate(members):
            chosen, rejected, shared = self.pairs.rows[2 * i], self.pairs.rows[2 * i + 1], self._shared[i]
            row = chosen + rejected[shared:]
            ids[r, : len(row)] = torch.tensor(row)
            segments[r, : len(row)] = torch.tensor(
                [0] * shared + [1] * (len(chosen) - shared) + [2] * (len(row) - len(chosen))
            )
            # a rejected sequence that is a prefix of the chosen one ends inside it
            last.append([len(chosen) - 1, len(rejected) - 1 if shared == len(rejected) else len(row) - 1])
        mask = branch_mask(segments)
        return ids, torch.tensor(last), mask


def reward_model(config: RMConfig, resume: bool = False) -> list[dict]:
    """Stage 1 (when pmp_data is given) then stage 2; returns this process's metrics records."""
    model, tokenizer = qianwen.load(config.model, dtype=torch.float32)
    model.requires_grad_(True)  # loaded for inference
    rm = RewardModel(model, config.seed)
    max_tokens = config.seq_length or model.config.seq_length
    runtime = init_runtime(config.device)
    history: list[dict] = []
    try:
        held = read_pairs(config.eval_data, tokenizer, max_tokens) if config.eval_data else None
        stages = [("rm-pmp", config.pmp_data, config.pmp_steps)] if config.pmp_data else []
        for name, data, steps in [*stages, ("rm", config.data, config.steps)]:
            pairs = read_pairs(data, tokenizer, max_tokens)
            history += _stage(name, rm, pairs, held, tokenizer, config, steps, runtime, resume)
    finally:
        shutdown(runtime)
    return history


def _stage(name, rm, pairs: Pairs, held: Pairs | None, tokenizer, config: RMConfig, steps, runtime: Runtime, resume):
    """One stage's training; scored on `held` (all of it) or else on every 1/val_fraction-th pair of its data."""
    if held is not None:
        train, val, scored = list(range(len(pairs))), list(range(len(held))), held
    else:
        every = round(1 / config.val_fraction)
        val = [i for i in range(len(pairs)) if i % every == every - 1]
        train = [i for i in range(len(pairs)) if i % every != every - 1]
        scored = pairs
    batches = PairBatches(pairs, train, config.batch_size, tokenizer.pad_id, config.seed, config.share_prompt)
    held_out = PairBatches(scored, val, config.batch_size, tokenizer.pad_id, 0, config.share_prompt) if val else None
    by_kind: dict[str, float] = {}  # the latest evaluation's accuracy per kind of rejected reply

    def on_device(batch: tuple) -> tuple:
        return tuple(t.to(runtime.device) if t is not None else None for t in batch)

    def batch(step: int, micro: int):
        ids, last, mask = on_device(batches.get((step * config.grad_accum + micro) * runtime.world + runtime.rank))
        return ids, last, True, mask

    def rewards(source: PairBatches, count: int, shuffle: bool = False) -> torch.Tensor:
        out = []
        for b in range(count):
            ids, last, mask = on_device(source.get(b * runtime.world + runtime.rank, shuffle))
            out.append(module(ids, last, pairwise=False, mask=mask).double())
        return torch.cat(out)

    def evaluate() -> dict:
        count = held_out.per_epoch // runtime.world
        if held is None:
            count = min(config.eval_batches, count)
        r = rewards(held_out, count)
        margin = r[0::2] - r[1::2]
        scored_pairs = torch.tensor(float(len(margin)), dtype=torch.float64, device=margin.device)  # beside the rest
        totals = runtime.sum(torch.stack([(margin > 0).sum().double(), margin.sum(), scored_pairs]))
        batches = [b * runtime.world + runtime.rank for b in range(count)]
        members = [i for b in batches for i in held_out.members(b, shuffle=False)]
        names = sorted(set(scored.kinds[i] for i in val) - {""})
        counts = torch.zeros(len(names), 2, dtype=torch.float64)
        for i, m in zip(members, margin.tolist(), strict=True):
            if scored.kinds[i]:
                counts[names.index(scored.kinds[i])] += torch.tensor([float(m > 0), 1.0], dtype=torch.float64)
        counts = runtime.sum(counts.to(margin.device))  # NCCL reduces GPU tensors only
        by_kind.clear()
        by_kind.update({n: round((c[0] / c[1]).item(), 4) for n, c in zip(names, counts, strict=True) if c[1]})
        return {
            "val_accuracy": round((totals[0] / totals[2]).item(), 4),
            "val_margin": round((totals[1] / totals[2]).item(), 4),
        }

    metadata = {
        "stage": name,
        "pairs": {
            "lines": pairs.lines,
            "train": len(train),
            "val": len(val),
            "val_from": config.eval_data if held is not None else "the stage's own data",
            "skipped": pairs.skipped,
        },
        "config": asdict(config),
    }
    stage = Stage(
        name=name,
        module=rm,
        batch=batch,
        export=reward_export(rm.model.config, tokenizer, metadata),
        evaluate=evaluate if held_out and held_out.per_epoch >= runtime.world else None,
    )
    config_for_stage = LoopConfig(**{**_loop_fields(config), "steps": steps})
    trainer = Trainer(stage, config_for_stage, Path(config.out), runtime)
    module = trainer.module
    if runtime.main:
        skipped = ", ".join(f"{n} {reason}" for reason, n in pairs.skipped.items()) or "none"
        print(
            f"{name}: {len(train):,} pairs to train on, {len(val):,} held out, from {pairs.lines:,} lines (skipped: {skipped})"
        )
        for example in pairs.examples:
            print(f"{name}: skipped {example}")
    history = trainer.fit(resume=resume)
    # Rewards on the training replies: the mean and spread PPO normalises with, over up to STATS_BATCHES batches
    # of the first epoch's shuffled order (the unshuffled order is by length, so its first batches are the
    # shortest).
    module.eval()
    with torch.no_grad():
        r = rewards(batches, min(batches.per_epoch // runtime.world, STATS_BATCHES), shuffle=True)
    replies = torch.tensor(float(len(r)), dtype=torch.float64, device=r.device)
    stats = runtime.sum(torch.stack([r.sum(), (r * r).sum(), replies]))
    mean = (stats[0] / stats[2]).item()
    metadata["reward"] = {"mean": mean, "std": math.sqrt(max((stats[1] / stats[2]).item() - mean * mean, 0.0))}
    evaluation = [h for h in history if "val_accuracy" in h]
    if evaluation:
        metadata["val_accuracy"] = evaluation[-1]["val_accuracy"]
        metadata["val_accuracy_by_rejection"] = dict(by_kind)
    trainer.export(trainer.latest() / "model")  # again, now with the reward statistics
    if runtime.main:
        print(f"{name}: wrote {trainer.publish(Path(config.out) / name)}")
    return history


def _loop_fields(config: RMConfig) -> dict:
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(LoopConfig)}


def reward_export(model_config, tokenizer, metadata: dict):
    """A Stage.export writing Qwen2ForSequenceClassification: the transformer's files, config.json
    relabelled, and `score.weight` beside the weights (lm_head stays, so qianwen.load still reads it)."""

    def export(state: dict, directory: Path) -> None:
        with torch.device("meta"):
            model = Transformer(model_config)
        body = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        model.load_state_dict(body, assign=True)
        qianwen.save(model, tokenizer, directory, metadata)
        score = {"score.weight": state["score.weight"].to(model.embed.weight.dtype).contiguous()}
        index_path = directory / "model.safetensors.index.json"
        if index_path.is_file():  # sharded: the head gets a file of its own, named in the index
            atomic_write(directory / SCORE_FILE, lambda tmp: save_file(score, tmp, metadata={"format": "pt"}))
            index = json.loads(index_path.read_text())
            index["weight_map"]["score.weight"] = SCORE_FILE
            atomic_write(index_path, json.dumps(index, indent=2))
        else:
            tensors = {**load_file(directory / "model.safetensors"), **score}
            atomic_write(
                directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
            )
        config = json.loads((directory / "config.json").read_text())
        config.update(architectures=["Qwen2ForSequenceClassification"], num_labels=1, pad_token_id=tokenizer.pad_id)
        atomic_write(directory / "config.json", json.dumps(config, indent=2))

    return export


def load_reward_model(directory: str | Path, device: str = "cpu") -> tuple[RewardModel, Tokenizer, dict]:
    """A reward model written by `qianwen rm` (eval mode), its tokenizer and its reward statistics."""
    directory = Path(directory)
    model, tokenizer = qianwen.load(directory, dtype=torch.float32, device=device)
    rm = RewardModel(model).to(device).eval()
    index = directory / "model.safetensors.index.json"
    source = directory / (SCORE_FILE if index.is_file() else "model.safetensors")
    tensors = load_file(source)
    if "score.weight" not in tensors:
        raise ValueError(
            f"{directory} is not a reward model: its weights have no score head (score.weight); give a `qianwen rm` "
            "output (a run's rm/ directory)."
        )
    with torch.no_grad():
        rm.score.weight.copy_(tensors["score.weight"])
    meta = json.loads((directory / "qianwen.json").read_text())
    return rm, tokenizer, meta.get("reward", {"mean": 0.0, "std": 1.0})


@torch.no_grad()
def score_reply_pairs(
    rm: RewardModel, tokenizer: Tokenizer, first: list[dict], second: list[dict], batch_size: int = 32
) -> tuple[list[float], list[float]]:
    """The rewards of two replies to each prompt, `{prompt | messages, reply, reply_ended}` records (a reply
    ended with <|im_end|> unless `reply_ended` is false), as PPO reads them: the scalar head at the reply's last
    token. Each prompt runs once for both replies (PairBatches' layout), in batches of similar length."""
    rows = [reply_ids(tokenizer, record, "reply") for pair in zip(first, second, strict=True) for record in pair]
    pairs = Pairs(rows, [""] * len(first), len(first), {}, [])
    batches = PairBatches(pairs, list(range(len(first))), batch_size, tokenizer.pad_id, seed=0)
    device = rm.score.weight.device
    scores = [(0.0, 0.0)] * len(first)
    for b in range(batches.per_epoch):
        ids, last, mask = (t.to(device) for t in batches.get(b, shuffle=False))
        rewards = rm(ids, last, pairwise=False, mask=mask).view(-1, 2).tolist()
        for i, reward in zip(batches.members(b, shuffle=False), rewards, strict=True):
            scores[i] = tuple(reward)
    return [a for a, _ in scores], [b for _, b in scores]


def compare_replies(rm_dir: str | Path, samples: dict[str, dict[str, Path]], device: str = "cpu") -> dict:
    """What PPO targets, on held-out prompts: the reward model scores two models' replies to the same prompts
    (`samples[model][task]`, the per-sample JSONL of `qianwen eval` with prompt, reply and ended). Per task:
    each model's mean normalised reward, and of the prompts where the replies differ, how many each model's
    reply scored higher on."""
    rm, tokenizer, stats = load_reward_model(rm_dir, device=device)
    first, second = samples
    result: dict = {"reward_model": str(rm_dir), "models": [first, second], "tasks": {}, "skipped": {}}
    for task in sorted(samples[first].keys() & samples[second].keys()):
        rows = {}
        for model in (first, second):
            with open(samples[model][task], encoding="utf-8") as f:
                rows[model] = [json.loads(line) for line in f if line.strip()]
        if [r["prompt"] for r in rows[first]] != [r["prompt"] for r in rows[second]]:
            result["skipped"][task] = "the two models were scored on different prompts (another limit or file)"
            continue
        replies = {
            model: [{"prompt": r["prompt"], "reply": r["reply"], "reply_ended": r.get("ended", True)} for r in records]
            for model, records in rows.items()
        }
        raw = score_reply_pairs(rm, tokenizer, replies[first], replies[second])
        scores = {m: (np.array(r) - stats["mean"]) / max(stats["std"], 1e-6) for m, r in zip((first, second), raw)}
        differ = np.array([a["reply"] != b["reply"] for a, b in zip(rows[first], rows[second])], dtype=bool)
        result["tasks"][task] = {
            "prompts": len(differ),
            "mean": {m: round(float(s.mean()), 4) for m, s in scores.items()},
            "different_replies": int(differ.sum()),
            "preferred": {
                first: int((scores[first] > scores[second])[differ].sum()),
                second: int((scores[second] > scores[first])[differ].sum()),
            },
        }
    return result
