"""The model against independent references: transformers' Qwen2ForCausalLM
for logits and greedy text, and a naive loop implementation of the spec's
long-context formulas."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

import qianwen
from qianwen.checkpoint import save_model
from qianwen.config import ModelConfig, preset
from qianwen.model import KVCache, Transformer, logn_factors, ntk_alpha, ntk_base

CONFIGS = {
    "mha-bias": ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96),
    "gqa": ModelConfig(
        vocab_size=1000, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=100
    ),
    "odd": ModelConfig(
        vocab_size=517, hidden_size=48, num_layers=2, num_heads=3, head_dim=22, num_kv_heads=1, intermediate_size=77
    ),
}


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(seed)
    with torch.no_grad():  # norms and biases away from 1 and 0, so a swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_both_directions(name, tmp_path):
    config = CONFIGS[name]
    ours = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))

    save_model(ours, tmp_path / "ours")
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max() <= 1e-4

    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = qianwen.checkpoint.load_model(tmp_path / "theirs")
    with torch.no_grad():
        assert (reloaded(ids) - expected).abs().max() <= 1e-4


def _v1_directory(hf_dir, out, config: ModelConfig) -> None:
    """Rename and fuse a transformers Qwen2 checkpoint the way Qwen v1 stores it."""
    import json

    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    v1 = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            v1[dst + f"attn.c_attn.{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        v1[dst + "attn.c_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        v1[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        v1[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
        v1[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]
        v1[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]
        v1[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
    out.mkdir()
    half = len(v1) // 2  # two shards with an index, as the released checkpoints ship
    names = sorted(v1)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for filename, keys in shards.items():
        save_file({k: v1[k].contiguous() for k in keys}, out / filename)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["QWenLMHeadModel"],
                "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
                "model_type": "qwen",
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_layers,
                "num_attention_heads": config.num_heads,
                "kv_channels": config.head_dim,
                "intermediate_size": 2 * config.intermediate_size,
                "layer_norm_epsilon": 1e-6,
                "rotary_emb_base": 10000,
                "rotary_pct": 1.0,
                "seq_length": 64,
                "max_position_embeddings": 256,
                "use_dynamic_ntk": True,
                "use_logn_attn": True,
                "use_flash_attn": "auto",
                "vocab_size": config.vocab_size,
                "tie_word_embeddings": False,
                "no_bias": True,
                "bf16": False,
                "fp16": False,
                "fp32": False,
                "emb_dropout_prob": 0.0,
                "attn_dropout_prob": 0.0,
                "scale_attn_weights": True,
                "softmax_in_fp32": False,
                "use_cache_quantization": False,
                "use_cache_kernel": False,
                "onnx_safe": None,
                "initializer_range": 0.02,
                "tokenizer_type": "QWenTokenizer",
                "transformers_version": "4.32.0",
                "use_cache": True,
            }
        )
    )


def test_qwen_v1_directory_loads_with_identical_logits(tmp_path):
    config = CONFIGS["mha-bias"]
    theirs = Qwen2ForCausalLM.from_pretrained(_saved(config, tmp_path / "hf"), dtype=torch.float32).eval()
    _v1_directory(tmp_path / "hf", tmp_path / "v1", config)
    ours = qianwen.checkpoint.load_model(tmp_path / "v1")
    assert ours.config.use_dynamic_ntk and ours.config.use_logn_attn and ours.config.seq_length == 64
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # 40 tokens: inside the training length, so NTK and LogN do not act
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def _saved(config, path):
    save_model(random_model(config), path)
    return path


@pytest.mark.parametrize("name", ["mha-bias", "gqa"])
def test_greedy_tokens_match_transformers_generate(name, tmp_path):
    config = CONFIGS[name]
    ours = random_model(config, seed=3)
    save_model(ours, tmp_path)
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = [5, 17, 300, 42, 7, 99]
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt) :].tolist()
    assert len(expected) == 32
    assert qianwen.generate(ours, None, prompt, 32, stop_ids=[]).token_ids == expected
    assert qianwen.generate(ours, None, prompt, 32, stop_ids=[], use_cache=False).token_ids == expected


def test_left_padded_batch_equals_each_prompt_alone():
    model = random_model(CONFIGS["gqa"], seed=4)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [11]]
    batch = qianwen.generate(model, None, prompts, 12, stop_ids=[])
    for prompt, completion in zip(prompts, batch):
        assert completion.token_ids == qianwen.generate(model, None, prompt, 12, stop_ids=[]).token_ids


def test_a_prefix_every_prompt_shares_is_prefilled_once_and_the_rows_decode_as_alone(monkeypatch):
    from qianwen.generate import MIN_SHARED_PREFIX

    model = random_model(CONFIGS["gqa"], seed=4)
    rng = np.random.default_rng(0)
    prefix = rng.integers(1, 1000, MIN_SHARED_PREFIX + 8).tolist()  # few-shot examples, a system prompt
    tails = [[5], [9, 8, 7, 6, 5, 4, 3], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    prompts = [prefix + t for t in tails] + [prefix[:-3]]  # one row is the prefix short of its last tokens
    fed = []
    model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape))
    batch = qianwen.generate(model, None, prompts, 12, stop_ids=[])
    assert fed[:2] == [(1, len(prefix) - 4), (5, 11 + 4)]  # the prefix once, then each row's rest
    for prompt, completion in zip(prompts, batch):
        assert completion.token_ids == qianwen.generate(model, None, prompt, 12, stop_ids=[]).token_ids
    # sampled, with a repetition penalty: the same draws as the batch laid out without sharing
    sampled = qianwen.generate(model, None, prompts, 12, stop_ids=[], temperature=1.0, seed=3, repetition_penalty=1.3)
    monkeypatch.setattr(sys.modules["qianwen.generate"], "MIN_SHARED_PREFIX", 10_000)
    fed.clear()
    unshared = qianwen.generate(model, None, prompts, 12, stop_ids=[], temperature=1.0, seed=3, repetition_penalty=1.3)
    assert fed[0] == (5, len(prefix) + 11)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in unshared]


def test_a_prompt_given_several_times_is_prefilled_once_and_its_rows_sample_apart():
    model = random_model(CONFIGS["gqa"], seed=4)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [1, 2, 3], [9, 8, 7, 6, 5], [1, 2, 3]]
    fed = []
    model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape))
    batch = qianwen.generate(model, None, prompts, 10, stop_ids=[])
    assert fed[0] == (2, 5)  # two distinct prompts
    for prompt, completion in zip(prompts, batch):
        assert completion.token_ids == qianwen.generate(model, None, prompt, 10, stop_ids=[]).token_ids
    sampled = qianwen.generate(model, None, prompts, 10, stop_ids=[], temperature=1.0, seed=0, repetition_penalty=1.2)
    assert len({tuple(c.token_ids) for c in sampled[0::2]}) == 3  # copies of a prompt's cache, not of its replies


def test_no_prefix_is_shared_where_dynamic_ntk_or_windows_make_a_row_s_keys_its_own():
    from qianwen.generate import MIN_SHARED_PREFIX, shared_prefix

    prompts = [[1] * 40 + [2], [1] * 40 + [3, 4]]
    model = random_model(CONFIGS["gqa"], seed=4)
    assert shared_prefix(model, prompts) == 40 >= MIN_SHARED_PREFIX
    assert shared_prefix(model, [p[:20] for p in prompts]) == 0  # too short to pay for a pass
    model.config = dataclasses.replace(model.config, use_dynamic_ntk=True, seq_length=42)
    assert shared_prefix(model, prompts) == 40  # within the training length every row keeps the trained base
    batch = qianwen.generate(model, None, prompts, 8, stop_ids=[])
    assert [c.token_ids for c in batch] == [qianwen.generate(model, None, p, 8, stop_ids=[]).token_ids for p in prompts]
    model.config = dataclasses.replace(model.config, seq_length=41)
    assert shared_prefix(model, prompts) == 0  # the second prompt's rotary base is past the training length's
    model.config = dataclasses.replace(model.config, seq_length=64, attention_windows=[16, 16, 16])
    assert shared_prefix(model, prompts) == 0


def test_rows_that_stop_leave_the_batch_and_the_rest_decode_as_alone(monkeypatch):
    model = random_model(CONFIGS["gqa"], seed=4)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [11], [20, 21, 22, 23]]
    alone = [qianwen.generate(model, None, p, 12, stop_ids=[]).token_ids for p in prompts]
    stops = [alone[0][1], alone[1][2]]  # the first two rows end after two or three tokens
    selects = []
    original = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda cache, index: selects.append(len(index)) or original(cache, index))
    batch = qianwen.generate(model, None, prompts, 12, stop_ids=stops)
    assert selects, "no row left the batch"
    for prompt, completion in zip(prompts, batch):
        assert completion.token_ids == qianwen.generate(model, None, prompt, 12, stop_ids=stops).token_ids
    assert batch[0].finish_reason == "stop" and len(batch[0].token_ids) <= 1


def test_padded_forward_matches_unpadded_rows():
    model = random_model(CONFIGS["mha-bias"], seed=5)
    a, b = torch.tensor([[4, 5, 6, 7, 8]]), torch.tensor([[9, 10]])
    ids = torch.tensor([[4, 5, 6, 7, 8], [0, 0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    with torch.no_grad():
        both = model(ids, attention_mask=mask)
        assert torch.allclose(both[0], model(a)[0], atol=1e-5)
        assert torch.allclose(both[1, 3:], model(b)[0], atol=1e-5)
        assert torch.isfinite(both).all()


def test_chunked_prefill_through_the_cache_equals_one_pass():
    model = random_model(CONFIGS["gqa"], seed=6)
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        first = model(ids[:, :12], cache=cache)
        second = model(ids[:, 12:], cache=cache)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


# ---------------------------------------------------------------------------
# Long context: formulas, then the model against a naive reference


def test_ntk_alpha_and_bases_follow_the_spec():
    assert [ntk_alpha(n * 2048, 2048) for n in (1, 2, 4, 8)] == [1, 3, 7, 15]
    assert ntk_alpha(100, 2048) == 1 and ntk_alpha(2049, 2048) == 3
    d = 128
    for alpha in (1, 3, 7, 15):
        assert math.isclose(ntk_base(10000, alpha, d), 10000 * alpha ** (d / (d - 2)))
    assert ntk_base(10000, 1, d) == 10000


def test_logn_factors_follow_the_spec():
    seq = 16
    positions = torch.arange(64)
    expected = np.array([math.log(i, seq) if i > seq else 1.0 for i in range(1, 65)])
    assert np.allclose(logn_factors(positions, seq).numpy(), expected, atol=1e-6)


def naive_forward(
    model: Transformer, ids: list[int], base: float | list[float], logn: bool, windows: list[int] | None
) -> torch.Tensor:
    """Token-by-token loops straight from QWEN_SPEC.md, no shared code with model.py. `base` is the rotary base,
    or one per layer; a query's LogN factor counts the keys it attends (at most its layer's window)."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, K, D, T = c.num_heads, c.num_kv_heads, c.head_dim, len(ids)
    bases = base if isinstance(base, list) else [base] * c.num_layers

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    def rope(v, pos, base):
        inv = [1.0 / base ** (2 * j / D) for j in range(D // 2)]
        half = D // 2
        out = v.clone()
        for j in range(half):
            cos, sin = math.cos(pos * inv[j]), math.sin(pos * inv[j])
            out[..., j] = v[..., j] * cos - v[..., j + half] * sin
            out[..., j + half] = v[..., j + half] * cos + v[..., j] * sin
        return out

    x = sd["embed.weight"][ids]
    for layer in range(c.num_layers):
        p = f"layers.{layer}."
        h = rms(x, sd[p + "attn_norm.weight"])
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q = qkv[:, : H * D].view(T, H, D)
        k = qkv[:, H * D : (H + K) * D].view(T, K, D)
        v = qkv[:, (H + K) * D :].view(T, K, D)
        q = torch.stack([rope(q[t], t, bases[layer]) for t in range(T)])
        k = torch.stack([rope(k[t], t, bases[layer]) for t in range(T)])
        out = torch.zeros(T, H, D, dtype=torch.float64)
        window = windows[layer] if windows else T
        for t in range(T):
            n = min(t + 1, window)
            scale = math.log(n) / math.log(c.seq_length) if logn and n > c.seq_length else 1.0
            for head in range(H):
                kv = head // (H // K)
                keys = range(max(0, t - window + 1), t + 1)
                scores = torch.tensor([(q[t, head] * scale) @ k[s, kv] / math.sqrt(D) for s in keys])
                weights = torch.softmax(scores, 0)
                out[t, head] = sum(w * v[s, kv] for w, s in zip(weights, keys))
        x = x + out.reshape(T, H * D) @ sd[p + "attn.proj.weight"].T
        h = rms(x, sd[p + "mlp_norm.weight"])
        gate, up = (h @ sd[p + "mlp.gate_up.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["lm_head.weight"].T


LONG = dict(
    vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=40, seq_length=8
)


def test_model_matches_naive_reference_with_ntk_logn_and_windows():
    """30 tokens at a training length of 8: the layer with a window of 5 attends over 5 keys at most, so it keeps
    the trained base and no LogN; the one with 12 gets the NTK factor of 12 tokens (1.5x: alpha 3) and LogN up to
    12 keys; with full attention, 30 tokens (3.75x: alpha 7)."""
    windows = [5, 12]
    config = ModelConfig(**LONG, use_dynamic_ntk=True, use_logn_attn=True, attention_windows=windows)
    model = random_model(config, seed=7)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    bases = [config.rope_base, ntk_base(config.rope_base, 3, config.head_dim)]
    expected = naive_forward(model, ids[0].tolist(), bases, logn=True, windows=windows)
    full = model.config.replace(attention_windows=None)
    with torch.no_grad():
        assert (model(ids)[0].double() - expected).abs().max() < 1e-4
        unwindowed = Transformer(full).eval()
        unwindowed.load_state_dict(model.state_dict())
        base = ntk_base(config.rope_base, 7, config.head_dim)
        expected = naive_forward(model, ids[0].tolist(), base, logn=True, windows=None)
        assert (unwindowed(ids)[0].double() - expected).abs().max() < 1e-4
        model.train()  # the three tricks are off while training: plain RoPE, no LogN, full attention
        plain = naive_forward(model, ids[0].tolist(), config.rope_base, logn=False, windows=None)
        assert (model(ids)[0].double() - plain).abs().max() < 1e-4


def test_window_equals_full_attention_when_the_sequence_fits():
    full = random_model(ModelConfig(**LONG), seed=8)
    windowed = Transformer(full.config.replace(attention_windows=[20, 20])).eval()
    windowed.load_state_dict(full.state_dict())
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(windowed(ids), full(ids))
        shorter = Transformer(full.config.replace(attention_windows=[19, 20])).eval()
        shorter.load_state_dict(full.state_dict())
        assert not torch.allclose(shorter(ids), full(ids))


def test_decoding_keeps_the_prefill_ntk_alpha():
    config = ModelConfig(**LONG, use_dynamic_ntk=True)
    model = random_model(config, seed=9)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        model(ids[:, :12], cache=cache)  # prefill 12 tokens = 1.5x -> alpha 3
        stepped = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)], 1)[0]
    fixed = ntk_base(config.rope_base, 3, config.head_dim)
    expected = naive_forward(model, ids[0].tolist(), fixed, logn=False, windows=None)[12:]
    assert (stepped.double() - expected).abs().max() < 1e-4


def test_windowed_decoding_matches_windowed_prefill():
    config = ModelConfig(**LONG, attention_windows=[3, 6], use_logn_attn=True)
    model = random_model(config, seed=10)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        first = model(ids[:, :5], cache=cache)
        rest = [model(ids[:, t : t + 1], cache=cache) for t in range(5, 16)]
        assert torch.allclose(torch.cat([first, *rest], 1), model(ids), atol=1e-5)


# ---------------------------------------------------------------------------
# Presets and initialisation


def test_presets_have_the_report_shapes():
    shapes = {
        name: (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) for name, c in qianwen.PRESETS.items()
    }
    assert shapes["qwen-1.8b"] == (2048, 24, 16, 5504)
    assert shapes["qwen-7b"] == (4096, 32, 32, 11008)
    assert shapes["qwen-14b"] == (5120, 40, 40, 13696)
    assert shapes["qwen-72b"] == (8192, 80, 64, 24576)
    assert all(qianwen.PRESETS[n].head_dim == 128 for n in ("qwen-1.8b", "qwen-7b", "qwen-14b", "qwen-72b"))
    assert all(qianwen.PRESETS[n].vocab_size == 151936 for n in ("qwen-7b", "qwen-72b"))
    with torch.device("meta"):
        counted = sum(p.numel() for p in Transformer(preset("qwen-7b")).parameters())
    assert counted == preset("qwen-7b").num_params
    assert abs(counted / 1e9 - 7.72) < 0.01  # Qwen-7B's published parameter count


def test_num_params_counts_every_parameter():
    for name in ("tiny-1m", "tiny-10m", "tiny-40m"):
        config = preset(name)
        assert config.num_params == sum(p.numel() for p in Transformer(config).parameters())
    assert 8e6 < preset("tiny-10m").num_params < 12e6 and 35e6 < preset("tiny-40m").num_params < 45e6


def test_init_scales_output_projections():
    config = ModelConfig(vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, intermediate_size=512)
    model = Transformer(config)
    model.init_weights(0)
    assert abs(model.layers[0].attn.qkv.weight.std() - 0.02) < 1e-3
    assert abs(model.layers[0].attn.proj.weight.std() - 0.02 / math.sqrt(16)) < 3e-4
    assert abs(model.layers[0].mlp.down.weight.std() - 0.02 / math.sqrt(16)) < 3e-4
    assert torch.all(model.layers[0].attn.qkv.bias == 0) and torch.all(model.norm.weight == 1)


def test_tied_embeddings_share_one_matrix(tmp_path):
    config = CONFIGS["mha-bias"].replace(tie_word_embeddings=True)
    model = random_model(config)
    assert model.lm_head.weight is model.embed.weight
    save_model(model, tmp_path)
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded = qianwen.checkpoint.load_model(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (reloaded(ids) - theirs(ids).logits).abs().max() <= 1e-4
    assert reloaded.lm_head.weight is reloaded.embed.weight


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="one window per layer"):
        ModelConfig(num_layers=2, attention_windows=[4])
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"hidden_sise": 4})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("qwen-9b")


