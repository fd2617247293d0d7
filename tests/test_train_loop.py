"""The shared training loop's pieces against small independent references: the schedule against a numpy
formula, the optimizer's decay groups, recipes and overrides, and the window sampler."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from qianwen.config import apply_overrides, build, parse_value, preset
from qianwen.model import Transformer
from qianwen.recipe import RECIPES
from qianwen.train import loop
from qianwen.train.data import TokenShards, WindowSampler
from qianwen.train.loop import LoopConfig, Runtime, lr_at, make_optimizers, optimizer_name
from qianwen.train.pretrain import PretrainConfig, load_config


def reference_lr(step, peak, warmup, total, floor):
    """Warmup to the peak over `warmup` steps, then half a cosine from the peak to floor * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = np.clip((step - warmup) / max(1, total - warmup - 1), 0, 1)
    return peak * floor + peak * (1 - floor) * (1 + np.cos(np.pi * t)) / 2


def test_schedule_warms_up_then_decays_to_a_tenth():
    config = LoopConfig(steps=50, lr=3e-4, warmup_steps=5, min_lr_ratio=0.1)
    got = [lr_at(s, config) for s in range(50)]
    want = [reference_lr(s, 3e-4, 5, 50, 0.1) for s in range(50)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[4] == pytest.approx(3e-4) and got[-1] == pytest.approx(3e-5)
    assert all(a >= b for a, b in itertools.pairwise(got[4:]))


def test_weight_decay_on_matrices_only():
    model = Transformer(preset("tiny-1m", vocab_size=64))
    (opt,) = make_optimizers(model, LoopConfig(), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in plain["params"]} == {"weight", "bias"}
    assert all(p.ndim == 1 for p in plain["params"]) and all(p.ndim == 2 for p in decayed["params"])
    assert any(names[id(p)].endswith("qkv.bias") for p in plain["params"])
    assert any(names[id(p)] == "embed.weight" for p in decayed["params"])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_muon_takes_the_layers_matrices_and_adamw_the_rest():
    model = Transformer(preset("tiny-1m", vocab_size=64))
    config = LoopConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    muon, adamw = make_optimizers(model, config, torch.device("cpu"), "muon")
    names = {id(p): n for n, p in model.named_parameters()}
    (matrices,) = muon.param_groups
    kinds = {names[id(p)].split(".", 2)[-1] for p in matrices["params"]}
    assert isinstance(muon, torch.optim.Muon) and kinds == {
        "attn.qkv.weight",
        "attn.proj.weight",
        "mlp.gate_up.weight",
        "mlp.down.weight",
    }
    assert len(matrices["params"]) == 4 * model.config.num_layers
    decayed, plain = adamw.param_groups
    assert {names[id(p)] for p in decayed["params"]} == {"embed.weight", "lm_head.weight"}
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    # Muon's rate is 20x AdamW's on the shared schedule; its decoupled decay per step (lr * wd) is AdamW's.
    assert matrices["lr_scale"] == pytest.approx(20.0)
    assert matrices["lr"] * matrices["weight_decay"] == pytest.approx(config.lr * config.weight_decay)


@pytest.mark.parametrize("nesterov", [True, False])
def test_stacked_muon_updates_as_torch_muon_to_the_bit(nesterov):
    """StackedMuon batches the Newton-Schulz products of same-shaped matrices; the parameters and the momentum
    after several steps are torch.optim.Muon's exactly, so its checkpoints are too."""
    torch.manual_seed(0)
    models = [Transformer(preset("tiny-1m", vocab_size=64)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    kwargs = {"lr": 0.02, "weight_decay": 0.05, "momentum": 0.9, "nesterov": nesterov}
    optimizers = [
        optimizer([p for n, p in model.named_parameters() if p.ndim == 2 and "layers." in n], **kwargs)
        for optimizer, model in zip((loop.StackedMuon, torch.optim.Muon), models)
    ]
    assert len({tuple(p.shape) for p in optimizers[0].param_groups[0]["params"]}) < len(
        optimizers[0].param_groups[0]["params"]
    )  # several matrices share a shape, so products really are stacked
    tokens = torch.randint(0, 64, (2, 17))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(tokens).float().logsumexp(-1).mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    states = [optimizer.state_dict()["state"] for optimizer in optimizers]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key]["momentum_buffer"], states[1][key]["momentum_buffer"])


def test_auto_optimizer_is_muon_in_one_process_with_newton_schulz_in_bf16_only_where_it_is_native(monkeypatch):
    def runtime(device: str, world: int = 1) -> Runtime:
        return Runtime(rank=0, world=world, device=torch.device(device), mesh=None)

    auto = LoopConfig(optimizer="auto")
    monkeypatch.setattr(loop, "cpu_has_bf16_matmul", lambda: True)
    assert optimizer_name(auto, runtime("cpu")) == "muon" and optimizer_name(auto, runtime("cuda")) == "muon"
    assert optimizer_name(auto, runtime("cpu", world=2)) == "adamw"  # FSDP2 shards the matrices
    assert loop.muon_ns_dtype(auto, runtime("cpu")) == torch.bfloat16 == loop.muon_ns_dtype(auto, runtime("cuda"))
    monkeypatch.setattr(loop, "cpu_has_bf16_matmul", lambda: False)
    assert optimizer_name(auto, runtime("cpu")) == "muon"
    assert loop.muon_ns_dtype(auto, runtime("cpu")) == torch.float32  # bf16 would be emulated, 2.4x a step
    assert loop.muon_ns_dtype(LoopConfig(muon_ns_dtype="bf16"), runtime("cpu")) == torch.bfloat16
    assert optimizer_name(LoopConfig(optimizer="adamw"), runtime("cpu")) == "adamw"  # asked for, it is used


def test_newton_schulz_in_fp32_equals_a_float64_reference():
    from qianwen.train.muon import orthogonalise

    coefficients, steps = (3.4445, -4.775, 2.0315), 5
    updates = torch.randn(3, 48, 20, generator=torch.Generator().manual_seed(0))
    x = updates.double().mT  # the wide orientation
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        gram = x @ x.mT
        a, b, c = coefficients
        x = a * x + (b * gram + c * gram @ gram) @ x
    ours = orthogonalise(updates, coefficients, steps, 1e-7, torch.float32)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), x.mT, atol=1e-5, rtol=1e-5)
    assert (orthogonalise(updates, coefficients, steps, 1e-7).float() - ours).abs().max() > 1e-4  # bf16 differs


