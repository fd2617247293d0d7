"""Evaluation throughput through lm-evaluation-harness: our lm-eval model `qianwen` against lm-eval's own `hf`
backend (transformers) on the same exported checkpoint and the same three local tasks, one multiple choice
(log-likelihoods) and two generate_until, 0-shot and few-shot, each run through `lm_eval.simple_evaluate`; samples
(documents) per second and the ratio (issue 5's goal: at least 2x). A third model that answers every request with
a constant times lm-eval's own work per call, which both backends pay; `ratio_net` is the ratio without it.

python -m benchmarks.bench_eval [--preset tiny-10m] [--checkpoint DIR ...] [--choice-docs 200] [--gen-docs 48]
    [--max-gen-toks 32] [--fewshot 4] [--batch 16] [--repeats 3] [--device cpu] [--threads N] [--compile]

The first model is the preset at Qwen's 151,936-token vocabulary with seeded random weights (the same bytes every
run; --preset "" leaves it out); each --checkpoint (a trained model directory, e.g. runs/tiny/base) adds its own
rows. The tasks are GSM8K-style word problems from the synthetic-task generator (seeded), asked as
"Question: ...\\nAnswer:", with four numeric choices or a greedy answer up to a newline; the few-shot task puts the
same --fewshot solved problems before every question (lm-eval's first_n sampler), as GSM8K's fixed 8-shot prompt
does. Both backends score the
same requests at the same batch size; the run also checks that they agree (log-likelihoods, greedy flags,
generated text), so the two did the same work. On a machine shared with other jobs, --threads 1 keeps a busy core
from stalling the other thread at every parallel region.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.common import write_result

CHOICE_YAML = """\
task: bench_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """\
task: bench_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
# The 0-shot task with the same solved problems before every question, as GSM8K's fixed 8-shot prompt.
FEWSHOT_YAML = (
    GEN_YAML.replace("task: bench_gen\n", "task: bench_gen_fewshot\n")
    .replace("    test: {data}\n", "    test: {data}\n    train: {shots}\n")
    .replace("test_split: test\n", "test_split: test\nfewshot_split: train\nnum_fewshot: {fewshot}\n")
    .replace("output_type:", "fewshot_config:\n  sampler: first_n\noutput_type:")
)
TASKS = {"bench_choice": "multiple_choice", "bench_gen": "generate_until", "bench_gen_fewshot": "generate_until"}


def write_tasks(directory: Path, choice_docs: int, gen_docs: int, max_gen_toks: int, fewshot: int = 4) -> None:
    from qianwen.data.synthetic_arith import arithmetic

    rng = random.Random(0)
    problems = [arithmetic(rng, rng.choice(["en", "zh"])) for _ in range(max(choice_docs, gen_docs) + fewshot)]
    shots = [{"question": p.prompt, "answer": p.answer} for p in problems[-fewshot:]] if fewshot else []
    choice = []
    for p in problems[:choice_docs]:
        right = int(p.answer)
        options = [right, *rng.sample([n for n in range(right - 9, right + 10) if n != right], 3)]
        rng.shuffle(options)
        choice.append({"question": p.prompt, "choices": [f" {n}" for n in options], "answer": options.index(right)})
    gen = [{"question": p.prompt, "answer": p.answer} for p in problems[:gen_docs]]
    for name, docs in (("choice", choice), ("gen", gen), ("shots", shots)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    for name, yaml in (("choice", CHOICE_YAML), ("gen", GEN_YAML), ("gen_fewshot", FEWSHOT_YAML)):
        data, shots_file = directory / ("choice.jsonl" if name == "choice" else "gen.jsonl"), directory / "shots.jsonl"
        text = yaml.format(data=data, shots=shots_file, fewshot=fewshot, max_gen_toks=max_gen_toks)
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")


def export_model(preset: str | None, checkpoint: str | None, out: Path) -> tuple[str, int]:
    """The checkpoint both backends load, and (what it is, its <|endoftext|> id)."""
    import qianwen
    from qianwen.tokenizer import Tokenizer

    if checkpoint:
        shutil.copytree(checkpoint, out)
        described = f"{checkpoint} (trained)"
    else:
        from qianwen.config import preset as model_preset
        from qianwen.tokenizer import qwen_vocabulary

        config = model_preset(preset, vocab_size=151936)
        model = qianwen.Transformer(config)
        model.init_weights(seed=0)
        with torch.no_grad():  # logits far from ties, so both backends' greedy choices are the same tokens
            model.lm_head.weight.mul_(20)
        qianwen.save(model, Tokenizer.from_file(qwen_vocabulary()), out)
        described = f"{preset}, Qwen's vocabulary, random weights"
    # transformers lets generation_config.json's max_new_tokens (512, as Qwen ships) override the limit lm-eval's
    # hf backend derives from max_gen_toks; without it both backends stop at the task's max_gen_toks.
    generation = out / "generation_config.json"
    if generation.is_file():
        settings = json.loads(generation.read_text())
        settings.pop("max_new_tokens", None)
        generation.write_text(json.dumps(settings))
    return described, Tokenizer.from_file(out).eod_id


def responses(results: dict, task: str) -> list:
    docs = sorted(results["samples"][task], key=lambda d: d["doc_id"])
    return [resp for doc in docs for (resp,) in doc["resps"]]


def agreement(ours: dict, theirs: dict, task: str) -> dict:
    a, b = responses(ours, task), responses(theirs, task)
    if TASKS[task] == "generate_until":
        return {"same_text": f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"}
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    return {
        "max_abs_loglik_diff": float(f"{diff:.2g}"),
        "same_greedy": f"{sum(x[1] == y[1] for x, y in zip(a, b))}/{len(a)}",
    }


def constant_lm():
    """An lm-eval model that answers every request with a constant: what a `simple_evaluate` call costs without
    any model (building the task's requests, templates, metrics, logging), the part both backends pay alike."""
    from lm_eval.api.model import LM

    class ConstantLM(LM):
        def loglikelihood(self, requests):
            return [(-1.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests):
            return [-1.0 for _ in requests]

        def generate_until(self, requests):
            return ["" for _ in requests]

    return ConstantLM()


def bench_model(args, described: str, model_dir: Path, eod_id: int, manager) -> list[dict]:
    """Rows for one checkpoint: each task, then all together."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from qianwen.eval.lm_eval_adapter import QianwenLM

    backends = {
        "qianwen": QianwenLM(
            str(model_dir), device=args.device, dtype=args.dtype, batch_size=args.batch, compile=args.compile
        ),
        # Qwen's documents follow <|endoftext|>, which the qianwen model puts before an empty context; hf would
        # use the tokenizer's eos (<|im_end|>), so it is told the same.
        "hf": HFLM(
            pretrained=str(model_dir),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch,
            prefix_token_id=eod_id,
        ),
        "harness": constant_lm(),
    }

    def evaluate(lm, task: str, limit: int | None = None) -> dict:
        return lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True
        )

    for lm in backends.values():  # datasets' cache of the JSONL files, first-call allocations
        for task in TASKS:
            evaluate(lm, task, limit=4)
    seconds = {(b, t): [] for b in backends for t in TASKS}
    last = {}
    for _ in range(args.repeats):  # interleaved, so load from other jobs on the machine falls on both alike
        for task in TASKS:
            for name, lm in backends.items():
                start = time.perf_counter()
                last[name, task] = evaluate(lm, task)
                seconds[name, task].append(time.perf_counter() - start)

    config = backends["qianwen"].model.config
    params = f"{config.num_params / 1e6:.0f}M"
    docs = {"bench_choice": args.choice_docs, "bench_gen": args.gen_docs, "bench_gen_fewshot": args.gen_docs}
    rows = []
    for task in [*TASKS, "all"]:
        tasks = list(TASKS) if task == "all" else [task]
        row = {"model": described, "params": params, "vocab": config.vocab_size, "task": task}
        row["output_type"] = TASKS.get(task, "")
        row["docs"] = sum(docs[t] for t in tasks)
        if task != "all":
            row["requests"] = len(responses(last["qianwen", task], task))
        for b in backends:
            row[f"{b}_s_best"] = round(sum(min(seconds[b, t]) for t in tasks), 2)
            row[f"{b}_s_median"] = round(sum(statistics.median(seconds[b, t]) for t in tasks), 2)
            row[f"{b}_samples_per_s"] = round(row["docs"] / row[f"{b}_s_best"], 2)
        row["ratio"] = round(row["hf_s_best"] / row["qianwen_s_best"], 2)
        row["ratio_median"] = round(row["hf_s_median"] / row["qianwen_s_median"], 2)
        # Net of lm-eval's own work, which a call costs with a model that answers constants.
        net = row["qianwen_s_best"] - row["harness_s_best"]
        row["ratio_net"] = round((row["hf_s_best"] - row["harness_s_best"]) / net, 2) if net > 0 else None
        if task != "all":
            row.update(agreement(last["qianwen", task], last["hf", task], task))
        rows.append(row)
        print(
            f"{described} {task}: qianwen {row['qianwen_samples_per_s']} samples/s, hf {row['hf_samples_per_s']} "
            f"samples/s, ratio {row['ratio']}x (medians {row['ratio_median']}x); lm-eval alone "
            f"{row['harness_s_best']} s, ratio net of it {row['ratio_net']}x"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-10m", help="the random model's preset; '' for none")
    parser.add_argument("--checkpoint", nargs="+", default=[], help="trained model directories")
    parser.add_argument("--choice-docs", type=int, default=200)
    parser.add_argument("--gen-docs", type=int, default=48)
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument(
        "--fewshot", type=int, default=4, help="solved problems before each question (bench_gen_fewshot)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights, both sides")
    parser.add_argument("--compile", action="store_true", help="our decoding steps compiled (CUDA graphs on a GPU)")
    parser.add_argument("--name", default="eval")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for checkpoint in args.checkpoint:
        if not (Path(checkpoint) / "config.json").is_file():
            parser.error(f"{checkpoint} holds no config.json; give --checkpoint a model directory.")
    models = ([(args.preset, None)] if args.preset else []) + [(None, c) for c in args.checkpoint]
    if not models:
        parser.error("nothing to run; give --preset or --checkpoint.")

    from lm_eval.tasks import TaskManager

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks_dir = Path(tmp) / "tasks"
        tasks_dir.mkdir()
        write_tasks(tasks_dir, args.choice_docs, args.gen_docs, args.max_gen_toks, args.fewshot)
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        for i, (preset, checkpoint) in enumerate(models):
            model_dir = Path(tmp) / f"model{i}"
            described, eod_id = export_model(preset, checkpoint, model_dir)
            rows += bench_model(args, described, model_dir, eod_id, manager)
    notes = (
        f"Batch size {args.batch} on both sides, weights in {args.dtype}, device {args.device}"
        f"{', our decoding steps compiled' if args.compile else ''}, "
        f"{torch.get_num_threads()} CPU thread(s); {args.repeats} interleaved runs per "
        "backend and task, each a whole `simple_evaluate` call (task building and metrics included); samples/s "
        f"and the ratio from each side's fastest run (the machine is shared), medians beside them. "
        f"generate_until stops at a newline or {args.max_gen_toks} tokens. `ratio_net` leaves out lm-eval's own work "
        "(the fastest call with a model that answers constants), which both backends pay in every call."
    )
    command = "python -m benchmarks.bench_eval " + shlex.join(sys.argv[1:] if argv is None else argv)  # --preset ""
    write_result(args.name, rows, command, notes)


if __name__ == "__main__":
    main()
