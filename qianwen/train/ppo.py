"""`qianwen ppo`: PPO-RLHF with the report's four models (QWEN_SPEC.md section 6).

The policy and a frozen reference start from the SFT model; the value model starts from the reward model
(its scalar head read at every token) and the frozen reward model scores whole replies. A step:
  1. sample `samples_per_prompt` replies to each of `prompts_per_step` prompts (top-p, KV-cached decoding);
  2. score them: the reward model at the last token, normalised by the statistics `qianwen rm` saved (or, with
     `reward=checker`, 1 for a reply that ends and answers its prompt's `answer` as `qianwen.checks` judges,
     else 0), minus `no_end_penalty` for a reply that never ends; per token, minus kl_coef times the KL
     estimate (k1 or k3) to the reference;
  3. GAE (gamma 1, lambda 0.95) over the reply tokens only, advantages whitened over the batch;
  4. `ppo_epochs` passes of minibatches: clipped policy loss (0.2) and clipped value loss (0.15), separate
     AdamW optimisers; for the first `value_warmup_steps` steps only the value model learns; with
     `ptx_coef` > 0, the pretraining loss on `ptx_batch_size` new windows of `ptx_data` is added to the
     policy's at every update (PPO-ptx).
Metrics per step go to `<out>/metrics/ppo.jsonl`; the policy is written to `<out>/ppo/` as a HF directory.
Every `save_every` steps the four models' trainable state (policy, value, both optimisers, the random streams
and the metrics so far) goes to `<out>/checkpoints/ppo/step-N`; `resume` continues from the newest, and since
each step's sampling is seeded by its number, a resumed run repeats the uninterrupted one.

Under torchrun the four models are sharded with FSDP2 and each process samples and scores its share of the
step's prompts (prompts_per_step and minibatch_size divide by the number of processes). Whitening, the
losses' token means and the logged statistics are taken over the whole batch, so a step's update is that of
one process holding all of it. Each process samples from its own whole copy of the policy, refreshed from
the shards before every rollout: processes finish their replies after different numbers of tokens, which
sharded parameters (gathered in lockstep at every forward) would not allow.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import qianwen
from qianwen.checkpoint import require_language_model
from qianwen.checks import KINDS, check_answer
from qianwen.config import apply_overrides, build, load_recipe
from qianwen.generate import generate
from qianwen.train.data import TokenShards, WindowSampler
from qianwen.train.loop import (
    LoopConfig,
    TrainingError,
    autocast_dtype,
    hf_export,
    init_runtime,
    latest_checkpoint,
    prepare,
    rng_state,
    set_rng_state,
    shutdown,
    single_process_quiet,
    write_model_dir,
)
from qianwen.train.loss import CausalLM
from qianwen.train.ppo_math import gae, kl_estimate, masked_mean, masked_whiten, policy_loss, value_loss
from qianwen.train.ppo_rows import Layout, Rows
from qianwen.train.reward import RewardModel, load_reward_model
from qianwen.util import atomic_write

RewardFn = Callable[[str, str, bool], float]  # (prompt text, reply text, ended) -> score


@dataclass
class PPOConfig:
    policy: str = ""  # the SFT model: policy and reference start here
    reward_model: str = ""  # `qianwen rm` output: frozen reward, and the value model's start
    reward: str = "model"  # "model": the reward model scores replies; "checker": each prompt's `answer` is checked
    prompts: str = ""  # JSONL of {"prompt": ...} or {"messages": [...]}
    out: str = "runs/ppo"
    steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    share_prompt: bool = True  # a prompt's replies read as branches of one row, the prompt run once (ppo_rows)
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
    ptx_batch_size: int = 0  # pretraining windows per policy update (0 = minibatch_size)
    grad_clip: float = 1.0
    save_every: int = 0  # steps between checkpoints (0: none)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # as the training loop's: bf16 autocast on CUDA and AMX CPUs, else fp32; or fp32 / bf16

    def __post_init__(self) -> None:
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ValueError(f"ppo.{name} is not set; pass {name}=PATH.")
        if self.reward not in ("model", "checker"):
            raise ValueError(f"reward must be model or checker, got {self.reward!r}.")
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
        if self.ptx_batch_size < 0:
            raise ValueError(f"ptx_batch_size must be 0 (minibatch_size) or more, got {self.ptx_batch_size}.")
        # A negative KL coefficient would pay the policy to leave the reference, a clip of 0 would never update it.
        for name, low, high, closed in (
            ("kl_coef", 0, math.inf, True),
            ("ptx_coef", 0, math.inf, True),
            ("no_end_penalty", 0, math.inf, True),
            ("gamma", 0, 1, True),
            ("lam", 0, 1, True),
            ("clip", 0, math.inf, False),
            ("value_clip", 0, math.inf, False),
            ("lr", 0, math.inf, False),
            ("value_lr", 0, math.inf, False),
            ("grad_clip", 0, math.inf, False),
            ("temperature", 0, math.inf, True),  # 0: greedy rollouts (the torchrun test compares them)
            ("top_p", 0, 1, False),
        ):
            value = getattr(self, name)
            inside = (low <= value if closed else low < value) and value <= high
            if not inside:
                edge = f"at least {low}" if closed else f"more than {low}"
                upper = f" and at most {high}" if high != math.inf else ""
                raise ValueError(f"{name} must be {edge}{upper}, got {value}.")
        if self.save_every < 0:
            raise ValueError(f"save_every must be 0 (no checkpoints) or more, got {self.save_every}.")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}.")


def load_config(recipe_path: str | None, overrides: list[str]) -> PPOConfig:
    recipe = apply_overrides(load_recipe(recipe_path), overrides, default_section="ppo")
    return build(PPOConfig, recipe.get("ppo", {}), "ppo")


def read_prompts(path: str | Path) -> list[dict]:
    """The prompts of a JSONL file, each `{"messages": [...]}` plus the record's `answer`, `kind` and `lang` when
    it has them (what `reward=checker` checks a reply against)."""
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
        task = {k: record[k] for k in ("answer", "kind", "lang") if record.get(k) is not None}
        prompts.append({"messages": messages, "line": number, **task})
    if bad:
        print(f"ppo: skipped {len(bad)} unusable line(s) of {path}, e.g. line {bad[0]}")
    if not prompts:
        raise ValueError(f"{path} holds no usable prompts.")
    return prompts


def check_tasks(prompts: list[dict], path: str | Path) -> None:
    """reward=checker needs an answer on every prompt, and a kind the checker knows (arithmetic, filled in
    where a record names none)."""
    for prompt in prompts:
        prompt.setdefault("kind", "arithmetic")
        if "answer" not in prompt:
            raise ValueError(
                f"{path} line {prompt['line']} has no 'answer'; reward=checker checks each reply against its "
                "prompt's answer, so give every record one (or use reward=model)."
            )
        if prompt["kind"] not in KINDS:
            raise ValueError(
                f"{path} line {prompt['line']} has kind {prompt['kind']!r}, which no checker knows; "
                f"the kinds are: {', '.join(KINDS)}."
            )


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, L] prompt + reply, right-padded
    mask: torch.Tensor  # [N, L-1] 1 where the target token (tokens[:, 1:]) belongs to the reply
    last: torch.Tensor  # [N] index in the targets of each reply's last token
    scores: torch.Tensor  # [N] raw reward
    ended: torch.Tensor  # [N] bool
    layout: Layout  # what the models run to read the replies


class PolicyScorer(CausalLM):
    """The policy (or the frozen reference) as one module whose forward FSDP2 can gather for: the
    log-probabilities of the reply tokens, or without a mask the pretraining loss (PPO-ptx)."""

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, entropy: bool = False, rows: Rows | None = None
    ):
        """Log-probabilities of the target tokens [N, L-1] of the replies' rows `tokens` (0 off the reply), read by
        running `rows`, and their entropies if asked; the logits are made only at reply positions. Without a
        mask, the mean next-token loss of `tokens`."""
        if mask is None:
            return super().forward(tokens)
        where = mask.bool()
        hidden = rows.read(self.model.hidden_states(rows.ids, rows.tree), where)
        logp_all = F.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device)
        out[where] = logp_all.gather(1, tokens[:, 1:][where][:, None]).squeeze(1)
        if not entropy:
            return out
        ent = torch.zeros_like(out)
        ent[where] = -(logp_all.exp() * logp_all).sum(-1)
        return out, ent


def token_values(value_model: RewardModel, rows: Rows, mask: torch.Tensor) -> torch.Tensor:
    """The value before each target token [N, L-1] (0 off the reply)."""
    where = mask.bool()
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[where] = rows.read(value_model(rows.ids, None, mask=rows.tree), where)
    return out


def fill_rows(score: Callable, n: int, first: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """`score(rows)` for all n rows, except that the rows `first` take their outputs from `known` if given."""
    if known is None:
        return score(torch.arange(n))
    rest = torch.ones(n, dtype=torch.bool)
    rest[first] = False
    out = known.new_empty((n, *known.shape[1:]))
    out[first] = known.detach()
    if rest.any():
        out[rest] = score(rest.nonzero().squeeze(1))
    return out


class PPO:
    def __init__(self, config: PPOConfig, reward_fn: RewardFn | None = None):
        self.config = config
        self.runtime = runtime = init_runtime(config.device)
        for name in ("prompts_per_step", "minibatch_size", "ptx_batch_size"):
            if getattr(config, name) % runtime.world:
                raise ValueError(
                    f"{name}={getattr(config, name)} does not divide among {runtime.world} processes; "
                    f"make it a multiple of {runtime.world}."
                )
        device = runtime.device
        if reward_fn is not None and config.reward == "checker":
            raise ValueError("pass a reward function or reward=checker, not both.")
        k = config.samples_per_prompt
        self.share = config.share_prompt and k > 1 and (config.minibatch_size // runtime.world) % k == 0
        if config.share_prompt and k > 1 and not self.share and runtime.main:
            print(
                f"ppo: each prompt's replies run in rows of their own: a process's minibatch of "
                f"{config.minibatch_size // runtime.world} replies does not hold whole prompts' {k}"
            )
        self.prompts = read_prompts(config.prompts)
        if config.reward == "checker":
            check_tasks(self.prompts, config.prompts)
        torch.manual_seed(config.seed)
        require_language_model(config.policy)
        model, self.tokenizer = qianwen.load(config.policy, dtype=torch.float32, device=device)
        model.requires_grad_(True)
        shard = LoopConfig(dtype=config.dtype)
        self.autocast = autocast_dtype(shard, runtime)
        # Sampling needs whole parameters, in the training dtype: with one fp32 process the policy's own are;
        # otherwise a copy, refreshed every step. Decoding with bf16 weights, rather than under autocast (which
        # converts every weight at every step) or in fp32, cut the benchmark's bf16 step from 0.85 to 0.77 s.
        sample_dtype = self.autocast or torch.float32
        self.sampler = model
        if runtime.world > 1 or sample_dtype != torch.float32:
            self.sampler = copy.deepcopy(model).to(sample_dtype).requires_grad_(False).eval()
        self.reference = PolicyScorer(copy.deepcopy(model)).requires_grad_(False).eval()
        self.reward_fn = reward_fn
        if reward_fn is None and config.reward == "model":
            if not config.reward_model:
                raise ValueError("ppo.reward_model is not set; pass reward_model=DIR, a `qianwen rm` output.")
            self.reward, _, self.reward_stats = load_reward_model(config.reward_model, device=str(device))
            self.reward.requires_grad_(False).eval()
            self.value = copy.deepcopy(self.reward)
        else:  # a programmatic reward or the checker: the value model starts from the policy with a fresh head
            self.reward, self.reward_stats = None, {"mean": 0.0, "std": 1.0}
            self.value = RewardModel(copy.deepcopy(model), config.seed).to(device)
        self.value.requires_grad_(True)
        head = self.value.model.lm_head.weight
        if head is not self.value.model.embed.weight:
            head.requires_grad_(False)  # the value model reads its score head, never the output head
        self.policy = PolicyScorer(model)
        # Dropout makes a training forward differ from the evaluation one that old log-probabilities need.
        self.reuse_first = not (model.config.dropout or self.value.model.config.dropout)
        for module in (self.policy, self.reference, self.value, self.reward):
            if module is not None:
                prepare(module, shard, runtime)
        adam = {"betas": (0.9, 0.95), "weight_decay": 0.0, "fused": device.type in ("cuda", "cpu") or None}
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=config.lr, **adam)
        trainable = [p for p in self.value.parameters() if p.requires_grad]
        self.value_opt = torch.optim.AdamW(trainable, lr=config.value_lr, **adam)
        self.ptx = None
        if config.ptx_coef:
            shards = TokenShards(config.ptx_data, "train")
            self.ptx = WindowSampler(shards, model.config.seq_length, seed=config.seed)
        self.metrics_path = Path(config.out) / "metrics" / "ppo.jsonl"

    def cast(self):
        """The scoring and training passes run in the training dtype (log-probabilities, values and losses in
        fp32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over every process's share of the batch."""
        return self.runtime.sum(value)

    # -- rollouts -------------------------------------------------------------

    @torch.no_grad()
    def refresh_sampler(self) -> None:
        """Copy the policy's parameters into the sampler (gathering shards), parameter by parameter: 1.4 ms
        where a state dict through torch.distributed.checkpoint takes 32 ms at 10M parameters."""
        if self.sampler is self.policy.model:
            return
        for mine, theirs in zip(self.sampler.parameters(), self.policy.model.parameters(), strict=True):
            mine.copy_(theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs)

    def rollout(self, step: int) -> Rollout:
        config, tok, device, runtime = self.config, self.tokenizer, self.runtime.device, self.runtime
        rng = np.random.default_rng([config.seed, step])
        chosen = rng.choice(
            len(self.prompts), size=config.prompts_per_step, replace=len(self.prompts) < config.prompts_per_step
        )
        share = config.prompts_per_step // runtime.world
        mine = chosen[runtime.rank * share : (runtime.rank + 1) * share]
        tasks = [self.prompts[i] for i in mine for _ in range(config.samples_per_prompt)]
        prompts = [tok.render_chat(task["messages"]) for task in tasks]
        self.refresh_sampler()
        self.sampler.eval()
        completions = generate(
            self.sampler,
            tok,
            prompts,
            config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed * 100_003 + step + 7_919 * runtime.rank,
            stop_ids=[tok.im_end_id],
        )
        ended = [c.finish_reason == "stop" for c in completions]
        rows = [p + c.token_ids + ([tok.im_end_id] if e else []) for p, c, e in zip(prompts, completions, ended)]
        layout = Layout.build(rows, list(map(len, prompts)), config.samples_per_prompt, self.share, tok.pad_id)
        layout = layout.to(device)
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
            elif self.reward is None:  # reward=checker: 1 for a right reply that ends, else 0
                scores = torch.tensor(
                    [
                        float(e and check_answer(t["kind"], str(t["answer"]), c.text, t.get("lang")))
                        for t, c, e in zip(tasks, completions, ended)
                    ]
                )
            else:
                with self.cast():
                    whole = layout.rows
                    scores = self.reward(whole.ids, whole.last, pairwise=False, mask=whole.tree).cpu()
        return Rollout(tokens, mask, last, scores, torch.tensor(ended), layout)

    # -- one step -------------------------------------------------------------

    def step(self, step: int) -> dict:
        config, runtime = self.config, self.runtime
        device = runtime.device
        start = time.perf_counter()
        ro = self.rollout(step)
        mask = ro.mask
        seed = [config.seed, step, 1] + ([runtime.rank] if runtime.rank else [])
        order_rng = np.random.default_rng(seed)
        # Minibatches of whole rows: a shared prompt's replies are read together.
        k = ro.layout.per_row
        epochs = [
            [
                (groups[:, None] * k + torch.arange(k)).flatten()
                for groups in torch.from_numpy(order_rng.permutation(len(mask) // k)).split(
                    config.minibatch_size // runtime.world // k
                )
            ]
            for _ in range(config.ppo_epochs)
        ]
        read = ro.layout.select
        train_policy = step >= config.value_warmup_steps
        # The first minibatch's training forwards see the parameters before any update: without dropout their
        # outputs are its rows' old values and log-probabilities too, so those rows are not scored twice (the
        # benchmark's bf16 step: 0.775 against 0.801 s).
        first, first_values, first_policy = epochs[0][0], None, None
        self.policy.train(self.reuse_first)
        self.value.train(self.reuse_first)
        if self.reuse_first:
            with self.cast():
                first_values = token_values(self.value, read(first), mask[first])
                if train_policy:
                    first_policy = self.policy(ro.tokens[first], mask[first], entropy=True, rows=read(first))
        with torch.no_grad():
            with self.cast():
                old_values = fill_rows(
                    lambda rows: token_values(self.value, read(rows), mask[rows]), len(mask), first, first_values
                )
                old_logp = fill_rows(
                    lambda rows: self.policy(ro.tokens[rows], mask[rows], rows=read(rows)),
                    len(mask),
                    first,
                    first_policy[0] if first_policy is not None else None,
                )
                ref_logp = self.reference(ro.tokens, mask, rows=ro.layout.rows)
            kl = kl_estimate(old_logp, ref_logp, config.kl_estimator) * mask
            normalised = (ro.scores - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-6)
            final = normalised - config.no_end_penalty * (~ro.ended).float()
            rewards = -config.kl_coef * kl
            rewards[torch.arange(len(mask)), ro.last.to(device)] += final.to(device)
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, mask, total=self.total)
        self.policy.train()
        self.value.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [], "entropy": []}
        for epoch, chunks in enumerate(epochs):
            for k, chunk in enumerate(chunks):
                m = mask[chunk]
                # A process's token means divide by the whole minibatch's tokens (over the processes, whose
                # gradients FSDP averages), so every reply token weighs the same wherever it was sampled.
                count = self.total(m.sum()) / runtime.world
                head = epoch == 0 and k == 0
                if head and first_values is not None:
                    values = first_values
                else:
                    with self.cast():
                        values = token_values(self.value, read(chunk), m)
                v_loss = value_loss(values, old_values[chunk], returns[chunk], m, config.value_clip, count)
                self.value_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), config.grad_clip)
                self.value_opt.step()
                stats["value_loss"].append(runtime.mean(v_loss.detach()).item())
                if not train_policy:
                    continue
                if head and first_policy is not None:
                    logp, entropy = first_policy
                else:
                    with self.cast():
                        logp, entropy = self.policy(ro.tokens[chunk], m, entropy=True, rows=read(chunk))
                p_loss, clip_frac = policy_loss(logp, old_logp[chunk], advantages[chunk], m, config.clip, count)
                update = epoch * len(chunks) + k
                loss = p_loss + (
                    config.ptx_coef * self._ptx_loss(step, update, len(epochs) * len(chunks)) if self.ptx else 0.0
                )
                if not torch.isfinite(runtime.sum(loss.detach())):
                    raise TrainingError(f"the policy loss became {loss.item()} at step {step + 1}; lower lr.")
                self.policy_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), config.grad_clip)
                self.policy_opt.step()
                stats["policy_loss"].append(runtime.mean(p_loss.detach()).item())
                stats["clip_frac"].append(runtime.mean(clip_frac).item())
                stats["entropy"].append(runtime.mean(masked_mean(entropy.detach(), m, count)).item())

        # Every process holds as many replies, so the mean of the processes' means is the batch's.
        def batch_mean(x: torch.Tensor) -> float:
            return runtime.mean(x.float().mean().to(device)).item()

        record = {
            "step": step + 1,
            "reward": round(batch_mean(ro.scores), 6),
            "reward_normalised": round(batch_mean(final), 6),
            "kl": round(batch_mean(kl.sum(1)), 6),
            "response_length": round(batch_mean(mask.sum(1)), 2),
            "ended_fraction": round(batch_mean(ro.ended), 4),
            "trained_policy": train_policy,
            "seconds": round(time.perf_counter() - start, 3),
        }
        record |= {k: round(float(np.mean(v)), 6) for k, v in stats.items() if v}
        return record

    def _ptx_loss(self, step: int, update: int, updates: int) -> torch.Tensor:
        """The pretraining loss on this process's share of `ptx_batch_size` windows, new ones for every update."""
        rows = (self.config.ptx_batch_size or self.config.minibatch_size) // self.runtime.world
        index = ((step * updates + update) * self.runtime.world + self.runtime.rank) * rows
        with self.cast():
            return self.policy(self.ptx.batch(index, rows).to(self.runtime.device))

    # -- checkpoints ------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return Path(self.config.out) / "checkpoints" / "ppo"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.checkpoints, "trainer.json")

    def _pairs(self) -> dict:
        return {"policy": (self.policy, self.policy_opt), "value": (self.value, self.value_opt)}

    def _state(self, stepped: list[str]) -> dict:
        """The models' state dicts, and the optimisers' of the models in `stepped` (those that have taken a step).
        An optimiser that has not (the policy's, during the value warm-up) stays out: torch's get_state_dict would
        give it state with a step at rate 0, which moves Adam's bias correction, and the run would then depend on
        when checkpoints were written."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        state = {}
        for name, (model, optimizer) in self._pairs().items():
            if name in stepped:
                state[name], state[f"{name}_opt"] = get_state_dict(model, optimizer)
            else:
                state[name] = get_model_state_dict(model)
        return state

    def save(self, step: int, history: list[dict]) -> Path:
        """The trainable state after `step` steps (the policy, the value model and their optimisers, through
        torch.distributed.checkpoint so any number of processes can load it) and each process's random
        streams, written whole (a `.tmp` directory renamed) before `latest` points at it."""
        from torch.distributed.checkpoint import save as dcp_save

        runtime = self.runtime
        name = f"step-{step:07d}"
        final, tmp = self.checkpoints / name, self.checkpoints / f"{name}.tmp"
        if runtime.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        runtime.barrier()
        stepped = [name for name, (_, optimizer) in self._pairs().items() if optimizer.state]
        with single_process_quiet():
            dcp_save(self._state(stepped), checkpoint_id=tmp / "state")
        torch.save(rng_state(), tmp / f"rng-{runtime.rank}.pt")
        runtime.barrier()
        if runtime.main:
            trainer = {"stage": "ppo", "step": step, "world_size": runtime.world, "history": history}
            trainer["stepped"] = stepped
            atomic_write(tmp / "trainer.json", json.dumps(trainer))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            atomic_write(self.checkpoints / "latest", name)
            for old in self.checkpoints.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)  # one checkpoint is enough to resume; they are large
        runtime.barrier()
        return final

    def resume(self) -> tuple[int, list[dict]]:
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        path = self.latest()
        trainer = json.loads((path / "trainer.json").read_text())
        stepped = trainer.get("stepped", list(self._pairs()))
        state = self._state(stepped)
        with single_process_quiet():
            dcp_load(state, checkpoint_id=path / "state")
        for name, (model, optimizer) in self._pairs().items():
            if name in stepped:
                set_state_dict(model, optimizer, model_state_dict=state[name], optim_state_dict=state[f"{name}_opt"])
            else:
                set_model_state_dict(model, state[name])
        rng = path / f"rng-{self.runtime.rank}.pt"
        if rng.is_file():  # a process that did not exist then keeps its seed
            set_rng_state(torch.load(rng, weights_only=False))
        if self.runtime.main:
            print(f"ppo: resumed from {path} (step {trainer['step']})")
        return trainer["step"], trainer["history"]

    # -- the run ----------------------------------------------------------------

    def run(self, resume: bool = False) -> list[dict]:
        config, runtime = self.config, self.runtime
        if self.latest() is not None and not resume:
            raise ValueError(
                f"{self.checkpoints} already holds checkpoints; pass --resume to continue, or another out=."
            )
        start, history = (0, []) if self.latest() is None else self.resume()
        if start == 0:
            torch.manual_seed(config.seed)
        log = None
        if runtime.main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.metrics_path, "w", encoding="utf-8")
            log.writelines(json.dumps(record) + "\n" for record in history)
        try:
            for step in range(start, config.steps):
                record = self.step(step)
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    print(
                        f"ppo step {record['step']}/{config.steps}: reward {record['reward']:.3f} kl {record['kl']:.3f} "
                        f"length {record['response_length']:.1f} ended {record['ended_fraction']:.2f}"
                    )
                if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                    self.save(step + 1, history)
        finally:
            if log:
                log.close()
        self.export(history)
        return history

    def export(self, history: list[dict]) -> None:
        """The policy as a HF directory: gathered whole, written by the first process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.runtime.main:
            return
        out = Path(self.config.out) / "ppo"
        metadata = {"stage": "ppo", "config": asdict(self.config), "final": history[-1]}
        export = hf_export(self.policy.model.config, self.tokenizer, metadata)
        write_model_dir(out, lambda tmp: export(state, tmp))
        atomic_write(out / "ppo_summary.json", json.dumps(history[-1], indent=2))
        print(f"ppo: wrote {out}")


def ppo(config: PPOConfig, reward_fn: RewardFn | None = None, resume: bool = False) -> list[dict]:
    """Train; returns the metrics records. Every process of a torchrun job calls this."""
    trainer = PPO(config, reward_fn)
    try:
        return trainer.run(resume)
    finally:
        shutdown(trainer.runtime)
