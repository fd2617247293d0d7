"""Tool use: Qwen's ReAct prompt and parser (react.py, shared with the server's function calling), the agent
loop (loop.py) and the tools (tools.py, calculator.py).

    result = qianwen.agent.run(model, tokenizer, "What is 2 ** 100 - 1?", tools=["calculator"])
    result.answer, result.steps, result.finish_reason
    results = qianwen.agent.run_many(model, tokenizer, questions, tools=lambda: ["code_interpreter"])  # batched
"""

from __future__ import annotations

from qianwen.agent.loop import AgentResult, run, run_many
from qianwen.agent.react import Step, build_prompt, completed_action, observation, parse
from qianwen.agent.tools import Tool, tool

__all__ = [
    "AgentResult",
    "Step",
    "Tool",
    "build_prompt",
    "completed_action",
    "observation",
    "parse",
    "run",
    "run_many",
    "tool",
]
