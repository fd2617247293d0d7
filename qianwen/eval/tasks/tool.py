"""`tool`: the synthetic tool-use problems (arithmetic on 4- to 7-digit numbers), answered directly and through
the ReAct agent with the code interpreter, so one table shows what the tool adds.

The file is `<data-dir>/tool_eval.jsonl` (written by `qianwen data synthetic`), or the JSONL that `file=PATH`
names: records with an `answer` and the bare question, either as `data.question` (the generator's layout) or as
a top-level `question`. Each question is scored twice, greedily:

- direct: the question as one ChatML user turn (with the default system prompt), batched; the answer is extracted
  as the `arith` task does (the N of a last "The answer is N." / "答案是 N。" / "Final Answer: N", else the last
  number), and compared by value with commas removed;
- agent: `qianwen.agent.run_many` with the `code_interpreter` tool, whose code runs in `qianwen.sandbox`; a
  batch's runs step in lockstep, each step of every unfinished run one row of a batched generation. The model
  sees exactly the prompt the synthetic transcripts train it on (the spec's ReAct prompt offering the code
  interpreter, as a user turn after the default system prompt); each step generates at most
  `agent_max_new_tokens` and stops at "Observation:", for at most `max_steps` steps. The run's answer (its
  Final Answer, or a reply outside the format) is extracted and compared as above.

Metrics: `direct_accuracy`, `agent_accuracy`, and counts over all questions: `tool_calls` (actions the sandbox
ran), `malformed_actions` (actions the parser could not run: an unknown tool, a missing or non-JSON input; a step
cut off by the token limit is not counted) and `agent_answers` (runs that ended with a non-empty answer). Options:
`file`, `max_new_tokens` (direct replies), `agent_max_new_tokens` (per agent step), `max_steps`, `timeout`
(seconds per code run). The sample log holds both replies, the agent's whole transcript and its counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from qianwen.agent.loop import AgentResult
from qianwen.agent.loop import run_many as agent_run_many
from qianwen.agent.react import build_prompt
from qianwen.agent.tools import code_interpreter
from qianwen.eval.harness import (
    TaskOptions,
    TaskResult,
    data_path,
    generate_all,
    last_number,
    read_jsonl,
    read_options,
)
from qianwen.eval.tasks.arith import extract, matches
from qianwen.react_prompt import CODE_INTERPRETER

NAME = "tool"
OPTIONS: dict[str, object] = {
    "file": "",
    "max_new_tokens": 128,
    "agent_max_new_tokens": 256,
    "max_steps": 4,
    "timeout": 10.0,
}
SOURCE = (
    "write it with `qianwen data synthetic --out DIR` (tool_eval.jsonl), or give any JSONL of question/answer records"
)


def question_of(row: dict, path: Path, number: int) -> str:
    data = row.get("data")
    question = row.get("question", data.get("question") if isinstance(data, dict) else None)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(
            f"{path} record {number} has no question; give each record data.question (as `qianwen data synthetic` "
            "writes) or a top-level question."
        )
    return question


def counts(result: AgentResult) -> dict[str, int]:
    """Tool calls the sandbox ran and malformed actions in one agent run. A step cut off by the token limit is
    left out: its input may be incomplete through no fault of the format."""
    judged = result.steps[:-1] if result.finish_reason == "length" else result.steps
    return {
        "tool_calls": sum(s.wants_tool and s.observation is not None for s in result.steps),
        "malformed_actions": sum(s.malformed is not None for s in judged),
    }


def _check_sandbox(timeout: float) -> None:
    """A broken sandbox would turn every tool call into an error message and the agent's score into noise."""
    from qianwen.sandbox import run

    try:
        result = run("print(1)", timeout=timeout)
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"the tool task runs the agent's code in qianwen.sandbox, which cannot start: {exc}") from None
    if result.status != "ok" or result.stdout.strip() != "1":
        detail = (result.stderr.strip().splitlines() or [result.status])[-1]
        raise ValueError(f"the tool task runs the agent's code in qianwen.sandbox, which failed a test run: {detail}")


def evaluate(model, tokenizer, options: TaskOptions) -> TaskResult:
    cfg = read_options(OPTIONS, options.extra, NAME)
    for key in ("max_new_tokens", "agent_max_new_tokens", "max_steps"):
        if cfg[key] < 1:
            raise ValueError(f"tool option {key}={cfg[key]} must be at least 1.")
    if cfg["timeout"] <= 0:
        raise ValueError(f"tool option timeout={cfg['timeout']} must be a positive number of seconds.")
    path = Path(cfg["file"]) if cfg["file"] else data_path(options, "tool_eval.jsonl", NAME, SOURCE)
    if not path.is_file():
        raise ValueError(f"tool option file={path} names no file; give a JSONL of tool problems.")
    rows = read_jsonl(path, ("answer",))[: options.limit]
    questions = [question_of(row, path, i) for i, row in enumerate(rows, 1)]
    stale = sum("prompt" in r and r["prompt"] != build_prompt(q, [CODE_INTERPRETER]) for r, q in zip(rows, questions))
    if stale:
        warnings.warn(
            f"{path}: {stale} record(s) carry a ReAct prompt other than the one the agent gives; the model was "
            "trained on a prompt it is not shown here (regenerate the file with `qianwen data synthetic`).",
            stacklevel=2,
        )

    prompts = [tokenizer.render_chat([{"role": "user", "content": q}]) for q in questions]
    direct = generate_all(
        model, tokenizer, prompts, cfg["max_new_tokens"], batch_size=options.batch_size, desc=f"{NAME} direct"
    )
    if rows:
        _check_sandbox(cfg["timeout"])
    runs = agent_run_many(
        model,
        tokenizer,
        questions,
        tools=lambda: [code_interpreter(timeout=cfg["timeout"])],
        max_steps=cfg["max_steps"],
        max_new_tokens=cfg["agent_max_new_tokens"],
        batch_size=options.batch_size,
    )
    samples = []
    for row, question, completion, result in zip(rows, questions, direct, runs, strict=True):
        answer = str(row["answer"])
        numeric = last_number(answer) == answer.replace(",", "").strip()
        direct_predicted = extract(completion.text, numeric)
        agent_predicted = extract(result.answer, numeric) if result.answer is not None else None
        samples.append(
            {
                "question": question,
                "answer": answer,
                **({"lang": row["lang"]} if "lang" in row else {}),
                "direct_reply": completion.text,
                "direct_predicted": direct_predicted,
                "direct_correct": matches(direct_predicted, answer, numeric),
                "agent_transcript": result.text,
                "agent_answer": result.answer,
                "agent_predicted": agent_predicted,
                "agent_correct": matches(agent_predicted, answer, numeric),
                "agent_finish": result.finish_reason,
                "agent_steps": len(result.steps),
                **counts(result),
            }
        )
    n = max(len(samples), 1)
    metrics: dict[str, float] = {
        "direct_accuracy": sum(s["direct_correct"] for s in samples) / n,
        "agent_accuracy": sum(s["agent_correct"] for s in samples) / n,
        "tool_calls": sum(s["tool_calls"] for s in samples),
        "malformed_actions": sum(s["malformed_actions"] for s in samples),
        # An empty reply (the model ending its turn at once) ends the run but answers nothing.
        "agent_answers": sum(bool((s["agent_answer"] or "").strip()) for s in samples),
    }
    return TaskResult(NAME, metrics, samples)
