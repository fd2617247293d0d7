"""Checkpoint directories: layouts, dtypes, and the one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2ForCausalLM

from qianwen.checkpoint import CheckpointError, load_model, qwen2_state_dict, save_model
from qianwen.config import ModelConfig
from qianwen.model import Transformer

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)


@pytest.fixture
def model():
    m = Transformer(CONFIG)
    m.init_weights(0)
    return m.eval()


def logits(model, ids=((1, 2, 3, 4, 5),)):
    with torch.no_grad():
        return model(torch.tensor(ids))


def test_loading_does_not_import_the_compiler(model, tmp_path):
    """The model is built on the meta device and filled from the file; torch's meta `normal_` (an embedding's
    default initialisation) would import torch._dynamo, 1.9 s of every process that loads a model."""
    save_model(model, tmp_path)
    code = f"import sys; from qianwen.checkpoint import load_model; load_model({str(tmp_path)!r}); "
    code += "print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_bf16_checkpoints_stay_bf16_unless_asked(model, tmp_path):
    save_model(model.to(torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path).embed.weight.dtype == torch.bfloat16
    as_fp32 = load_model(tmp_path, dtype=torch.float32)
    assert as_fp32.embed.weight.dtype == torch.float32
    assert torch.equal(as_fp32.embed.weight, model.embed.weight.float())


def test_sharded_export_with_index_loads_in_transformers(model, tmp_path):
    save_model(model, tmp_path, shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(torch.tensor([[1, 2, 3, 4, 5]])).logits - logits(model)).abs().max() <= 1e-5
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_pytorch_bin_checkpoints_load(model, tmp_path):
    save_model(model, tmp_path)
    state = {k: v.clone() for k, v in qwen2_state_dict(model).items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_model_without_qkv_bias_round_trips(tmp_path):
    m = Transformer(CONFIG.replace(qkv_bias=False))
    m.init_weights(1)
    save_model(m, tmp_path)
    reloaded = load_model(tmp_path)
    assert reloaded.layers[0].attn.qkv.bias is None
    assert torch.equal(logits(reloaded), logits(m.eval()))
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # zero biases on disk
    with torch.no_grad():
        assert (theirs(torch.tensor([[1, 2, 3, 4, 5]])).logits - logits(m)).abs().max() <= 1e-5


def test_long_context_settings_survive_export(tmp_path):
    config = CONFIG.replace(seq_length=64, use_dynamic_ntk=True, use_logn_attn=True, attention_windows=[16, 64])
    m = Transformer(config)
    m.init_weights(2)
    save_model(m, tmp_path)
    assert load_model(tmp_path).config == config


def test_load_holds_no_second_copy(model, tmp_path):
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    storages = {p.untyped_storage().data_ptr() for p in loaded.parameters()}
    assert len(storages) == len(list(loaded.parameters()))  # each parameter owns exactly its own buffer
    assert not any(p.is_meta for p in loaded.parameters())


def test_training_loaded_weights_leaves_the_file_alone(model, tmp_path):
    """Weights stored as they are wanted are mapped copy-on-write: writing them changes memory, not the file."""
    save_model(model, tmp_path)
    stored = (tmp_path / "model.safetensors").read_bytes()
    loaded = load_model(tmp_path)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    assert (tmp_path / "model.safetensors").read_bytes() == stored
    assert torch.equal(logits(load_model(tmp_path)), logits(model))
    assert not torch.equal(logits(loaded), logits(model))  # the write took, in memory


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_clear_errors_for_bad_directories(model, tmp_path):
    assert "does not exist" in _error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")

    save_model(model, tmp_path / "ok")
    cfg_path = tmp_path / "ok" / "config.json"
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "sparse_attention": True}))
    assert "sparse_attention" in _error(tmp_path / "ok")
    cfg_path.write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert "'llama'" in _error(tmp_path / "ok")
    cfg_path.write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert "yarn" in _error(tmp_path / "ok")
    cfg_path.write_text(json.dumps({**cfg, "hidden_size": 64}))
    assert "shape" in _error(tmp_path / "ok")
    cfg_path.write_text("{not json")
    assert "not valid JSON" in _error(tmp_path / "ok")
    cfg_path.write_text(json.dumps(cfg))

    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "truncated" in _error(tmp_path / "ok")
    weights.unlink()
    assert "holds no weights" in _error(tmp_path / "ok")


def test_missing_tensor_is_named(model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in _error(tmp_path)
