"""A reward-model training step (forward and backward of the pairwise loss) with each pair in one row, its prompt
run once (`rm.share_prompt = true`, qianwen's default since session 14) against chosen and rejected as rows of
their own (`false`: the layout of TRL's RewardTrainer, and qianwen's before). Same model, same pairs, same batches.

    python -m benchmarks.bench_rm [--preset tiny-10m] [--pairs 400] [--batches 30] [--rounds 3]

The pairs are the tiny recipe's clean preference pairs (the synthetic tasks' generator, seed 0, the recipe's
number caps; tool transcripts included), tokenized with Qwen's vocabulary; batches of 8 in the training order
(shuffled, grouped by length). The rounds alternate the two sides and each keeps its fastest; the run also checks
that the two layouts give the same rewards (fp32, no autocast).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from qianwen.config import preset
from qianwen.data.synthetic import make_all
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer, qwen_vocabulary
from qianwen.train.loop import cpu_has_bf16_matmul
from qianwen.train.reward import PairBatches, RewardModel, read_pairs


def step_seconds(rm: RewardModel, batches: PairBatches, count: int, bf16: bool) -> float:
    start = time.perf_counter()
    for b in range(count):
        ids, last, mask = batches.get(b)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = rm(ids, last, mask=mask)
        loss.backward()
    rm.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-10m")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    tok = Tokenizer.from_file(qwen_vocabulary())
    with tempfile.TemporaryDirectory() as tmp:
        make_all(tmp, sft=0, pairs=args.pairs, pmp=0, ppo=0, eval_size=1, max_number=30, tool_digits=3)
        pairs = read_pairs(Path(tmp) / "rm.jsonl", tok, max_tokens=1024)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=tok.vocab_size))
    model.init_weights(0)
    rm = RewardModel(model, seed=1).train()
    indices = list(range(len(pairs)))
    sides = {
        share: PairBatches(pairs, indices, args.batch_size, tok.pad_id, seed=0, share=share) for share in (True, False)
    }
    count = min(args.batches, sides[True].per_epoch)

    with torch.no_grad():  # the same rewards either way
        rm.eval()
        got = {}
        for share, batches in sides.items():
            rewards = {}
            for b in range(count):
                ids, last, mask = batches.get(b)
                r = rm(ids, last, pairwise=False, mask=mask).view(-1, 2)
                rewards |= dict(zip(batches.members(b), r.tolist()))
            got[share] = rewards
        rm.train()
    both = sorted(got[True].keys() & got[False].keys())  # the two sides' first batches hold other pairs too
    difference = max(abs(a - b) for i in both for a, b in zip(got[True][i], got[False][i]))

    prompt_share = sum(sides[True]._shared[i] * 2 for i in indices) / sum(len(r) for r in pairs.rows)
    rows = []
    for bf16 in [False] + ([True] if cpu_has_bf16_matmul() else []):
        seconds = {share: [] for share in sides}
        for _ in range(args.rounds):
            for share, batches in sides.items():
                step_seconds(rm, batches, 2, bf16)  # warm-up
                seconds[share].append(step_seconds(rm, batches, count, bf16))
        tokens = {
            share: sum(
                len(b.members(i)) * max(b._length[m] for m in b.members(i)) * (1 if share else 2) for i in range(count)
            )
            for share, b in sides.items()
        }
        row = {
            "preset": args.preset,
            "dtype": "bf16 autocast" if bf16 else "fp32",
            "pairs_per_batch": args.batch_size,
            "batches": count,
            "prompt_share_of_tokens": round(prompt_share, 3),
            "tokens_shared": tokens[True],
            "tokens_apart": tokens[False],
            "shared_ms_per_step": round(min(seconds[True]) / count * 1000, 1),
            "apart_ms_per_step": round(min(seconds[False]) / count * 1000, 1),
            "rounds_shared_s": [round(s, 2) for s in seconds[True]],
            "rounds_apart_s": [round(s, 2) for s in seconds[False]],
            "max_reward_difference": float(f"{difference:.2g}"),
        }
        row["speed_ratio"] = round(row["apart_ms_per_step"] / row["shared_ms_per_step"], 2)
        rows.append(row)
        print(
            f"{args.preset} {row['dtype']}: shared prompt {row['shared_ms_per_step']} ms a step, apart "
            f"{row['apart_ms_per_step']} ms, {row['speed_ratio']}x (rewards differ by {difference:.1e})"
        )
    command = " ".join(["python -m benchmarks.bench_rm", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"{len(pairs)} pairs; forward and backward of the pairwise loss, no optimizer step; each side's fastest of "
        f"{args.rounds} alternating rounds; {torch.get_num_threads()} CPU thread(s)."
    )
    write_result("rm", rows, command, notes)


if __name__ == "__main__":
    main()
