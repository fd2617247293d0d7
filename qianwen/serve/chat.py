"""Chat requests as ChatML prompts, and replies as OpenAI messages, with function calling through Qwen's ReAct
format (QWEN_SPEC.md section 7), the agent's own prompt and parser (one implementation).

With tools offered, the last user message becomes the ReAct prompt listing them, as the official Qwen server
does. An assistant's tool calls and the tool results that answer them are written into that assistant's turn as
`Thought / Action / Action Input` and `Observation: ...\\nThought:`, so a conversation the client sends back
continues the same text the model was writing; the turn is left open for the model to go on.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from qianwen.agent.react import STOP, build_prompt, completed_action, observation, parse
from qianwen.serve.protocol import APIError, ChatRequest, Message, ToolCall
from qianwen.tokenizer import Tokenizer

FINAL_ANSWER = "Thought: I now know the final answer\nFinal Answer: "
_LABELS = ("Thought", "Action", "Final Answer")
_FINAL = re.compile(r"^[ \t]*Final[ \t]*[Aa]nswer[ \t]*[:：]", re.MULTILINE)


@dataclass
class ChatPrompt:
    ids: list[int]
    step: str  # the start of the model's current ReAct step ("Thought:", a forced "Action:"), before its reply
    tools: list[dict]  # OpenAI function objects the reply may call ([] = plain chat)
    stop: tuple[str, ...]


def render(request: ChatRequest, tokenizer: Tokenizer) -> ChatPrompt:
    """The prompt ids for a chat request and the text the reply continues."""
    tools = [f.model_dump() for f in request.functions_list] if request.choice != "none" else []
    messages = request.messages
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise APIError(400, "the messages hold no user message; add one.", "messages")
    turns: list[dict] = []
    open_turn = ""  # an assistant turn in the ReAct format whose tool results are in and that is not closed yet
    i = 0
    while i < len(messages):
        m = messages[i]
        if m.role in ("tool", "function"):
            raise APIError(
                400, f"messages[{i}] is a {m.role} result with no assistant tool call before it.", "messages"
            )
        if m.role == "assistant" and (m.tool_calls or m.function_call):
            results, i = _results(messages, i)
            open_turn = _react_turn(open_turn, m, results)
            continue
        if m.role == "assistant" and open_turn:  # the answer that closes a turn with tool calls
            turns.append({"role": "assistant", "content": open_turn + FINAL_ANSWER.removeprefix("Thought:") + m.text})
            open_turn = ""
        else:
            if open_turn:
                turns.append({"role": "assistant", "content": open_turn})
                open_turn = ""
            role = "system" if m.role == "developer" else m.role
            content = build_prompt(m.text, tools) if tools and i == last_user else m.text
            turns.append({"role": role, "content": content})
        i += 1
    step = ("Thought:" if open_turn else "") + _forced(request.choice, bool(open_turn))
    ids = tokenizer.render_chat(turns) + tokenizer.encode(open_turn.removesuffix("Thought:") + step)
    return ChatPrompt(ids, step, tools, request.stops + ((STOP,) if tools else ()))


def _results(messages: list[Message], i: int) -> tuple[list[str], int]:
    """The results answering the calls of messages[i], in call order, and the index after them."""
    m = messages[i]
    calls = m.tool_calls or [ToolCall(id="", function=m.function_call)]
    answers: dict[str, str] = {}
    j = i + 1
    while j < len(messages) and messages[j].role in ("tool", "function"):
        r = messages[j]
        key = r.tool_call_id if r.role == "tool" else calls[min(len(answers), len(calls) - 1)].id
        if key not in {c.id for c in calls} or key in answers:
            raise APIError(
                400,
                f"messages[{j}] answers tool_call_id {key!r}, which messages[{i}] did not make (or was answered).",
                "messages",
            )
        answers[key] = r.text
        j += 1
    missing = [c.function.name for c in calls if c.id not in answers]
    if missing:
        raise APIError(
            400,
            f"messages[{i}] calls {', '.join(missing)} with no tool message giving the result; send one.",
            "messages",
        )
    return [answers[c.id] for c in calls], j


def _react_turn(turn: str, m: Message, results: list[str]) -> str:
    """`turn` (empty, or ending at "Thought:") with this assistant message's calls and their observations."""
    calls = m.tool_calls or [ToolCall(id="", function=m.function_call)]
    thought = m.text.strip()
    if turn:
        turn += f" {thought}\n" if thought else "\n"
    elif thought:
        turn = f"Thought: {thought}\n"
    for n, (call, result) in enumerate(zip(calls, results, strict=True)):
        turn += ("\n" if n else "") + f"Action: {call.function.name}\nAction Input: {call.function.arguments}\n"
        turn += observation(result)
    return turn


