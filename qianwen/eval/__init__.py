"""Evaluation: the report's benchmarks with its protocols (QWEN_SPEC.md section 8), offline, on the user's copies of
the benchmark files; `qianwen eval` is the command.

    from qianwen.eval import TaskOptions, run_tasks, tasks
    modules = {name: tasks.load(name) for name in tasks.resolve("humaneval,gsm8k")}
    done = run_tasks(model, tokenizer, modules, TaskOptions(data_dir=Path("benchmarks"), limit=None), extra={})

Tasks (qianwen/eval/tasks/, each module's docstring gives its files, prompt and scoring): humaneval, gsm8k, mmlu and
ceval (choice.py), arith (synthetic exact match), bpb (bits per byte), longctx (perplexity past the training length),
tool (synthetic tool-use problems answered directly and by the ReAct agent with the sandboxed code interpreter).
A run writes, beside its summary `<stem>.json`: `<stem>.<task>.jsonl` (one line per sample), `<stem>.md` (the table)
and any extra file a task makes as `<stem>.<task>.<name>`.
"""

from qianwen.eval import tasks
from qianwen.eval.harness import TaskOptions, TaskResult, run_tasks, write_outputs

__all__ = ["TaskOptions", "TaskResult", "run_tasks", "tasks", "write_outputs"]