def test_fixed_shape_decode_step_equals_the_cached_forward():
    """decode_step is what torch.compile captures; it must agree with the
    eager path on padding, NTK, LogN and windows."""
    config = ModelConfig(**LONG, use_dynamic_ntk=True, use_logn_attn=True, attention_windows=[4, 30])
    model = random_model(config, seed=11)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # the second row is left-padded
    with torch.no_grad():
        eager, stepped = model.new_cache(2, 30), model.new_cache(2, 30)
        model(ids[:, :10], attention_mask=mask, cache=eager)
        model(ids[:, :10], attention_mask=mask, cache=stepped)
        for t in range(10, 24):
            expected = model(ids[:, t : t + 1], cache=eager)[:, -1]
            got = model.decode_step(ids[:, t : t + 1], stepped, torch.tensor(stepped.length))
            stepped.advance()
            assert torch.allclose(got, expected, atol=1e-5), t


def test_compiled_decoding_gives_the_eager_tokens():
    model = random_model(CONFIGS["gqa"], seed=12)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    eager = qianwen.generate(model, None, prompts, 12, stop_ids=[])
    compiled = qianwen.generate(model, None, prompts, 12, stop_ids=[], compile=True)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]


def test_training_after_generation():
    """PPO generates, then trains: state built while generating must not be inference-only."""
    model = random_model(CONFIGS["mha-bias"], seed=13)
    qianwen.generate(model, None, [1, 2, 3], 4, stop_ids=[])
    model.train()
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    assert model.embed.weight.grad is not None


