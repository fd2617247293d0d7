"""The agent loop: the ReAct prompt as a ChatML user turn, then model and tools take turns inside one assistant
turn. The model writes Thought / Action / Action Input and stops at "Observation:"; the runtime runs the tool and
appends `Observation: {result}\\nThought:`; this repeats until a Final Answer, the step limit or the window."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qianwen.agent.react import STOP, Step, build_prompt, observation, parse
from qianwen.agent.tools import Tool, resolve
from qianwen.generate import generate
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer


@dataclass
class AgentResult:
    answer: str | None  # None when the run ended without one
    steps: list[Step]
    finish_reason: str  # "answer", "max_steps" (the step limit) or "length" (max_new_tokens or the model's window)
    text: str  # the whole assistant turn: what the model wrote and the observations


def run(
    model: Transformer | None,
    tokenizer: Tokenizer,
    question: str,
    tools: Sequence[Tool | str | Mapping] = ("code_interpreter", "calculator"),
    max_steps: int = 8,
    max_new_tokens: int = 512,
    system: str | None = None,
    generate_fn: Callable[[str], str] | None = None,
    on_event: Callable[[str, str], None] | None = None,
    callables: Mapping[str, Callable] | None = None,
) -> AgentResult:
    """Answer `question` with tools: built-in names ("code_interpreter", "calculator"), Tool objects (see `@tool`),
    or OpenAI tool specs whose functions are in `callables`. Each step is one greedy generation; a tool the model
    asks for in the last allowed step is not run. `generate_fn` replaces the model: it gets the whole prompt text
    and returns the completion (cut before "Observation:"). `on_event(label, text)` sees the trace as it grows,
    labelled Thought, Action, Action Input, Observation and Final Answer. Tools' state (the interpreter's
    variables) lasts for this run only."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty; ask the agent something.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}.")
    resolved = resolve(tools, callables)
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": build_prompt(question, resolved)})
    if generate_fn is not None:
        prefix = tokenizer.chat_text(messages)
        complete = lambda text: (generate_fn(prefix + text), "stop")
    else:
        if model is None:
            raise ValueError("give a model, or a generate_fn that stands in for one.")
        complete = _model_completion(model, tokenizer, tokenizer.render_chat(messages), max_new_tokens)
    try:
        return _loop(complete, resolved, max_steps, on_event or (lambda label, text: None))
    finally:
        for t in resolved:
            if t.close is not None:
                t.close()


def _model_completion(model: Transformer, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int):
    window = model.config.max_position_embeddings
    if len(prompt) >= window:
        raise ValueError(
            f"the ReAct prompt takes {len(prompt)} tokens, the model's whole {window}-token window; "
            "use fewer tools or a shorter question."
        )

    def complete(text: str) -> tuple[str, str]:
        # The assistant's text is encoded as plain text: an observation cannot forge ChatML special tokens.
        ids = prompt + tokenizer.encode(text)
        room = window - len(ids)
        if room < 1:
            return "", "length"
        out = generate(model, tokenizer, ids, min(max_new_tokens, room), stop=STOP)
        return out.text, out.finish_reason

    return complete


def _loop(complete, tools: list[Tool], max_steps: int, emit: Callable[[str, str], None]) -> AgentResult:
    by_name = {t.name: t for t in tools}
    text, steps = "", []
    for n in range(max_steps):
        completion, reason = complete(text)
        step = parse(completion, tools)
        steps.append(step)
        if step.thought:
            emit("Thought", step.thought)
        if reason == "length":  # cut off mid-turn: an action's input may be incomplete, so nothing runs
            return AgentResult(step.final_answer, steps, "length", text + completion)
        if step.final_answer is not None or (step.action is None and step.malformed is None):
            # A reply outside the format (no Action, no Final Answer) is the model answering directly.
            answer = step.final_answer if step.final_answer is not None else step.thought
            emit("Final Answer", answer)
            return AgentResult(answer, steps, "answer", text + step.text)
        if step.action is not None:
            emit("Action", step.action)
        if step.raw_input is not None:
            emit("Action Input", step.raw_input)
        text += step.text
        if n == max_steps - 1:
            break
        step.observation = by_name[step.action].invoke(step.action_input) if step.wants_tool else step.malformed
        emit("Observation", step.observation)
        text += observation(step.observation)
    return AgentResult(None, steps, "max_steps", text)
