"""Model shapes: a dataclass for the architecture and the named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The architecture of QWEN_SPEC.md section 1, plus the inference-time
    long-context switches of section 2 (all inactive while training)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int | None = None  # None = multi-head (Qwen v1); fewer = GQA
    head_dim: int | None = None  # None = hidden_size // num_heads
    intermediate_size: int = 5504  # width of ONE SwiGLU branch (Qwen2 meaning)
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    seq_length: int = 2048  # training context; NTK and LogN key off this
    max_position_embeddings: int = 8192  # longest prompt + generation allowed
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    dropout: float = 0.0  # attention probabilities and residual branches
    initializer_range: float = 0.02
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    attention_windows: list[int] | None = field(default=None)  # per layer; None = full

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}; set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings.")
        if self.attention_windows is not None:
            self.attention_windows = [int(w) for w in self.attention_windows]
            if len(self.attention_windows) != self.num_layers:
                raise ValueError(
                    f"attention_windows has {len(self.attention_windows)} entries but the "
                    f"model has {self.num_layers} layers; give one window per layer."
                )
            if min(self.attention_windows) < 1:
                raise ValueError("every attention window must be at least 1 token.")

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * hd
        qkv += (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        layer = qkv + self.num_heads * hd * d + 3 * d * f + 2 * d
        embeddings = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


# Released Qwen v1 shapes (report Table 1 / public configs). intermediate_size is
# the per-branch width: the v1 config.json stores twice this number.
PRESETS: dict[str, ModelConfig] = {
    "qwen-1.8b": ModelConfig(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5504),
    "qwen-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008),
    "qwen-14b": ModelConfig(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13696),
    "qwen-72b": ModelConfig(
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        intermediate_size=24576,
        max_position_embeddings=32768,
    ),
    # Laptop sizes. The vocabulary is the tiny recipe's own BPE (8,192); a run
    # that uses another tokenizer overrides vocab_size. Parameter counts are at
    # that vocabulary.
    "tiny-1m": ModelConfig(
        vocab_size=8192,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=176,
        seq_length=256,
        max_position_embeddings=2048,
    ),
    "tiny-10m": ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        num_layers=6,
        num_heads=4,
        intermediate_size=704,
        seq_length=512,
        max_position_embeddings=4096,
    ),
    "tiny-40m": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        num_layers=10,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1408,
        seq_length=1024,
        max_position_embeddings=8192,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides)
