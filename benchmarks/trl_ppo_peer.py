"""The peer side of benchmarks/bench_ppo.py: TRL's four-model PPO (`PPOv2Trainer` of trl 0.11.4, the last
release that also kept the older `PPOTrainer`) on a policy, a reward model and tokenized prompts that
bench_ppo.py wrote. Run by bench_ppo.py with the Python of a separate virtual environment (trl 0.11 needs
transformers 4.46); prints one JSON line with the seconds of each PPO update.

    /path/to/trl-venv/bin/python benchmarks/trl_ppo_peer.py --policy DIR --reward DIR --prompts FILE ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import PPOv2Config, PPOv2Trainer


class StepTimes(TrainerCallback):
    def __init__(self):
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL of {'input_ids': [...]}")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16, help="replies per PPO update")
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--stop-id", type=int, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: TRL's bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    rows = [json.loads(line) for line in open(args.prompts)]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    policy = AutoModelForCausalLM.from_pretrained(args.policy, torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.policy, torch_dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, torch_dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, torch_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        config = PPOv2Config(
            output_dir=out,
            # TRL's batch of one update is per_device_train_batch_size (a minibatch) x num_mini_batches.
            per_device_train_batch_size=args.minibatch,
            num_mini_batches=args.batch // args.minibatch,
            num_ppo_epochs=1,
            response_length=args.response_length,
            total_episodes=args.batch * args.steps,
            temperature=1.0,
            kl_coef=0.04,
            cliprange=0.2,
            cliprange_value=0.15,
            learning_rate=1e-5,
            stop_token_id=args.stop_id,
            missing_eos_penalty=1.0,
            local_rollout_forward_batch_size=args.batch,
            num_sample_generations=0,
            report_to="none",
            save_strategy="no",
            logging_steps=10**9,
            use_cpu=True,
            bf16=args.dtype == "bf16",
            seed=0,
        )
        times = StepTimes()
        trainer = PPOv2Trainer(
            config=config,
            tokenizer=tok,
            policy=policy,
            ref_policy=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            callbacks=[times],
        )
        times.stamps = [time.perf_counter()]
        trainer.train()
    steps = [b - a for a, b in zip(times.stamps, times.stamps[1:])]
    print(json.dumps({"seconds": steps}))


if __name__ == "__main__":
    main()
