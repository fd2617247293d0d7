"""Does a pretrained base model copy numbers? The probe behind the tiny recipe's pretraining settings
(benchmarks/ANALYSIS.md): on held-out tasks, in the pretraining text's "Question: ... Answer: ..." form,

- code copies: given a tool transcript up to `Action Input: {"code": "print(`, the model writes the question's
  numbers as the code does;
- answer copies: given the transcript up to the Observation, its Final Answer repeats the Observation;
- arithmetic: greedy answers to word problems, last number of the last line against the answer.

    python -m benchmarks.probe_copying --model runs/tiny/base --tasks runs/tiny/tasks
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import qianwen
from qianwen.data.synthetic_tasks import tool_transcript
from qianwen.generate import generate


def load(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def probe(model_dir: str, tasks: Path, n_tool: int = 40, n_arith: int = 60) -> dict[str, int]:
    model, tok = qianwen.load(model_dir)
    tools = load(tasks / "tool_eval.jsonl", n_tool)
    # The training transcript of each problem, cut just after the code's opening "print(".
    transcripts = [tool_transcript(r["data"]["code"], r["answer"], r["lang"]) for r in tools]
    heads = [
        f"Question: {r['data']['question']}\nAnswer: {t[: t.index('print(') + len('print(')]}"
        for r, t in zip(tools, transcripts, strict=True)
    ]
    wanted = [r["data"]["code"].removeprefix("print(") for r in tools]
    codes = generate(model, tok, heads, max_new_tokens=48, stop="\n")
    finals = [
        f'{h}{w}"}}\nObservation: {r["answer"]}\nThought: I now know the final answer\nFinal Answer:'
        for h, w, r in zip(heads, wanted, tools, strict=True)
    ]
    answers = generate(model, tok, finals, max_new_tokens=16, stop="\n")
    arith = load(tasks / "arith_eval.jsonl", n_arith)
    replies = generate(model, tok, [f"Question: {r['prompt']}\nAnswer:" for r in arith], max_new_tokens=80, stop="\n\n")

    def last_number(text: str) -> str | None:
        found = re.findall(r"\d+", text.strip().split("\n")[-1])
        return found[-1] if found else None

    return {
        "tool problems": len(tools),
        "code copies": sum(c.text.startswith(w) for c, w in zip(codes, wanted, strict=True)),
        "answer copies": sum(a.text.strip() == r["answer"] for a, r in zip(answers, tools, strict=True)),
        "arithmetic problems": len(arith),
        "arithmetic right": sum(last_number(c.text) == r["answer"] for c, r in zip(replies, arith, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a base model directory (e.g. runs/tiny/base)")
    parser.add_argument("--tasks", required=True, type=Path, help="the run's tasks/ directory")
    args = parser.parse_args()
    counts = probe(args.model, args.tasks)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
