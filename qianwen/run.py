"""`qianwen run`: the recipe end to end, as far as it is built today.

Stages meet through files in the run directory (DESIGN.md): tokenizer/ -> data/ -> base/ -> tasks/ ->
sft/ -> rm/ -> ppo/ -> report.md. A stage whose outputs are complete is skipped on a re-run, and an
interrupted pretraining or SFT resumes from its newest checkpoint. The recipe (qianwen/recipes/tiny.toml by
default) holds one section per stage; any key can be overridden as `section.key=value`. Each model is
then scored on the held-out synthetic tasks. Long-context evaluation, tool use and serving are future
stages, listed in the report as not built.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qianwen
from qianwen.config import apply_overrides, load_recipe
from qianwen.util import atomic_write

RECIPES = Path(__file__).parent / "recipes"
SAMPLE_PROMPT = "def fibonacci(n):\n"
SAMPLE_TOKENS = 48
CHAT_PROMPT = "Tom has 12 apples and buys 7 more. How many apples does he have now?"
NOT_BUILT = [
    ("long-context evaluation", "perplexity past the training length with dynamic NTK, LogN and windows"),
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
    skipped: bool = False


Log = Callable[..., None]
STAGES = ("tokenizer", "data", "pretrain", "tasks", "sft", "rm", "ppo", "eval", "sample", "report")
EVAL_KEYS = {"tasks": ["arith"], "limit": 100, "batch_size": 16, "max_new_tokens": 64}
EVALUATED = ("base", "sft", "ppo")
TASK_KEYS = {"seed": 0, "sft": 2000, "pairs": 1000, "pmp": 4000, "ppo": 1000, "eval_size": 200, "flip": 0.1}


def recipe_path(name: str) -> Path:
    """A recipe by name (tiny) or path (my.toml)."""
    path = Path(name)
    if path.suffix != ".toml":
        path = RECIPES / f"{name}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES.glob("*.toml"))
            raise ValueError(f"unknown recipe {name!r}; use one of {known} or a path to a .toml file.")
    return path


def run(
    out: str | os.PathLike,
    recipe: str = "tiny",
    overrides: Sequence[str] = (),
    seed: int = 0,
    log: Log = print,
) -> Path:
    """Run every built stage into `out`, skipping the ones already complete; return the report's path."""
    out = Path(out)
    path = recipe_path(recipe)
    sections = apply_overrides(load_recipe(path), overrides, default_section="run")
    unknown = sorted(set(sections.get("run", {})))
    if unknown:
        raise ValueError(
            f"unknown run key(s) {unknown}; prefix a stage's keys with its section, e.g. pretrain.steps=10."
        )
    check_sections(sections, out, seed)
    out.mkdir(parents=True, exist_ok=True)
    log(f"qianwen run -> {out} (recipe {path}, seed {seed})")
    stages: list[StageResult] = []
    steps = [
        lambda: tokenizer_stage(out, sections.get("tokenizer", {}), log),
        lambda: data_stage(out, sections, log),
        lambda: pretrain_stage(out, sections, seed, log),
        lambda: tasks_stage(out, sections.get("tasks", {}), log),
        lambda: sft_stage(out, sections, seed, log),
        lambda: rm_stage(out, sections, seed, log),
        lambda: ppo_stage(out, sections, seed, log),
        lambda: eval_stage(out, sections.get("eval", {}), seed, log),
        lambda: sample_stage(out, log),
        lambda: report_stage(out, path, seed, stages),
    ]
    report = None
    for index, (name, work) in enumerate(zip(STAGES, steps), 1):
        log(f"[{index}/{len(STAGES)}] {name}")
        start = time.perf_counter()
        report, summary, details, skipped = work()
        seconds = time.perf_counter() - start
        stages.append(StageResult(name, seconds, summary, details, skipped))
        log(f"      {summary}  ({'done before, skipped' if skipped else f'{seconds:.1f}s'})")
    log(f"\nreport: {report}")
    log(f"chat with the model: {cli_name()} chat --model {out / 'ppo'}")
    return report


