"""Correctness on a CUDA device, against transformers on the same weights:
fp32 logits, bf16 error against an fp64 reference, greedy tokens, and
torch.compile against eager. Prints one line per check; exits 1 on a failure.

    python -m benchmarks.gpu_check
"""

from __future__ import annotations

import json
import queue
import sys

import torch

import qianwen
from benchmarks.bench_model import build
from qianwen.config import ModelConfig, preset


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def engine_replies(model, tok, params, n: int = 2) -> list[tuple[str, str]]:
    """(text, finish reason) of each of n choices for one prompt through the serving engine."""
    from qianwen.engine import Engine

    done: queue.Queue = queue.Queue()
    texts: dict[int, str] = {}

    def emit(job, event):
        texts[job.index] = texts.get(job.index, "") + event.text
        if event.finish_reason:
            done.put((job.index, event.finish_reason))

    engine = Engine(model, tok, max_batch=4)
    try:
        engine.submit(tok.encode("Once upon a time"), params, n, emit)
        finished = dict(done.get(timeout=60) for _ in range(n))
    finally:
        engine.close()
    return [(texts[i], finished[i]) for i in range(n)]


def engine_checks() -> list[dict]:
    """The serving engine on the GPU: greedy text as on the CPU; sampling with a seed (the request's generator
    lives on the CPU), penalties, a logit bias and log-probabilities run and repeat."""
    from qianwen.engine import Params
    from qianwen.tokenizer import Tokenizer

    tok = Tokenizer({bytes([i]): i for i in range(256)})
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128)  # fmt: skip
    model = qianwen.Transformer(config)
    model.init_weights(0)
    greedy = Params(max_tokens=24, temperature=0)
    cpu = engine_replies(model, tok, greedy)
    model.cuda()
    gpu = engine_replies(model, tok, greedy)
    sampled = Params(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, frequency_penalty=0.5, logprobs=2,
                     logit_bias=((65, 3.0),))  # fmt: skip
    first, again = engine_replies(model, tok, sampled), engine_replies(model, tok, sampled)
    return [
        {"check": "engine greedy text on CUDA equals the CPU's", "pass": gpu == cpu},
        {"check": "engine sampling on CUDA runs and its seed repeats",
         "pass": first == again and all(r in ("stop", "length") for _, r in first)},
    ]  # fmt: skip


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results, ok = [], True
    config = ModelConfig(
        vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=640
    )
    qianwen.config.PRESETS["check"] = config
    ours, theirs = build("check", "cuda", torch.float32)
    ids = torch.randint(0, 4096, (2, 300), device="cuda")
    with torch.no_grad():
        ref = theirs.double()(ids).logits
        theirs.float()
        fp32 = (ours(ids) - theirs(ids).logits).abs().max().item()
        results.append({"check": "fp32 logits vs transformers", "max_abs_diff": fp32, "pass": fp32 <= 1e-4})

        greedy_ref = theirs.generate(ids[:1, :8], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        greedy = qianwen.generate(ours, None, ids[0, :8].tolist(), 32, stop_ids=[]).token_ids
        results.append({"check": "32 greedy tokens vs transformers", "pass": greedy == greedy_ref[0, 8:].tolist()})

        graphed = qianwen.generate(ours, None, ids[0, :8].tolist(), 32, stop_ids=[], compile=True).token_ids
        results.append({"check": "CUDA-graph decoding gives the eager tokens", "pass": graphed == greedy})

        compiled = torch.compile(ours)
        diff = (compiled(ids) - ours(ids)).abs().max().item()
        results.append({"check": "torch.compile vs eager (fp32)", "max_abs_diff": diff, "pass": diff <= 1e-4})

        ours_bf, theirs_bf = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
        theirs_bf.model.rotary_emb.float()  # keep HF's inverse frequencies fp32, as from_pretrained does
        e_ours = relative_error(ours_bf(ids), ref)
        e_theirs = relative_error(theirs_bf(ids).logits, ref)
        results.append(
            {"check": "bf16 relative error vs fp64", "ours": e_ours, "transformers": e_theirs, "pass": e_ours < 1e-2}
        )
    results += engine_checks()
    big = preset("qwen-1.8b")
    with torch.device("cuda"):
        model = qianwen.Transformer(big).to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randint(0, big.vocab_size, (1, 4096), device="cuda"), last_only=True)
    results.append({"check": "qwen-1.8b bf16 4096-token forward is finite", "pass": bool(torch.isfinite(out).all())})
    for r in results:
        print(json.dumps(r))
        ok &= r["pass"]
    print("ALL PASS" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
