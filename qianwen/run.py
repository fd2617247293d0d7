"""`qianwen run`: the recipe end to end, as far as it is built today.

Stages meet through files in the run directory (DESIGN.md): tokenizer/, base/, report.md. Today's path
is tokenizer -> untrained tiny model -> checkpoint round trip -> a streamed sample -> the report card;
data prep, pretraining, SFT, reward model, PPO, evaluation, tool use and serving are future stages.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qianwen
from qianwen.config import preset
from qianwen.tokenizer import Tokenizer, qwen_vocabulary
from qianwen.util import atomic_write

QWEN_EMBEDDING_ROWS = 151936  # 151,851 ids padded (QWEN_SPEC.md section 1)
SAMPLE_PROMPT = "Give me a short introduction to large language models."
SAMPLE_TOKENS = 32
HELD_OUT_BUCKET = 7  # crc32(path) % 10: a fixed tenth of the stdlib, whatever files this Python ships
NOT_BUILT = [
    ("data prep", "read, normalise, deduplicate (exact + MinHash), filter, decontaminate, tokenise and pack shards"),
    ("pretraining", "next-token training with AdamW and a cosine schedule, checkpoint/resume, FSDP2"),
    ("SFT", "ChatML fine-tuning with the loss mask of QWEN_SPEC.md section 4"),
    ("reward model", "preference-model pretraining, then fine-tuning on high-quality pairs"),
    ("PPO", "policy, value, reference and reward models; KL 0.04; PPO-ptx"),
    ("evaluation", "HumanEval, GSM8K, MMLU/C-Eval, bits per byte, long context"),
    ("tool use", "ReAct prompting, parsing and the tool loop"),
    ("serving", "an OpenAI-compatible server with batching and a web chat page"),
]


class RunError(RuntimeError):
    """A stage that could not run or failed its own check; the message says which and why."""


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str
    details: dict = field(default_factory=dict)


Log = Callable[..., None]


def run(out: str | os.PathLike, seed: int = 0, sample_bytes: int = 1_000_000, log: Log = print) -> Path:
    """Run every stage that exists into `out`; return the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"qianwen run -> {out} (seed {seed})")
    stages: list[StageResult] = []
    tok = _stage(1, "tokenizer", lambda: tokenizer_stage(out, sample_bytes, log), stages, log)
    model = _stage(2, "model", lambda: model_stage(out, tok, seed, log), stages, log)
    loaded = _stage(3, "reload", lambda: reload_stage(out, model, tok), stages, log)
    _stage(4, "sample", lambda: sample_stage(*loaded, log), stages, log)
    report = _stage(5, "report", lambda: report_stage(out, seed, stages), stages, log)
    log(f"\nreport: {report}")
    log(f"chat with the (untrained) model: {cli_name()} chat --model {out / 'base'}")
    return report


def _stage(index: int, name: str, work: Callable, stages: list[StageResult], log: Log):
    """Time one stage and print its one-line result."""
    log(f"[{index}/5] {name}")
    start = time.perf_counter()
    value, summary, details = work()
    seconds = time.perf_counter() - start
    stages.append(StageResult(name, seconds, summary, details))
    log(f"      {summary}  ({seconds:.1f}s)")
    return value


# ---------------------------------------------------------------------------
# 1. tokenizer


