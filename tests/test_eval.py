"""qianwen eval: the HumanEval executor against the package's canonical solutions, pass@k against the closed form,
MMLU/C-Eval/GSM8K/arith scoring on fixture files with hand-computed results, and the command end to end."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qianwen
from qianwen.cli import main
from qianwen.config import ModelConfig
from qianwen.eval import harness, tasks
from qianwen.eval.harness import TaskOptions
from qianwen.eval.tasks import arith, gsm8k, humaneval, instruct
from qianwen.eval.tasks.choice import CEVAL, MMLU, option_logits
from qianwen.generate import Completion
from qianwen.tokenizer import Tokenizer, qwen_vocabulary

TINY = ModelConfig(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(qwen_vocabulary())


@pytest.fixture(scope="module")
def model() -> qianwen.Transformer:
    m = qianwen.Transformer(TINY)
    m.init_weights(0)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("eval") / "base"
    qianwen.save(model, tokenizer, out)
    return out


# ---------------------------------------------------------------------------
# HumanEval

# Each solution's return value changed by the smallest step of its type: what a nearly right program returns.
ALTER = """
def _altered(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, None]
    if isinstance(value, tuple):
        return (*value, None)
    return 0 if value is None else None
"""


def broken(problem: dict) -> str:
    name = problem["entry_point"]
    wrapper = f"\n_original = {name}\n\ndef {name}(*args, **kwargs):\n    return _altered(_original(*args, **kwargs))\n"
    return problem["canonical_solution"] + ALTER + wrapper


def test_canonical_solutions_pass_and_altered_returns_fail():
    problems = humaneval.problems()
    assert len(problems) == 164
    jobs = [(p, p["canonical_solution"]) for p in problems] + [(p, broken(p)) for p in problems]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: humaneval.execute(*job, timeout=20.0), jobs))
    canonical, altered = results[:164], results[164:]
    assert [p["task_id"] for p, r in zip(problems, canonical) if not r.passed] == []
    assert [p["task_id"] for p, r in zip(problems, altered) if r.passed] == []
    # They fail on the tests' asserts, not by crashing: the wrapper itself is sound.
    assert all("AssertionError" in r.stderr for r in altered)


def _fake_generation(texts: list[str]):
    def generate_batches(model, tokenizer, prompts, max_new_tokens, **kwargs):
        assert len(prompts) == len(texts)
        yield list(range(len(texts))), [Completion([], t, "stop") for t in texts]

    return generate_batches


def test_hang_crash_and_exit_are_failures_and_the_run_goes_on(monkeypatch, tokenizer):
    first = humaneval.problems(5)
    texts = [
        "    while True:\n        pass\n",
        "    raise RuntimeError('boom')\n",
        "    import os\n    os._exit(0)\n",  # exits 0 before the tests have run
        "    import sys\n    sys.exit(0)\n",
        first[4]["canonical_solution"],
    ]
    monkeypatch.setattr(humaneval, "generate_batches", _fake_generation(texts))
    options = TaskOptions(data_dir=None, limit=5, extra={"timeout": "2"})
    result = humaneval.evaluate(None, tokenizer, options)
    assert [s["passed"] for s in result.samples] == [False, False, False, False, True]
    assert result.samples[0]["status"] == "timeout"
    assert "boom" in result.samples[1]["error"]
    assert result.metrics == {"pass@1": pytest.approx(1 / 5)}


@pytest.mark.parametrize(
    "n,c,k", [(1, 0, 1), (1, 1, 1), (10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 8, 5), (20, 19, 2), (200, 13, 100)]
)
def test_pass_at_k_is_the_closed_form(n, c, k):
    expected = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


def test_pass_at_k_over_samples(monkeypatch, tokenizer):
    problems = humaneval.problems(2)
    good, bad = (p["canonical_solution"] for p in problems), "    return None\n"
    good = list(good)
    # Problem 0: 3 of 4 samples right; problem 1: 1 of 4.
    texts = [good[0], good[0], bad, good[0], bad, bad, good[1], bad]
    monkeypatch.setattr(humaneval, "generate_batches", _fake_generation(texts))
    options = TaskOptions(None, limit=2, extra={"n": "4", "k": "1,2,10", "temperature": "0.8"})
    result = humaneval.evaluate(None, tokenizer, options)
    closed = lambda n, c, k: 1 - math.comb(n - c, k) / math.comb(n, k)
    assert list(result.metrics) == ["pass@1", "pass@2"]  # k=10 > n is left out
    assert result.metrics["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert result.metrics["pass@2"] == pytest.approx((closed(4, 3, 2) + closed(4, 1, 2)) / 2)
    assert [s["sample"] for s in result.samples] == [0, 1, 2, 3] * 2


def test_sampling_without_temperature_is_refused(tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        humaneval.evaluate(None, tokenizer, TaskOptions(None, 1, extra={"n": "5"}))


CUTS = [
    ("    return x\n\ndef g():\n    pass\n", "    return x"),
    ("    a = 1\n\n    return a\n", "    a = 1\n\n    return a\n"),  # a blank line inside the body stays
    ("    return 1\nprint(f(2))\n", "    return 1"),
    ("    return 1\n# a test\n", "    return 1"),
    ("    return 1\n    # an indented comment\n", "    return 1\n    # an indented comment\n"),
    ("    return 1\nif __name__ == '__main__':\n", "    return 1"),
    ("    return 1\nclass A:\n", "    return 1"),
    ("    return 1\n\nassert f(1) == 1\n", "    return 1"),
    ("    return 1\n \t\nx = f()\n", "    return 1"),  # a blank line of spaces and tabs
    ("    return 1\ndefault = 3\n", "    return 1"),  # "\ndef" is a plain prefix, as in Codex's stop list
    ("    return 1\nx = 2\n", "    return 1\nx = 2\n"),  # top-level code without a blank line: not a stop
    ("    return 1\n\n\n", "    return 1\n\n\n"),
]


@pytest.mark.parametrize("text,expected", CUTS)
def test_completion_cut(text, expected):
    assert humaneval.cut_completion(text) == expected


# ---------------------------------------------------------------------------
# MMLU and C-Eval with a scorer whose option logits the test controls


class PickingModel(torch.nn.Module):
    """Gives the letter named by the last "pick X" of the prompt the highest logit; records each prompt it saw
    (real tokens only, as the attention mask marks them)."""

    def __init__(self, tokenizer: Tokenizer, letters: list[str], window: int = 4096):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=window)
        self.embed = torch.nn.Embedding(1, 1)
        self.tokenizer, self.seen, self.batches = tokenizer, [], 0
        self.ids = {letter.strip(): tokenizer.encode(letter)[0] for letter in letters}

    def forward(self, ids, attention_mask=None, cache=None, last_only=False):
        assert last_only and cache is None
        self.batches += 1
        logits = torch.zeros(ids.shape[0], 1, TINY.vocab_size)
        for row in range(ids.shape[0]):
            text = self.tokenizer.decode(ids[row][attention_mask[row].bool()].tolist())
            self.seen.append(text)
            letter = text.rsplit("pick ", 1)[1][0]
            logits[row, 0, self.ids[letter]] = 5.0
            logits[row, 0, self.ids["A"]] += 1.0  # a runner-up, so the argmax matters
        return logits


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def question(text: str, answer: str) -> list[str]:
    return [text, f"{text}-a", f"{text}-b", f"{text}-c", f"{text}-d", answer]


def as_row(values: list[str]) -> dict:
    return dict(zip(["question", "A", "B", "C", "D", "answer"], values))


@pytest.fixture
def mmlu_dir(tmp_path) -> Path:
    data = tmp_path / "mmlu" / "data"
    write_csv(data / "dev" / "abstract_algebra_dev.csv", [question(f"dev{i}", "ABCDA"[i]) for i in range(5)])
    write_csv(data / "dev" / "world_religions_dev.csv", [question("rdev0", "B"), question("rdev1", "C")])
    # abstract algebra: picks right, right, wrong; world religions: right, wrong.
    algebra = [question("q0 pick B", "B"), question("q1 pick D", "D"), question("q2 pick A", "C")]
    write_csv(data / "test" / "abstract_algebra_test.csv", algebra)
    write_csv(data / "test" / "world_religions_test.csv", [question("r0 pick C", "C"), question("r1 pick C", "D")])
    return tmp_path


def test_mmlu_scores_and_averages(mmlu_dir, tokenizer):
    scorer = PickingModel(tokenizer, [" A", " B", " C", " D"])
    result = MMLU.evaluate(scorer, tokenizer, TaskOptions(mmlu_dir, None, batch_size=2))
    assert [s["correct"] for s in result.samples] == [True, True, False, True, False]
    assert [s["predicted"] for s in result.samples] == ["B", "D", "A", "C", "C"]
    assert result.metrics == pytest.approx({"acc": 3 / 5, "acc_micro": 3 / 5, "acc_macro": (2 / 3 + 1 / 2) / 2})
    assert scorer.batches == 3  # 5 prompts in batches of 2
    assert "| world_religions | 2 | 0.5000 |" in result.table_md
    expected = (
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        "rdev0\nA. rdev0-a\nB. rdev0-b\nC. rdev0-c\nD. rdev0-d\nAnswer: B\n\n"
        "rdev1\nA. rdev1-a\nB. rdev1-b\nC. rdev1-c\nD. rdev1-d\nAnswer: C\n\n"
        "r1 pick C\nA. r1 pick C-a\nB. r1 pick C-b\nC. r1 pick C-c\nD. r1 pick C-d\nAnswer:"
    )
    assert expected in scorer.seen
    assert all(s["shots"] == 5 for s in result.samples if s["subject"] == "abstract_algebra")


def test_mmlu_limit_is_per_subject_and_long_prompts_drop_shots(mmlu_dir, tokenizer):
    short = len(tokenizer.encode(MMLU.prompt("abstract algebra", [], as_row(question("q0 pick B", "B")))))
    scorer = PickingModel(tokenizer, [" A", " B", " C", " D"], window=short + 40)
    result = MMLU.evaluate(scorer, tokenizer, TaskOptions(mmlu_dir, 1))
    assert [(s["subject"], s["index"]) for s in result.samples] == [("abstract_algebra", 0), ("world_religions", 0)]
    assert 0 <= result.samples[0]["shots"] < 5
    assert all(len(tokenizer.encode(text)) <= short + 40 for text in scorer.seen)


def test_ceval_chinese_prompt_and_subject_mean(tmp_path, tokenizer):
    root = tmp_path / "ceval"
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(root / "dev" / "computer_network_dev.csv", [["0", *question("网络", "A"), "因为"]], header)
    write_csv(root / "dev" / "law_dev.csv", [["0", *question("法", "D"), ""]], header)
    val = [["0", *question("一 pick B", "B")], ["1", *question("二 pick B", "C")], ["2", *question("三 pick D", "D")]]
    write_csv(root / "val" / "computer_network_val.csv", val, header[:7])
    write_csv(root / "val" / "law_val.csv", [["0", *question("四 pick A", "B")]], header[:7])
    (root / "subject_mapping.json").write_text(
        json.dumps({"computer_network": ["Computer Network", "计算机网络", "STEM"]})
    )
    scorer = PickingModel(tokenizer, ["A", "B", "C", "D"])
    result = CEVAL.evaluate(scorer, tokenizer, TaskOptions(tmp_path, None))
    assert [s["correct"] for s in result.samples] == [True, False, True, False]
    assert result.metrics == pytest.approx({"acc": (2 / 3 + 0) / 2, "acc_micro": 2 / 4, "acc_macro": 1 / 3})
    expected = (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "网络\nA. 网络-a\nB. 网络-b\nC. 网络-c\nD. 网络-d\n答案：A\n\n"
        "一 pick B\nA. 一 pick B-a\nB. 一 pick B-b\nC. 一 pick B-c\nD. 一 pick B-d\n答案："
    )
    assert expected in scorer.seen
    assert any(text.startswith("以下是中国关于law考试") for text in scorer.seen)  # no mapping entry: the file name


def test_batched_option_logits_equal_plain_forwards(model, tokenizer):
    prompts = [tokenizer.encode(t) for t in ["Answer:", "One two three four five six. Answer:", "x\nAnswer:", "2+2=?"]]
    letters = MMLU.letter_ids(tokenizer)
    batched = option_logits(model, prompts, letters, batch_size=3, pad_id=tokenizer.pad_id)
    with torch.inference_mode():
        plain = torch.stack([model(torch.tensor([p]))[0, -1, letters] for p in prompts])
    torch.testing.assert_close(batched, plain, atol=1e-5, rtol=1e-5)


def test_missing_benchmark_files_name_the_file_and_the_source(tmp_path, tokenizer):
    scorer = PickingModel(tokenizer, [" A", " B", " C", " D"])
    with pytest.raises(ValueError, match=r"mmlu.*hendrycks"):
        MMLU.evaluate(scorer, tokenizer, TaskOptions(tmp_path, None))
    with pytest.raises(ValueError, match="--data-dir"):
        CEVAL.evaluate(scorer, tokenizer, TaskOptions(None, None))
    write_csv(tmp_path / "mmlu" / "dev" / "law_dev.csv", [question("d", "A")])
    write_csv(tmp_path / "mmlu" / "test" / "law_test.csv", [question("q", "A"), question("r", "E")])
    with pytest.raises(ValueError, match=r"law_test.csv row 2 is not question,A,B,C,D,answer"):
        MMLU.evaluate(scorer, tokenizer, TaskOptions(tmp_path, None))
    with pytest.raises(ValueError, match=r"gsm8k/test.jsonl, which does not exist; download it from https://github"):
        gsm8k.evaluate(scorer, tokenizer, TaskOptions(tmp_path, None))
    # The synthetic tasks' files are made here, not downloaded.
    for task in (arith, instruct):
        with pytest.raises(ValueError, match=r"which does not exist; write it with `qianwen data synthetic --out DIR`"):
            task.evaluate(scorer, tokenizer, TaskOptions(tmp_path, None))


# ---------------------------------------------------------------------------
# GSM8K and arith, with generation replaced by fixed replies


def gsm8k_row(i: int) -> dict:
    return {"question": f"Tom has {i} apples. How many?", "answer": f"He has <<{i}*1={i}>>{i} apples.\n#### {i:,}"}


@pytest.fixture
def gsm8k_dir(tmp_path) -> Path:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(gsm8k_row(i)) + "\n" for i in range(1, 10)))
    test = [gsm8k_row(1200), gsm8k_row(7), gsm8k_row(-3)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return tmp_path


def _fake_generate_all(texts: list[str], seen: list):
    def generate_all(model, tokenizer, prompts, max_new_tokens, **kwargs):
        seen.extend(tokenizer.decode(p) for p in prompts)
        return [Completion([], t, "stop") for t in texts]

    return generate_all


def test_gsm8k_prompt_extraction_and_accuracy(monkeypatch, gsm8k_dir, tokenizer):
    seen: list[str] = []
    replies = ["He has 1,200 apples.\nThe answer is 1,200.", "The answer is 7.5", "so -3"]
    monkeypatch.setattr(gsm8k, "generate_all", _fake_generate_all(replies, seen))
    fake = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    result = gsm8k.evaluate(fake, tokenizer, TaskOptions(gsm8k_dir, None))
    assert [s["predicted"] for s in result.samples] == ["1200", "7.5", "-3"]
    assert [s["answer"] for s in result.samples] == ["1200", "7", "-3"]
    assert [s["correct"] for s in result.samples] == [True, False, True]
    assert result.metrics == {"acc": pytest.approx(2 / 3)}
    shot = "Question: Tom has 1 apples. How many?\nLet's think step by step\nHe has 1 apples.\nThe answer is 1.\n\n"
    assert seen[1].startswith(shot)
    assert seen[1].endswith("Question: Tom has 7 apples. How many?\nLet's think step by step\n")
    assert seen[1].count("Question:") == 9 and "Tom has 9 apples" not in seen[1]  # the first 8 of train


def test_gsm8k_shots_are_dropped_to_fit_the_window(monkeypatch, gsm8k_dir, tokenizer):
    seen: list[str] = []
    monkeypatch.setattr(gsm8k, "generate_all", _fake_generate_all(["1"], seen))
    three = len(tokenizer.encode(gsm8k.prompt("Tom has 1200 apples. How many?", [gsm8k_row(i) for i in (1, 2, 3)])))
    fake = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=three + 256 + 5))
    result = gsm8k.evaluate(fake, tokenizer, TaskOptions(gsm8k_dir, 1))
    assert result.samples[0]["shots"] == 3


@pytest.mark.parametrize(
    "text,number",
    [("1,234 apples", "1234"), ("from 3 to -4.5.", "-4.5"), ("$1,000,000", "1000000"), ("none", None), ("7.", "7")],
)
def test_last_number(text, number):
    assert harness.last_number(text) == number


def test_gsm8k_gold_needs_the_marker():
    assert gsm8k.gold("so 5 + 5 = 10\n#### 10") == "10"
    with pytest.raises(ValueError, match="####"):
        gsm8k.gold("10")


@pytest.mark.parametrize(
    "reply,answer",
    [
        ("3 + 4 = 7.\nThe answer is 7.", "7"),
        ("小明有 5 个。\n答案是 1,234。", "1234"),
        ("Thought: I now know the final answer\nFinal Answer: 42", "42"),
        ("The answer is **$12**.", "12"),
        ("The answer is 5. Then 6 more", "6"),  # the marker is not at a line end: the last number
        ("no idea", None),
    ],
)
def test_arith_extraction(reply, answer):
    assert arith.extract(reply, numeric=True) == answer


@pytest.mark.parametrize(
    "reply,right",
    [
        ("Slices in all: 3 × 10 = 30.\nSlices for each friend: 30 ÷ 3 = 10.\nThe answer is 10.", True),
        ("糖的总数：14 + 4 = 12。\n答案是 12。", False),
        ("24 ÷ 6 = 3", False),
        ("24/6 = 4 and 7-2=5 and 6*7 = 42", True),
        ("9 ÷ 0 = 0", False),
        ("The answer is 3.", True),  # no working shown, none wrong
    ],
)
def test_arith_working_is_checked_step_by_step(reply, right):
    assert arith.working_right(reply) is right


def test_arith_chat_prompts_and_exact_match(monkeypatch, tmp_path, tokenizer):
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2*3?", "answer": "6"}, {"prompt": "sort", "answer": "1, 2"}]
    rows.append({"prompt": "3 x 5 - 3?", "answer": "12"})
    (tmp_path / "arith_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[str] = []
    replies = ["1 + 1 = 2\nThe answer is 2.", "2 * 3 = 5\nThe answer is 5.", "From smallest:\n1, 2"]
    replies.append("爸爸：3 × 5 = 25。\n年龄差：25 - 3 = 12。\n答案是 12。")  # the right number through wrong working
    monkeypatch.setattr(arith, "generate_all", _fake_generate_all(replies, seen))
    result = arith.evaluate(None, tokenizer, TaskOptions(tmp_path, None))
    assert [s["correct"] for s in result.samples] == [True, False, True, True]
    assert [s["worked_correct"] for s in result.samples] == [True, False, True, False]
    assert result.metrics == {"acc": 0.75, "worked_acc": 0.5}
    assert seen[0] == tokenizer.chat_text([{"role": "user", "content": "1+1?"}])


def test_instruct_scores_each_kind_with_its_checker(monkeypatch, tmp_path, tokenizer):
    rows = [
        {"prompt": "Sort: 3, 1, 2", "answer": "1, 2, 3", "kind": "sort", "lang": "en"},
        {"prompt": "Reverse cat", "answer": "tac", "kind": "reverse", "lang": "en"},
        {"prompt": "Upper: red sky", "answer": "RED SKY", "kind": "uppercase", "lang": "en"},
        {"prompt": "2+2, answer in Chinese", "answer": "4", "kind": "answer_in_zh", "lang": "en"},
        {"prompt": "小明有3个苹果，又买了4个。", "answer": "7", "kind": "arithmetic", "lang": "zh"},
        {"prompt": "Sort: 9, 8", "answer": "8, 9", "kind": "sort", "lang": "en"},
    ]
    (tmp_path / "instruct_eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    replies = [
        ("From smallest to largest:\n1, 2, 3", "stop"),  # right, clean
        ("The word reversed is cta.", "stop"),  # wrong answer
        ("In capital letters: RED SKY", "length"),  # right, but never ended
        ("答案是 4。", "stop"),  # right and in Chinese
        ("The answer is 7.", "stop"),  # right number, wrong language: not correct
        ("Sorted.\nSorted.\nSorted.\n8, 9", "stop"),  # right, but rambling
    ]
    seen: list[str] = []

    def fake(model, tok, prompts, max_new_tokens, **kwargs):
        seen.extend(tok.decode(p) for p in prompts)
        return [Completion([], text, reason) for text, reason in replies]

    monkeypatch.setattr(instruct, "generate_all", fake)
    result = instruct.evaluate(None, tokenizer, TaskOptions(tmp_path, None))
    assert [s["correct"] for s in result.samples] == [True, False, True, True, False, True]
    assert [s["flaws"] for s in result.samples] == [
        [],
        ["wrong_answer"],
        ["unended"],
        [],
        ["wrong_language"],
        ["rambling"],
    ]
    assert result.metrics == {
        "acc": pytest.approx(4 / 6),
        "clean_accuracy": pytest.approx(2 / 6),
        "accuracy/arithmetic": 0.0,
        "accuracy/reverse": 0.0,
        "accuracy/sort": 1.0,
        "accuracy/uppercase": 1.0,
        "accuracy/answer_in_zh": 1.0,
    }
    assert seen[0] == tokenizer.chat_text([{"role": "user", "content": "Sort: 3, 1, 2"}])
    (tmp_path / "odd.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a", "kind": "poetry"}) + "\n")
    with pytest.raises(ValueError, match="kind 'poetry', which no checker knows; the kinds are: arithmetic"):
        instruct.evaluate(None, tokenizer, TaskOptions(tmp_path, None, extra={"file": str(tmp_path / "odd.jsonl")}))


# ---------------------------------------------------------------------------
# Options and the task registry


def test_options_reach_their_tasks_typed():
    modules = {"humaneval": humaneval, "gsm8k": gsm8k}
    extra = harness.parse_extra(["max_new_tokens=32", "humaneval.n=3", "humaneval.temperature=0.8"])
    harness.check_extra(modules, extra)
    mine = harness.read_options(humaneval.OPTIONS, harness.extra_for("humaneval", extra), "humaneval")
    assert (mine["n"], mine["temperature"], mine["max_new_tokens"]) == (3, 0.8, 32)
    theirs = harness.read_options(gsm8k.OPTIONS, harness.extra_for("gsm8k", extra), "gsm8k")
    assert theirs == {"shots": 8, "max_new_tokens": 32}
    for bad, words in [(["temprature=1"], "temprature"), (["mmlu.shots=1"], "not among"), (["n=ten"], "not an int")]:
        with pytest.raises(ValueError, match=words):
            extra = harness.parse_extra(bad)
            harness.check_extra(modules, extra)
            harness.read_options(humaneval.OPTIONS, harness.extra_for("humaneval", extra), "humaneval")


def test_task_registry(monkeypatch):
    assert tasks.resolve("gsm8k, humaneval,gsm8k") == ["gsm8k", "humaneval"]
    assert tasks.load("ceval") is CEVAL and tasks.load("humaneval") is humaneval
    with pytest.raises(ValueError, match="humaneval, gsm8k, mmlu"):
        tasks.resolve("humaneval,mmmlu")
    monkeypatch.setitem(tasks.TASKS, "ghost", "qianwen.eval.tasks.ghost")
    with pytest.raises(ValueError, match="ghost is registered but its module"):
        tasks.load("ghost")


def test_default_out_sits_beside_the_model(tmp_path):
    assert harness.default_out(tmp_path / "runs" / "x" / "base") == tmp_path / "runs" / "x" / "eval" / "base.json"


def test_outputs_hold_every_metric_table_and_file(tmp_path):
    result = harness.TaskResult(
        "longctx",
        {"ppl": 3.5, "tokens": 4096},
        [{"length": 512}],
        table_md="| a |\n|---|\n| 1 |",
        files={"plot.png": b"PNG"},
    )
    out = tmp_path / "eval" / "base.json"
    table = harness.write_outputs(out, [harness.Finished(result, 1.25)], {"model": "m"})
    assert (out.parent / "base.longctx.plot.png").read_bytes() == b"PNG"
    summary = json.loads(out.read_text())
    assert summary["tasks"]["longctx"] == {
        "metrics": {"ppl": 3.5, "tokens": 4096},
        "samples": 1,
        "seconds": 1.25,
        "log": "base.longctx.jsonl",
        "files": ["base.longctx.plot.png"],
    }
    assert table.splitlines()[2:4] == ["| longctx | ppl | 3.5000 | 1 | 1.2 |", "|  | tokens | 4096 |  |  |"]
    assert table.endswith("### longctx\n\n| a |\n|---|\n| 1 |\n") and (out.parent / "base.md").read_text() == table


# ---------------------------------------------------------------------------
# The command


def test_cli_end_to_end(checkpoint, gsm8k_dir, tmp_path, capsys):
    out = tmp_path / "scores" / "tiny.json"
    args = ["eval", "--model", str(checkpoint), "--tasks", "humaneval,gsm8k", "--limit", "2"]
    args += ["--data-dir", str(gsm8k_dir), "--out", str(out), "max_new_tokens=16", "gsm8k.shots=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert list(summary["tasks"]) == ["humaneval", "gsm8k"]
    assert summary["tasks"]["humaneval"]["metrics"] == {"pass@1": 0.0}
    assert summary["options"] == {"max_new_tokens": "16", "gsm8k.shots": "2"}
    for task in ("humaneval", "gsm8k"):
        lines = (out.parent / f"tiny.{task}.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)
    assert [json.loads(line)["shots"] for line in (out.parent / "tiny.gsm8k.jsonl").read_text().splitlines()] == [2, 2]
    table = (out.parent / "tiny.md").read_text()
    assert table == printed
    assert "| humaneval | pass@1 | 0.0000 | 2 |" in table and "| gsm8k | acc |" in table


def _bad_task(tmp, checkpoint):
    return ["eval", "--model", str(checkpoint), "--tasks", "humaneval,mmmlu"], "mmmlu"


def _missing_test_file(tmp, checkpoint):
    return ["eval", "--model", str(checkpoint), "--tasks", "gsm8k", "--data-dir", str(tmp)], "grade-school-math"


def _no_data_dir(tmp, checkpoint):
    return ["eval", "--model", str(checkpoint), "--tasks", "ceval"], "--data-dir"


def _unknown_option(tmp, checkpoint):
    return ["eval", "--model", str(checkpoint), "--tasks", "gsm8k", "temprature=0.2"], "temprature"


@pytest.mark.parametrize("case", [_bad_task, _missing_test_file, _no_data_dir, _unknown_option])
def test_cli_user_errors(case, tmp_path, checkpoint, capsys):
    args, words = case(tmp_path, checkpoint)
    assert main([*args, "--out", str(tmp_path / "out.json")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert words in err


def test_cli_bad_task_as_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qianwen.cli", "eval", "--model", str(tmp_path), "--tasks", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no task named 'nope'; the tasks are: humaneval, gsm8k")
    assert len(result.stderr.strip().splitlines()) == 1


def test_arith_few_shot_prompts_a_base_model_in_its_pretraining_format(monkeypatch, tmp_path, tokenizer):
    """shots=K: plain text, K solved arithmetic problems of sft.jsonl (other kinds skipped) before the question,
    cut at a blank line or the next question; as many shots as fit the model's training length."""
    rows = [{"prompt": "2 + 3?", "answer": "5"}]
    (tmp_path / "arith_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = [
        {
            "kind": "sort",
            "messages": [{"role": "user", "content": "Sort 2, 1"}, {"role": "assistant", "content": "1, 2"}],
        },
        {
            "kind": "arithmetic",
            "messages": [
                {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "1 + 1 = 2.\nThe answer is 2."},
            ],
        },
        {
            "kind": "arithmetic",
            "messages": [
                {"role": "user", "content": "2 × 2?"},
                {"role": "assistant", "content": "2 × 2 = 4.\nThe answer is 4."},
            ],
        },
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    seen: list[str] = []
    monkeypatch.setattr(arith, "generate_all", _fake_generate_all([" 2 + 3 = 5.\nThe answer is 5."], seen))

    model = SimpleNamespace(config=SimpleNamespace(seq_length=1024))
    result = arith.evaluate(model, tokenizer, TaskOptions(tmp_path, None, extra={"shots": 3}))
    assert seen[0] == (
        "Question: 1 + 1?\nAnswer: 1 + 1 = 2.\nThe answer is 2.\n\n"
        "Question: 2 × 2?\nAnswer: 2 × 2 = 4.\nThe answer is 4.\n\n"
        "Question: 2 + 3?\nAnswer:"
    )
    assert result.metrics == {"acc": 1.0, "worked_acc": 1.0}
    model.config.seq_length = 64 + len(tokenizer.encode(seen[0].split("\n\n", 1)[1]))  # one solved problem fits
    arith.evaluate(model, tokenizer, TaskOptions(tmp_path, None, extra={"shots": 3, "max_new_tokens": 64}))
    assert seen[1].count("Question:") == 2
