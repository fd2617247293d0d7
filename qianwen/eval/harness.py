"""The task interface, the batched generation every generative task shares, and the files a run writes.

A task is a module with `NAME: str` and `evaluate(model, tokenizer, options: TaskOptions) -> TaskResult`; it may
declare `OPTIONS: dict[str, object]` (name -> default) for its `key=value` command-line options, which lets the
command reject a misspelt key and convert values to the defaults' types. On the command line a bare `key=value`
goes to every task that reads `key`; `task.key=value` goes to that task only.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

import qianwen
from qianwen.generate import Completion, generate
from qianwen.util import atomic_write


@dataclass
class TaskOptions:
    data_dir: Path | None  # user-supplied benchmark files
    limit: int | None  # at most this many samples
    batch_size: int = 8
    seed: int = 0
    extra: dict = field(default_factory=dict)  # task-specific key=value options from the command line


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]  # e.g. {"pass@1": 0.17}; the first one is the headline
    samples: list[dict]  # per-sample logs (written as JSONL)
    table_md: str | None = None  # an extra Markdown table (e.g. per subject, or the long-context table)
    files: dict[str, bytes] = field(default_factory=dict)  # extra artefacts to write beside the summary (e.g. a PNG)


class Task(Protocol):
    """What a task module (or object) offers; `OPTIONS` is optional."""

    NAME: str

    def evaluate(self, model, tokenizer, options: TaskOptions) -> TaskResult: ...


# ---------------------------------------------------------------------------
# Options


def parse_extra(items: Sequence[str]) -> dict[str, str]:
    """`key=value` items from the command line, as strings."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not a KEY=VALUE option; write task options as e.g. n=10 or humaneval.n=10.")
        extra[key] = value
    return extra


def check_extra(modules: dict[str, Task], extra: dict[str, str]) -> None:
    """Reject keys no chosen task reads, before any model work. A task without OPTIONS accepts any key."""
    open_ended = [name for name, m in modules.items() if not hasattr(m, "OPTIONS")]
    for key in extra:
        task, dot, bare = key.rpartition(".")
        if dot and task not in modules:
            raise ValueError(f"option {key} is for task {task!r}, which is not among --tasks ({', '.join(modules)}).")
        targets = [task] if dot else list(modules)
        readers = [t for t in targets if t in open_ended or bare in modules[t].OPTIONS]
        if not readers:
            known = sorted({k for t in targets for k in getattr(modules[t], "OPTIONS", {})})
            raise ValueError(f"no task here reads option {bare!r}; the options are: {', '.join(known) or 'none'}.")


def extra_for(task: str, extra: dict[str, str]) -> dict[str, str]:
    """The options one task sees: bare keys, then its own `task.key` ones (which win)."""
    own = {k.rpartition(".")[2]: v for k, v in extra.items() if k.rpartition(".")[0] == task}
    return {**{k: v for k, v in extra.items() if "." not in k}, **own}


def read_options(defaults: dict[str, object], extra: dict, task: str) -> dict:
    """A task's settings: its defaults, overridden by `extra`, converted to the defaults' types."""
    settings = dict(defaults)
    for key, default in defaults.items():
        if key not in extra:
            continue
        value = extra[key]
        if isinstance(value, str) and not isinstance(default, str):
            value = _convert(value, default, f"{task} option {key}")
        settings[key] = value
    return settings


def _convert(text: str, default: object, what: str) -> object:
    kind = type(default)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{what}={text} is not a boolean; write true or false.")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what}={text} is not {'an' if kind is int else 'a'} {kind.__name__}.") from None


# ---------------------------------------------------------------------------
# Data files


def download(source: str) -> str:
    """How to get an official data file, for `data_path`'s errors."""
    return f"download it from {source} (no download happens here)"


def data_path(options: TaskOptions, relative: str, task: str, where: str) -> Path:
    """`<data-dir>/<relative>` (a file or a directory), or an error naming it and `where` it comes from (a clause:
    `download(URL)`, or how to make it)."""
    if options.data_dir is None:
        raise ValueError(f"{task} reads {relative} under --data-dir DIR; give --data-dir, and {where}.")
    path = Path(options.data_dir) / relative
    if not path.exists():
        raise ValueError(f"{task} needs {path}, which does not exist; {where}.")
    return path


