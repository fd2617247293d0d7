"""Serving throughput: `qianwen serve` against `transformers serve` (the OpenAI-compatible server in the
transformers package) on the same exported model, same machine, same prompts. For 1, 4 and 16 concurrent
clients, each client streams --requests chat completions one after another (greedy, or sampled with
--temperature and --top-p and a seed per request; --max-tokens each, end of text banned with logit_bias where the
server honours it so every reply has the same length); measured:
aggregate generated tokens/s and the median time to the first token. Each client is a process of its own. The
servers run as separate processes on 127.0.0.1, one at a time, each with every thread count of --threads (the
clients share the machine's cores, so fewer torch threads can be faster); transformers both in its default mode
and with --continuous-batching. Goals: >= 2x transformers at 16 clients, and our 16-client aggregate >= 4x our
single-client rate.

    python -m benchmarks.bench_serve [--model tiny-10m] [--max-tokens 64] [--requests 2] [--threads 1,2] [--rounds 1]
        [--dtype auto|bf16] [--temperature T --top-p P] [--name serve]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import qianwen
from benchmarks.common import write_result
from qianwen.config import preset
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer, qwen_vocabulary

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works.",
    "List five uses of the Python standard library's itertools module.",
    "What is the capital of France, and why is it famous?",
    "Describe the water cycle to a child.",
    "Give three tips for writing readable code.",
    "Summarise the plot of a detective novel you invent.",
    "How do transformers use attention?",
]


def export_model(out: Path, name: str) -> Path:
    """Random weights in `name`'s shape with Qwen's first 8,192 merges as the vocabulary: the HF files both
    servers read."""
    full = Tokenizer.from_file(qwen_vocabulary())
    tok = Tokenizer({b: r for b, r in full.ranks.items() if r < 8192 - 208})
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=tok.vocab_size))
    model.init_weights(0)
    qianwen.save(model, tok, out)
    return out


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no server at {url} after {timeout} s")


def one_request(url: str, model: str, prompt: str, max_tokens: int, extra: dict) -> tuple[float, int, float]:
    """(seconds to the first token, tokens generated, seconds in all) for one streamed chat completion; `extra`
    adds to the body (logit_bias; temperature, top_p and seed when sampled)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    first, tokens, chunks = None, None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        # The client shares the machine's cores with the server: it parses only the chunk that carries usage.
        for line in response.iter_lines():
            if '"content":' in line and '"content":""' not in line.replace(" ", ""):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
            if '"completion_tokens"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return first if first is not None else total, tokens if tokens is not None else chunks, total


def _client(args: tuple) -> list[tuple[float, int, float]]:
    url, model, k, requests, max_tokens, extra, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    return [
        one_request(url, model, PROMPTS[(k + r) % len(PROMPTS)], max_tokens, seeded(extra, 1000 * k + r))
        for r in range(requests)
    ]


def seeded(extra: dict, seed: int) -> dict:
    """A sampled request's body fields with a seed of its own."""
    return {**extra, "seed": seed} if extra.get("temperature") else extra


def load(url: str, model: str, clients: int, requests: int, max_tokens: int, extra: dict) -> dict:
    """Each client is its own process, as real clients are: 16 client threads in one Python process spend the
    GIL parsing streams and held our server at 880-910 tokens/s where 16 processes reached 1,140-1,150."""
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        pool.map(time.sleep, [0] * clients)  # every process up before the clock starts
        start_at = time.time() + 0.5
        jobs = [(url, model, k, requests, max_tokens, extra, start_at) for k in range(clients)]
        results = [r for rs in pool.map(_client, jobs) for r in rs]
        wall = time.time() - start_at
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_median_s": round(statistics.median(r[0] for r in results), 3),
    }


