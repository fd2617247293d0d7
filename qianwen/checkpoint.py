"""Checkpoint I/O: read Qwen v1 and Qwen2-format directories, write standard
Hugging Face Qwen2 directories (QWEN_SPEC.md section 1, "Checkpoint names").

Weights are read straight into the parameters they end up in: the model is
built on the meta device and each tensor is filled from the file with one
`readinto` (safetensors) or copied from a memory map (.bin), so loading never
holds two copies of the weights.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch
from torch import nn

from qianwen.config import ModelConfig
from qianwen.model import Transformer
from qianwen.util import atomic_write


class CheckpointError(ValueError):
    """A directory that cannot be read as a checkpoint; the message says why."""


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig

# Keys every HF config may carry that do not change the maths.
_METADATA_KEYS = {
    "_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "tokenizer_class", "output_attentions", "output_hidden_states",
    "return_dict", "is_decoder", "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "num_labels", "problem_type", "torchscript", "pruned_heads", "add_cross_attention",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "quantization_config",
}  # fmt: skip
_V1_IGNORED = {
    "bf16", "fp16", "fp32", "use_flash_attn", "onnx_safe", "tokenizer_type", "emb_dropout_prob",
    "attn_dropout_prob", "softmax_in_fp32", "use_cache_kernel", "n_positions", "padded_vocab_size",
}  # fmt: skip
_QWEN2_IGNORED = {"attention_dropout", "hidden_act", "mlp_only_layers", "use_mrope"}


def _require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise CheckpointError(f"{path} lacks the key {key!r}; is this a complete Qwen config.json?")
    return cfg[key]


def _check_keys(cfg: dict, known: set[str], path: Path) -> None:
    unknown = sorted(set(cfg) - known - _METADATA_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path} has key(s) {unknown} that qianwen does not know how to honour; "
            "remove them if they are only metadata."
        )
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{path} describes a quantised model; qianwen reads bf16/fp16/fp32 weights only.")


def config_from_v1(cfg: dict, path: Path) -> ModelConfig:
    known = {
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "kv_channels",
        "layer_norm_epsilon", "rotary_emb_base", "rotary_pct", "seq_length", "max_position_embeddings",
        "use_dynamic_ntk", "use_logn_attn", "vocab_size", "tie_word_embeddings", "no_bias",
        "scale_attn_weights", "use_cache_quantization",
    } | _V1_IGNORED  # fmt: skip
    _check_keys(cfg, known, path)
    for key, needed in (
        ("rotary_pct", 1.0),
        ("scale_attn_weights", True),
        ("no_bias", True),
        ("use_cache_quantization", False),
    ):
        if key in cfg and cfg[key] != needed:
            raise CheckpointError(
                f"{path}: {key}={cfg[key]!r} is not supported (Qwen's released models use {needed!r})."
            )
    heads = _require(cfg, "num_attention_heads", path)
    hidden = _require(cfg, "hidden_size", path)
    seq_length = cfg.get("seq_length", 2048)
    return ModelConfig(
        vocab_size=_require(cfg, "vocab_size", path),
        hidden_size=hidden,
        num_layers=_require(cfg, "num_hidden_layers", path),
        num_heads=heads,
        head_dim=cfg.get("kv_channels", hidden // heads),
        intermediate_size=_require(cfg, "intermediate_size", path) // 2,
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_base=float(cfg.get("rotary_emb_base", 10000)),
        seq_length=seq_length,
        max_position_embeddings=max(cfg.get("max_position_embeddings", seq_length), seq_length),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        use_dynamic_ntk=cfg.get("use_dynamic_ntk", False),
        use_logn_attn=cfg.get("use_logn_attn", False),
    )


def config_from_qwen2(cfg: dict, path: Path, extras: dict | None = None) -> ModelConfig:
    known = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
        "max_position_embeddings", "tie_word_embeddings", "use_sliding_window", "sliding_window",
        "max_window_layers", "layer_types",
    } | _QWEN2_IGNORED  # fmt: skip
    _check_keys(cfg, known, path)
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act={cfg['hidden_act']!r}; Qwen uses 'silu'.")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(
            f"{path} uses rope scaling {rope_type!r}; qianwen supports plain RoPE with its own dynamic NTK."
        )
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    layers = _require(cfg, "num_hidden_layers", path)
    max_pos = cfg.get("max_position_embeddings", 32768)
    windows = None
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", layers) else "full_attention"
            for i in range(layers)
        ]
        if "sliding_attention" in types:
            windows = [cfg["sliding_window"] if t == "sliding_attention" else max_pos for t in types]
    config = dict(
        vocab_size=_require(cfg, "vocab_size", path),
        hidden_size=_require(cfg, "hidden_size", path),
        num_layers=layers,
        num_heads=_require(cfg, "num_attention_heads", path),
        num_kv_heads=cfg.get("num_key_value_heads"),
        head_dim=cfg.get("head_dim"),
        intermediate_size=_require(cfg, "intermediate_size", path),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=float(base),
        seq_length=max_pos,
        max_position_embeddings=max_pos,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_windows=windows,
    )
    # qianwen.json keeps what Qwen2's config has no words for (training length,
    # NTK/LogN switches, window schedule); config.json stays authoritative for shapes.
    for key in ("seq_length", "use_dynamic_ntk", "use_logn_attn", "attention_windows", "qkv_bias", "dropout"):
        if extras and key in extras:
            config[key] = extras[key]
    return ModelConfig(**config)


def config_to_qwen2(config: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


# ---------------------------------------------------------------------------
# Tensor sources: where each stored tensor lives and how to read it


_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class _SafetensorsFile:
    """Reads tensors of one .safetensors file into caller-provided buffers, or maps them."""

    def __init__(self, path: Path):
        self.path = path
        self._map: mmap.mmap | None = None
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt).") from None
        header.pop("__metadata__", None)
        self.base = 8 + size
        self.entries = header

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self.entries[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        return _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def mapped(self, name: str) -> torch.Tensor | None:
        """The tensor as a copy-on-write view of the file's pages, or None where its bytes are not aligned for
        its dtype. Pages are read when first used and never copied unless written (training does): a 1.28 GB
        checkpoint took 1.08 s to read into fresh memory, against 0.36 s for transformers, which maps it."""
        dtype, shape = self.meta(name)
        begin, end = self.entries[name]["data_offsets"]
        numel, size = math.prod(shape), dtype.itemsize
        if end - begin != numel * size:
            raise CheckpointError(f"{self.path}: tensor {name} has {end - begin} bytes, expected {numel * size}.")
        if (self.base + begin) % size or numel == 0:
            return None
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if self.base + end > len(self._map):
            raise CheckpointError(f"{self.path} ends inside tensor {name}; the file is truncated.")
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=self.base + begin).view(shape)

    def read_into(self, name: str, out: torch.Tensor, handle) -> None:
        begin, end = self.entries[name]["data_offsets"]
        view = out.reshape(-1).view(torch.uint8).numpy()
        if view.nbytes != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name} has {end - begin} bytes, expected {view.nbytes}.")
        handle.seek(self.base + begin)
        if handle.readinto(view) != view.nbytes:
            raise CheckpointError(f"{self.path} ends inside tensor {name}; the file is truncated.")


class TensorSource:
    """All tensors of a checkpoint directory, by name, whatever the file layout."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._where: dict[str, object] = {}
        self._handles: dict[Path, object] = {}
        st = sorted(directory.glob("*.safetensors"))
        bins = sorted(p for p in directory.glob("pytorch_model*.bin"))
        if st:
            files = self._indexed(directory / "model.safetensors.index.json") or st
            for path in files:
                f = _SafetensorsFile(path)
                for name in f.entries:
                    self._where[name] = f
        elif bins:
            files = self._indexed(directory / "pytorch_model.bin.index.json") or bins
            for path in files:
                try:
                    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # torch raises many types for a bad pickle
                    raise CheckpointError(f"{path} could not be read as a PyTorch state dict ({exc}).") from None
                for name, tensor in state.items():
                    self._where[name] = tensor
        else:
            raise CheckpointError(
                f"{directory} holds no weights: expected model.safetensors, model-*.safetensors or pytorch_model*.bin."
            )

    def _indexed(self, index: Path) -> list[Path] | None:
        if not index.is_file():
            return None
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'; is the index file complete?")
        files = sorted({self.directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index.name} lists {missing} but they are not in {self.directory}; the download is incomplete."
            )
        return files

    def names(self):
        return self._where.keys()

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        where = self._where[name]
        if isinstance(where, torch.Tensor):
            return where.dtype, tuple(where.shape)
        return where.meta(name)

    def mapped(self, name: str) -> torch.Tensor | None:
        """A safetensors tensor mapped from its file (see _SafetensorsFile.mapped); None for .bin files."""
        where = self._where[name]
        return where.mapped(name) if isinstance(where, _SafetensorsFile) else None

    def read_into(self, name: str, out: torch.Tensor) -> None:
        where = self._where[name]
        if isinstance(where, torch.Tensor):
            out.copy_(where)
            return
        dtype, _ = where.meta(name)
        if dtype != out.dtype:  # convert through a temporary the size of one tensor
            tmp = torch.empty(out.shape, dtype=dtype)
            where.read_into(name, tmp, self._handle(where.path))
            out.copy_(tmp)
        else:
            where.read_into(name, out, self._handle(where.path))

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = open(path, "rb", buffering=0)
        return self._handles[path]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._where.clear()


