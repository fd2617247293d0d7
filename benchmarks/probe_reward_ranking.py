"""What does the reward model tell PPO about the policy's own replies? The probe behind ANALYSIS.md's session 12:
`--samples` replies sampled as PPO samples them (temperature 1, top-p 0.9, at most 48 tokens) from a run's SFT model
to each of `--prompts` of its PPO prompts, scored by its reward model (normalised by the statistics `qianwen rm`
saved) and by the task checker. Prints the normalised reward's variance between and within prompts, and, over the
same-prompt pairs where the checker finds one reply right and the other wrong, how often the reward model scores
the right one higher.

python -m benchmarks.probe_reward_ranking --run runs/tiny [--prompts 96] [--samples 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

import numpy as np
import torch

import qianwen
from qianwen.checks import check_answer
from qianwen.generate import generate
from qianwen.train.reward import load_reward_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `qianwen run` directory with sft/, rm/ and tasks/ppo.jsonl")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tok = qianwen.load(f"{args.run}/sft")
    model = model.to(torch.bfloat16).eval()  # as PPO's sampler on an AMX CPU
    rm, _, stats = load_reward_model(f"{args.run}/rm")
    with open(f"{args.run}/tasks/ppo.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.prompts]
    tasks = [r for r in rows for _ in range(args.samples)]
    prompts = [tok.render_chat(r.get("messages") or [{"role": "user", "content": r["prompt"]}]) for r in tasks]
    replies = []
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        replies += generate(
            model, tok, batch, 48, temperature=1.0, top_p=0.9, seed=args.seed + start, stop_ids=[tok.im_end_id]
        )
    rows_ids = [p + c.token_ids + [tok.im_end_id] * (c.finish_reason == "stop") for p, c in zip(prompts, replies)]
    scores: list[float] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(rows_ids), 32):
            batch = rows_ids[start : start + 32]
            ids = torch.full((len(batch), max(map(len, batch))), tok.pad_id)
            for i, row in enumerate(batch):
                ids[i, : len(row)] = torch.tensor(row)
            scores += rm(ids, torch.tensor([len(row) - 1 for row in batch]), pairwise=False).tolist()
    shape = (len(rows), args.samples)
    reward = ((np.array(scores) - stats["mean"]) / stats["std"]).reshape(shape)
    right = np.array(
        [
            c.finish_reason == "stop"
            and check_answer(t.get("kind", "arithmetic"), str(t["answer"]), c.text, t.get("lang"))
            for t, c in zip(tasks, replies)
        ],
        dtype=float,
    ).reshape(shape)
    pairs = [
        (r[a] > r[b])
        for r, k in zip(reward, right)
        for a in range(args.samples)
        for b in range(args.samples)
        if k[a] > k[b]
    ]
    kinds = Counter(r.get("kind", "arithmetic") for r in rows)
    print(f"{len(rows)} prompts x {args.samples} replies; kinds: {dict(sorted(kinds.items()))}")
    print(
        f"normalised reward: variance {reward.var():.3f}, between prompts {reward.mean(1).var():.3f}, "
        f"within prompts {reward.var(1, ddof=1).mean():.3f}"
    )
    print(f"checker: mean {right.mean():.3f}, within-prompt variance {right.var(1, ddof=1).mean():.3f}")
    print(
        f"same-prompt pairs, one right and one wrong: {len(pairs)}; the reward model ranks the right one higher in {sum(pairs)}"
    )


if __name__ == "__main__":
    main()
