"""Is the reward model what keeps PPO from raising arithmetic? The probe behind ANALYSIS.md's "PPO with a
perfect reward": PPO from a run's SFT model with the task checker as the reward (`reward=checker`: 1 for a
right, ended reply as `qianwen.checks` judges it) instead of the reward model, scored like the recipe's eval
(greedy, held-out arithmetic), next to the sampled accuracy and pass@k of both models at PPO's own sampling
(T = 1, top-p 0.9).

    python -m benchmarks.probe_ppo_reward --run runs/tiny --out /tmp/oracle [lr=1e-4 ptx_coef=0 ...]

Any [ppo] key of the tiny recipe can be overridden after the options; the run's SFT model, PPO prompts and
pretraining shards are used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import qianwen
from qianwen.checks import check_answer
from qianwen.eval.harness import read_jsonl
from qianwen.eval.tasks import arith
from qianwen.generate import generate
from qianwen.train.ppo import load_config, ppo


def scores(model_dir: Path, problems: list[dict], k: int) -> dict[str, float]:
    """Greedy accuracy (as `qianwen eval --tasks arith`), and sampled accuracy and pass@k at T = 1, top-p 0.9."""
    model, tok = qianwen.load(model_dir)
    prompts = [tok.render_chat([{"role": "user", "content": p["prompt"]}]) for p in problems]
    greedy = generate(model, tok, prompts, 64)
    right = [arith.matches(arith.extract(c.text, True), p["answer"], True) for c, p in zip(greedy, problems)]
    sampled = generate(
        model, tok, [p for p in prompts for _ in range(k)], 64, temperature=1.0, top_p=0.9, seed=0,
        stop_ids=[tok.im_end_id],
    )  # fmt: skip
    hits = [
        check_answer(p["kind"], p["answer"], c.text, p["lang"])
        for p, c in zip([p for p in problems for _ in range(k)], sampled)
    ]
    per_problem = [any(hits[i * k : (i + 1) * k]) for i in range(len(problems))]
    return {
        "greedy": sum(right) / len(problems),
        "sampled": sum(hits) / len(hits),
        f"pass@{k}": sum(per_problem) / len(problems),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a `qianwen run` directory (its sft/, tasks/ and data/)")
    parser.add_argument("--out", required=True, help="where PPO writes")
    parser.add_argument("--k", type=int, default=8, help="samples per problem for pass@k")
    parser.add_argument("overrides", nargs="*", help="[ppo] keys, e.g. lr=1e-4")
    args = parser.parse_args()
    run = Path(args.run)
    torch.manual_seed(0)
    config = load_config(
        "tiny",
        [f"policy={run / 'sft'}", f"prompts={run / 'tasks/ppo.jsonl'}", f"ptx_data={run / 'data'}", f"out={args.out}"]
        + ["reward=checker"]
        + args.overrides,
    )
    history = ppo(config)
    rewards = [r["reward"] for r in history]
    third = max(len(rewards) // 3, 1)
    problems = read_jsonl(run / "tasks/arith_eval.jsonl", ("prompt", "answer", "kind", "lang"))
    report = {
        "overrides": args.overrides,
        "reward first third": sum(rewards[:third]) / third,
        "reward last third": sum(rewards[-third:]) / third,
        "kl": history[-1]["kl"],
        "sft": scores(run / "sft", problems, args.k),
        "ppo": scores(Path(args.out) / "ppo", problems, args.k),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
