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
    messages = _messages(question, resolved, system)
    if generate_fn is not None:
        prefix = tokenizer.chat_text(messages)
        complete = lambda text: (generate_fn(prefix + text), "stop")
    else:
        if model is None:
            raise ValueError("give a model, or a generate_fn that stands in for one.")
        complete = _model_completion(model, tokenizer, tokenizer.render_chat(messages), max_new_tokens)
    turns = _turns(resolved, max_steps, on_event or (lambda label, text: None))
    try:
        text = next(turns)
        while True:
            text = turns.send(complete(text))
    except StopIteration as done:
        return done.value
    finally:
        _close(resolved)


def run_many(
    model: Transformer | None,
    tokenizer: Tokenizer,
    questions: Sequence[str],
    tools: Callable[[], Sequence[Tool | str | Mapping]],
    max_steps: int = 8,
    max_new_tokens: int = 512,
    system: str | None = None,
    generate_fn: Callable[[str], str] | None = None,
    batch_size: int = 32,
) -> list[AgentResult]:
    """`run` for many questions, `batch_size` at a time in lockstep: each round, every unfinished run's next step
    is one row of a single batched greedy generation, then their tools run. `tools()` gives each run its own
    tools (an interpreter's variables belong to one run). The answers are those of one `run` per question, up to
    the rounding of a batched forward; `generate_fn` replaces the model as in `run`."""
    for question in questions:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("a question is empty; ask the agent something.")
    if max_steps < 1 or batch_size < 1:
        raise ValueError(f"max_steps and batch_size must be at least 1, got {max_steps} and {batch_size}.")
    if generate_fn is None and model is None:
        raise ValueError("give a model, or a generate_fn that stands in for one.")
    results: list[AgentResult] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        results += _lockstep(model, tokenizer, chunk, tools, max_steps, max_new_tokens, system, generate_fn)
    return results


def _lockstep(model, tokenizer, questions, tools, max_steps, max_new_tokens, system, generate_fn) -> list[AgentResult]:
    kits = [resolve(tools()) for _ in questions]
    prompts = []
    for question, kit in zip(questions, kits):
        messages = _messages(question, kit, system)
        if generate_fn is not None:
            prompts.append(tokenizer.chat_text(messages))
        else:
            prompts.append(tokenizer.render_chat(messages))
            _check_window(model, prompts[-1])
    results: list[AgentResult | None] = [None] * len(questions)
    pending: dict[int, tuple] = {}
    try:
        for i, kit in enumerate(kits):
            turns = _turns(kit, max_steps, lambda label, text: None)
            pending[i] = (turns, next(turns))
        while pending:
            if generate_fn is not None:
                outs = {i: (generate_fn(prompts[i] + text), "stop") for i, (_, text) in pending.items()}
            else:
                work = {i: (prompts[i], text) for i, (_, text) in pending.items()}
                outs = _complete_many(model, tokenizer, work, max_new_tokens)
            for i, out in outs.items():
                turns = pending[i][0]
                try:
                    pending[i] = (turns, turns.send(out))
                except StopIteration as done:
                    results[i] = done.value
                    del pending[i]
                    _close(kits[i])
    finally:
        for i in pending:
            _close(kits[i])
    return results  # type: ignore[return-value]


def _messages(question: str, tools: list[Tool], system: str | None) -> list[dict]:
    """The conversation an agent run continues: the system prompt if given, then the ReAct prompt as the user."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": build_prompt(question, tools)}]


def _close(tools: list[Tool]) -> None:
    for t in tools:
        if t.close is not None:
            t.close()


def _check_window(model: Transformer, prompt: list[int]) -> None:
    window = model.config.max_position_embeddings
    if len(prompt) >= window:
        raise ValueError(
            f"the ReAct prompt takes {len(prompt)} tokens, the model's whole {window}-token window; "
            "use fewer tools or a shorter question."
        )


def _model_completion(model: Transformer, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int):
    _check_window(model, prompt)

    def complete(text: str) -> tuple[str, str]:
        return _complete_many(model, tokenizer, {0: (prompt, text)}, max_new_tokens)[0]

    return complete


def _complete_many(model: Transformer, tokenizer: Tokenizer, work: dict, max_new_tokens: int) -> dict:
    """{key: (completion, finish_reason)} for {key: (prompt ids, assistant text so far)}: the rows with room for
    `max_new_tokens` share one batched generation, the rest (near the window's end) are generated one by one
    within what room they have."""
    window = model.config.max_position_embeddings
    # The assistant's text is encoded as plain text: an observation cannot forge ChatML special tokens.
    ids = {key: prompt + tokenizer.encode(text) for key, (prompt, text) in work.items()}
    out = {key: ("", "length") for key, row in ids.items() if window - len(row) < 1}
    full = [key for key, row in ids.items() if window - len(row) >= max_new_tokens]
    if full:
        batch = generate(model, tokenizer, [ids[key] for key in full], max_new_tokens, stop=STOP)
        out |= {key: (c.text, c.finish_reason) for key, c in zip(full, batch)}
    for key in ids.keys() - out.keys():
        c = generate(model, tokenizer, ids[key], window - len(ids[key]), stop=STOP)
        out[key] = (c.text, c.finish_reason)
    return out


def _turns(tools: list[Tool], max_steps: int, emit: Callable[[str, str], None]):
    """The loop of one run as a generator, so that many runs can share each generation: it yields the assistant
    text so far, is sent the model's (completion, finish_reason), and returns the AgentResult."""
    by_name = {t.name: t for t in tools}
    text, steps = "", []
    for n in range(max_steps):
        completion, reason = yield text
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
