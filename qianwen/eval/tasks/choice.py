"""MMLU and C-Eval: 5-shot multiple choice scored by the next-token logits of the four option letters, the report's
protocol. The prediction is the letter whose token has the highest logit after the prompt; nothing is generated.

Files, as the official releases unpack:
- MMLU (https://people.eecs.berkeley.edu/~hendrycks/data.tar, from https://github.com/hendrycks/test):
  `<data-dir>/mmlu/data/dev/<subject>_dev.csv` (the shots) and `<data-dir>/mmlu/data/test/<subject>_test.csv`
  (scored), rows question,A,B,C,D,answer with no header; `<data-dir>/mmlu/dev/...` (no `data/`) works too.
- C-Eval (https://huggingface.co/datasets/ceval/ceval-exam, ceval-exam.zip): `<data-dir>/ceval/dev/<subject>_dev.csv`
  and `<data-dir>/ceval/val/<subject>_val.csv` (scored: the test answers are not public), with a header row
  id,question,A,B,C,D,answer[,explanation]. The Chinese subject names come from `<data-dir>/ceval/subject_mapping.json`
  (in https://github.com/hkust-nlp/ceval) when it is there, else the file names stand in.

Prompts (the shots are the first `shots` rows of the subject's dev file; shots are dropped from the end while the
prompt does not fit the model's window):
- MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n", then per question
  "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" (+ " {answer}\\n\\n" for a shot); letters " A" ... " D".
- C-Eval: "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n", then
  "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：" (+ "{answer}\\n\\n"); letters "A" ... "D".

`--limit N` applies per subject (as lm-eval's limit does to MMLU's subtasks), so a short run still sees every
subject. Metrics: `acc` is the benchmark's own average (MMLU: over all questions, as Hendrycks et al. report it;
C-Eval: the mean of the subjects' accuracies, as its leaderboard does), then both averages by name.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qianwen.eval.harness import TaskOptions, TaskResult, data_path, download, fit_few_shot, read_options

LETTERS = "ABCD"
KEYS = ["question", *LETTERS, "answer"]


@dataclass(frozen=True)
class Benchmark:
    NAME: str
    source: str
    header: str  # the instruction before the shots; {subject} is filled in
    cue: str  # what ends each question, before the answer letter
    space: str  # between the cue and the letter
    dev: tuple[str, str]  # (directory, file suffix) of the shots
    scored: tuple[str, str]  # (directory, file suffix) of the questions scored
    has_header: bool
    average: str  # "micro" or "macro": which average is the headline `acc`
    OPTIONS: dict = field(default_factory=lambda: {"shots": 5})

    def example(self, row: dict, with_answer: bool) -> str:
        options = "".join(f"\n{letter}. {row[letter]}" for letter in LETTERS)
        text = f"{row['question']}{options}\n{self.cue}"
        return f"{text}{self.space}{row['answer']}\n\n" if with_answer else text

    def prompt(self, subject: str, shots: Sequence[dict], row: dict) -> str:
        body = "".join(self.example(s, True) for s in shots)
        return self.header.format(subject=subject) + body + self.example(row, False)

    def letter_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.encode(self.space + letter) for letter in LETTERS]
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != 4:
            raise ValueError(
                f"{self.NAME} scores one token per option letter, but this tokenizer encodes "
                f"{[self.space + letter for letter in LETTERS]} as {ids}; use a vocabulary with single-token letters."
            )
        return [i[0] for i in ids]

    def subjects(self, options: TaskOptions) -> tuple[Path, list[str]]:
        """The benchmark's root directory and its subjects (those with a scored file), sorted."""
        root = data_path(options, self.NAME, self.NAME, download(self.source))
        if (root / "data").is_dir():  # data.tar unpacks MMLU under data/
            root = root / "data"
        folder, suffix = self.scored
        where = root / folder
        if not where.is_dir():
            raise ValueError(f"{self.NAME} needs {where}, which does not exist; unpack the release from {self.source}.")
        subjects = sorted(p.name[: -len(suffix)] for p in where.glob(f"*{suffix}"))
        if not subjects:
            raise ValueError(f"{where} holds no *{suffix} files; unpack the official release from {self.source}.")
        return root, subjects

    def read(self, path: Path) -> list[dict]:
        """Rows as {question, A, B, C, D, answer}; a malformed row is an error that names it."""
        if not path.is_file():
            raise ValueError(f"{self.NAME} needs {path}, which does not exist; get the release from {self.source}.")
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        names = KEYS
        if self.has_header:
            names, rows = (rows[0] if rows else []), rows[1:]
            if any(k not in names for k in KEYS):
                raise ValueError(f"{path} has columns {names}; {self.NAME} needs {', '.join(KEYS)}.")
        out = []
        for number, values in enumerate(rows, 1 + self.has_header):
            row = dict(zip(names, values))
            if len(values) < len(names) or row["answer"].strip() not in LETTERS:
                raise ValueError(f"{path} row {number} is not {','.join(names)} with an answer from A to D.")
            out.append({**{k: row[k] for k in KEYS}, "answer": row["answer"].strip()})
        return out

    def subject_names(self, root: Path) -> dict[str, str]:
        mapping = root / "subject_mapping.json"
        if not mapping.is_file():
            return {}
        return {k: v[1] for k, v in json.loads(mapping.read_text(encoding="utf-8")).items()}

    def evaluate(self, model, tokenizer, options: TaskOptions) -> TaskResult:
        cfg = read_options(self.OPTIONS, options.extra, self.NAME)
        letters = self.letter_ids(tokenizer)
        root, subjects = self.subjects(options)
        names = self.subject_names(root)
        window = model.config.max_position_embeddings
        prompts, samples = [], []
        for subject in subjects:
            shots = self.read(root / self.dev[0] / f"{subject}{self.dev[1]}")[: cfg["shots"]]
            rows = self.read(root / self.scored[0] / f"{subject}{self.scored[1]}")[: options.limit]
            title = names.get(subject, subject.replace("_", " "))
            for index, row in enumerate(rows):
                ids, k = fit_few_shot(
                    lambda k, t=title, s=shots, r=row: tokenizer.encode(self.prompt(t, s[:k], r)), len(shots), window
                )
                prompts.append(ids)
                samples.append({"subject": subject, "index": index, "answer": row["answer"], "shots": k})
        logits = option_logits(model, prompts, letters, options.batch_size, tokenizer.pad_id, self.NAME)
        for sample, row in zip(samples, logits.tolist()):
            sample["predicted"] = LETTERS[max(range(4), key=row.__getitem__)]
            sample["correct"] = sample["predicted"] == sample["answer"]
            sample["logits"] = dict(zip(LETTERS, row))
        return self.result(samples, subjects)

    def result(self, samples: list[dict], subjects: list[str]) -> TaskResult:
        by_subject = {s: [x["correct"] for x in samples if x["subject"] == s] for s in subjects}
        by_subject = {s: v for s, v in by_subject.items() if v}
        micro = sum(map(sum, by_subject.values())) / max(sum(map(len, by_subject.values())), 1)
        macro = sum(sum(v) / len(v) for v in by_subject.values()) / max(len(by_subject), 1)
        headline = micro if self.average == "micro" else macro
        table = ["| subject | questions | acc |", "|---|---|---|"]
        table += [f"| {s} | {len(v)} | {sum(v) / len(v):.4f} |" for s, v in by_subject.items()]
        metrics = {"acc": headline, "acc_micro": micro, "acc_macro": macro}
        return TaskResult(self.NAME, metrics, samples, table_md="\n".join(table))


