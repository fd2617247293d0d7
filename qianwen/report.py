"""The report card of a run: report.md and a self-contained report.html, gathered from the run directory alone.

Every number comes from a file a stage wrote (run.json for times, tokenizer/bpe.json, data/stats.json,
metrics/<stage>.jsonl, the model directories' qianwen.json, eval/<model>.json, samples.json), so the card can
be rendered again at any time (`qianwen run --only report`) and says "not run yet" for what is missing.
Each stage's part comes from report_sections, the training curves from report_plots, and both renderings from
one list of blocks (report_render).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import qianwen
from qianwen.report_render import Block, Code, Heading, Paragraph, Table, markdown, page
from qianwen.report_sections import Section, duration, read_json, sections, summary_of
from qianwen.run import NAMES, first_held_out
from qianwen.util import atomic_write

# ---------------------------------------------------------------------------
# Environment


def machine() -> str:
    """What a stage ran on, in a few words."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{count}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def cli_name() -> str:
    """`qianwen` if the shell finds this installation's script, else its path
    (after `make run` the virtualenv is usually not activated)."""
    script = Path(sys.executable).with_name("qianwen")
    found = shutil.which("qianwen")
    if found and Path(found).resolve() == script.resolve():
        return "qianwen"
    return os.path.relpath(script) if script.exists() else "qianwen"


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


def environment() -> dict[str, str]:
    import torch

    return {
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""),
        "qianwen": f"{qianwen.__version__} (git {git_commit()})",
        "platform": platform.platform(),
    }


def summary(out: Path, stage: str) -> str:
    """The stage's one-line result, as the report states it."""
    if stage == "report":
        return f"wrote {out / 'report.md'} and {out / 'report.html'}"
    return summary_of(out, stage)


# ---------------------------------------------------------------------------
# The card


def document(out: Path, plots: dict[str, str]) -> list[Block]:
    ledger = read_json(out / "run.json") or {}
    times = ledger.get("stages", {})
    found = sections(out, plots)
    recipe = Path(ledger.get("recipe", "?")).name
    blocks: list[Block] = [
        Heading(1, "qianwen run report"),
        Paragraph(
            f"Run directory `{out}`, recipe `{recipe}`, seed {ledger.get('seed', '?')}; rendered "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}."
        ),
        Heading(2, "Environment"),
    ]
    env = environment()
    ran_on = sorted({t["machine"] for t in times.values() if t.get("machine")})
    if ran_on and ran_on != [env["machine"]]:
        env["stages ran on"] = "; ".join(ran_on)
    blocks += [Table(["", ""], [[k, v] for k, v in env.items()]), Heading(2, "Stages")]
    rows = []
    for i, stage in enumerate(NAMES, 1):
        section, timing = found.get(stage), times.get(stage, {})
        if stage == "report":
            result, processed = "this card", "—"
        else:
            result, processed = (section.summary, section.processed) if section else ("not run yet", "—")
        rows.append([f"{i}. {stage}", duration(timing.get("seconds")), processed, result])
    blocks.append(Table(["stage", "time", "processed", "result"], rows))
    for i, stage in enumerate(NAMES[:-1], 1):
        section = found[stage]
        blocks += [Heading(2, f"{i}. {stage}")]
        blocks += section.blocks if section else [Paragraph("Not run yet.")]
    blocks += [Heading(2, "Use the result"), Code("\n".join(commands(out, found)), "sh")]
    return blocks


def commands(out: Path, found: dict[str, Section | None]) -> list[str]:
    cli = cli_name()
    final = out / ("ppo" if found.get("ppo") else "sft")
    summary = read_json(out / "eval" / f"{final.name}.json") or {}
    tasks = ",".join(t for t in summary.get("tasks", {}) if t != "longctx") or "arith"
    tool = first_held_out(out / "tasks" / "tool_eval.jsonl")
    question = tool["data"]["question"] if tool else "What is 31415 * 2718?"
    return [
        "# chat in the terminal",
        f"{cli} chat --model {final}",
        "# serve an OpenAI-compatible API and a web chat page",
        f"{cli} serve --model {final}",
        "# evaluate: the held-out tasks, then the long-context table of the base model",
        f"{cli} eval --model {final} --tasks {tasks} --data-dir {out / 'tasks'}",
        f"{cli} eval --model {out / 'base'} --tasks longctx data={out / 'data'}",
        "# answer with tools (ReAct)",
        f"{cli} agent --model {final} --tools code_interpreter {shlex.quote(question)}",
    ]


def write(out: Path) -> Path:
    """Render report.md, report.html and the training curves from the run directory; returns report.md."""
    from qianwen.report_plots import draw

    out = Path(out)
    blocks = document(out, draw(out))
    atomic_write(out / "report.md", markdown(blocks))
    atomic_write(out / "report.html", page(blocks, out, f"qianwen run report: {out}"))
    return out / "report.md"
