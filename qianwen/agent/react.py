"""Qwen's ReAct prompt and a forgiving parser of what a model writes into it.

Pure functions, shared by the agent loop and by the server's function calling:

    prompt = build_prompt("What is 2**10?", tools)       # tools: OpenAI `tools`/`functions` entries
    step = parse(model_output, tools)                    # Thought / Action / Action Input / Final Answer
    prompt += step.text + observation("1024")            # the runtime's turn, then the model goes on
    completed_action(text_so_far, tools)                 # a whole tool call yet? (for streaming)
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qianwen.react_prompt import react_prompt

STOP = "Observation:"  # generation stops here; the runtime writes the observation

# A label at the start of a line; models add spaces or write a full-width colon. Capitalised, so that code
# in an Action Input (`question: str = ...`) does not read as one.
_LABEL = re.compile(
    r"^[ \t]*(Thought|Action[ \t]*[Ii]nput|Action|Observation|Final[ \t]*[Aa]nswer|Question)[ \t]*[:：][ \t]*",
    re.MULTILINE,
)
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder(strict=False)  # models put raw newlines inside JSON strings (code, mostly)


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the prompt describes it."""

    name: str
    description: str
    parameters: dict | list
    name_for_human: str

    @property
    def single_parameter(self) -> str | None:
        """The parameter's name when the tool takes exactly one: a bare Action Input is then its value."""
        properties = self.parameters.get("properties") if isinstance(self.parameters, dict) else None
        return next(iter(properties)) if isinstance(properties, dict) and len(properties) == 1 else None

    @property
    def required(self) -> list[str]:
        required = self.parameters.get("required") if isinstance(self.parameters, dict) else None
        return [r for r in required if isinstance(r, str)] if isinstance(required, list) else []


@dataclass
class Step:
    """One model turn of the ReAct format, as parsed, and (in the agent loop) what the tool said back."""

    thought: str = ""
    action: str | None = None  # the tool's name as listed in the prompt (as written when it names no tool)
    action_input: dict | None = None  # None when the action is malformed
    raw_input: str | None = None  # the Action Input as written; None when there was none
    final_answer: str | None = None
    malformed: str | None = None  # why the action cannot run, in one sentence for the model to read
    text: str = ""  # the model's text to keep in the transcript, cut after the action or the answer
    observation: str | None = None

    @property
    def wants_tool(self) -> bool:
        return self.action is not None and self.malformed is None


def tool_spec(entry: object) -> ToolSpec:
    """An OpenAI `tools` entry, a legacy `functions` entry, Qwen's plugin dict (name_for_model, ...) or an object
    with a `spec` of one of those."""
    entry = getattr(entry, "spec", entry)
    if isinstance(entry, Mapping) and entry.get("type") == "function" and isinstance(entry.get("function"), Mapping):
        entry = entry["function"]
    if not isinstance(entry, Mapping):
        raise ValueError(f"a tool must be an OpenAI tool or function object, got {type(entry).__name__}.")
    name = entry.get("name_for_model", entry.get("name"))
    if not isinstance(name, str) or not name.strip() or any(c.isspace() or c == "," for c in name):
        raise ValueError(f"a tool needs a 'name' without spaces or commas, got {name!r}.")
    description = entry.get("description_for_model", entry.get("description", ""))
    parameters = entry.get("parameters", {"type": "object", "properties": {}})
    human = entry.get("name_for_human") or name.replace("_", " ").replace("-", " ").title()
    return ToolSpec(name, str(description or ""), parameters, str(human))


def tool_specs(tools: Sequence[object]) -> list[ToolSpec]:
    specs = [tool_spec(t) for t in tools]
    names = [s.name for s in specs]
    if not specs:
        raise ValueError("the agent needs at least one tool.")
    if len(set(names)) < len(names):
        raise ValueError(f"two tools share a name in {names}; give each tool its own name.")
    return specs


def build_prompt(query: str, tools: Sequence[object]) -> str:
    """The spec's ReAct prompt (section 7) for `query`; the model's reply starts after it."""
    return react_prompt(query, [(s.name, s.name_for_human, s.description, s.parameters) for s in tool_specs(tools)])


def observation(result: str) -> str:
    """The runtime's part of the transcript after an action (whose kept text ends with a newline)."""
    return f"Observation: {result}\nThought:"


def _label(match: re.Match) -> str:
    return " ".join(match.group(1).lower().split())


