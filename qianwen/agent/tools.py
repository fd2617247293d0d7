"""Tools an agent can call: user functions (through `@tool` or an OpenAI tool spec) and the built-ins,
`code_interpreter` (the sandbox) and `calculator` (arithmetic without eval)."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qianwen.agent.calculator import calculate
from qianwen.agent.react import tool_spec
from qianwen.react_prompt import CODE_INTERPRETER

OUTPUT_CHARS = 2000  # of each stream in an observation: enough to read, small enough for a model's window
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")


@dataclass
class Tool:
    """A function the model may call by name with JSON arguments described by `parameters` (a JSON schema)."""

    name: str
    description: str
    parameters: dict | list  # a JSON schema (a list in Qwen's older plugin format)
    fn: Callable[..., object]
    name_for_human: str | None = None
    close: Callable[[], None] | None = None  # ends state held for one agent run (the interpreter's session)

    @property
    def spec(self) -> dict:
        """The OpenAI `tools` entry for this tool."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if self.name_for_human:
            function["name_for_human"] = self.name_for_human
        return {"type": "function", "function": function}

    def invoke(self, arguments: Mapping[str, object]) -> str:
        """The tool's result as text for an Observation; a failure is described, never raised."""
        try:
            result = self.fn(**arguments)
        except Exception as exc:  # the model reads what went wrong and may try again
            return f"Error: {self.name} raised {type(exc).__name__}: {exc}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(result)


# ---------------------------------------------------------------------------
# @tool: a schema from a Python function

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _schema(hint: object) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return _schema(kept[0]) if len(kept) == 1 else {"anyOf": [_schema(a) for a in kept]}
    if origin in (list, tuple, Sequence):
        return {"type": "array", **({"items": _schema(args[0])} if args else {})}
    if origin in (dict, Mapping):
        return {"type": "object"}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    return {}  # Any, or a type JSON has no name for: the model may send anything


def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """The summary (text before any Args section) and each parameter's description, from Google style
    (`Args:` then `name: text`) or reST (`:param name: text`)."""
    doc = inspect.getdoc(fn) or ""
    described = dict(re.findall(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.MULTILINE))
    args = re.search(r"^(?:Args|Arguments|Parameters):\s*$(.*?)(?=^\S|\Z)", doc, re.MULTILINE | re.DOTALL)
    if args:
        described.update(re.findall(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", args.group(1), re.MULTILINE))
    summary = re.split(r"^(?:Args|Arguments|Parameters|Returns|Raises):\s*$|^\s*:param", doc, flags=re.MULTILINE)[0]
    return " ".join(summary.split()), described


def _from_function(fn: Callable, name: str | None, description: str | None) -> Tool:
    summary, described = _docstring(fn)
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        schema = _schema(hints.get(p.name, inspect.Parameter.empty))
        if p.name in described:
            schema["description"] = described[p.name]
        properties[p.name] = schema
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(name or fn.__name__, description or summary, parameters, fn)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Make a Tool of a function: its name, its docstring's summary as the description, and a JSON schema from
    its type hints (parameters without a default are required). Use as `@tool` or `@tool(name=...)`."""
    if fn is None:
        return lambda f: _from_function(f, name, description)
    return _from_function(fn, name, description)


# ---------------------------------------------------------------------------
# Built-ins


def _calculator(expression: str) -> str:
    try:
        return str(calculate(expression))
    except ValueError as exc:
        return f"Error: {exc}"


def calculator() -> Tool:
    return Tool(
        "calculator",
        "Exact arithmetic on integers and decimals: + - * / // % ** and parentheses, and the functions "
        "sqrt, exp, log, log2, log10, sin, cos, tan, abs, round, floor and ceil, and the constants pi and e.",
        {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "the expression, e.g. (3 + 4) ** 2"}},
            "required": ["expression"],
        },
        _calculator,
    )


def _clip(text: str, limit: int = OUTPUT_CHARS) -> str:
    """Head and tail of a long text: where output starts and how it ended (a traceback's last line) both matter."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit // 2], text[-limit // 2 :]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters cut ...]\n{tail}"


def describe(result) -> str:
    """A sandbox Result as an observation: output, the last expression's value, errors, and files written."""
    parts = []
    if result.stdout:
        parts.append(_clip(result.stdout.rstrip("\n")))
    if result.stdout_dropped:
        parts.append(f"[{result.stdout_dropped} more bytes of output dropped]")
    if result.value is not None:
        parts.append(_clip(result.value))
    if result.stderr.strip():  # the traceback, or the sandbox's note on a timeout or a restart
        parts.append(("error:\n" if result.status != "ok" else "stderr:\n") + _clip(result.stderr.strip()))
    elif result.status == "timeout":
        parts.append("The code timed out and was stopped.")
    elif result.status == "limit":
        parts.append(f"The code was stopped by the sandbox's {result.limit} limit.")
    elif result.status == "killed":
        parts.append(f"The code was killed by signal {result.signal}.")
    elif result.status == "error":
        parts.append(f"The code failed with exit code {result.exit_code}.")
    images = sorted(n for n in result.files if n.lower().endswith(IMAGE_SUFFIXES))
    others = sorted(n for n in result.files if n not in images)
    if images:
        parts.append(f"Images saved: {', '.join(images)}")
    if others:
        parts.append(f"Files written: {', '.join(others)}")
    return "\n".join(parts) or "Finished execution with no output."


def code_interpreter(timeout: float = 30.0, limits=None) -> Tool:
    """Python in a sandbox Session, started at the first call. Variables persist from call to call until
    `close` (the agent calls it when a run ends), so each run gets a fresh interpreter."""
    from qianwen.sandbox import Session

    session: Session | None = None

    def run_code(code: str) -> str:
        nonlocal session
        if session is None:
            session = Session(limits=limits)
        return describe(session.run(code, timeout=timeout))

    def close() -> None:
        nonlocal session
        if session is not None:
            session.close()
            session = None

    spec = CODE_INTERPRETER["function"]
    return Tool(spec["name"], spec["description"], spec["parameters"], run_code, close=close)


BUILTINS: dict[str, Callable[[], Tool]] = {"code_interpreter": code_interpreter, "calculator": calculator}


def resolve(tools: Sequence[Tool | str | Mapping], callables: Mapping[str, Callable] | None = None) -> list[Tool]:
    """Tools from built-in names, Tool objects, and OpenAI tool specs whose functions are in `callables`."""
    if not tools:
        raise ValueError(f"the agent needs at least one tool, such as {' or '.join(sorted(BUILTINS))}.")
    resolved = []
    for item in tools:
        if isinstance(item, Tool):
            resolved.append(item)
        elif isinstance(item, str):
            if item not in BUILTINS:
                raise ValueError(f"there is no built-in tool {item!r}; use {' or '.join(sorted(BUILTINS))}.")
            resolved.append(BUILTINS[item]())
        else:
            spec = tool_spec(item)
            fn = (callables or {}).get(spec.name)
            if fn is None:
                raise ValueError(f"the tool {spec.name!r} has no function; pass it as callables={{{spec.name!r}: f}}.")
            resolved.append(Tool(spec.name, spec.description, spec.parameters, fn, spec.name_for_human))
    return resolved