# ---------------------------------------------------------------------------
# 1. tokenizer, 2. data, 3. pretrain


TOKENIZER_KEYS = {"vocab_size": 8192, "max_bytes": None, "inputs": []}


def check_sections(sections: dict, out: Path, seed: int) -> None:
    """Every stage's settings, checked before the first stage starts, so a typo fails in a second, not later."""
    from qianwen.config import preset

    unknown = sorted(set(sections.get("tokenizer", {})) - set(TOKENIZER_KEYS))
    if unknown:
        raise ValueError(f"unknown tokenizer key(s) {unknown}; valid keys are {sorted(TOKENIZER_KEYS)}.")
    prep_config(sections)
    pretrain_config(sections, out, seed)
    unknown = sorted(set(sections.get("tasks", {})) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"unknown tasks key(s) {unknown}; valid keys are {sorted(TASK_KEYS)}.")
    for name in ("sft", "rm", "ppo"):
        alignment_config(name, sections, out, seed)
    unknown = sorted(set(sections.get("eval", {})) - set(EVAL_KEYS))
    if unknown:
        raise ValueError(f"unknown eval key(s) {unknown}; valid keys are {sorted(EVAL_KEYS)}.")
    model = dict(sections.get("model", {}))
    preset(model.pop("preset", "tiny-10m"), **model)


def prep_config(sections: dict):
    from qianwen.config import build
    from qianwen.data.config import PrepConfig

    section = {k: v for k, v in sections.get("data", {}).items() if k != "inputs"}
    config = build(PrepConfig, section, "data")
    config.check()
    return config


def pretrain_config(sections: dict, out: Path, seed: int):
    from qianwen.config import build
    from qianwen.train.pretrain import PretrainConfig

    section = {**sections.get("pretrain", {}), "data": str(out / "data"), "out": str(out)}
    section.setdefault("seed", seed)
    return build(PretrainConfig, section, "pretrain")


def tokenizer_stage(out: Path, section: dict, log: Log):
    from qianwen.bpe import train

    directory = out / "tokenizer"
    done = directory / "bpe.json"
    skipped = done.is_file()
    if not skipped:
        settings = dict(section)
        vocab_size = settings.pop("vocab_size", 8192)
        max_bytes = settings.pop("max_bytes", None)
        inputs = settings.pop("inputs", [])
        if settings:
            raise ValueError(
                f"unknown tokenizer key(s) {sorted(settings)}; valid keys are inputs, max_bytes, vocab_size."
            )
        train(inputs, vocab_size, directory, max_bytes=max_bytes, force=True, log=lambda *a, **k: log("     ", *a, **k))
    meta = json.loads(done.read_text())
    held = meta.get("held_out") or {}
    summary = f"{meta['vocab_size']:,} ids trained on {meta['corpus']['train_bytes'] / 1e6:.1f} MB"
    if held.get("bytes_per_token"):
        summary += (
            f"; {held['bytes_per_token']:.3f} bytes/token on held-out text "
            f"(Qwen's 151,851 ids: {held['qwen_bytes_per_token']:.3f})"
        )
    return None, summary, _flatten(meta), skipped