# ---------------------------------------------------------------------------
# Name maps: each qianwen parameter is one stored tensor or several stacked
# along dim 0 (fused QKV, fused gate|up).


def _qwen2_names(config: ModelConfig) -> dict[str, list[str]]:
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[dst + "attn_norm.weight"] = [src + "input_layernorm.weight"]
        names[dst + "mlp_norm.weight"] = [src + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            names[dst + f"attn.qkv.{kind}"] = [src + f"self_attn.{p}_proj.{kind}" for p in "qkv"]
        names[dst + "attn.proj.weight"] = [src + "self_attn.o_proj.weight"]
        names[dst + "mlp.gate_up.weight"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
        names[dst + "mlp.down.weight"] = [src + "mlp.down_proj.weight"]
    return names


def _v1_names(config: ModelConfig) -> dict[str, list[str]]:
    names = {"embed.weight": ["transformer.wte.weight"], "norm.weight": ["transformer.ln_f.weight"]}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        names[dst + "attn_norm.weight"] = [src + "ln_1.weight"]
        names[dst + "mlp_norm.weight"] = [src + "ln_2.weight"]
        names[dst + "attn.qkv.weight"] = [src + "attn.c_attn.weight"]
        names[dst + "attn.qkv.bias"] = [src + "attn.c_attn.bias"]
        names[dst + "attn.proj.weight"] = [src + "attn.c_proj.weight"]
        # v1's w2 is the gate and w1 the up projection (spec section 1).
        names[dst + "mlp.gate_up.weight"] = [src + "mlp.w2.weight", src + "mlp.w1.weight"]
        names[dst + "mlp.down.weight"] = [src + "mlp.c_proj.weight"]
    return names


# ---------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object.")
    return data


def read_config(directory: str | os.PathLike) -> tuple[str, ModelConfig]:
    """("qwen" or "qwen2", ModelConfig) for a checkpoint directory."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist; give the path of a checkpoint directory.")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; give the directory that holds config.json and the weights.")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no config.json.")
    cfg = _read_json(path)
    kind = cfg.get("model_type")
    if kind == "qwen":
        return kind, config_from_v1(cfg, path)
    if kind == "qwen2":
        extras = (
            _read_json(directory / "qianwen.json").get("model", {}) if (directory / "qianwen.json").is_file() else None
        )
        return kind, config_from_qwen2(cfg, path, extras)
    raise CheckpointError(
        f"{path} describes a {kind!r} model; qianwen reads Qwen v1 ('qwen') and Qwen2-format ('qwen2') checkpoints."
    )


def require_language_model(directory: str | os.PathLike) -> None:
    """Refuse a reward model (`qianwen rm` writes Qwen2ForSequenceClassification) where text is to be generated or
    trained: its body was tuned to score replies and its output head never to write them, so it would run and
    answer nonsense. (Reward models load with `qianwen.load` too; PPO's value and reward models are built so.)"""
    path = Path(directory) / "config.json"
    architectures = (_read_json(path).get("architectures") or []) if path.is_file() else []
    scorer = next((a for a in architectures if a.endswith("ForSequenceClassification")), None)
    if scorer:
        raise CheckpointError(
            f"{directory} is a reward model ({scorer}): it scores replies and was never trained to write them; "
            "give a base, SFT or PPO model directory."
        )


def load_model(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: ModelConfig | None = None,
) -> Transformer:
    """A Transformer with the directory's weights, in the stored dtype unless
    `dtype` is given, in eval mode."""
    directory = Path(directory)
    kind, file_config = read_config(directory)
    config = config or file_config
    source = TensorSource(directory)
    try:
        names = (_v1_names if kind == "qwen" else _qwen2_names)(config)
        first = next(iter(names.values()))[0]
        if first not in source.names():
            raise CheckpointError(
                f"{directory} has no tensor {first!r}: its weights do not match its config.json model_type {kind!r}."
            )
        if config.tie_word_embeddings is False and "lm_head.weight" not in source.names():
            raise CheckpointError(f"{directory} has no lm_head.weight but its config says the embeddings are untied.")
        dtype = dtype or source.meta(first)[0]
        device = torch.device(device or "cpu")
        with torch.device("meta"):
            model = Transformer(config)
        for name, parts in names.items():
            _fill(model, name, parts, source, dtype, device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
    finally:
        source.close()
    return model.eval()


def _fill(model, name, parts, source, dtype, device) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if getattr(module, attr) is None:
        return  # a bias this model is configured without (the file holds zeros)
    expected = getattr(module, attr).shape
    missing = [p for p in parts if p not in source.names()]
    if missing:
        raise CheckpointError(f"{source.directory} lacks tensor(s) {missing}; the checkpoint is incomplete.")
    shapes = [source.meta(p)[1] for p in parts]
    stacked = (sum(s[0] for s in shapes), *shapes[0][1:])
    if stacked != tuple(expected):
        raise CheckpointError(
            f"{source.directory}: {' + '.join(parts)} has shape {list(stacked)} but the config needs {list(expected)}."
        )
    # A tensor stored as it is wanted is mapped; stacked parts and a change of dtype are read into memory.
    tensor = source.mapped(parts[0]) if len(parts) == 1 and source.meta(parts[0])[0] == dtype else None
    if tensor is None:
        tensor = torch.empty(expected, dtype=dtype)
        row = 0
        for part, shape in zip(parts, shapes, strict=True):
            source.read_into(part, tensor[row : row + shape[0]])
            row += shape[0]
    if device.type != "cpu":
        tensor = tensor.to(device)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


# ---------------------------------------------------------------------------
# Saving


def qwen2_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face Qwen2 names (views, no copies)."""
    config = model.config
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, parts in _qwen2_names(config).items():
        if name.endswith("qkv.bias") and name not in ours:
            tensor = torch.zeros((H + 2 * K) * D, dtype=ours[name.replace("bias", "weight")].dtype)
        else:
            tensor = ours[name]
        sizes = (
            [H * D, K * D, K * D]
            if ".qkv." in name
            else [config.intermediate_size] * 2
            if "gate_up" in name
            else [tensor.shape[0]]
        )
        for part, piece in zip(parts, tensor.split(sizes), strict=True):
            out[part] = piece
    return out


def save_model(
    model: Transformer, out_dir: str | os.PathLike, metadata: dict | None = None, shard_bytes: int = 4 << 30
) -> None:
    """Write config.json, model.safetensors (sharded with an index past
    `shard_bytes`), generation_config.json and qianwen.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = qwen2_state_dict(model)
    dtype = model.embed.weight.dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in (
        list(out.glob("model*.safetensors"))
        + list(out.glob("pytorch_model*.bin*"))
        + list(out.glob("model.safetensors.index.json"))
    ):
        stale.unlink()
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for filename, shard in zip(files, shards, strict=True):
        # safetensors refuses views that share storage: copy one shard at a time.
        contiguous = {k: v.detach().to("cpu").clone() for k, v in shard.items()}
        atomic_write(out / filename, lambda tmp, c=contiguous: save_file(c, tmp, metadata={"format": "pt"}))
        del contiguous
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: f for f, shard in zip(files, shards, strict=True) for k in shard},
        }
        atomic_write(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    atomic_write(out / "config.json", json.dumps(config_to_qwen2(model.config, dtype), indent=2))
    meta = {"format": "qianwen", "model": model.config.to_dict(), **(metadata or {})}
    atomic_write(out / "qianwen.json", json.dumps(meta, indent=2))


def write_generation_config(out_dir: str | os.PathLike, eos_ids: list[int], pad_id: int) -> None:
    generation = {"eos_token_id": eos_ids, "pad_token_id": pad_id, "do_sample": False, "max_new_tokens": 512}
    atomic_write(Path(out_dir) / "generation_config.json", json.dumps(generation, indent=2))
