"""`qianwen pretrain`: next-token training on the token shards of `qianwen data prep`.

The recipe's [model] section picks a preset and changes any of its fields; [pretrain] holds the loop's
settings (LoopConfig) and the ones below. The vocabulary comes from the data: the model gets the data's
vocabulary size rounded up to a multiple of 64 (as Qwen pads 151,851 ids to 151,936) unless [model] says
otherwise. The result is `<out>/base/`, a Hugging Face Qwen2 directory with the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qianwen.config import ModelConfig, apply_overrides, build, load_recipe, preset
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer
from qianwen.train.data import TokenShards, WindowSampler
from qianwen.train.loop import (
    LoopConfig,
    Runtime,
    Stage,
    Trainer,
    hf_export,
    init_runtime,
    optimizer_name,
    shutdown,
    train_flops_per_token,
)
from qianwen.train.loss import CausalLM


@dataclass
class PretrainConfig(LoopConfig):
    data: str = ""  # a `qianwen data prep` output directory
    out: str = "runs/pretrain"  # writes base/, checkpoints/pretrain/, metrics/pretrain.jsonl
    batch_size: int = 8  # sequences per micro-batch per process
    seq_length: int = 0  # 0 = the model's seq_length
    eval_batches: int = 8  # validation batches per process per evaluation
    loss: str = "auto"  # auto | fused | plain; auto = fused from a 32k vocabulary up
    pad_vocab_to: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ValueError("pretrain.data is not set; pass data=DIR, a `qianwen data prep` output directory.")
        if self.loss not in ("auto", "fused", "plain"):
            raise ValueError(f"loss must be auto, fused or plain, got {self.loss!r}.")
        for name in ("batch_size", "eval_batches", "pad_vocab_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


def load_config(recipe_path: str | None, overrides: list[str]) -> tuple[PretrainConfig, dict]:
    """The [pretrain] settings and the [model] section (preset + field changes) of a recipe."""
    recipe = apply_overrides(load_recipe(recipe_path), overrides, default_section="pretrain")
    config = build(PretrainConfig, recipe.get("pretrain", {}), "pretrain")
    return config, dict(recipe.get("model", {}))


def model_config(model_section: dict, shards: TokenShards, config: PretrainConfig) -> ModelConfig:
    section = dict(model_section)
    name = section.pop("preset", "tiny-10m")
    if "vocab_size" not in section:
        section["vocab_size"] = math.ceil(shards.vocab_size / config.pad_vocab_to) * config.pad_vocab_to
    if config.seq_length:
        section["seq_length"] = config.seq_length
    result = preset(name, **section)
    if result.vocab_size < shards.vocab_size:
        raise ValueError(
            f"model.vocab_size {result.vocab_size} is smaller than the data's vocabulary ({shards.vocab_size} ids); "
            "drop the override or raise it."
        )
    if result.seq_length > result.max_position_embeddings:
        raise ValueError(
            f"seq_length {result.seq_length} exceeds max_position_embeddings {result.max_position_embeddings}; "
            "lower one or raise the other."
        )
    return result


def bytes_per_token(tokenizer: Tokenizer, rows: int) -> torch.Tensor:
    """UTF-8 bytes each id stands for; 0 for special tokens and padded rows, which bits per byte leaves out."""
    sizes = [0 if tokenizer.is_special(i) else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(sizes + [0] * (rows - len(sizes)), dtype=torch.float64)


def pretrain(config: PretrainConfig, model_section: dict, resume: bool = False) -> list[dict]:
    """Train; returns this process's metrics records. Every process of a torchrun job calls this."""
    train = TokenShards(config.data, "train")
    val = TokenShards(config.data, "val")
    tokenizer_dir = Path(train.tokenizer_dir)
    if not tokenizer_dir.exists():
        raise ValueError(
            f"the data's tokenizer {tokenizer_dir} does not exist; re-run `qianwen data prep` with a tokenizer."
        )
    tokenizer = Tokenizer.from_file(tokenizer_dir)
    mconfig = model_config(model_section, train, config)
    runtime = init_runtime(config.device)
    try:
        return _pretrain(config, mconfig, train, val, tokenizer, runtime, resume)
    finally:
        shutdown(runtime)