def data_stage(out: Path, sections: dict, log: Log):
    from qianwen.config import build
    from qianwen.data.config import PrepConfig
    from qianwen.data.prep import prep, summary

    directory = out / "data"
    skipped = (directory / "index.json").is_file()
    if not skipped:
        section = dict(sections.get("data", {}))
        inputs = section.pop("inputs", [])
        config = build(PrepConfig, section, "data")
        config.check()
        start = time.perf_counter()
        stats = prep(inputs, out / "tokenizer", directory, config)
        for line in summary(stats, directory, time.perf_counter() - start).splitlines():
            log(f"      {line}")
    stats = json.loads((directory / "stats.json").read_text())
    train, val = stats["output"]["train"], stats["output"]["val"]
    removed = {
        name: sum(stage["removed"].values()) for name, stage in stats["stages"].items() if stage.get("enabled", True)
    }
    summary_line = (
        f"{stats['read']['documents']:,} documents read, {train['documents']:,} kept for training "
        f"({train['tokens']:,} tokens) and {val['documents']:,} for validation ({val['tokens']:,} tokens); removed "
        + ", ".join(f"{name} {n}" for name, n in removed.items())
    )
    details = {"malformed records": stats["read"]["malformed"]}
    for name, stage in stats["stages"].items():
        details[name] = (
            f"{stage['documents_in']:,} -> {stage['documents_out']:,} documents "
            f"({', '.join(f'{r} {n}' for r, n in stage['removed'].items()) or 'none removed'})"
        )
    return None, summary_line, details, skipped


def pretrain_stage(out: Path, sections: dict, seed: int, log: Log):
    from qianwen.config import build
    from qianwen.train.pretrain import PretrainConfig, pretrain

    section = {**sections.get("pretrain", {}), "data": str(out / "data"), "out": str(out)}
    section.setdefault("seed", seed)
    config = build(PretrainConfig, section, "pretrain")
    meta_path = out / "base" / "qianwen.json"
    metrics = out / "metrics" / "pretrain.jsonl"
    skipped = meta_path.is_file() and json.loads(meta_path.read_text()).get("stage") == "pretrain"
    if not skipped:
        resume = (out / "checkpoints" / "pretrain" / "latest").is_file()
        if resume:
            log("      resuming from the newest checkpoint")
        pretrain(config, dict(sections.get("model", {})), resume=resume)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    meta = json.loads(meta_path.read_text())
    entropy = meta.get("unigram_entropy")
    last = train[-1]
    summary = (
        f"{last['step']} steps, {last['tokens']:,} tokens; train loss {train[0]['loss']:.2f} -> {last['loss']:.2f}"
    )
    if val:
        summary += f", validation loss {val[-1]['val_loss']:.3f} ({val[-1]['val_bpb']:.3f} bits/byte)"
    if entropy:
        summary += f" vs the data's unigram entropy {entropy:.3f}"
    details = {
        "model": meta["model"],
        "parameters": f"{qianwen.ModelConfig.from_dict(meta['model']).num_params:,}",
        "tokens/s (last logged step)": last["tokens_per_s"],
        "MFU (last logged step)": last.get("mfu"),
        "validation": [{k: r[k] for k in ("step", "val_loss", "val_bpb")} for r in val],
        "metrics": str(metrics),
    }
    return None, summary, details, skipped


# ---------------------------------------------------------------------------
# 4. tasks, 5. SFT, 6. reward model, 7. PPO


def alignment_config(name: str, sections: dict, out: Path, seed: int):
    """The stage's settings with the run's paths filled in (a recipe sets only hyper-parameters)."""
    from qianwen.config import build

    tasks = out / "tasks"
    paths = {
        "sft": {"model": out / "base", "data": tasks / "sft.jsonl", "out": out},
        "rm": {"model": out / "sft", "data": tasks / "rm.jsonl", "pmp_data": tasks / "pmp.jsonl", "out": out},
        "ppo": {"policy": out / "sft", "reward_model": out / "rm", "prompts": tasks / "ppo.jsonl", "out": out},
    }[name]
    section = {"seed": seed, **sections.get(name, {}), **{k: str(v) for k, v in paths.items()}}
    if name == "sft":
        from qianwen.train.sft import SFTConfig as cls
    elif name == "rm":
        from qianwen.train.reward import RMConfig as cls
    else:
        from qianwen.train.ppo import PPOConfig as cls
    return build(cls, section, name)


