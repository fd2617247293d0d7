"""qianwen: the whole Qwen recipe in one readable PyTorch codebase."""

from __future__ import annotations

import os

import torch

from qianwen.checkpoint import CheckpointError, load_model, save_model, write_generation_config
from qianwen.config import PRESETS, ModelConfig, preset
from qianwen.generate import Completion, generate, stream
from qianwen.model import KVCache, Transformer
from qianwen.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Completion",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "generate",
    "load",
    "preset",
    "save",
    "stream",
]  # fmt: skip


def load(
    model_dir: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Transformer, Tokenizer]:
    """Model (eval mode) and tokenizer from a qianwen, Hugging Face Qwen2 or Qwen v1 directory."""
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype) or getattr(
            torch, dtype
        )
    model = load_model(model_dir, dtype=dtype, device=device)
    return model, Tokenizer.from_file(model_dir)


def save(model: Transformer, tokenizer: Tokenizer, out_dir: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a Hugging Face Qwen2 directory that transformers loads as is."""
    save_model(model, out_dir, metadata)
    tokenizer.save(out_dir, model_max_length=model.config.max_position_embeddings)
    write_generation_config(out_dir, tokenizer.chat_stop_ids[:1] + [tokenizer.eod_id], tokenizer.pad_id)