def _pretrain(config, mconfig, train, val, tokenizer, runtime: Runtime, resume: bool) -> list[dict]:
    T, B, world = mconfig.seq_length, config.batch_size, runtime.world
    sampler = WindowSampler(train, T, seed=config.seed)
    model = Transformer(mconfig)
    model.init_weights(seed=config.seed)
    lm = CausalLM(model, config.loss)
    per_step = B * config.grad_accum * world  # sequences per optimizer step, all processes together

    def batch(step: int, micro: int) -> torch.Tensor:
        first = step * per_step + (micro * world + runtime.rank) * B
        return sampler.batch(first, B).to(runtime.device, non_blocking=True)

    evaluate = _evaluator(lm, val, tokenizer, mconfig, config, runtime)
    run_dir = Path(config.out)
    metadata = {"stage": "pretrain", "data": str(Path(config.data).resolve()), "config": asdict(config)}
    metadata["optimizer"] = optimizer_name(config, runtime)

    stage = Stage(
        name="pretrain",
        module=lm,
        batch=batch,
        export=hf_export(mconfig, tokenizer, metadata),
        tokens_per_step=per_step * T,
        flops_per_token=train_flops_per_token(mconfig, T),
        evaluate=evaluate,
    )
    trainer = Trainer(stage, config, run_dir, runtime)
    if runtime.main:
        entropy = train.unigram_entropy()
        print(
            f"pretrain: {mconfig.num_params / 1e6:.1f}M parameters, {train.num_tokens:,} training tokens "
            f"({sampler.num_windows:,} windows of {T}), {per_step * T:,} tokens per step on {world} process(es); "
            f"unigram entropy of the data {entropy:.3f} nats/token"
        )
        metadata["unigram_entropy"] = round(entropy, 4)
    history = trainer.fit(resume=resume)
    if runtime.main:
        print(f"pretrain: wrote {trainer.publish(run_dir / 'base')}")
    return history


def _evaluator(lm: CausalLM, val: TokenShards, tokenizer, mconfig, config, runtime: Runtime):
    """Validation loss and bits per byte on the first windows of the validation split (every process
    takes every world-th window, the same number each, as FSDP needs all of them in every forward)."""
    if val.num_tokens <= mconfig.seq_length:
        if runtime.main:
            print(f"pretrain: the validation split has {val.num_tokens} tokens, under one window; no evaluation.")
        return None
    sampler = WindowSampler(val, mconfig.seq_length, seed=0, shuffle=False)
    per_process = min(config.eval_batches * config.batch_size, sampler.num_windows // runtime.world)
    if per_process == 0:
        return None
    sizes = bytes_per_token(tokenizer, mconfig.vocab_size).to(runtime.device)

    def evaluate() -> dict:
        nats = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # all targets, byte-bearing targets
        counts = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # targets, bytes
        for start in range(0, per_process, config.batch_size):
            rows = range(start, min(per_process, start + config.batch_size))
            tokens = torch.cat([sampler.batch(i * runtime.world + runtime.rank, 1) for i in rows]).to(runtime.device)
            losses = lm(tokens, per_token=True).double()
            nbytes = sizes[tokens[:, 1:]]
            nats += torch.stack([losses.sum(), (losses * (nbytes > 0)).sum()])
            counts += torch.stack([torch.tensor(losses.numel(), device=runtime.device), nbytes.sum()])
        nats, counts = runtime.sum(nats), runtime.sum(counts)
        return {
            "val_loss": round((nats[0] / counts[0]).item(), 6),
            "val_bpb": round((nats[1] / math.log(2) / counts[1]).item(), 6),
        }

    return evaluate
