"""`qianwen sft`: supervised fine-tuning on ChatML conversations, through the same loop as pretraining.

Data: JSONL, one `{"messages": [{"role", "content"}, ...]}` per line (OpenAI style). Each conversation is
rendered in ChatML (QWEN_SPEC.md section 4; the default system prompt first when there is none) with the
loss mask of Qwen's public fine-tuning script: every turn keeps labels on `<|im_start|>`, `<|im_end|>` and
the "\n" after it; the role word and its "\n" are masked; system and user content are masked; assistant
content is trained. Batches group conversations of similar length (right-padded, padding masked), so a
causal model never attends to padding and no conversation sees another. Lines that cannot be used (bad
JSON, bad messages, no assistant reply, longer than the context) are counted and reported, never dropped
silently. The result is `<out>/sft/`, a Hugging Face directory.

LoRA (`lora=true`, through peft): low-rank adapters on the attention and MLP projections (the public
script's c_attn, c_proj, w1, w2 are our qkv, proj, gate_up, down), everything else frozen; checkpoints hold
the adapters beside the frozen weights, and every exported directory (sft/ included) has them merged in, so
it loads anywhere a Qwen2 model does. Default lr: 1e-5 for full fine-tuning, 3e-4 with LoRA (QWEN_SPEC.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import qianwen
from qianwen.checkpoint import require_language_model
from qianwen.config import apply_overrides, build, load_recipe
from qianwen.tokenizer import Tokenizer
from qianwen.train.loop import LoopConfig, Runtime, Stage, Trainer, hf_export, init_runtime, shutdown
from qianwen.train.loss import IGNORE, CausalLM
from qianwen.train.records import Skip, read_records

GROUP_BATCHES = 64  # length grouping sorts this many batches' worth of conversations at a time


@dataclass
class SFTConfig(LoopConfig):
    model: str = ""  # the model to fine-tune: a qianwen, Hugging Face Qwen2 or Qwen v1 directory
    data: str = ""  # JSONL of {"messages": [...]}
    out: str = "runs/sft"  # writes sft/, checkpoints/sft/, metrics/sft.jsonl
    batch_size: int = 8  # conversations per micro-batch per process
    seq_length: int = 0  # longest conversation in tokens; 0 = the model's seq_length
    val_fraction: float = 0.05  # every n-th conversation is held out for the validation loss
    eval_batches: int = 4
    dropout: float = 0.0  # the report's SFT used 0.1
    loss: str = "auto"
    lr: float = 0.0  # 0 = the public script's default: 1e-5 full, 3e-4 LoRA
    warmup_steps: int = 10
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "gate_up", "down"])

    def __post_init__(self) -> None:
        if self.lr == 0:
            self.lr = 3e-4 if self.lora else 1e-5
        super().__post_init__()
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"sft.{name} is not set; pass {name}=PATH.")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.dropout < 1:
            raise ValueError("val_fraction and dropout must be in [0, 1).")
        if self.lora and self.lora_r < 1:
            raise ValueError(f"lora_r (the adapters' rank) must be at least 1, got {self.lora_r}.")


def load_config(recipe_path: str | None, overrides: list[str]) -> SFTConfig:
    recipe = apply_overrides(load_recipe(recipe_path), overrides, default_section="sft")
    return build(SFTConfig, recipe.get("sft", {}), "sft")


def chat_labels(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Input ids and labels (IGNORE where not trained) of one conversation, by the mask of QWEN_SPEC.md
    section 4. Every turn, the last included, ends with <|im_end|> and "\n"."""
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    labels: list[int] = []
    for role, content in tokenizer.chat_turns(messages):
        head = [tokenizer.im_start_id, *tokenizer.encode(role), *nl]
        body = tokenizer.encode(content)
        tail = [tokenizer.im_end_id, *nl]
        ids += head + body + tail
        kept = body if role == "assistant" else [IGNORE] * len(body)
        labels += [tokenizer.im_start_id] + [IGNORE] * (len(head) - 1) + kept + tail
    return ids, labels


@dataclass
class Conversations:
    ids: list[list[int]]
    labels: list[list[int]]
    lines: int
    skipped: dict[str, int]
    examples: list[str]  # "file:line: reason" of the first few skipped


def read_conversations(path: str | Path, tokenizer: Tokenizer, max_tokens: int) -> Conversations:
    def convert(record: object) -> tuple[list[int], list[int]]:
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise Skip("no messages", "no 'messages' list")
        try:
            ids, labels = chat_labels(tokenizer, messages)
        except ValueError as exc:
            raise Skip("bad message", str(exc)) from None
        if all(label == IGNORE for label in labels[1:]) or messages[-1].get("role") != "assistant":
            raise Skip("no assistant reply", "does not end with an assistant reply to learn")
        if len(ids) > max_tokens:
            raise Skip("too long", f"{len(ids)} tokens, more than seq_length {max_tokens}")
        return ids, labels

    read = read_records(path, convert, "pass data=FILE, a JSONL of {'messages': [...]}.")
    ids = [i for i, _ in read.items]
    return Conversations(ids, [labels for _, labels in read.items], read.lines, read.skipped, read.examples)