def _done(directory: Path, stage: str) -> bool:
    meta = directory / "qianwen.json"
    return meta.is_file() and json.loads(meta.read_text()).get("stage") == stage


def _records(out: Path, stage: str) -> list[dict]:
    path = out / "metrics" / f"{stage}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def tasks_stage(out: Path, section: dict, log: Log):
    from qianwen.data.synthetic import make_all

    directory = out / "tasks"
    skipped = (directory / "manifest.json").is_file()
    if not skipped:
        make_all(directory, **{**TASK_KEYS, **section})
    manifest = json.loads((directory / "manifest.json").read_text())
    counts = {name: files["records"] for name, files in manifest["files"].items()}
    summary = "synthetic tasks (arithmetic, instructions, tool use; English and Chinese): " + ", ".join(
        f"{name} {n:,}" for name, n in counts.items()
    )
    return None, summary, {f"{name}": n for name, n in counts.items()}, skipped


def sft_stage(out: Path, sections: dict, seed: int, log: Log):
    from qianwen.train.sft import sft

    skipped = _done(out / "sft", "sft")
    if not skipped:
        resume = (out / "checkpoints" / "sft" / "latest").is_file()
        sft(alignment_config("sft", sections, out, seed), resume=resume)
    train = [r for r in _records(out, "sft") if "loss" in r]
    val = [r for r in _records(out, "sft") if "val_loss" in r]
    meta = json.loads((out / "sft" / "qianwen.json").read_text())
    summary = f"{train[-1]['step']} steps on {meta['conversations']['train']:,} conversations; loss {train[0]['loss']:.2f} -> {train[-1]['loss']:.2f}"
    if val:
        summary += f", held-out loss {val[-1]['val_loss']:.3f}"
    return (
        None,
        summary,
        {"conversations": meta["conversations"], "metrics": str(out / "metrics" / "sft.jsonl")},
        skipped,
    )


def rm_stage(out: Path, sections: dict, seed: int, log: Log):
    from qianwen.train.reward import reward_model

    skipped = _done(out / "rm", "rm")
    if not skipped:
        resume = any((out / "checkpoints" / s / "latest").is_file() for s in ("rm-pmp", "rm"))
        reward_model(alignment_config("rm", sections, out, seed), resume=resume)
    accuracy = {}
    for stage in ("rm-pmp", "rm"):
        if (out / stage / "qianwen.json").is_file():
            accuracy[stage] = json.loads((out / stage / "qianwen.json").read_text()).get("val_accuracy")
    meta = json.loads((out / "rm" / "qianwen.json").read_text())
    summary = "held-out pairwise accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items() if v is not None)
    details = {"accuracy": accuracy, "reward mean/std": meta.get("reward")}
    return None, summary, details, skipped


def ppo_stage(out: Path, sections: dict, seed: int, log: Log):
    from qianwen.train.ppo import ppo

    skipped = _done(out / "ppo", "ppo")
    if not skipped:
        ppo(alignment_config("ppo", sections, out, seed))
    records = _records(out, "ppo")
    first, last = records[0], records[-1]
    summary = (
        f"{last['step']} steps; reward {first['reward']:.3f} -> {last['reward']:.3f}, KL {last['kl']:.3f} nats, "
        f"replies ended {first['ended_fraction']:.0%} -> {last['ended_fraction']:.0%}"
    )
    return None, summary, {"first step": first, "last step": last}, skipped


