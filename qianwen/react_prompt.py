"""Qwen's ReAct prompt (QWEN_SPEC.md section 7) and the built-in code interpreter's tool spec, in core because
two stages write them: the agent (and the server's function calling) at inference, and the synthetic tasks
that teach the format. One text, so a model is trained on exactly the prompt it is later given."""

from __future__ import annotations

import json
from collections.abc import Sequence

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} "
    "Parameters: {parameters} Format the arguments as a JSON object."
)

REACT_PROMPT = """Answer the following questions as best you can. You have access to the following tools:

{tool_descs}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!

Question: {query}"""

CODE_INTERPRETER = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "A Python interpreter in a sandbox with no network: it runs the code and returns what it "
        "prints and the value of its last expression; variables persist between calls. Use it for calculations, "
        "data and plots.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the Python code to run"}},
            "required": ["code"],
        },
    },
}


def react_prompt(query: str, tools: Sequence[tuple[str, str, str, object]]) -> str:
    """The prompt for `query` offering `tools`, each (name, human name, description, JSON-schema parameters)."""
    descs = [
        TOOL_DESC.format(
            name_for_model=name,
            name_for_human=human,
            description_for_model=description,
            parameters=json.dumps(parameters, ensure_ascii=False),
        )
        for name, human, description, parameters in tools
    ]
    return REACT_PROMPT.format(tool_descs="\n\n".join(descs), tool_names=",".join(t[0] for t in tools), query=query)
