"""Task name -> module (or `module:object` where one module holds several tasks). Modules are imported only when
asked for, so a run pays only for its own tasks' imports."""

from __future__ import annotations

import importlib

from qianwen.eval.harness import Task

TASKS = {
    "humaneval": "qianwen.eval.tasks.humaneval",
    "gsm8k": "qianwen.eval.tasks.gsm8k",
    "mmlu": "qianwen.eval.tasks.choice:MMLU",
    "ceval": "qianwen.eval.tasks.choice:CEVAL",
    "arith": "qianwen.eval.tasks.arith",
    "instruct": "qianwen.eval.tasks.instruct",
    "bpb": "qianwen.eval.tasks.bpb",
    "longctx": "qianwen.eval.tasks.longctx",
    "tool": "qianwen.eval.tasks.tool",
}


def resolve(names: str | list[str]) -> list[str]:
    """Task names from a comma-separated list, each once, in the order given."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = list(dict.fromkeys(n for n in wanted if n))
    if not wanted:
        raise ValueError(f"no task named; give --tasks with some of: {', '.join(TASKS)}.")
    unknown = [n for n in wanted if n not in TASKS]
    if unknown:
        raise ValueError(f"no task named {', '.join(map(repr, unknown))}; the tasks are: {', '.join(TASKS)}.")
    return wanted


def load(name: str) -> Task:
    """The task `name`: a module with NAME and evaluate, or such an object in a module."""
    path, _, attribute = TASKS[resolve([name])[0]].partition(":")
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name != path:
            raise
        raise ValueError(f"task {name} is registered but its module {path} is not installed in this copy.") from None
    return getattr(module, attribute) if attribute else module
