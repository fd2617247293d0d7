"""`qianwen ppo`: PPO-RLHF with the report's four models (QWEN_SPEC.md section 6).

The policy and a frozen reference start from the SFT model; the value model starts from the reward model
(its scalar head read at every token) and the frozen reward model scores whole replies. A step:
  1. sample `samples_per_prompt` replies to each of `prompts_per_step` prompts (top-p, KV-cached decoding);
  2. score them: the reward model at the last token, normalised by the statistics `qianwen rm` saved, minus
     `no_end_penalty` for a reply that never ends; per token, minus kl_coef times the KL estimate (k1 or
     k3) to the reference;
  3. GAE (gamma 1, lambda 0.95) over the reply tokens only, advantages whitened over the batch;
  4. `ppo_epochs` passes of minibatches: clipped policy loss (0.2) and clipped value loss (0.15), separate
     AdamW optimisers; for the first `value_warmup_steps` steps only the value model learns; with
     `ptx_coef` > 0, the pretraining loss on shards of `ptx_data` is added to the policy's (PPO-ptx).
Metrics per step go to `<out>/metrics/ppo.jsonl`; the policy is written to `<out>/ppo/` as a HF directory.
Every `save_every` steps the four models' trainable state (policy, value, both optimisers, the random streams
and the metrics so far) goes to `<out>/checkpoints/ppo/step-N`; `resume` continues from the newest, and since
each step's sampling is seeded by its number, a resumed run repeats the uninterrupted one. One process: PPO is
not sharded with FSDP yet.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import qianwen
from qianwen.config import apply_overrides, build, load_recipe
from qianwen.generate import generate
from qianwen.train.data import TokenShards, WindowSampler
from qianwen.train.loop import (
    TrainingError,
    hf_export,
    init_runtime,
    latest_checkpoint,
    rng_state,
    set_rng_state,
    write_model_dir,
)
from qianwen.train.ppo_math import gae, kl_estimate, masked_mean, masked_whiten, policy_loss, value_loss
from qianwen.train.reward import RewardModel, load_reward_model
from qianwen.util import atomic_write

RewardFn = Callable[[str, str, bool], float]  # (prompt text, reply text, ended) -> score


@dataclass
class PPOConfig:
    policy: str = ""  # the SFT model: policy and reference start here
    reward_model: str = ""  # `qianwen rm` output: frozen reward, and the value model's start
    prompts: str = ""  # JSONL of {"prompt": ...} or {"messages": [...]}
    out: str = "runs/ppo"
    steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.9
    kl_coef: float = 0.04
    kl_estimator: str = "k1"
    no_end_penalty: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.15
    ppo_epochs: int = 1
    minibatch_size: int = 8  # replies per optimiser step
    lr: float = 1e-6
    value_lr: float = 1e-5
    value_warmup_steps: int = 50
    ptx_coef: float = 0.0
    ptx_data: str = ""  # `qianwen data prep` shards for PPO-ptx
    grad_clip: float = 1.0
    save_every: int = 0  # steps between checkpoints (0: none)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ValueError(f"ppo.{name} is not set; pass {name}=PATH.")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}.")
        if self.ptx_coef and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx_data=DIR, a `qianwen data prep` output.")
        for name in (
            "steps",
            "prompts_per_step",
            "samples_per_prompt",
            "max_new_tokens",
            "ppo_epochs",
            "minibatch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.save_every < 0:
            raise ValueError(f"save_every must be 0 (no checkpoints) or more, got {self.save_every}.")


def load_config(recipe_path: str | None, overrides: list[str]) -> PPOConfig:
    recipe = apply_overrides(load_recipe(recipe_path), overrides, default_section="ppo")
    return build(PPOConfig, recipe.get("ppo", {}), "ppo")


def read_prompts(path: str | Path) -> list[list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist; pass prompts=FILE, a JSONL of {{'prompt': ...}}.")
    prompts, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            bad.append(number)
            continue
        prompts.append(messages)
    if bad:
        print(f"ppo: skipped {len(bad)} unusable line(s) of {path}, e.g. line {bad[0]}")
    if not prompts:
        raise ValueError(f"{path} holds no usable prompts.")
    return prompts


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, L] prompt + reply, right-padded
    mask: torch.Tensor  # [N, L-1] 1 where the target token (tokens[:, 1:]) belongs to the reply
    last: torch.Tensor  # [N] index in the targets of each reply's last token
    scores: torch.Tensor  # [N] raw reward
    ended: torch.Tensor  # [N] bool


def token_logprobs(model, tokens: torch.Tensor, mask: torch.Tensor, entropy: bool = False):
    """Log-probabilities of the target tokens [N, L-1] (0 off the reply), and their entropies if asked; the
    logits are made only at reply positions."""
    hidden = model.hidden_states(tokens[:, :-1])
    where = mask.bool()
    logits = model.lm_head(hidden[where]).float()
    logp_all = F.log_softmax(logits, dim=-1)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device)
    out[where] = logp_all.gather(1, tokens[:, 1:][where][:, None]).squeeze(1)
    if not entropy:
        return out
    ent = torch.zeros_like(out)
    ent[where] = -(logp_all.exp() * logp_all).sum(-1)
    return out, ent


def token_values(value_model: RewardModel, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = value_model.model.hidden_states(tokens[:, :-1])
    return value_model.score(hidden).squeeze(-1).float() * mask


class PPO:
    def __init__(self, config: PPOConfig, reward_fn: RewardFn | None = None):
        self.config = config
        self.runtime = init_runtime(config.device)
        if self.runtime.world > 1:
            raise ValueError("ppo runs in one process for now; start it without torchrun.")
        device = self.runtime.device
        self.policy, self.tokenizer = qianwen.load(config.policy, dtype=torch.float32, device=device)
        self.policy.requires_grad_(True)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.reward_fn = reward_fn
        if reward_fn is None:
            if not config.reward_model:
                raise ValueError("ppo.reward_model is not set; pass reward_model=DIR, a `qianwen rm` output.")
            self.reward, _, self.reward_stats = load_reward_model(config.reward_model, device=str(device))
            self.reward.requires_grad_(False)
            self.value = copy.deepcopy(self.reward)
        else:  # a programmatic reward: the value model starts from the policy with a fresh head
            self.reward, self.reward_stats = None, {"mean": 0.0, "std": 1.0}
            self.value = RewardModel(copy.deepcopy(self.policy), config.seed).to(device)
        self.value.requires_grad_(True)
        betas = (0.9, 0.95)
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=config.lr, betas=betas, weight_decay=0.0)
        self.value_opt = torch.optim.AdamW(self.value.parameters(), lr=config.value_lr, betas=betas, weight_decay=0.0)
        self.prompts = read_prompts(config.prompts)
        self.ptx = None
        if config.ptx_coef:
            shards = TokenShards(config.ptx_data, "train")
            self.ptx = WindowSampler(shards, self.policy.config.seq_length, seed=config.seed)
        self.metrics_path = Path(config.out) / "metrics" / "ppo.jsonl"

    # -- rollouts -------------------------------------------------------------

    def rollout(self, step: int) -> Rollout:
        config, tok, device = self.config, self.tokenizer, self.runtime.device
        rng = np.random.default_rng([config.seed, step])
        chosen = rng.choice(
            len(self.prompts), size=config.prompts_per_step, replace=len(self.prompts) < config.prompts_per_step
        )
        prompts = [tok.render_chat(self.prompts[i]) for i in chosen for _ in range(config.samples_per_prompt)]
        self.policy.eval()
        completions = generate(
            self.policy,
            tok,
            prompts,
            config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed * 100_003 + step,
            stop_ids=[tok.im_end_id],
        )
        ended = [c.finish_reason == "stop" for c in completions]
        rows = [p + c.token_ids + ([tok.im_end_id] if e else []) for p, c, e in zip(prompts, completions, ended)]
        length = max(map(len, rows))
        tokens = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length - 1))
        for r, (row, prompt) in enumerate(zip(rows, prompts)):
            tokens[r, : len(row)] = torch.tensor(row)
            mask[r, len(prompt) - 1 : len(row) - 1] = 1
        last = torch.tensor([len(row) - 2 for row in rows])
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.no_grad():
            if self.reward_fn is not None:
                texts = [tok.decode(p) for p in prompts]
                scores = torch.tensor(
                    [self.reward_fn(t, c.text, e) for t, c, e in zip(texts, completions, ended)], dtype=torch.float32
                )
            else:
                scores = self.reward(tokens, last.to(device) + 1, pairwise=False).cpu()
        return Rollout(tokens, mask, last, scores, torch.tensor(ended))

    # -- one step -------------------------------------------------------------

    def step(self, step: int) -> dict:
        config, device = self.config, self.runtime.device
        start = time.perf_counter()
        ro = self.rollout(step)
        mask = ro.mask
        with torch.no_grad():
            old_logp = token_logprobs(self.policy, ro.tokens, mask)
            ref_logp = token_logprobs(self.reference, ro.tokens, mask)
            self.value.eval()
            old_values = token_values(self.value, ro.tokens, mask)
            kl = kl_estimate(old_logp, ref_logp, config.kl_estimator) * mask
            normalised = (ro.scores - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-6)
            final = normalised - config.no_end_penalty * (~ro.ended).float()
            rewards = -config.kl_coef * kl
            rewards[torch.arange(len(mask)), ro.last.to(device)] += final.to(device)
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, mask)
        train_policy = step >= config.value_warmup_steps
        self.policy.train()
        self.value.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [], "entropy": []}
        order_rng = np.random.default_rng([config.seed, step, 1])
        for _ in range(config.ppo_epochs):
            order = torch.from_numpy(order_rng.permutation(len(mask)))
            for chunk in order.split(config.minibatch_size):
                m = mask[chunk]
                values = token_values(self.value, ro.tokens[chunk], m)
                v_loss = value_loss(values, old_values[chunk], returns[chunk], m, config.value_clip)
                self.value_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), config.grad_clip)
                self.value_opt.step()
                stats["value_loss"].append(v_loss.item())
                if not train_policy:
                    continue
                logp, entropy = token_logprobs(self.policy, ro.tokens[chunk], m, entropy=True)
                p_loss, clip_frac = policy_loss(logp, old_logp[chunk], advantages[chunk], m, config.clip)
                loss = p_loss + (config.ptx_coef * self._ptx_loss(step) if self.ptx else 0.0)
                if not torch.isfinite(loss):
                    raise TrainingError(f"the policy loss became {loss.item()} at step {step + 1}; lower lr.")
                self.policy_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), config.grad_clip)
                self.policy_opt.step()
                stats["policy_loss"].append(p_loss.item())
                stats["clip_frac"].append(clip_frac.item())
                stats["entropy"].append(masked_mean(entropy, m).item())
        lengths = mask.sum(1)
        record = {
            "step": step + 1,
            "reward": round(ro.scores.mean().item(), 6),
            "reward_normalised": round(final.mean().item(), 6),
            "kl": round((kl.sum(1)).mean().item(), 6),
            "response_length": round(lengths.mean().item(), 2),
            "ended_fraction": round(ro.ended.float().mean().item(), 4),
            "trained_policy": train_policy,
            "seconds": round(time.perf_counter() - start, 3),
        }
        record |= {k: round(float(np.mean(v)), 6) for k, v in stats.items() if v}
        return record

    def _ptx_loss(self, step: int) -> torch.Tensor:
        tokens = self.ptx.batch(step * self.config.minibatch_size, self.config.minibatch_size).to(self.runtime.device)
        logits = self.policy(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    # -- checkpoints ------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return Path(self.config.out) / "checkpoints" / "ppo"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.checkpoints, "state.pt")

    def save(self, step: int, history: list[dict]) -> Path:
        """The state after `step` steps, written whole (a `.tmp` directory renamed) before `latest` points at it."""
        name = f"step-{step:07d}"
        final, tmp = self.checkpoints / name, self.checkpoints / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {
            "step": step,
            "history": history,
            "policy": self.policy.state_dict(),
            "value": self.value.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "value_opt": self.value_opt.state_dict(),
            "rng": rng_state(),
        }
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(self.checkpoints / "latest", name)
        for old in self.checkpoints.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)  # one checkpoint is enough to resume; they are large
        return final

    def resume(self) -> tuple[int, list[dict]]:
        path = self.latest()
        state = torch.load(path / "state.pt", map_location=self.runtime.device, weights_only=False)
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.value_opt.load_state_dict(state["value_opt"])
        set_rng_state(state["rng"])
        print(f"ppo: resumed from {path} (step {state['step']})")
        return state["step"], state["history"]

    # -- the run ----------------------------------------------------------------

    def run(self, resume: bool = False) -> list[dict]:
        config = self.config
        if self.latest() is not None and not resume:
            raise ValueError(
                f"{self.checkpoints} already holds checkpoints; pass --resume to continue, or another out=."
            )
        start, history = (0, []) if self.latest() is None else self.resume()
        if start == 0:
            torch.manual_seed(config.seed)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "w", encoding="utf-8") as log:
            log.writelines(json.dumps(record) + "\n" for record in history)
            for step in range(start, config.steps):
                record = self.step(step)
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(
                    f"ppo step {record['step']}/{config.steps}: reward {record['reward']:.3f} "
                    f"kl {record['kl']:.3f} length {record['response_length']:.1f} ended {record['ended_fraction']:.2f}"
                )
                if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                    self.save(step + 1, history)
        out = Path(self.config.out) / "ppo"
        metadata = {"stage": "ppo", "config": asdict(self.config), "final": history[-1]}
        state = {f"model.{k}": v.detach().cpu() for k, v in self.policy.state_dict().items()}
        write_model_dir(out, lambda tmp: hf_export(self.policy.config, self.tokenizer, metadata)(state, tmp))
        atomic_write(Path(self.config.out) / "ppo" / "ppo_summary.json", json.dumps(history[-1], indent=2))
        print(f"ppo: wrote {out}")
        return history


def ppo(config: PPOConfig, reward_fn: RewardFn | None = None, resume: bool = False) -> list[dict]:
    return PPO(config, reward_fn).run(resume)
