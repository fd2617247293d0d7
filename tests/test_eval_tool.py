"""The `tool` evaluation task: the agent's prompt is the synthetic transcripts' prompt; scoring, extraction and
counts against hand-computed results with a scripted model (the code really runs in the sandbox); the task end
to end on a tiny random model through `qianwen eval`."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest

import qianwen
from qianwen.agent import loop
from qianwen.cli import main
from qianwen.config import ModelConfig
from qianwen.data.synthetic import prompt_record
from qianwen.data.synthetic_tasks import tool_problem, tool_prompt
from qianwen.eval import tasks
from qianwen.eval.harness import TaskOptions
from qianwen.eval.tasks import tool
from qianwen.generate import Completion
from qianwen.react_prompt import CODE_INTERPRETER
from qianwen.tokenizer import DEFAULT_SYSTEM, Tokenizer, qwen_vocabulary


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(qwen_vocabulary())


def test_the_agent_prompt_is_the_one_the_transcripts_teach():
    from qianwen.agent.react import build_prompt
    from qianwen.agent.tools import code_interpreter

    for i, lang in enumerate(["en", "zh", "en", "zh"]):
        question = tool_problem(random.Random(i), lang).data["question"]
        assert build_prompt(question, [CODE_INTERPRETER]) == tool_prompt(question)
        assert build_prompt(question, [code_interpreter()]) == tool_prompt(question)  # the Tool the task passes
    assert tasks.load("tool") is tool


# ---------------------------------------------------------------------------
# A scripted model

Q1, A1 = "What is 12345 × 6789?", 12345 * 6789
Q2, A2 = "计算 54321 × 1234。", 54321 * 1234
Q3, A3 = "What is the sum of 1000000, 234567?", 1234567
Q4, A4 = "What is 10000 × 1000?", 10000000

# Each question's agent replies in turn (what the model writes before the runtime's "Observation:").
AGENT = {
    # One tool call, then the answer: right.
    Q1: [
        'Thought: too large for my head\nAction: code_interpreter\nAction Input: {"code": "print(12345 * 6789)"}\n',
        "Thought: I now know the final answer\nFinal Answer: 83,810,205",
    ],
    # A tool that is not offered (malformed), one with no input (malformed), a real call, then a wrong answer.
    Q2: [
        "Thought: calculate\nAction: calculator\nAction Input: 54321 * 1234\n",
        "Thought: the interpreter then\nAction: code_interpreter\n",
        'Action: code_interpreter\nAction Input: {"code": "x = 54321 * 1234\\nprint(x)"}\n',
        "Thought: I now know the final answer\nFinal Answer: 67032115",
    ],
    # Calls the tool at every step: the step limit (4) comes first, and the fourth call does not run.
    Q3: ['Thought: add\nAction: code_interpreter\nAction Input: {"code": "print(1000000 + 234567)"}\n'] * 4,
    # Ends its turn at once: the run ends, but with no answer.
    Q4: [""],
}
DIRECT = {Q1: "The answer is 83810205.", Q2: "答案是 67,032,113。", Q3: "It is 1,234,567 I think, not 7", Q4: ""}


def scripted_agent(seen: list[str]):
    """`qianwen.agent.run_many` with the model replaced by the scripts above (the sandbox is real)."""
    left = {q: iter(replies) for q, replies in AGENT.items()}

    def generate_fn(text: str) -> str:
        seen.append(text)
        question = next(q for q in AGENT if f"Question: {q}<|im_end|>" in text)
        return next(left[question])

    return functools.partial(loop.run_many, generate_fn=generate_fn)


def fake_generate_all(seen: list[str]):
    def generate_all(model, tokenizer, prompts, max_new_tokens, **kwargs):
        texts = [tokenizer.decode(p) for p in prompts]
        seen.extend(texts)
        return [Completion([], DIRECT[next(q for q in DIRECT if q in t)], "stop") for t in texts]

    return generate_all


def write_rows(path: Path) -> None:
    rows = [
        {"prompt": tool_prompt(Q1), "answer": str(A1), "lang": "en", "data": {"question": Q1}},
        {"prompt": tool_prompt(Q2), "answer": str(A2), "lang": "zh", "data": {"question": Q2}},
        {"question": Q3, "answer": str(A3)},
        {"question": Q4, "answer": str(A4)},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_scoring_extraction_and_counts(monkeypatch, tmp_path, tokenizer):
    write_rows(tmp_path / "tool_eval.jsonl")
    agent_seen: list[str] = []
    direct_seen: list[str] = []
    monkeypatch.setattr(tool, "agent_run_many", scripted_agent(agent_seen))
    monkeypatch.setattr(tool, "generate_all", fake_generate_all(direct_seen))
    result = tool.evaluate(None, tokenizer, TaskOptions(tmp_path, None))

    # A1 = 83810205 and A3 = 1234567: right directly; A2 = 67032114, to which 67032113 and 67032115 are not.
    assert (A1, A2, A3) == (83810205, 67032114, 1234567)
    s1, s2, s3, s4 = result.samples
    assert [s["direct_predicted"] for s in result.samples] == ["83810205", "67032113", "7", None]
    assert [s["direct_correct"] for s in result.samples] == [True, False, False, False]
    assert [s["agent_predicted"] for s in result.samples] == ["83810205", "67032115", None, None]
    assert [s["agent_correct"] for s in result.samples] == [True, False, False, False]
    assert [s["agent_finish"] for s in result.samples] == ["answer", "answer", "max_steps", "answer"]
    assert (s3["agent_answer"], s4["agent_answer"]) == (None, "")
    assert [(s["tool_calls"], s["malformed_actions"], s["agent_steps"]) for s in result.samples] == [
        (1, 0, 2),
        (1, 2, 4),
        (3, 0, 4),
        (0, 0, 1),
    ]
    assert result.metrics == {
        "direct_accuracy": 0.25,
        "agent_accuracy": 0.25,
        "tool_calls": 5,
        "malformed_actions": 2,
        "agent_answers": 2,
    }
    assert isinstance(result.metrics["tool_calls"], int)  # shown whole in the table

    # What the sandbox printed came back as the observation the model read next.
    assert "Observation: 83810205\nThought:" in s1["agent_transcript"]
    assert "Observation: 67032114\nThought:" in s2["agent_transcript"]
    assert "There is no tool named 'calculator'" in s2["agent_transcript"]
    assert s3["agent_transcript"].count("Observation: 1234567\nThought:") == 3
    assert (s1["lang"], s2["lang"], "lang" in s3) == ("en", "zh", False)

    # The agent saw the training prompt (the SFT record's system and user turns); direct, the bare question.
    first = tokenizer.chat_text(
        [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": tool_prompt(Q1)}]
    )
    assert agent_seen[0] == first
    assert direct_seen[0] == tokenizer.chat_text([{"role": "user", "content": Q1}])
    assert len(agent_seen) == 2 + 4 + 4 + 1


def test_limit_and_bad_input(monkeypatch, tmp_path, tokenizer):
    write_rows(tmp_path / "tool_eval.jsonl")
    monkeypatch.setattr(tool, "agent_run_many", scripted_agent([]))
    monkeypatch.setattr(tool, "generate_all", fake_generate_all([]))
    result = tool.evaluate(None, tokenizer, TaskOptions(tmp_path, 1))
    assert len(result.samples) == 1 and result.metrics["agent_accuracy"] == 1.0

    with pytest.raises(ValueError, match=r"tool needs .*tool_eval.jsonl, which does not exist"):
        tool.evaluate(None, tokenizer, TaskOptions(tmp_path / "nowhere", None))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"answer": "1", "data": {}}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl record 1 has no question"):
        tool.evaluate(None, tokenizer, TaskOptions(None, None, extra={"file": str(bad)}))
    with pytest.raises(ValueError, match=r"max_steps=0 must be at least 1"):
        tool.evaluate(None, tokenizer, TaskOptions(tmp_path, None, extra={"max_steps": "0"}))

    monkeypatch.setattr(tool, "agent_run_many", scripted_agent([]))
    stale = tmp_path / "stale.jsonl"
    stale.write_text(json.dumps({"prompt": "Question: " + Q1, "answer": str(A1), "data": {"question": Q1}}) + "\n")
    with pytest.warns(UserWarning, match="1 record"):
        tool.evaluate(None, tokenizer, TaskOptions(None, None, extra={"file": str(stale)}))


def test_end_to_end_on_a_tiny_random_model(tmp_path, tokenizer):
    config = ModelConfig(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = qianwen.Transformer(config)
    model.init_weights(0)
    qianwen.save(model, tokenizer, tmp_path / "base")
    data = tmp_path / "tasks"
    data.mkdir()
    rows = [prompt_record(tool_problem(random.Random(i), lang)) for i, lang in enumerate(["en", "zh", "en"])]
    (data / "tool_eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "eval" / "base.json"
    args = ["eval", "--model", str(tmp_path / "base"), "--tasks", "tool", "--data-dir", str(data), "--limit", "2"]
    assert main([*args, "--out", str(out), "max_new_tokens=4", "agent_max_new_tokens=4", "max_steps=2"]) == 0
    summary = json.loads(out.read_text())["tasks"]["tool"]
    assert list(summary["metrics"]) == ["direct_accuracy", "agent_accuracy", "tool_calls", "malformed_actions"] + [
        "agent_answers"
    ]
    assert summary["samples"] == 2
    logged = [json.loads(line) for line in (out.parent / "base.tool.jsonl").read_text().splitlines()]
    assert [s["question"] for s in logged] == [r["data"]["question"] for r in rows[:2]]
    assert all(s["answer"] == r["answer"] for s, r in zip(logged, rows))
    assert "| tool | direct_accuracy |" in (out.parent / "base.md").read_text()