def stdlib_sample(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, text) of held-out standard-library sources, in path order, about max_bytes in all."""
    root = Path(os.__file__).parent
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    sample, total = [], 0
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if zlib.crc32(rel.encode()) % 10 != HELD_OUT_BUCKET:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        sample.append((rel, text))
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not sample:
        raise RunError(f"found no Python sources under {root} to measure the tokenizer on.")
    return sample


def tokenizer_stage(out: Path, sample_bytes: int, log: Log):
    vocab = qwen_vocabulary()
    tok = Tokenizer.from_file(vocab)
    log(f"      loaded {tok.vocab_size:,} ids from {vocab}; writing {out / 'tokenizer'}")
    tok.save(out / "tokenizer")
    sample = stdlib_sample(sample_bytes)
    texts = [text for _, text in sample]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    log(f"      encoding {n_bytes / 1e6:.2f} MB of held-out stdlib source ({len(texts)} files)")
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    bpt = n_bytes / n_tokens
    summary = f"Qwen vocabulary, {tok.vocab_size:,} ids; {bpt:.3f} bytes/token on {n_bytes / 1e6:.2f} MB of Python"
    details = {
        "vocabulary": str(vocab),
        "ids": tok.vocab_size,
        "sample files": len(texts),
        "sample bytes": n_bytes,
        "sample tokens": n_tokens,
        "bytes per token": round(bpt, 4),
        "first sample files": ", ".join(rel for rel, _ in sample[:5]),
    }
    return tok, summary, details


# ---------------------------------------------------------------------------
# 2. model, 3. reload


def model_stage(out: Path, tok: Tokenizer, seed: int, log: Log):
    config = preset("tiny-1m", vocab_size=QWEN_EMBEDDING_ROWS)
    model = qianwen.Transformer(config)
    model.init_weights(seed)
    model.eval()
    log(f"      tiny-1m with Qwen's {QWEN_EMBEDDING_ROWS:,}-row embeddings; saving {out / 'base'}")
    qianwen.save(model, tok, out / "base", metadata={"run": {"stage": "init", "seed": seed, "trained_tokens": 0}})
    size = sum(p.stat().st_size for p in (out / "base").iterdir() if p.is_file())
    body = config.num_params - 2 * config.vocab_size * config.hidden_size
    summary = (
        f"tiny-1m, {config.num_params / 1e6:.2f}M parameters ({body / 1e6:.2f}M outside the embeddings), "
        f"untrained (seed {seed}); {size / 1e6:.1f} MB on disk"
    )
    details = {
        "preset": "tiny-1m",
        "parameters": config.num_params,
        "parameters outside the embeddings": body,
        "hidden/layers/heads": f"{config.hidden_size}/{config.num_layers}/{config.num_heads}",
        "vocab_size": config.vocab_size,
        "directory": str(out / "base"),
        "bytes on disk": size,
    }
    return model, summary, details


@torch.inference_mode()
def reload_stage(out: Path, model: qianwen.Transformer, tok: Tokenizer):
    loaded, loaded_tok = qianwen.load(out / "base")
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n# 千问"
    ids = tok.encode(text)
    if loaded_tok.encode(text) != ids:
        raise RunError(f"the tokenizer saved in {out / 'base'} encodes differently from the one in memory.")
    x = torch.tensor([ids])
    diff = (loaded(x) - model(x)).abs().max().item()
    if diff > 1e-5:
        raise RunError(f"the reloaded model's logits differ by {diff:.3g} from the model in memory; saving is broken.")
    summary = f"reloaded {out / 'base'}: max abs logit difference {diff:.3g} over {len(ids)} tokens"
    return (loaded, loaded_tok), summary, {"tokens compared": len(ids), "max abs logit difference": diff}


# ---------------------------------------------------------------------------
# 4. sample, 5. report


def sample_stage(model: qianwen.Transformer, tok: Tokenizer, log: Log):
    prompt = tok.render_chat([{"role": "user", "content": SAMPLE_PROMPT}])
    log(f"      user: {SAMPLE_PROMPT}")
    log("      the weights are untrained, so this reply is noise:")
    log("      assistant: ", end="", flush=True)
    start = time.perf_counter()
    parts = []
    for delta in qianwen.stream(model, tok, prompt, SAMPLE_TOKENS, stop_ids=[]):
        parts.append(delta)
        log(delta, end="", flush=True)
    seconds = time.perf_counter() - start
    log()
    rate = SAMPLE_TOKENS / seconds
    summary = f"{SAMPLE_TOKENS} greedy tokens from a ChatML prompt at {rate:.0f} tokens/s with prefill (noise: untrained weights)"
    details = {"prompt tokens": len(prompt), "tokens/s": round(rate, 1), "text": "".join(parts)}
    return None, summary, details


def report_stage(out: Path, seed: int, stages: list[StageResult]):
    path = out / "report.md"
    atomic_write(path, render_report(out, seed, stages))
    return path, f"wrote {path}", {}


def cli_name() -> str:
    """`qianwen` if the shell finds this installation's script, else its path
    (after `make run` the virtualenv is usually not activated)."""
    script = Path(sys.executable).with_name("qianwen")
    found = shutil.which("qianwen")
    if found and Path(found).resolve() == script.resolve():
        return "qianwen"
    return os.path.relpath(script) if script.exists() else "qianwen"


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qianwen": f"{qianwen.__version__} (git {git_commit()})",
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
    }


def git_commit() -> str:
    """The source tree's commit, marked dirty if it has uncommitted changes; "unknown" outside a checkout."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def render_report(out: Path, seed: int, stages: list[StageResult]) -> str:
    lines = [
        "# qianwen run report",
        "",
        f"Run directory `{out}`, seed {seed}, finished {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in environment().items()),
        "",
        "## Stages",
        "",
        "| stage | time | result |",
        "|---|---|---|",
        *(f"| {i}. {s.name} | {s.seconds:.1f} s | {s.summary} |" for i, s in enumerate(stages, 1)),
        "",
    ]
    for i, stage in enumerate(stages, 1):
        lines += [f"### {i}. {stage.name}", ""]
        lines += [f"- {key}: {value}" for key, value in stage.details.items() if key != "text"]
        if "text" in stage.details:
            lines += ["", "The weights are untrained, so the reply is noise:", "", "````text"]
            lines += [stage.details["text"], "````"]
        lines.append("")
    lines += ["## Not built yet", "", "Future stages of `qianwen run`:", ""]
    lines += [f"- **{name}**: {what}" for name, what in NOT_BUILT]
    lines += ["", "## Next", "", "```", f"{cli_name()} chat --model {out / 'base'}", "```", ""]
    return "\n".join(lines)