@pytest.mark.parametrize("length", [40, 200])  # below and above the keys from which a CPU attends in bf16
def test_bf16_on_the_cpu_follows_fp32_on_both_sides_of_the_attention_switch(length):
    model = random_model(CONFIGS["gqa"], seed=7)
    ids = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(ids)
        weights = model.to(torch.bfloat16)(ids)
    for got in (autocast, weights):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_a_decoding_step_at_each_rows_own_slot_in_fp32_and_bf16():
    """One new token per row written at the row's own slot (stale keys beyond it are masked), equal to the row
    run alone; with bf16 weights one query attends in bf16 on a CPU (no fp32 detour) and follows fp32."""
    model = random_model(CONFIGS["gqa"], seed=13)
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(2))
    new = torch.tensor([[5], [6], [7]])
    slots = torch.tensor([39, 25, 31])
    with torch.no_grad():
        alone = torch.cat([model(torch.cat([ids[r, :s], new[r]])[None])[:, -1] for r, s in enumerate(slots.tolist())])
        for m, tolerance in ((model, 1e-4), (copy.deepcopy(model).to(torch.bfloat16), 0.1)):
            cache = m.new_cache(3, 48)
            m(ids, cache=cache)
            cache.seen = slots.clone()
            got = m.decode_step(new, cache, slots.clone()).float()
            assert (got - alone).abs().max() < tolerance * alone.abs().max(), m.embed.weight.dtype