def parse(text: str, tools: Sequence[object] | None = None) -> Step:
    """Read one model turn. With `tools`, the action must name one of them and its input must fit the tool:
    a bare (non-JSON) input is taken as the value of a tool's only parameter."""
    specs = tool_specs(tools) if tools else None
    labels = list(_LABEL.finditer(text))
    kinds = [_label(m) for m in labels]

    def content(i: int) -> tuple[int, int]:
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        return labels[i].end(), end

    decision = next((i for i, k in enumerate(kinds) if k in ("action", "final answer", "action input")), None)
    before = labels[decision].start() if decision is not None else len(text)
    thoughts = [text[: labels[0].start() if labels else len(text)]]
    thoughts += [text[slice(*content(i))] for i, k in enumerate(kinds) if k == "thought" and labels[i].start() < before]
    thought = "\n".join(t.strip() for t in thoughts if t.strip())
    if decision is None:
        cut = next((m.start() for m, k in zip(labels, kinds) if k in ("observation", "question")), len(text))
        return Step(thought=thought, text=text[:cut].rstrip())
    start, end = content(decision)
    if kinds[decision] == "final answer":
        return Step(thought=thought, final_answer=text[start:end].strip(), text=text[:end].rstrip())
    if kinds[decision] == "action input":
        return Step(
            thought=thought,
            raw_input=text[start:end].strip(),
            malformed="There is an Action Input but no Action; write `Action: <tool name>` on the line before it.",
            text=text[:end].rstrip() + "\n",
        )
    name_line, _, rest = text[start:end].partition("\n")
    step = Step(thought=thought, action=name_line.strip().strip("`'\"*").rstrip(".").strip())
    if decision + 1 < len(labels) and kinds[decision + 1] == "action input":
        start, end = content(decision + 1)
    elif rest.strip():  # the input on the line after the Action, its label forgotten
        start += len(name_line) + 1
    else:
        start = None
    spec = _find(step, specs)
    if start is None:
        _no_input(step, spec)
        step.text = text[:end].rstrip() + "\n"
        return step
    step.raw_input = text[start:end].strip()
    if step.malformed is None:
        arguments, used = _arguments(text[start:], end - start, spec)
        if isinstance(arguments, str):
            step.malformed = arguments
        else:
            end = start + used
            step.raw_input = text[start:end].strip()
            missing = [p for p in (spec.required if spec else []) if p not in arguments]
            if missing:
                step.malformed = (
                    f"The Action Input for {spec.name} lacks {', '.join(map(repr, missing))}; "
                    f"write it as a JSON object such as {_example(spec)}."
                )
            else:
                step.action_input = arguments
    step.text = text[:end].rstrip() + "\n"
    return step


def _find(step: Step, specs: list[ToolSpec] | None) -> ToolSpec | None:
    """The tool the action names (forgiving case, and the human name); sets `malformed` when there is none."""
    if not step.action:
        step.malformed = "The Action names no tool; write the tool's name after `Action:`."
        return None
    if specs is None:
        return None
    wanted = step.action.lower()
    for spec in specs:
        if wanted in (spec.name.lower(), spec.name_for_human.lower()):
            step.action = spec.name
            return spec
    names = ",".join(s.name for s in specs)
    step.malformed = f"There is no tool named {step.action!r}; the Action must be one of [{names}]."
    return None


def _no_input(step: Step, spec: ToolSpec | None) -> None:
    if step.malformed is not None:
        return
    if spec is not None and not spec.required:
        step.action_input = {}
        return
    example = _example(spec) if spec else "{...}"
    step.malformed = f"The Action has no Action Input; write `Action Input: {example}` on the line after it."


def _example(spec: ToolSpec) -> str:
    properties = spec.parameters.get("properties") if isinstance(spec.parameters, dict) else None
    names = list(properties) if isinstance(properties, dict) else []
    return "{" + ", ".join(f'"{n}": ...' for n in names) + "}"


def _arguments(rest: str, limit: int, spec: ToolSpec | None) -> tuple[dict | str, int]:
    """The arguments in an Action Input (`rest` is the text after its label, the label's content its first `limit`
    characters) and how many characters of `rest` they take; or why there are none. A JSON object or a fenced
    block may run past lines that look like labels (code that prints "Thought: ...")."""
    lead = len(rest) - len(rest.lstrip())
    fence = _FENCE.match(rest, lead)
    if fence:  # ```json ... ``` or ```py ... ```
        source, start = fence.group(1).strip(), 0
        body, used = source, fence.end()
    else:
        source, start = rest, lead
        body, used = rest[:limit].strip(), len(rest[:limit].rstrip())
    try:
        value, end = _DECODER.raw_decode(source, start)
    except json.JSONDecodeError:
        value = end = None
        if body.startswith("{"):  # a Python dict: single quotes, True/None
            with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
                value, end = ast.literal_eval(body), len(source) if fence else lead + len(body)
    if isinstance(value, dict):
        return value, used if fence else end
    single = spec.single_parameter if spec else None
    if single is not None:
        if isinstance(value, str):
            return {single: value}, used if fence else end
        schema = spec.parameters["properties"][single]
        if isinstance(schema, dict) and schema.get("type", "string") == "string":
            return {single: body}, used
        if value is not None and not source[end : None if fence else limit].strip():
            return {single: value}, used
    name = spec.name if spec else "the tool"
    example = _example(spec) if spec else "{...}"
    return f"The Action Input for {name} is not a JSON object; write it as one, such as {example}.", used


def completed_action(text: str, tools: Sequence[object] | None = None) -> Step | None:
    """The action once `text` (generated so far) holds a whole Action and Action Input, else None: a server
    streaming a reply can then send the tool call without waiting for the stop string. A JSON value or a fenced
    block is whole once it closes; a bare input once a label follows it. (At the end of generation, `parse`.)"""
    labels = list(_LABEL.finditer(text))
    kinds = [_label(m) for m in labels]
    decision = next((i for i, k in enumerate(kinds) if k in ("action", "final answer")), None)
    if decision is None or kinds[decision] != "action" or decision + 1 >= len(labels):
        return None
    if kinds[decision + 1] != "action input":
        return parse(text, tools)  # the action line is over; parse says what is wrong
    body = text[labels[decision + 1].end() :].lstrip()
    if body.startswith("```"):
        whole = _FENCE.match(body) is not None
    elif body[:1] in ("{", "[", '"'):
        try:
            whole = _DECODER.raw_decode(body) is not None
        except json.JSONDecodeError:
            whole = False
    else:
        whole = decision + 2 < len(labels)
    return parse(text, tools) if whole else None
