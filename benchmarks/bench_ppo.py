"""Time per PPO step: `qianwen ppo` against TRL's four-model PPO (trl 0.11.4's `PPOv2Trainer`, from the last
release that still shipped the original `PPOTrainer` beside it) on the same HF-format policy and reward model
and the same ChatML prompts. A step = 16 replies of 48 sampled tokens (8 prompts x 2 samples for us, 16 prompts
for TRL), scored by the reward model, one PPO epoch in minibatches of 8, policy and value updated, KL 0.04 to
the frozen reference. TRL runs in its own virtual environment (it needs transformers 4.46), started from here;
every reply runs to its length limit (random weights), so both sides do the same work. Both sides run in fp32
and again under bf16 autocast (which a CPU with AMX computes in hardware). The sides alternate for --rounds
rounds and each side's fastest round counts, since this host's speed drifts within minutes. Goal: >= 2x faster.

    python -m benchmarks.bench_ppo --trl-python /tmp/trlvenv/bin/python [--steps 6] [--rounds 3] [--dtypes fp32,bf16]

Without --trl-python only our side runs (a GPU machine, where TRL's venv cannot be built): --device cuda.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import qianwen
from benchmarks.common import write_result
from qianwen.config import preset
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer, qwen_vocabulary
from qianwen.train.ppo import load_config, ppo
from qianwen.train.reward import RewardModel, reward_export

QUESTIONS = [f"Tom has {a} apples and buys {a % 7 + 2} more. How many apples does he have now?" for a in range(3, 43)]


def export(out: Path, name: str) -> tuple[Path, Path, Tokenizer]:
    full = Tokenizer.from_file(qwen_vocabulary())
    tok = Tokenizer({b: r for b, r in full.ranks.items() if r < 8192 - 208})
    torch.manual_seed(0)
    config = preset(name, vocab_size=tok.vocab_size)
    model = Transformer(config)
    model.init_weights(0)
    qianwen.save(model, tok, out / "sft")
    rm = RewardModel(model, seed=1)
    state = {f"model.{k}": v for k, v in model.state_dict().items()} | {"score.weight": rm.score.weight.detach()}
    reward_export(config, tok, {"stage": "rm", "reward": {"mean": 0.0, "std": 1.0}})(state, out / "rm")
    return out / "sft", out / "rm", tok


def trl_steps(args, policy: Path, reward: Path, work: Path, tok: Tokenizer, dtype: str) -> list[float]:
    """TRL's seconds per step, from its own venv."""
    peer = subprocess.run(
        [
            args.trl_python, str(Path(__file__).with_name("trl_ppo_peer.py")),
            "--policy", str(policy), "--reward", str(reward), "--prompts", str(work / "ids.jsonl"),
            "--steps", str(args.steps), "--stop-id", str(tok.im_end_id), "--threads", str(args.threads),
            "--dtype", dtype,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if peer.returncode != 0:
        raise SystemExit(f"the TRL side failed:\n{peer.stderr[-3000:]}")
    return json.loads(peer.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", help="the Python of a venv with trl==0.11.4 (none: our side alone)")
    parser.add_argument("--model", default="tiny-10m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides; the fastest counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtypes", default="fp32,bf16", help="each side in each: fp32, or bf16 autocast")
    parser.add_argument("--device", default="cpu", help="where our side runs (TRL's always runs on the CPU)")
    parser.add_argument("--name", default="ppo", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, ratios = [], {}
    work = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    try:
        policy, reward, tok = export(work, args.model)
        (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
        ids = [tok.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
        (work / "ids.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
        timings: dict[str, dict[str, list[float]]] = {d: {"ours": [], "trl": []} for d in args.dtypes.split(",")}
        lengths: dict[str, float] = {}
        # The host's speed drifts by a quarter within minutes: the sides alternate, round after round, and each
        # side's fastest round counts (the least disturbed one).
        for round_ in range(args.rounds):
            for dtype, times in timings.items():
                overrides = [
                    f"policy={policy}", f"reward_model={reward}", f"prompts={work / 'prompts.jsonl'}",
                    f"out={work / f'ours-{dtype}-{round_}'}", f"steps={args.steps}", "prompts_per_step=8",
                    "samples_per_prompt=2", "max_new_tokens=48", "ppo_epochs=1", "minibatch_size=8",
                    "value_warmup_steps=0", "temperature=1.0", "top_p=1.0", "kl_coef=0.04", "lr=1e-5",
                    "value_lr=1e-5", "no_end_penalty=1.0", f"device={args.device}", f"dtype={dtype}",
                ]  # fmt: skip
                history = ppo(load_config(None, overrides))
                lengths[dtype] = history[-1]["response_length"]
                # The first step of each side pays for warm-up (allocations, first kernels): the median of the rest.
                times["ours"].append(statistics.median([r["seconds"] for r in history][1:]))
                if args.trl_python:
                    times["trl"].append(statistics.median(trl_steps(args, policy, reward, work, tok, dtype)[1:]))
                peer_text = f", TRL {times['trl'][-1]:.3f} s" if times["trl"] else ""
                print(f"round {round_ + 1} ({dtype}, {args.device}): qianwen {times['ours'][-1]:.3f} s{peer_text}")
        for dtype, times in timings.items():
            mine = min(times["ours"])
            rows.append(
                {
                    "impl": "qianwen ppo" + (f" ({args.device})" if args.device != "cpu" else ""), "dtype": dtype, "steps": args.steps,
                    "seconds_per_step": round(mine, 3), "rounds": [round(t, 3) for t in times["ours"]],
                    "reply_tokens": lengths[dtype],
                }
            )  # fmt: skip
            if times["trl"]:
                peer_s = min(times["trl"])
                ratios[dtype] = rows[-1]["speedup"] = round(peer_s / mine, 2)
                rows.append(
                    {
                        "impl": "trl 0.11.4 PPOv2Trainer", "dtype": dtype, "steps": args.steps,
                        "seconds_per_step": round(peer_s, 3), "rounds": [round(t, 3) for t in times["trl"]],
                    }
                )  # fmt: skip
                print(f"qianwen ppo ({dtype}): {ratios[dtype]:.2f}x TRL's step time")
            print(*(json.dumps(r) for r in rows[-2 if times["trl"] else -1 :]), sep="\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speedups = ", ".join(f"{ratio:.2f}x in {dtype}" for dtype, ratio in ratios.items())
    notes = (
        f"{args.model} with random weights, 16 replies x 48 tokens a step, one epoch in minibatches of 8, "
        f"{args.threads} torch thread(s), ours on {args.device}; median step time after the first, the fastest of "
        f"{args.rounds} alternating rounds per side; bf16 = autocast on both sides (TRL's bf16=True). "
        + (f"Speedup {speedups}." if ratios else "TRL not run (no --trl-python).")
    )
    write_result(args.name, rows, "python -m benchmarks.bench_ppo " + " ".join(sys.argv[1:]), notes)


if __name__ == "__main__":
    main()