def serve(command: list[str], url: str, env: dict, log: Path):
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_ready(url, process)
    except RuntimeError:
        process.kill()
        raise RuntimeError(f"{command[0]} did not start: {log.read_text()[-2000:]}") from None
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-10m", help="model preset (random weights)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every server and keep each one's fastest round")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="torch thread counts to try")
    parser.add_argument("--servers", default="qianwen,transformers,transformers-cb")
    parser.add_argument("--device", default="cpu", help="where both servers run the model (cpu, cuda)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16"], help="both servers' weights (auto: fp32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, each request seeded")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus of sampled requests")
    parser.add_argument("--name", default="serve", help="results file name")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        model_dir = export_model(workdir / "model", args.model)
        _, tok = qianwen.load(model_dir)
        bias = {str(i): -100.0 for i in [*tok.chat_stop_ids, tok.eod_id]}  # floats: transformers rejects ints
        extra = {"logit_bias": bias}
        if args.temperature:
            extra |= {"temperature": args.temperature, "top_p": args.top_p}
        # Through this Python rather than the console scripts: a machine with the package on PYTHONPATH alone
        # (the GPU machine) has none.
        transformers_cli = [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
        peer_dtype = {"auto": "auto", "bf16": "bfloat16"}[args.dtype]
        servers = {
            "qianwen": (
                [sys.executable, "-m", "qianwen", "serve", "--model", str(model_dir), "--port", "8931",
                 "--served-name", "m", "--max-batch", str(max(levels)), "--device", args.device,
                 "--dtype", args.dtype],
                "http://127.0.0.1:8931",
                "m",
            ),
            # transformers serves each request with its own generate() call by default, or with its paged
            # continuous-batching manager; both are measured and the faster one is the peer.
            "transformers": (
                [*transformers_cli, "serve", str(model_dir), "--port", "8932", "--host", "127.0.0.1",
                 "--device", args.device, "--dtype", peer_dtype],
                "http://127.0.0.1:8932",
                str(model_dir),
            ),
            "transformers-cb": (
                [*transformers_cli, "serve", str(model_dir), "--port", "8933", "--host", "127.0.0.1",
                 "--device", args.device, "--continuous-batching", "--dtype", peer_dtype],
                "http://127.0.0.1:8933",
                str(model_dir),
            ),
        }  # fmt: skip
        rows = []
        # On a small machine the clients share the cores: each server runs with each thread count, and its best
        # counts. The host's speed drifts within minutes, so with --rounds the whole sequence repeats and each
        # (server, threads, clients) keeps its fastest round.
        for threads, name in [
            (int(t), n)
            for _ in range(args.rounds)
            for t in dict.fromkeys(args.threads.split(","))
            for n in args.servers.split(",")
        ]:
            command, url, served = servers[name]
            log = workdir / f"{name}.log"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            process = serve(command, url, env, log)
            try:
                one_request(url, served, PROMPTS[0], 8, seeded(extra, 0))  # warm-up
                for clients in levels:
                    result = load(url, served, clients, args.requests, args.max_tokens, extra)
                    row = {"server": name, "threads": threads, **result}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            except httpx.HTTPError:
                print(log.read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                process.terminate()
                process.wait(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    best_rounds: dict[tuple, dict] = {}
    for r in rows:
        key = (r["server"], r["threads"], r["clients"])
        if key not in best_rounds or r["tokens_per_s"] > best_rounds[key]["tokens_per_s"]:
            best_rounds[key] = r
    rows = list(best_rounds.values())
    top = max(levels)

    def best(server: str, clients: int) -> dict:
        return max(
            (r for r in rows if r["server"] == server and r["clients"] == clients), key=lambda r: r["tokens_per_s"]
        )

    ours = best("qianwen", top)
    peer = max((best(s, top) for s in {r["server"] for r in rows} - {"qianwen"}), key=lambda r: r["tokens_per_s"])
    ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
    alone = [
        r for r in rows if r["server"] == "qianwen" and r["clients"] == min(levels) and r["threads"] == ours["threads"]
    ]
    scaling = ours["tokens_per_s"] / alone[0]["tokens_per_s"]
    print(f"{top} clients: qianwen {ratio:.2f}x {peer['server']}; our {top} vs {min(levels)} client(s): {scaling:.2f}x")
    command = "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:])
    decoding = f"sampled at temperature {args.temperature}, top-p {args.top_p}" if args.temperature else "greedy"
    notes = (
        f"{args.model} with random weights and an 8,192-id vocabulary, {args.dtype} weights; {decoding}, "
        f"{args.max_tokens} tokens per reply, {args.requests} requests per client, the fastest of {args.rounds} "
        f"round(s); at {top} clients, each server at its best thread count, qianwen "
        f"({ours['threads']} thread(s)) {ratio:.2f}x the faster peer mode ({peer['server']}, {peer['threads']} "
        f"thread(s)); our {top}-client rate {scaling:.2f}x our single-client rate at the same thread count."
    )
    write_result(args.name, rows, command.strip(), notes)


if __name__ == "__main__":
    main()