def read_jsonl(path: Path, fields: Sequence[str]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number} is not JSON ({exc.msg}); fix or remove that line.") from None
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(
                    f"{path} line {number} has no {', '.join(missing)}; each line needs {', '.join(fields)}."
                )
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text`, commas removed ("1,234.5" -> "1234.5"); None if there is none."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(a: str | None, b: str | None) -> bool:
    """Numeric equality of two number strings ("18" == "18.0"); False when either is missing or not a number."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a.replace(",", "")), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Prompts and batched generation


# Where a few-shot answer ends in the "Question: ... Answer: ..." layout: a blank line or the next question.
FEW_SHOT_STOP = ("\n\n", "Question:")


def fit_few_shot(build: Callable[[int], list[int]], shots: int, budget: int) -> tuple[list[int], int]:
    """The ids of the prompt with the most shots (at most `shots`) that fits `budget` tokens, and that number.
    When even the zero-shot prompt is too long its oldest tokens are dropped, as lm-eval does."""
    for k in range(shots, -1, -1):
        ids = build(k)
        if len(ids) <= budget:
            return ids, k
    return ids[-budget:], 0


def generate_batches(
    model: qianwen.Transformer,
    tokenizer: qianwen.Tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "generate",
) -> Iterator[tuple[list[int], list[Completion]]]:
    """(indices, completions) batch by batch. Prompts of similar length share a batch, so little padding is
    computed; a prompt longer than the model's window less `max_new_tokens` loses its oldest tokens (with a
    warning). Batch i samples with seed `seed + i`, so a run is repeatable at a given batch size."""
    window = model.config.max_position_embeddings
    budget = window - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the {window}-token window.")
    cut = sum(len(p) > budget for p in prompts)
    if cut:
        warnings.warn(
            f"{desc}: {cut} prompt(s) lost their oldest tokens to fit the {window}-token window.", stacklevel=2
        )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, disable=None) as bar:
        for b, start in enumerate(range(0, len(order), batch_size)):
            indices = order[start : start + batch_size]
            batch = [list(prompts[i][-budget:]) for i in indices]
            outs = generate(
                model, tokenizer, batch, max_new_tokens, stop=list(stop) or None,
                temperature=temperature, top_p=top_p, seed=seed + b if temperature > 0 else None,
            )  # fmt: skip
            bar.update(len(indices))
            yield indices, outs


def generate_all(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, **kwargs) -> list[Completion]:
    """`generate_batches`, gathered back into the order of `prompts`."""
    out: list[Completion | None] = [None] * len(prompts)
    for indices, completions in generate_batches(model, tokenizer, prompts, max_new_tokens, **kwargs):
        for i, c in zip(indices, completions):
            out[i] = c
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Running tasks and writing what they found


@dataclass
class Finished:
    result: TaskResult
    seconds: float


def run_tasks(
    model: qianwen.Transformer,
    tokenizer: qianwen.Tokenizer,
    modules: dict[str, Task],
    options: TaskOptions,
    extra: dict[str, str],
    on_finished: Callable[[list[Finished]], None] | None = None,
) -> list[Finished]:
    """Each task in turn; `on_finished` sees the results so far after each one, so a later failure keeps them."""
    done: list[Finished] = []
    for name, module in modules.items():
        start = time.perf_counter()
        result = module.evaluate(model, tokenizer, replace(options, extra=extra_for(name, extra)))
        done.append(Finished(result, time.perf_counter() - start))
        if on_finished is not None:
            on_finished(done)
    return done


def default_out(model_dir: str | Path) -> Path:
    """`<model>/../eval/<model dir name>.json`: a run's `runs/x/base` is scored in `runs/x/eval/base.json`."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent / "eval" / f"{model_dir.name}.json"


def markdown(done: Sequence[Finished]) -> str:
    """One row per metric, then each task's own table under its name."""
    lines = ["| task | metric | value | samples | seconds |", "|---|---|---|---|---|"]
    for f in done:
        r = f.result
        for i, (metric, value) in enumerate(r.metrics.items()):
            tail = f"{len(r.samples)} | {f.seconds:.1f}" if i == 0 else " | "
            shown = str(value) if isinstance(value, int) else f"{value:.4f}"  # counts stay whole
            lines.append(f"| {r.name if i == 0 else ''} | {metric} | {shown} | {tail} |")
    parts = ["\n".join(lines)]
    parts += [f"### {f.result.name}\n\n{f.result.table_md.strip()}" for f in done if f.result.table_md]
    return "\n\n".join(parts) + "\n"


def write_outputs(out: Path, done: Sequence[Finished], meta: dict) -> str:
    """The summary `out`, `<stem>.<task>.jsonl` sample logs, `<stem>.<task>.<name>` extra files and the Markdown
    table `<stem>.md`, all beside `out`; returns the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for f in done:
        r = f.result
        log = out.with_name(f"{out.stem}.{r.name}.jsonl")
        atomic_write(log, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in r.samples))
        extra_files = []
        for name, data in r.files.items():
            path = out.with_name(f"{out.stem}.{r.name}.{name}")
            atomic_write(path, data)
            extra_files.append(path.name)
        tasks[r.name] = {
            "metrics": r.metrics,
            "samples": len(r.samples),
            "seconds": round(f.seconds, 3),
            "log": log.name,
            "files": extra_files,
        }
    table = markdown(done)
    summary = {**meta, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tasks": tasks}
    atomic_write(out, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out.with_suffix(".md"), table)
    return table
