"""`instruct`: the synthetic instructions (reverse a word, sort numbers, count letters, repeat a word, upper case,
answer in a given language), each scored by its own checker, so a run shows what SFT and PPO do beyond arithmetic.

The file is `<data-dir>/instruct_eval.jsonl` (written by `qianwen data synthetic`), or the JSONL that `file=PATH`
names: records with `prompt`, `answer`, `kind` (one of qianwen.checks.KINDS, so the word problems and tool problems
can be scored this way too) and optionally `lang`, the question's language. Each prompt is sent as one ChatML user
turn (with the default system prompt) and answered greedily. A reply is checked by `qianwen.checks`, the checker
that labels the preference pairs the reward model learns from:

- `acc`: the answer is right (for sorting, repeating and upper case: the reply's last line; for counting and the
  language tasks: its last number) and in the right language where that is checked: the one asked for by the
  "answer in" tasks, the question's own for a word problem with a `lang`;
- `clean_accuracy`: right with nothing else wrong: the reply ended (at a chat stop token, not the token limit)
  and does not ramble;
- `accuracy/<kind>`: `acc` over each kind's records.

The sample log holds each reply and the flaws the checker found in it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qianwen.checks import END, KINDS, answered, flaws
from qianwen.eval.harness import TaskOptions, TaskResult, data_path, generate_all, read_jsonl, read_options

NAME = "instruct"
OPTIONS: dict[str, object] = {"file": "", "max_new_tokens": 64}
SOURCE = "write it with `qianwen data synthetic --out DIR` (instruct_eval.jsonl), or give any JSONL of prompt/answer/kind records"


def evaluate(model, tokenizer, options: TaskOptions) -> TaskResult:
    cfg = read_options(OPTIONS, options.extra, NAME)
    path = Path(cfg["file"]) if cfg["file"] else data_path(options, "instruct_eval.jsonl", NAME, SOURCE)
    if not path.is_file():
        raise ValueError(f"instruct option file={path} names no file; give a JSONL of prompt/answer/kind records.")
    rows = read_jsonl(path, ("prompt", "answer", "kind"))[: options.limit]
    unknown = sorted({str(r["kind"]) for r in rows} - set(KINDS))
    if unknown:
        raise ValueError(
            f"{path} has records of kind {', '.join(map(repr, unknown))}, which no checker knows; "
            f"the kinds are: {', '.join(KINDS)}."
        )
    prompts = [tokenizer.render_chat([{"role": "user", "content": str(r["prompt"])}]) for r in rows]
    completions = generate_all(
        model, tokenizer, prompts, cfg["max_new_tokens"], batch_size=options.batch_size, desc=NAME
    )
    samples = []
    for row, completion in zip(rows, completions):
        reply = completion.text + (END if completion.finish_reason == "stop" else "")
        found = flaws(row["kind"], str(row["answer"]), reply, row.get("lang"))
        samples.append(
            {
                "prompt": row["prompt"],
                "kind": row["kind"],
                "reply": completion.text,
                "ended": completion.finish_reason == "stop",
                "answer": str(row["answer"]),
                "correct": answered(found),
                "flaws": found,
            }
        )
    n = max(len(samples), 1)
    metrics = {
        "acc": sum(s["correct"] for s in samples) / n,
        "clean_accuracy": sum(not s["flaws"] for s in samples) / n,
    }
    totals, right = Counter(s["kind"] for s in samples), Counter(s["kind"] for s in samples if s["correct"])
    metrics.update({f"accuracy/{kind}": right[kind] / totals[kind] for kind in KINDS if totals[kind]})
    return TaskResult(NAME, metrics, samples)
