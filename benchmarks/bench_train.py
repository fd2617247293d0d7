"""Training throughput and MFU of `qianwen pretrain` (the real loop: shards, sampler, AdamW, clipping, logging)
against a plain training loop over transformers' Qwen2ForCausalLM on the same shapes, with the machine's own
matmul peak measured in the same run (the issue's goal: at least 50% of it for the ~40M preset on a CPU).

python -m benchmarks.bench_train [--preset tiny-40m] [--seq 512] [--batch 8] [--steps 8] [--compile]
On a GPU (bf16 autocast on both sides): --device cuda --peak-tflops 989 (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import best_time, write_result
from qianwen.config import parse_value, preset
from qianwen.tokenizer import Tokenizer
from qianwen.train.loop import train_flops_per_token
from qianwen.train.pretrain import load_config, pretrain


def matmul_peak_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: a @ b, repeats=10, warmup=2)


def model_config(args):
    """The preset with the --model changes, as pretrain will build it."""
    changes = {}
    for item in args.model:
        key, _, value = item.removeprefix("model.").partition("=")
        changes[key] = parse_value(value)
    return preset(args.preset, **changes)


def shards(directory: Path, vocab_size: int, tokens: int) -> None:
    """Random tokens in the `qianwen data prep` layout: throughput does not depend on what the tokens say."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    tok.save(directory / "tokenizer")
    rng = np.random.default_rng(0)
    index = {"format": "qianwen-tokens/1", "dtype": "uint32", "vocab_size": vocab_size, "eod_id": 256}
    index["tokenizer"] = str(directory / "tokenizer")
    index["splits"] = {}
    for split, n in (("train", tokens), ("val", tokens // 8)):
        rng.integers(0, 256, n, dtype=np.uint32).tofile(directory / f"{split}-00000.bin")
        index["splits"][split] = [{"file": f"{split}-00000.bin", "tokens": n, "documents": 1}]
    (directory / "index.json").write_text(json.dumps(index))


def ours(args, data: Path, out: Path) -> float:
    overrides = [
        f"data={data}",
        f"out={out}",
        f"model.preset={args.preset}",
        f"seq_length={args.seq}",
        f"batch_size={args.batch}",
        f"steps={args.steps + 2}",
        "log_every=1",
        "eval_batches=1",
        f"compile={'true' if args.compile else 'false'}",
        f"device={args.device}",
        *(f"model.{item.removeprefix('model.')}" for item in args.model),
    ]
    config, model = load_config(None, overrides)
    records = pretrain(config, model)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]  # after two warm-up steps
    return statistics.median(rates)


def theirs(args, vocab_size: int) -> float:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model_config(args)
    config = Qwen2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).to(args.device).train()
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, 256, (args.batch, args.seq + 1), device=args.device)
    bf16 = args.device.startswith("cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return args.batch * args.seq / best_time(step, repeats=args.steps, warmup=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-40m")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--name", default="train")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: measure a CPU matmul)")
    parser.add_argument("--model", nargs="*", default=[], metavar="model.KEY=VALUE", help="preset field changes")
    args = parser.parse_args(argv)
    vocab_size = model_config(args).vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        shards(data, vocab_size, tokens=args.batch * (args.seq + 1) * (args.steps + 4) * 2)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops()
        a = ours(args, data, Path(tmp) / "run")
        gc.collect()  # our model and optimizer state go before the peer's are built (1.8B: ~29 GB each on a GPU)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        b = theirs(args, vocab_size)
    config = model_config(args)
    flops = train_flops_per_token(config, args.seq)
    row = {
        "preset": " ".join([args.preset, *args.model]),
        "device": args.device,
        "params_m": round(config.num_params / 1e6, 1),
        "seq": args.seq,
        "batch": args.batch,
        "compiled": args.compile,
        "unit": "tok/s",
        "ours": round(a),
        "transformers": round(b),
        "ratio": round(a / b, 2),
        "matmul_peak_gflops": round(peak / 1e9),
        "mfu_ours": round(a * flops / peak, 3),
        "mfu_transformers": round(b * flops / peak, 3),
    }
    print(
        f"{args.preset} seq {args.seq} batch {args.batch}{' compiled' if args.compile else ''}: "
        f"qianwen pretrain {a:,.0f} tok/s (MFU {row['mfu_ours']:.1%} of a {peak / 1e9:,.0f} GFLOP/s peak), "
        f"transformers loop {b:,.0f} tok/s (MFU {row['mfu_transformers']:.1%}), ratio {row['ratio']}x"
    )
    write_result(
        args.name, [row], " ".join(["python -m benchmarks.bench_train", *(sys.argv[1:] if argv is None else argv)])
    )


if __name__ == "__main__":
    main()