def eval_stage(out: Path, section: dict, seed: int, log: Log):
    """Each model of the run on the held-out synthetic tasks (exact match), one summary per model."""
    from qianwen.eval import harness, tasks

    settings = {**EVAL_KEYS, **section}
    modules = {name: tasks.load(name) for name in tasks.resolve(settings["tasks"])}
    extra = {"max_new_tokens": str(settings["max_new_tokens"])}
    options = harness.TaskOptions(out / "tasks", settings["limit"], settings["batch_size"], seed)
    scores, skipped = {}, True
    for stage in EVALUATED:
        target = out / "eval" / f"{stage}.json"
        if not target.is_file():
            skipped = False
            model, tok = qianwen.load(out / stage)
            meta = {"model": str(out / stage), "limit": settings["limit"], "seed": seed}
            harness.run_tasks(
                model, tok, modules, options, extra, lambda d, t=target, m=meta: harness.write_outputs(t, d, m)
            )
        summary = json.loads(target.read_text())["tasks"]
        scores[stage] = {task: next(iter(v["metrics"].values())) for task, v in summary.items()}
    line = "; ".join(
        f"{task}: " + ", ".join(f"{stage} {scores[stage][task]:.1%}" for stage in EVALUATED) for task in scores["base"]
    )
    return None, f"held-out exact match ({settings['limit']} per task) {line}", {"scores": scores}, skipped


# ---------------------------------------------------------------------------
# 9. sample, 10. report


def sample_stage(out: Path, log: Log):
    """The pretrained model completes code; the final chat model answers a question."""
    model, tok = qianwen.load(out / "base")
    completion = qianwen.generate(model, tok, tok.encode(SAMPLE_PROMPT), SAMPLE_TOKENS, stop_ids=[tok.eod_id])
    log("      base/ completes " + repr(SAMPLE_PROMPT) + ":")
    for line in (SAMPLE_PROMPT + completion.text).splitlines()[:8]:
        log("        " + line)
    details = {"prompt": SAMPLE_PROMPT, "text": SAMPLE_PROMPT + completion.text}
    chat = next((out / d for d in ("ppo", "sft") if (out / d / "qianwen.json").is_file()), None)
    if chat is not None:
        model, tok = qianwen.load(chat)
        reply = qianwen.generate(model, tok, tok.render_chat([{"role": "user", "content": CHAT_PROMPT}]), 64)
        log(f"      {chat.name}/ answers {CHAT_PROMPT!r}: {reply.text!r}")
        details["chat"] = f"{chat.name}/: {CHAT_PROMPT} -> {reply.text}"
    return None, f"samples from base/ and {chat.name if chat else 'no chat model'}", details, False


def report_stage(out: Path, recipe: Path, seed: int, stages: list[StageResult]):
    path = out / "report.md"
    atomic_write(path, render_report(out, recipe, seed, stages))
    return path, f"wrote {path}", {}, False


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


def _flatten(meta: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key} "))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def render_report(out: Path, recipe: Path, seed: int, stages: list[StageResult]) -> str:
    lines = [
        "# qianwen run report",
        "",
        f"Run directory `{out}`, recipe `{recipe.name}`, seed {seed}, finished {time.strftime('%Y-%m-%d %H:%M:%S')}.",
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
        *(
            f"| {i}. {s.name} | {'earlier run' if s.skipped else f'{s.seconds:.1f} s'} | {s.summary} |"
            for i, s in enumerate(stages, 1)
        ),
        "",
    ]
    for i, stage in enumerate(stages, 1):
        lines += [f"### {i}. {stage.name}", ""]
        lines += [f"- {key}: {value}" for key, value in stage.details.items() if key != "text"]
        if "text" in stage.details:
            lines += ["", "````text", stage.details["text"], "````"]
        lines.append("")
    lines += ["## Not built yet", "", "Future stages of `qianwen run`:", ""]
    lines += [f"- **{name}**: {what}" for name, what in NOT_BUILT]
    base = out / "base"
    lines += [
        "",
        "## Next",
        "",
        "```",
        f"{cli_name()} chat --model {out / 'ppo'}",
        f"{cli_name()} generate --model {base} --prompt 'import os'",
        f"{cli_name()} agent --model {out / 'ppo'} --tools code_interpreter 'What is 31415 * 2718?'",
        "```",
        "",
    ]
    return "\n".join(lines)