def test_override_values_read_as_toml():
    assert parse_value("3e-4") == 3e-4 and parse_value("12") == 12 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("runs/x") == "runs/x" and parse_value('"a b"') == "a b"
    merged = apply_overrides({"pretrain": {"lr": 1.0}}, ["lr=2", "model.hidden_size=128"], "pretrain")
    assert merged == {"pretrain": {"lr": 2}, "model": {"hidden_size": 128}}
    assert build(LoopConfig, merged["pretrain"], "pretrain").lr == 2.0  # an int where a float goes


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=1", "unknown config key pretrain.lrr; valid keys in [pretrain] are "),
        ("steps=many", "config key pretrain.steps must be an integer, got 'many'"),
        ("compile=1", "config key pretrain.compile must be true or false, got 1"),
        ("nope.x=1", "unknown config key pretrain.nope; valid keys in [pretrain] are "),
        ("justtext", "is not key=value"),
        ("steps=0", "steps must be at least 1"),
        ("optimizer=sgd", "optimizer must be adamw, muon or auto, got 'sgd'"),
    ],
)
def test_bad_settings_are_one_sentence(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, ["data=somewhere", override])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; pass a TOML file to --recipe"):
        load_config(str(tmp_path / "missing.toml"), [])
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain\nlr = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(str(bad), [])
    with pytest.raises(
        ValueError, match=re.escape("unknown recipe 'tinyy'; use one of ['qwen-1.8b', 'small', 'tiny']")
    ):
        load_config("tinyy", [])

    odd = tmp_path / "odd.toml"
    odd.write_text("[pretrian]\nlr = 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_config(str(odd), [])
    good = tmp_path / "good.toml"
    good.write_text('[model]\npreset = "tiny-1m"\n[pretrain]\ndata = "d"\nlr = 1e-3\n[sft]\nlr = 1e-5\n')
    config, model = load_config(str(good), ["steps=7"])
    assert isinstance(config, PretrainConfig) and config.lr == 1e-3 and config.steps == 7
    assert model == {"preset": "tiny-1m"}


def test_a_recipe_by_name_is_the_shipped_file():
    assert load_config("tiny", ["data=somewhere"]) == load_config(str(RECIPES / "tiny.toml"), ["data=somewhere"])


def write_shards(directory, splits: dict[str, list[np.ndarray]], vocab_size=300, eod_id=299):
    directory.mkdir(parents=True, exist_ok=True)
    index = {"format": "qianwen-tokens/1", "dtype": "uint32", "vocab_size": vocab_size, "eod_id": eod_id}
    index["splits"] = {}
    for split, shards in splits.items():
        index["splits"][split] = []
        for i, tokens in enumerate(shards):
            name = f"{split}-{i:05d}.bin"
            tokens.astype("<u4").tofile(directory / name)
            index["splits"][split].append({"file": name, "tokens": len(tokens), "documents": 1})
    (directory / "index.json").write_text(json.dumps(index))


def test_windows_cross_shards_and_cover_an_epoch_once(tmp_path):
    stream = np.arange(1000) % 299
    write_shards(tmp_path, {"train": [stream[:333], stream[333:334], stream[334:]]})
    shards = TokenShards(tmp_path, "train")
    assert shards.num_tokens == 1000
    np.testing.assert_array_equal(shards.tokens(330, 340), stream[330:340])
    sampler = WindowSampler(shards, seq_length=10, seed=3)
    assert sampler.num_windows == 99
    starts = sorted(int(sampler.batch(i, 1)[0, 0]) for i in range(99))
    assert starts == sorted(int(stream[w * 10]) for w in range(99))
    epoch0 = [sampler.window(i) for i in range(99)]
    epoch1 = [sampler.window(99 + i) for i in range(99)]
    assert sorted(epoch0) == list(range(99)) and epoch0 != epoch1
    batch = sampler.batch(5, 4)
    assert batch.shape == (4, 11) and batch.dtype == torch.int64
    np.testing.assert_array_equal(batch[1].numpy(), stream[sampler.window(6) * 10 :][:11])


def test_unigram_entropy_matches_counts(tmp_path):
    tokens = np.array([1, 1, 2, 3, 3, 3, 3, 0])
    write_shards(tmp_path, {"train": [tokens]}, vocab_size=4, eod_id=0)
    p = np.array([1, 2, 1, 4]) / 8
    assert TokenShards(tmp_path, "train").unigram_entropy() == pytest.approx(-(p * np.log(p)).sum())


def test_shard_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"holds no index\.json"):
        TokenShards(tmp_path, "train")
    write_shards(tmp_path, {"train": [np.arange(10)]})
    (tmp_path / "train-00000.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="is missing or not 40 bytes"):
        TokenShards(tmp_path, "train")
    write_shards(tmp_path, {"train": [np.arange(5)]})
    with pytest.raises(ValueError, match="fewer than one window"):
        WindowSampler(TokenShards(tmp_path, "train"), seq_length=8, seed=0)


def test_flops_per_token_counts_every_matmul():
    from qianwen.train.loop import train_flops_per_token

    config = preset("tiny-1m", vocab_size=512)
    d, f, L, T = config.hidden_size, config.intermediate_size, config.num_layers, 64
    per_layer = d * 3 * d + 3 * d + d * d + 3 * d * f + 2 * d
    n = L * per_layer + 512 * d + d  # the output head and final norm; the embedding lookup is no matmul
    assert train_flops_per_token(config, T) == pytest.approx(6 * n + 6 * L * d * T)
    assert math.isfinite(train_flops_per_token(preset("qwen-7b"), 2048))


@pytest.mark.parametrize(("device", "local_rank", "expected"), [("cuda", "0", "cuda:0"), ("cuda", "1", "cuda:1"),
                                                                 ("cuda:0", "1", "cuda:0"), ("auto", "1", "cuda:1")])  # fmt: skip
def test_a_plain_cuda_device_is_this_processs_gpu(monkeypatch, device, local_rank, expected):
    """`device=cuda` names the process's own GPU: torch.cuda.set_device refuses a device without an index."""
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch._utils._get_device_index(d)))
    assert str(loop.init_runtime(device).device) == expected
    assert chosen == [int(expected[-1])]


def test_a_gpu_device_that_is_not_there_is_one_sentence(monkeypatch):
    """device=cuda without CUDA, a GPU index past the machine's count (or a LOCAL_RANK past it under torchrun),
    and a name torch does not know each end in a ValueError that says what to use, not in torch's traceback."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device=cuda asks for a GPU but torch sees no CUDA device; use device=cpu"):
        loop.init_runtime("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device=cuda:2 means GPU 2 .* torch sees 2; name one of cuda:0 to cuda:1"):
        loop.init_runtime("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match=r"device=cuda means GPU 3 .* at most 2 process\(es\) per machine"):
        loop.init_runtime("cuda")
    with pytest.raises(ValueError, match=r"^device='gpu' is not a torch device"):
        loop.init_runtime("gpu")
