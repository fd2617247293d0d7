"""Exact match on synthetic problems, so the tiny recipe's chat models are scored offline.

The file is JSONL of {"prompt": ..., "answer": ...} (the synthetic-task generator writes such files):
`<data-dir>/arith_eval.jsonl` unless `file=PATH` names another. Each prompt is sent as one ChatML user turn (with
the default system prompt) and answered greedily. The reply's answer is the N of its last "The answer is N." /
"答案是 N。" / "Final Answer: N" when it has one, else (for a numeric reference) its last number. Numbers compare
by value with commas removed ("$" and "**" around them do not matter); a text answer compares with the marked answer
or else the reply's last line, surrounding spaces and a final full stop removed.

With `shots=K` (what `qianwen run` gives a base model) the prompt is plain text, not ChatML: K solved problems as
"Question: ...\nAnswer: ...", blank-line separated (the pretraining corpus's format), then the question; the
reply stops at a blank line or the next "Question:". The solved problems are the first K arithmetic conversations
of `shots_file` (default `<data-dir>/sft.jsonl`, training data), as many as fit the model's training length.

Metrics: `acc`, the share answered right (the protocol of GSM8K-style scoring: the final answer alone), and
`worked_acc`, the share answered right with every step of working the reply shows ("a op b = c", with + - × ÷ * /)
right too: a small model often reaches the right number through wrong steps ("3 × 5 = 25, 25 - 3 = 12" for 12),
and this counts only what it computed.
"""

from __future__ import annotations

import re
from pathlib import Path

from qianwen.eval.harness import (
    FEW_SHOT_STOP,
    TaskOptions,
    TaskResult,
    data_path,
    fit_few_shot,
    generate_all,
    last_number,
    read_jsonl,
    read_options,
    same_number,
)

NAME = "arith"
OPTIONS: dict[str, object] = {"file": "", "max_new_tokens": 128, "shots": 0, "shots_file": ""}
SOURCE = "write it with `qianwen data synthetic --out DIR` (or give any JSONL of prompt/answer pairs)"
_MARKED = re.compile(r"(?:The answer is|答案是|Final Answer:)[ \t]*(.+?)[ \t]*[.。]?[ \t]*$", re.MULTILINE)


_STEP = re.compile(r"(\d+)\s*([-+×÷*/])\s*(\d+)\s*=\s*(\d+)")
_APPLY = {"+": int.__add__, "-": int.__sub__, "×": int.__mul__, "*": int.__mul__}


def working_right(reply: str) -> bool:
    """Whether every "a op b = c" step the reply shows computes right (a reply with none shows no wrong step)."""
    for a, op, b, c in _STEP.findall(reply):
        a, b, c = int(a), int(b), int(c)
        if op in "÷/":
            if b == 0 or a != b * c:
                return False
        elif _APPLY[op](a, b) != c:
            return False
    return True


def extract(reply: str, numeric: bool) -> str | None:
    """The answer a reply gives (see the module docstring); None when it gives none."""
    marked = _MARKED.findall(reply)
    if marked:
        return (last_number(marked[-1]) or marked[-1]) if numeric else marked[-1]
    if numeric:
        return last_number(reply)
    lines = reply.strip().splitlines()
    return lines[-1].strip() if lines else None


def matches(predicted: str | None, answer: str, numeric: bool) -> bool:
    if numeric:
        return same_number(predicted, answer)
    return predicted is not None and predicted.strip().rstrip(".。") == answer.strip().rstrip(".。")


def solved_problems(cfg: dict, options: TaskOptions) -> list[tuple[str, str]]:
    """(question, worked answer) of the first `shots` arithmetic conversations of the shots file (all it has, if
    fewer)."""
    path = Path(cfg["shots_file"]) if cfg["shots_file"] else data_path(options, "sft.jsonl", NAME, SOURCE)
    if not path.is_file():
        raise ValueError(f"arith option shots_file={path} names no file; give a JSONL of chat `messages`.")
    found = []
    for row in read_jsonl(path, ("messages",)):
        turns = {m.get("role"): m.get("content") for m in row["messages"] if isinstance(m, dict)}
        if row.get("kind", "arithmetic") == "arithmetic" and turns.get("user") and turns.get("assistant"):
            found.append((str(turns["user"]), str(turns["assistant"])))
        if len(found) == cfg["shots"]:
            return found
    if not found:
        raise ValueError(f"{path} holds no arithmetic conversation to show as a solved problem; give shots_file=.")
    return found  # fewer than asked: the prompt shows what there is


def few_shot_prompt(question: str, shots: list[tuple[str, str]]) -> str:
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}\nAnswer:"


def evaluate(model, tokenizer, options: TaskOptions) -> TaskResult:
    cfg = read_options(OPTIONS, options.extra, NAME)
    path = Path(cfg["file"]) if cfg["file"] else data_path(options, "arith_eval.jsonl", NAME, SOURCE)
    if not path.is_file():
        raise ValueError(f"arith option file={path} names no file; give a JSONL of prompt/answer pairs.")
    rows = read_jsonl(path, ("prompt", "answer"))[: options.limit]
    if cfg["shots"] > 0:
        shots = solved_problems(cfg, options)
        budget = model.config.seq_length - cfg["max_new_tokens"]
        prompts = [
            fit_few_shot(
                lambda k, q=str(r["prompt"]): tokenizer.encode(few_shot_prompt(q, shots[:k])), len(shots), budget
            )[0]
            for r in rows
        ]
        stop = FEW_SHOT_STOP
    else:
        prompts = [tokenizer.render_chat([{"role": "user", "content": str(r["prompt"])}]) for r in rows]
        stop = ()
    completions = generate_all(
        model, tokenizer, prompts, cfg["max_new_tokens"], stop=stop, batch_size=options.batch_size, desc=NAME
    )
    samples = []
    for row, completion in zip(rows, completions):
        answer = str(row["answer"])
        numeric = last_number(answer) == answer.replace(",", "").strip()
        predicted = extract(completion.text, numeric)
        correct = matches(predicted, answer, numeric)
        samples.append(
            {
                "prompt": row["prompt"],
                "reply": completion.text,
                "ended": completion.finish_reason == "stop",
                "predicted": predicted,
                "answer": answer,
                "correct": correct,
                "worked_correct": correct and working_right(completion.text),
            }
        )
    n = max(len(samples), 1)
    metrics = {
        "acc": sum(s["correct"] for s in samples) / n,
        "worked_acc": sum(s["worked_correct"] for s in samples) / n,
    }
    return TaskResult(NAME, metrics, samples)