class LengthGroupedBatches:
    """Batches of conversations of similar length, a fresh grouping each epoch, a pure function of
    (seed, batch index): resuming and any number of processes read the same batches."""

    def __init__(self, data: Conversations, indices: list[int], batch_size: int, pad_id: int, seed: int):
        if not indices:
            raise ValueError("no usable conversations to train on; check the data (see the skipped counts).")
        self.data, self.indices, self.batch_size, self.pad_id, self.seed = data, indices, batch_size, pad_id, seed
        self.per_epoch = math.ceil(len(indices) / batch_size)
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.indices[i] for i in rng.permutation(len(self.indices))]
        group = self.batch_size * GROUP_BATCHES
        batches = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: len(self.data.ids[i]), reverse=True)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def get(self, index: int, shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if not shuffle:
            members = self.indices[position * self.batch_size : (position + 1) * self.batch_size]
        else:
            if epoch != self._epoch:
                self._batches, self._epoch = self._plan(epoch), epoch
            members = self._batches[position]
        length = max(len(self.data.ids[i]) for i in members)
        ids = torch.full((len(members), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(members), length), IGNORE, dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, : len(self.data.ids[i])] = torch.tensor(self.data.ids[i])
            labels[row, : len(self.data.labels[i])] = torch.tensor(self.data.labels[i])
        return ids, labels


def sft(config: SFTConfig, resume: bool = False) -> list[dict]:
    """Fine-tune; returns this process's metrics records. Every process of a torchrun job calls this."""
    require_language_model(config.model)
    model, tokenizer = qianwen.load(config.model, dtype=torch.float32)
    model.requires_grad_(True)  # loaded for inference
    model.config.dropout = config.dropout
    max_tokens = config.seq_length or model.config.seq_length
    data = read_conversations(config.data, tokenizer, max_tokens)
    every = round(1 / config.val_fraction) if config.val_fraction else 0
    val = [i for i in range(len(data.ids)) if every and i % every == every - 1]
    train = [i for i in range(len(data.ids)) if not (every and i % every == every - 1)]
    runtime = init_runtime(config.device)
    try:
        return _sft(config, model, tokenizer, data, train, val, runtime, resume)
    finally:
        shutdown(runtime)


def _sft(config, model, tokenizer, data, train, val, runtime: Runtime, resume: bool) -> list[dict]:
    batches = LengthGroupedBatches(data, train, config.batch_size, tokenizer.pad_id, config.seed)
    world = runtime.world

    def batch(step: int, micro: int):
        ids, labels = batches.get((step * config.grad_accum + micro) * world + runtime.rank)
        return ids.to(runtime.device), labels.to(runtime.device)

    metadata = {
        "stage": "sft",
        "base": str(Path(config.model).resolve()),
        "data": str(Path(config.data).resolve()),
        "conversations": {"lines": data.lines, "train": len(train), "val": len(val), "skipped": data.skipped},
        "config": asdict(config),
    }
    if config.lora:
        export = merged_export(model.config, tokenizer, metadata, add_lora(model, config))
    else:
        export = hf_export(model.config, tokenizer, metadata)
    lm = CausalLM(model, config.loss)
    evaluate = _evaluator(lm, data, val, tokenizer, config, runtime) if val else None
    stage = Stage(
        name="sft",
        module=lm,
        batch=batch,
        export=export,
        evaluate=evaluate,
    )
    trainer = Trainer(stage, config, Path(config.out), runtime)
    if runtime.main:
        skipped = ", ".join(f"{n} {reason}" for reason, n in data.skipped.items()) or "none"
        print(
            f"sft: {len(train):,} conversations to train on and {len(val):,} held out, from {data.lines:,} lines "
            f"(skipped: {skipped}); {batches.per_epoch:,} batches per epoch"
        )
        for example in data.examples:
            print(f"sft: skipped {example}")
    history = trainer.fit(resume=resume)
    if runtime.main:
        print(f"sft: wrote {trainer.publish(Path(config.out) / 'sft')}")
    return history


def add_lora(model, config: SFTConfig):
    """Wrap the target projections of `model` in place with LoRA adapters; only they stay trainable."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError:
        raise ValueError("lora=true needs peft; install it with `pip install 'qianwen[lora]'`.") from None
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
    )
    LoraModel(model, lora, "default")
    return lora


def merged_export(model_config, tokenizer, metadata: dict, lora):
    """A Stage.export for a LoRA model: the adapters merged into a plain Transformer, written as HF."""

    def export(state: dict, directory: Path) -> None:
        from peft.tuners.lora import LoraModel

        model = qianwen.Transformer(model_config)
        wrapped = LoraModel(model, copy.deepcopy(lora), "default")
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        meta = {**metadata, "lora": {"r": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)}}
        qianwen.save(wrapped.merge_and_unload(), tokenizer, directory, meta)

    return export


def _evaluator(lm: CausalLM, data: Conversations, val: list[int], tokenizer, config: SFTConfig, runtime: Runtime):
    """Mean loss over the trained tokens of the held-out conversations (the same count on every process)."""
    batches = LengthGroupedBatches(data, val, config.batch_size, tokenizer.pad_id, seed=0)
    per_process = min(config.eval_batches, batches.per_epoch // runtime.world)
    if per_process == 0:
        return None

    def evaluate() -> dict:
        total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        for b in range(per_process):
            ids, labels = batches.get(b * runtime.world + runtime.rank, shuffle=False)
            ids, labels = ids.to(runtime.device), labels.to(runtime.device)
            losses = lm(ids, labels, per_token=True).double()
            trained = labels[:, 1:] != IGNORE
            total += torch.stack([losses[trained].sum(), trained.sum().double()])
        total = runtime.sum(total)
        return {"val_loss": round((total[0] / total[1]).item(), 6)}

    return evaluate
