"""Model shapes (a dataclass for the architecture, the named presets) and recipes (TOML + overrides)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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


# ---------------------------------------------------------------------------
# Recipes: TOML files of sections, one dataclass per section, `key=value` overrides from the command line.
# A whole-run recipe holds the sections of every stage; each command reads its own and checks every key,
# so a misspelt key is an error naming the valid ones, never silently ignored.

SECTIONS = ("run", "model", "tokenizer", "data", "pretrain", "tasks", "sft", "rm", "ppo", "eval")


def read_toml(path: str | os.PathLike, flag: str) -> dict:
    """A TOML file as nested dicts; a missing or malformed file is one sentence naming `flag`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a TOML file to {flag} (see qianwen/recipes/ for examples).")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid TOML ({exc}); fix the file.") from None


def load_recipe(path: str | os.PathLike | None) -> dict:
    """A whole-run recipe ({} with no file), by path or by name in qianwen/recipes/ (tiny, small ...); its
    top-level tables must be known sections."""
    if path is None:
        return {}
    if Path(path).suffix != ".toml" and not Path(path).is_file():
        from qianwen.recipe import recipe_path

        path = recipe_path(str(path))
    recipe = read_toml(path, "--recipe")
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ValueError(f"recipe {path} has unknown section(s) {unknown}; valid sections are {list(SECTIONS)}.")
    return recipe


def parse_value(text: str) -> object:
    """A command-line value as TOML reads it (numbers, booleans, lists, quoted strings, inf), else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: dict, overrides: Sequence[str], default_section: str) -> dict:
    """`section.key=value`, or a key of `default_section` (dotted into its sub-tables), merged over a copy."""
    merged = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"override {item!r} is not key=value; write e.g. lr=3e-4 or model.hidden_size=256.")
        section = parts.pop(0) if len(parts) > 1 and parts[0] in SECTIONS else default_section
        table = merged.setdefault(section, {})
        for name in parts[:-1]:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ValueError(f"override {item!r}: {name} is not a section; override the keys inside it.")
        table[parts[-1]] = parse_value(text.strip())
    return merged


def build(cls: type, values: dict, where: str = ""):
    """An instance of dataclass `cls` (nested dataclasses included) with every key and type checked."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        scope = f"[{where}]" if where else "the top level"
        raise ValueError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}; valid keys in {scope} are "
            f"{', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name} is a section; give keys inside it, e.g. {name}.enabled=false.")
            kwargs[key] = build(hints[key], value, name)
        else:
            kwargs[key] = _check_type(value, hints[key], name)
    return cls(**kwargs)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}


def _check_type(value: object, hint: object, name: str) -> object:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            if isinstance(value, list):
                return [_check_type(v, item, f"{name} item") for v in value]
        elif option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        elif isinstance(value, option) and (option is bool or not isinstance(value, bool)):
            return value
    kind = " or ".join(_KINDS.get(o, "a list") for o in options)
    raise ValueError(f"config key {name} must be {kind}, got {value!r}; fix the config or the override.")
