"""GSM8K: 8-shot chain of thought, greedy, the report's setting.

Files (the official release, https://github.com/openai/grade-school-math, grade_school_math/data/):
`<data-dir>/gsm8k/test.jsonl` is scored; the shots are the first `shots` (8) problems of
`<data-dir>/gsm8k/train.jsonl`. Each shot reads

    Question: {question}
    Let's think step by step
    {the reference solution, calculator annotations <<...>> removed}
    The answer is {N}.

and shots are separated by a blank line; the prompt ends with the test question and "Let's think step by step\\n".
The completion is cut at a blank line or at "Question:", and its last number (commas removed) is compared with
the number after "####" in the reference. When a prompt does not fit the model's window less `max_new_tokens`,
the last shots are dropped until it does (the sample log says how many were used).
"""

from __future__ import annotations

import re

from qianwen.eval.harness import (
    FEW_SHOT_STOP,
    TaskOptions,
    TaskResult,
    data_path,
    download,
    fit_few_shot,
    generate_all,
    last_number,
    read_jsonl,
    read_options,
    same_number,
)

NAME = "gsm8k"
OPTIONS: dict[str, object] = {"shots": 8, "max_new_tokens": 256}
SOURCE = "https://github.com/openai/grade-school-math (grade_school_math/data/)"
_ANNOTATION = re.compile(r"<<[^>]*>>")


def gold(answer: str) -> str:
    """The number after "####" in a reference answer, commas removed."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise ValueError(f"a GSM8K answer must end with '#### N'; this one does not: {answer[-80:]!r}.")
    return tail.strip().replace(",", "")


def shot(row: dict) -> str:
    reasoning = _ANNOTATION.sub("", row["answer"].rpartition("####")[0]).strip()
    return (
        f"Question: {row['question']}\nLet's think step by step\n{reasoning}\nThe answer is {gold(row['answer'])}.\n\n"
    )


def prompt(question: str, shots: list[dict]) -> str:
    return "".join(shot(s) for s in shots) + f"Question: {question}\nLet's think step by step\n"


def evaluate(model, tokenizer, options: TaskOptions) -> TaskResult:
    cfg = read_options(OPTIONS, options.extra, NAME)
    test_file = data_path(options, "gsm8k/test.jsonl", NAME, download(SOURCE))
    test = read_jsonl(test_file, ("question", "answer"))[: options.limit]
    train = []
    if cfg["shots"] > 0:
        train = read_jsonl(data_path(options, "gsm8k/train.jsonl", NAME, download(SOURCE)), ("question", "answer"))
    shots = train[: cfg["shots"]]
    budget = model.config.max_position_embeddings - cfg["max_new_tokens"]
    prompts, used = [], []
    for row in test:
        ids, k = fit_few_shot(lambda k, q=row["question"]: tokenizer.encode(prompt(q, shots[:k])), len(shots), budget)
        prompts.append(ids)
        used.append(k)
    completions = generate_all(
        model, tokenizer, prompts, cfg["max_new_tokens"], stop=FEW_SHOT_STOP, batch_size=options.batch_size, desc=NAME
    )
    samples = []
    for row, completion, k in zip(test, completions, used):
        text = completion.text  # generate cut it before any of FEW_SHOT_STOP
        predicted, expected = last_number(text), gold(row["answer"])
        samples.append(
            {
                "question": row["question"],
                "completion": text,
                "predicted": predicted,
                "answer": expected,
                "correct": same_number(predicted, expected),
                "shots": k,
            }
        )
    accuracy = sum(s["correct"] for s in samples) / max(len(samples), 1)
    return TaskResult(NAME, {"acc": accuracy}, samples)