@torch.inference_mode()
def option_logits(
    model, prompts: Sequence[list[int]], option_ids: list[int], batch_size: int, pad_id: int, desc: str = ""
) -> torch.Tensor:
    """Next-token logits [N, len(option_ids)] after each prompt, from left-padded batches of similar lengths."""
    device = model.embed.weight.device
    out = torch.empty(len(prompts), len(option_ids))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with tqdm(total=len(prompts), desc=desc, unit="question", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            longest = max(len(prompts[i]) for i in indices)
            ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(indices):
                ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, longest - len(prompts[i]) :] = 1
            logits = model(ids.to(device), attention_mask=mask.to(device), last_only=True)[:, -1]
            out[indices] = logits[:, option_ids].float().cpu()
            bar.update(len(indices))
    return out


MMLU = Benchmark(
    NAME="mmlu",
    source="https://people.eecs.berkeley.edu/~hendrycks/data.tar (see https://github.com/hendrycks/test)",
    header="The following are multiple choice questions (with answers) about {subject}.\n\n",
    cue="Answer:",
    space=" ",
    dev=("dev", "_dev.csv"),
    scored=("test", "_test.csv"),
    has_header=False,
    average="micro",
)
CEVAL = Benchmark(
    NAME="ceval",
    source="https://huggingface.co/datasets/ceval/ceval-exam (ceval-exam.zip)",
    header="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    cue="答案：",
    space="",
    dev=("dev", "_dev.csv"),
    scored=("val", "_val.csv"),
    has_header=True,
    average="macro",
)