def _forced(choice: str, after_observation: bool) -> str:
    """Text that makes the reply an action: `required` starts it at "Action:", a named function also names it."""
    if choice in ("none", "auto"):
        return ""
    lead = "\n" if after_observation else ""
    return lead + ("Action:" if choice == "required" else f"Action: {choice}\nAction Input:")


@dataclass
class Reply:
    content: str | None
    tool_call: dict | None = None  # {"name", "arguments"}
    finish_reason: str = "stop"


def interpret(prompt: ChatPrompt, text: str, finish_reason: str) -> Reply:
    """What a finished reply says: a tool call, a final answer, or (outside the format) plain content. A reply cut
    by max_tokens never becomes a call: its arguments may be incomplete."""
    if not prompt.tools:
        return Reply(text, None, finish_reason)
    step = parse(prompt.step + text, prompt.tools)
    known = step.action in {t["name"] for t in prompt.tools}
    if known and step.raw_input is not None and finish_reason != "length":
        arguments = (
            json.dumps(step.action_input, ensure_ascii=False) if step.action_input is not None else step.raw_input
        )
        return Reply(step.thought or None, {"name": step.action, "arguments": arguments}, "tool_calls")
    if step.final_answer is not None:
        return Reply(step.final_answer, None, finish_reason)
    if step.action is None and not prompt.step:
        return Reply(step.thought or text.strip(), None, finish_reason)
    return Reply((prompt.step + text).strip(), None, finish_reason)


@dataclass
class ToolStream:
    """A reply's text deltas as OpenAI stream deltas while it is generated: the final answer streams as content
    once its label has passed, a reply outside the format streams as it comes, and a tool call goes out whole as
    soon as its Action Input is complete (the caller then stops generating)."""

    prompt: ChatPrompt
    text: str = ""
    mode: str = "undecided"  # undecided, content, answer, called
    sent: int = 0  # characters of the content already sent
    call_id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def push(self, delta: str) -> list[dict]:
        """Deltas ({"content"} or {"name", "arguments", "id"}) that `delta` releases."""
        self.text += delta
        if self.mode == "undecided":
            head = (self.prompt.step + self.text).lstrip()
            if _FINAL.search(head):
                self.mode = "answer"
            elif head and not self.prompt.step and not any(label.startswith(head[: len(label)]) for label in _LABELS):
                self.mode = "content"
            elif completed_action(self.prompt.step + self.text, self.prompt.tools) is not None:
                reply = interpret(self.prompt, self.text, "stop")
                if reply.tool_call is not None:
                    return self._call(reply)
        return self._flush() if self.mode in ("content", "answer") else []

    def finish(self, finish_reason: str) -> tuple[list[dict], str]:
        """The deltas still owed when generation ends, and the choice's finish reason."""
        if self.mode == "called":
            return [], "tool_calls"
        if self.mode in ("content", "answer"):
            return self._flush(final=True), finish_reason
        reply = interpret(self.prompt, self.text, finish_reason)
        if reply.tool_call is not None:
            return self._call(reply), "tool_calls"
        return ([{"content": reply.content}] if reply.content else []), reply.finish_reason

    @property
    def called(self) -> bool:
        return self.mode == "called"

    def _flush(self, final: bool = False) -> list[dict]:
        if self.mode == "content":
            body = self.text
        else:
            head = self.prompt.step + self.text
            body = head[_FINAL.search(head).end() :].lstrip()
        if not final:
            body = body.rstrip()  # trailing spaces end a final answer; hold them until more text follows
        out = body[self.sent :]
        self.sent += len(out)
        return [{"content": out}] if out else []

    def _call(self, reply: Reply) -> list[dict]:
        self.mode = "called"
        deltas = [{"content": reply.content}] if reply.content else []
        deltas.append({"name": reply.tool_call["name"], "arguments": reply.tool_call["arguments"], "id": self.call_id})
        return deltas
