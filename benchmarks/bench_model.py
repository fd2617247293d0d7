"""qianwen's Transformer against transformers' Qwen2ForCausalLM on the same
weights, threads and device: training step, greedy decoding, prefill.

    python -m benchmarks.bench_model                      # CPU fp32, tiny-10m and tiny-40m
    python -m benchmarks.bench_model --device cuda --dtype bf16 --sizes qwen-1.8b --only train_compiled
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

import qianwen
from benchmarks.common import best_time, write_result
from qianwen.checkpoint import config_to_qwen2, qwen2_state_dict
from qianwen.config import preset
from qianwen.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(size: str, device: str, dtype: torch.dtype) -> tuple[Transformer, Qwen2ForCausalLM]:
    """Our model and transformers' with the same weights (handed over in memory:
    the tests check the on-disk path)."""
    config = preset(size)
    ours = Transformer(config)
    ours.init_weights(0)
    ours = ours.to(device, dtype)
    hf_config = Qwen2Config(**config_to_qwen2(config, dtype))
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        theirs = Qwen2ForCausalLM(hf_config)
    theirs.load_state_dict({k: v.clone() for k, v in qwen2_state_dict(ours).items()}, assign=True)
    # Rebuilt off the meta device; its inverse frequencies stay fp32, as from_pretrained leaves them.
    theirs.model.rotary_emb = type(theirs.model.rotary_emb)(hf_config).to(device)
    return ours, theirs.eval()


def train_flops_per_token(config, seq: int) -> float:
    """6N for the matmuls plus causal attention scores and values (PaLM's count)."""
    n = config.num_params - config.vocab_size * config.hidden_size  # the embedding lookup is no matmul
    return 6 * n + 6 * config.num_layers * config.num_heads * config.head_dim * seq


def train_rate(model, batch: int, seq: int, ours: bool, steps: int) -> float:
    """Tokens/s of forward + backward + AdamW on random tokens."""
    model.train()
    vocab = (model._orig_mod if hasattr(model, "_orig_mod") else model).config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq + 1), device=next(model.parameters()).device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        if ours:  # the plain loss, so torch.compile can fuse it (the fused loss: bench_loss.py)
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        else:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = best_time(step, repeats=steps, warmup=2)
    model.eval()
    return batch * seq / seconds


def decode_rate(ours, theirs, new_tokens: int, compile: bool = False) -> tuple[float, float]:
    prompt = list(range(100, 116))
    device = next(ours.parameters()).device

    def run_ours():
        qianwen.generate(ours, None, prompt, new_tokens, stop_ids=[], compile=compile)

    def run_theirs():
        with torch.inference_mode():
            theirs.generate(
                torch.tensor([prompt], device=device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    ours_s = best_time(run_ours, repeats=3)
    theirs_s = best_time(run_theirs, repeats=3)
    return new_tokens / ours_s, new_tokens / theirs_s


def prefill_rate(ours, theirs, length: int) -> tuple[float, float]:
    """Tokens/s of a prompt's forward pass with a KV cache and last-position logits only."""
    device = next(ours.parameters()).device
    ids = torch.randint(0, ours.config.vocab_size, (1, length), device=device)

    def run_ours():
        with torch.inference_mode():
            ours(ids, cache=ours.new_cache(1, length + 1), last_only=True)

    def run_theirs():
        with torch.inference_mode():
            theirs(ids, use_cache=True, logits_to_keep=1)

    return length / best_time(run_ours, repeats=5), length / best_time(run_theirs, repeats=5)


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """GFLOP/s of one large square matmul: the ceiling the model's matmuls can approach."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeats=5) / 1e9


def train_row(base: dict, args, task: str, a: float, b: float, **extra) -> dict:
    row = {**base, "task": task, "unit": "tok/s", "ours": round(a), "transformers": round(b), "ratio": round(a / b, 2)}
    row.update(batch=args.batch, seq=args.seq, **extra)
    if args.peak_tflops:
        flops = base["train_flops_per_token"]
        row["mfu_ours"] = round(a * flops / args.peak_tflops / 1e12, 3)
        row["mfu_transformers"] = round(b * flops / args.peak_tflops / 1e12, 3)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny-10m", "tiny-40m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument(
        "--only",
        nargs="+",
        default=["train", "decode", "prefill"],
        choices=["train", "decode", "prefill", "train_compiled", "decode_compiled"],
        help="the _compiled tasks run torch.compile (CUDA graphs for decoding on a GPU)",
    )
    parser.add_argument("--name", default="model")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 SXM bf16 dense: 989)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []

    def report(row: dict) -> None:
        print(json.dumps(row), flush=True)  # as it comes: a later step may run out of time
        rows.append(row)

    for size in args.sizes:
        ours, theirs = build(size, args.device, DTYPES[args.dtype])
        base = {
            "size": size,
            "params_m": round(ours.config.num_params / 1e6, 1),
            "device": args.device,
            "dtype": args.dtype,
        }
        base["train_flops_per_token"] = train_flops_per_token(ours.config, args.seq)

        if "train" in args.only:
            a = train_rate(ours, args.batch, args.seq, True, args.steps)
            b = train_rate(theirs, args.batch, args.seq, False, args.steps)
            report(train_row(base, args, "train_step", a, b))
        if "decode" in args.only:
            a, b = decode_rate(ours, theirs, args.new_tokens)
            report(
                {
                    **base,
                    "task": f"greedy_decode_{args.new_tokens}",
                    "unit": "tok/s",
                    "ours": round(a, 1),
                    "transformers": round(b, 1),
                    "ratio": round(a / b, 2),
                }
            )
        if "prefill" in args.only:
            a, b = prefill_rate(ours, theirs, args.prefill)
            report(
                {
                    **base,
                    "task": f"prefill_{args.prefill}",
                    "unit": "tok/s",
                    "ours": round(a),
                    "transformers": round(b),
                    "ratio": round(a / b, 2),
                }
            )
        if "decode_compiled" in args.only:
            a, b = decode_rate(ours, theirs, args.new_tokens, compile=True)
            report(
                {
                    **base,
                    "task": f"greedy_decode_{args.new_tokens}_compiled",
                    "unit": "tok/s",
                    "ours": round(a, 1),
                    "transformers": round(b, 1),
                    "ratio": round(a / b, 2),
                    "note": "ours torch.compile'd step, transformers eager generate",
                }
            )
        if "train_compiled" in args.only:
            c = train_rate(torch.compile(ours), args.batch, args.seq, True, args.steps)
            d = train_rate(torch.compile(theirs), args.batch, args.seq, False, args.steps)
            report(train_row(base, args, "train_step_compiled", c, d, note="both torch.compile'd"))
        del ours, theirs
    command = "python -m benchmarks.bench_model " + " ".join(sys.argv[1:] if argv is None else argv)
    peak = matmul_peak(args.device, DTYPES[args.dtype])
    write_result(args.name, rows, command, notes=f"matmul_peak_gflops={peak:.0f}")


if __name__ == "__main__":
    main()
