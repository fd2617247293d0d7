"""The report card's problem-by-problem comparison of two models: the counts from per-sample logs, and the sign
test against brute-force enumeration of every outcome of fair coins."""

from __future__ import annotations

import itertools
import json

import pytest

from qianwen.report_sections import _paired, paired_counts, sign_test


def enumerated_p(wins: int, losses: int) -> float:
    """The share of all 2^n win/loss sequences whose split is at least as far from even as the observed one."""
    n = wins + losses
    far = abs(wins - losses)
    hits = sum(abs(2 * sum(seq) - n) >= far for seq in itertools.product((0, 1), repeat=n))
    return hits / 2**n if n else 1.0


@pytest.mark.parametrize(("wins", "losses"), [(0, 0), (2, 7), (5, 0), (4, 4), (1, 10), (6, 5)])
def test_sign_test_equals_enumeration(wins, losses):
    assert sign_test(wins, losses) == pytest.approx(enumerated_p(wins, losses), abs=1e-12)
    assert sign_test(wins, losses) == sign_test(losses, wins)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paired_counts_and_the_report_table(tmp_path):
    (tmp_path / "eval").mkdir()
    prompts = [f"q{i}" for i in range(6)]
    sft = [True, False, False, True, False, True]
    ppo = [True, True, True, False, False, True]
    write(tmp_path / "eval" / "sft.arith.jsonl", [{"prompt": p, "correct": c} for p, c in zip(prompts, sft)])
    write(tmp_path / "eval" / "ppo.arith.jsonl", [{"prompt": p, "correct": c} for p, c in zip(prompts, ppo)])
    tool = [{"question": "t", "direct_correct": False, "agent_correct": True}]
    write(tmp_path / "eval" / "sft.tool.jsonl", tool)
    write(tmp_path / "eval" / "ppo.tool.jsonl", [{**tool[0], "agent_correct": False}])
    assert paired_counts(tmp_path / "eval" / "sft.arith.jsonl", tmp_path / "eval" / "ppo.arith.jsonl") == {
        "correct": (1, 2)
    }
    _, table = _paired(tmp_path, "sft", "ppo")
    assert table.rows == [
        ["arith", "2", "1", f"{enumerated_p(2, 1):.2f}"],
        ["tool direct", "0", "0", "1.00"],
        ["tool agent", "0", "1", "1.00"],
    ]
    # Logs of different prompts are not compared.
    write(tmp_path / "eval" / "ppo.arith.jsonl", [{"prompt": "other", "correct": True}] * 6)
    assert paired_counts(tmp_path / "eval" / "sft.arith.jsonl", tmp_path / "eval" / "ppo.arith.jsonl") == {}
