"""The agent: the ReAct prompt against the spec's text, the parser on well-formed and malformed model output,
the loop with a scripted model, the tools (calculator against Python's arithmetic, the interpreter in the real
sandbox, @tool schemas) and the `qianwen agent` command on a real tiny checkpoint."""

from __future__ import annotations

import json
import math
import re
from typing import Literal

import pytest

import qianwen
from qianwen.agent import build_prompt, completed_action, observation, parse, run, run_many, tool
from qianwen.agent.calculator import calculate
from qianwen.agent.tools import OUTPUT_CHARS, Tool, code_interpreter, describe, resolve
from qianwen.cli import main
from qianwen.sandbox import Result
from qianwen.tokenizer import Tokenizer, qwen_vocabulary

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {  # a legacy `functions` entry naming its human name
    "name": "web_search",
    "name_for_human": "Quark Search",
    "description": "Searches the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}
TOOLS = [WEATHER, SEARCH]
INTERPRETER = code_interpreter()  # its spec only: the sandbox starts at the first call


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(qwen_vocabulary())


# ---------------------------------------------------------------------------
# The prompt


def test_prompt_is_the_spec_text():
    weather_params = json.dumps(WEATHER["function"]["parameters"], ensure_ascii=False)
    search_params = json.dumps(SEARCH["parameters"], ensure_ascii=False)
    expected = (
        "Answer the following questions as best you can. You have access to the following tools:\n"
        "\n"
        "get_weather: Call this tool to interact with the Get Weather API. What is the Get Weather API useful for? "
        f"Current weather in a city. Parameters: {weather_params} Format the arguments as a JSON object.\n"
        "\n"
        "web_search: Call this tool to interact with the Quark Search API. What is the Quark Search API useful "
        f"for? Searches the web. Parameters: {search_params} Format the arguments as a JSON object.\n"
        "\n"
        "Use the following format:\n"
        "\n"
        "Question: the input question you must answer\n"
        "Thought: you should always think about what to do\n"
        "Action: the action to take, should be one of [get_weather,web_search]\n"
        "Action Input: the input to the action\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the final answer to the original input question\n"
        "\n"
        "Begin!\n"
        "\n"
        "Question: Is it raining in 杭州?"
    )
    assert build_prompt("Is it raining in 杭州?", TOOLS) == expected
    assert '"城市"' in expected  # non-ASCII stays readable, as in Qwen's prompt


@pytest.mark.parametrize(
    "tools, words",
    [([], "at least one tool"), ([WEATHER, WEATHER], "share a name"), ([{"name": "two words"}], "name"), ([3], "tool")],
)
def test_prompt_refuses_bad_tool_lists(tools, words):
    with pytest.raises(ValueError, match=words):
        build_prompt("q", tools)


# ---------------------------------------------------------------------------
# The parser

CALL = 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'

WELL_FORMED = [
    ("canonical", CALL, "get_weather", {"city": "Paris"}),
    ("no final newline", CALL.rstrip("\n"), "get_weather", {"city": "Paris"}),
    ("extra spaces", 'Thought:  I should look it up. \nAction:   get_weather   \nAction Input:{"city": "Paris"}  ',
     "get_weather", {"city": "Paris"}),
    ("trailing text after JSON", CALL.rstrip("\n") + " and then I will answer.", "get_weather", {"city": "Paris"}),
    ("full-width colon, 'Action input'", "Thought：x\nAction : get_weather\nAction input： {\"city\": \"Paris\"}",
     "get_weather", {"city": "Paris"}),
    ("human name, backticks", 'Thought: x\nAction: `Quark Search`\nAction Input: {"query": "rain"}', "web_search",
     {"query": "rain"}),
    ("bare input for a one-string tool", "Thought: x\nAction: web_search\nAction Input: rain in Paris\n", "web_search",
     {"query": "rain in Paris"}),
    ("JSON string for a one-string tool", 'Thought: x\nAction: web_search\nAction Input: "rain"\n', "web_search",
     {"query": "rain"}),
    ("fenced JSON", 'Thought: x\nAction: get_weather\nAction Input: ```json\n{"city": "Paris"}\n```\n', "get_weather",
     {"city": "Paris"}),
    ("Python dict", "Thought: x\nAction: get_weather\nAction Input: {'city': 'Paris', 'unit': 'c'}", "get_weather",
     {"city": "Paris", "unit": "c"}),
    ("raw newline in a JSON string", 'Thought: x\nAction: web_search\nAction Input: {"query": "a\nb"}', "web_search",
     {"query": "a\nb"}),
    ("hallucinated observation cut", CALL + "Observation: sunny\nThought: done", "get_weather", {"city": "Paris"}),
    ("input on the next line, label forgotten", 'Thought: x\nAction: get_weather\n{"city": "Paris"}', "get_weather",
     {"city": "Paris"}),
]  # fmt: skip


@pytest.mark.parametrize("name, text, action, arguments", WELL_FORMED, ids=[c[0] for c in WELL_FORMED])
def test_parser_reads_actions_through_the_usual_slips(name, text, action, arguments):
    step = parse(text, TOOLS)
    assert (step.action, step.action_input, step.malformed, step.final_answer) == (action, arguments, None, None)
    assert step.wants_tool and step.text.endswith("\n")
    assert "Observation" not in step.text and "then I will answer" not in step.text
    assert step.thought in ("I should look it up.", "x")


MALFORMED = [
    ("unknown tool", 'Thought: x\nAction: get_time\nAction Input: {"city": "Paris"}', "no tool named 'get_time'"),
    ("no Action Input", "Thought: x\nAction: get_weather\n", 'Action Input: {"city": ..., "unit": ...}'),
    ("empty Action", 'Thought: x\nAction:\nAction Input: {"city": "Paris"}', "names no tool"),
    ("not JSON for a two-parameter tool", "Thought: x\nAction: get_weather\nAction Input: Paris", "not a JSON object"),
    ("required argument missing", 'Thought: x\nAction: get_weather\nAction Input: {"unit": "c"}', "lacks 'city'"),
    ("Action Input without Action", 'Thought: x\nAction Input: {"city": "Paris"}', "no Action"),
    ("broken JSON", 'Thought: x\nAction: get_weather\nAction Input: {"city": "Par', "not a JSON object"),
]


@pytest.mark.parametrize("name, text, reason", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_parser_reports_malformed_actions_in_one_sentence(name, text, reason):
    step = parse(text, TOOLS)
    assert step.malformed is not None and reason in step.malformed
    assert step.malformed.endswith(".") and "\n" not in step.malformed
    assert step.action_input is None and not step.wants_tool
    assert step.text.endswith("\n")  # the runtime appends the observation on a line of its own


def test_code_with_lines_that_look_like_labels_stays_whole():
    code = 'question: str = "why?"\nprint("""\nThought: not a label\n""")'
    raw_json = json.dumps({"code": code}).replace("\\n", "\n")  # with raw newlines, as models write it
    for written in (raw_json, f"```python\n{code}\n```"):
        step = parse(f"Thought: run it\nAction: code_interpreter\nAction Input: {written}\n", [INTERPRETER])
        assert step.action_input == {"code": code} and step.text.endswith(f"Action Input: {written}\n")


def test_parser_reads_final_answers_and_plain_replies():
    step = parse(" I now know the final answer\nFinal Answer: 42 degrees.\nQuestion: another one?", TOOLS)
    assert (step.thought, step.final_answer, step.action) == ("I now know the final answer", "42 degrees.", None)
    assert step.text == " I now know the final answer\nFinal Answer: 42 degrees."
    first = parse("Thought: easy\nFinal Answer: 4\nAction: get_weather\nAction Input: {}", TOOLS)
    assert first.final_answer == "4" and first.action is None  # what comes first wins
    plain = parse("It is 4.", TOOLS)
    assert (plain.thought, plain.final_answer, plain.action, plain.malformed) == ("It is 4.", None, None, None)


def test_parser_without_tools_takes_any_name_but_wants_json():
    assert parse(CALL).action_input == {"city": "Paris"}
    assert "not a JSON object" in parse("Action: anything\nAction Input: Paris").malformed


def test_completed_action_tells_a_streaming_server_when_the_call_is_whole():
    seen = [completed_action(CALL[:n], TOOLS) for n in range(len(CALL) + 1)]
    first = next(n for n, step in enumerate(seen) if step is not None)
    assert CALL[:first].endswith('"Paris"}')  # as soon as the JSON object closes
    assert all(step is not None and step.action_input == {"city": "Paris"} for step in seen[first:])
    bare = "Thought: x\nAction: web_search\nAction Input: rain"
    assert completed_action(bare, TOOLS) is None  # a bare input may still grow
    assert completed_action(bare + "\nObservation:", TOOLS).action_input == {"query": "rain"}
    code = 'print("""\nThought: not a label\n""")'
    # JSON as models write it, with raw newlines inside the string
    written = "Action: code_interpreter\nAction Input: " + json.dumps({"code": code}).replace("\\n", "\n")
    assert completed_action(written[:-5], [INTERPRETER]) is None  # a label-like line inside an open JSON string
    assert completed_action(written, [INTERPRETER]).action_input == {"code": code}
    assert completed_action("Thought: x\nFinal Answer: 4", TOOLS) is None
    assert completed_action("Thought: x\nAction: web_search\nAction Input: 12", TOOLS) is None  # 12 may be 123


def test_observation_continues_the_transcript():
    assert parse(CALL, TOOLS).text + observation("sunny") == CALL + "Observation: sunny\nThought:"


# ---------------------------------------------------------------------------
# The loop


class Scripted:
    """A fake model: replies from a list, recording each prompt it was given."""

    def __init__(self, *replies: str):
        self.replies, self.prompts = list(replies), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.replies.pop(0)


def test_loop_calls_a_tool_feeds_the_observation_back_and_stops_at_the_answer(tokenizer):
    call = 'Thought: I need to add.\nAction: calculator\nAction Input: {"expression": "2 ** 100 - 1"}\n'
    model = Scripted(call, " I now know the final answer\nFinal Answer: 1267650600228229401496703205375")
    events = []
    result = run(
        None,
        tokenizer,
        "What is 2**100 - 1?",
        tools=["calculator"],
        generate_fn=model,
        on_event=lambda label, text: events.append((label, text)),
    )
    assert result.finish_reason == "answer" and result.answer == str(2**100 - 1)
    first, second = model.prompts
    assert first.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert first.endswith("Question: What is 2**100 - 1?<|im_end|>\n<|im_start|>assistant\n")
    assert second == first + call + f"Observation: {2**100 - 1}\nThought:"
    assert [label for label, _ in events] == [
        "Thought",
        "Action",
        "Action Input",
        "Observation",
        "Thought",
        "Final Answer",
    ]
    assert result.steps[0].observation == str(2**100 - 1) and result.steps[0].action_input == {
        "expression": "2 ** 100 - 1"
    }
    assert result.text == second[len(first) :] + " I now know the final answer\nFinal Answer: " + result.answer


def test_loop_stops_at_the_step_limit_without_running_the_last_action(tokenizer):
    calls = []
    echo = Tool(
        "echo",
        "Echoes.",
        {"type": "object", "properties": {"text": {"type": "string"}}},
        lambda text: calls.append(text) or text,
    )
    model = Scripted(*[f'Thought: again\nAction: echo\nAction Input: {{"text": "{i}"}}\n' for i in range(3)])
    result = run(None, tokenizer, "Loop forever", tools=[echo], max_steps=3, generate_fn=model)
    assert result.finish_reason == "max_steps" and result.answer is None
    assert calls == ["0", "1"] and len(result.steps) == 3 and result.steps[-1].observation is None
    assert model.prompts[2].endswith('Action Input: {"text": "1"}\nObservation: 1\nThought:')


def test_malformed_action_becomes_an_observation_and_the_loop_goes_on(tokenizer):
    model = Scripted(
        "Thought: x\nAction: abacus\nAction Input: 1 + 1\n",
        "Thought: y\nAction: calculator\nAction Input: 1 + 1\n",
        " done\nFinal Answer: 2",
    )
    result = run(None, tokenizer, "1 + 1?", tools=["calculator"], generate_fn=model)
    assert result.answer == "2" and result.finish_reason == "answer"
    reason = "There is no tool named 'abacus'; the Action must be one of [calculator]."
    assert model.prompts[1].endswith(f"Action Input: 1 + 1\nObservation: {reason}\nThought:")
    assert model.prompts[2].endswith("Action Input: 1 + 1\nObservation: 2\nThought:")


def test_tool_errors_become_observations(tokenizer):
    @tool
    def divide(a: int, b: int) -> float:
        """Divides a by b."""
        return a / b

    model = Scripted('Action: divide\nAction Input: {"a": 1, "b": 0}', "Final Answer: undefined")
    result = run(None, tokenizer, "1/0?", tools=[divide], generate_fn=model)
    assert result.steps[0].observation == "Error: divide raised ZeroDivisionError: division by zero"
    assert result.answer == "undefined"


def test_user_tools_from_openai_specs_and_callables(tokenizer):
    model = Scripted('Action: get_weather\nAction Input: {"city": "Paris"}', "Final Answer: sunny")
    result = run(
        None,
        tokenizer,
        "Weather?",
        tools=[WEATHER],
        generate_fn=model,
        callables={"get_weather": lambda city, unit="c": {"city": city, "sky": "sunny"}},
    )
    assert result.steps[0].observation == '{"city": "Paris", "sky": "sunny"}'
    with pytest.raises(ValueError, match="callables"):
        resolve([WEATHER])
    with pytest.raises(ValueError, match="no built-in tool 'abacus'"):
        resolve(["abacus"])


def test_a_reply_outside_the_format_is_the_answer(tokenizer):
    result = run(None, tokenizer, "Hi", tools=["calculator"], generate_fn=Scripted("Hello! How can I help?"))
    assert (result.answer, result.finish_reason, len(result.steps)) == ("Hello! How can I help?", "answer", 1)


def test_run_many_steps_its_runs_in_lockstep_each_with_its_own_interpreter(tokenizer):
    def act(code: str) -> str:
        return f"Action: code_interpreter\nAction Input: {json.dumps({'code': code})}\n"

    scripts = {
        "a": [act("x = 1"), act("print(x + 1)"), "Final Answer: 2"],
        "b": [act("print(x)"), "Final Answer: none"],
        "c": ["Final Answer: 3"],
        "d": [act("print(40 + 2)"), "Final Answer: 42"],
    }
    asked = []

    def scripted(prompt: str) -> str:
        question = next(q for q in scripts if f"Question: {q}<|im_end|>" in prompt)
        asked.append(question)
        return scripts[question].pop(0)

    results = run_many(None, tokenizer, list(scripts), lambda: ["code_interpreter"], generate_fn=scripted, batch_size=3)
    assert asked == ["a", "b", "c", "a", "b", "a", "d", "d"]  # rounds of the first three, then the fourth alone
    assert [r.answer for r in results] == ["2", "none", "3", "42"]
    assert results[0].steps[1].observation == "2"
    assert "NameError: name 'x' is not defined" in results[1].steps[0].observation  # a's variables are a's own
    with pytest.raises(ValueError, match="empty"):
        run_many(None, tokenizer, ["q", " "], lambda: ["calculator"], generate_fn=scripted)


def test_loop_checks_its_arguments(tokenizer):
    for kwargs, words in [({"question": " "}, "empty"), ({"max_steps": 0}, "max_steps"), ({"tools": []}, "tool")]:
        with pytest.raises(ValueError, match=words):
            run(None, tokenizer, **{"question": "q", "generate_fn": Scripted(), **kwargs})


# ---------------------------------------------------------------------------
# Tools


ARITHMETIC = [
    "1 + 2 * 3", "(1 + 2) * 3", "-(4 - 10) ** 2", "7 // 2", "-7 // 2", "7 % 3", "-7 % 3", "7 / 2", "2 ** -2",
    "2 ** 100 - 1", "123456789123456789 * 987654321987654321", "1e3 + 0.5", "+-+5", "10 ** 50 // 7 ** 20",
    "3.5 % 1.25", "(2 ** 64) % 1000007", "1_000_000 * 3",
]  # fmt: skip


@pytest.mark.parametrize("expression", ARITHMETIC)
def test_calculator_agrees_with_python(expression):
    expected = eval(expression)  # the reference; the calculator itself never evals
    got = calculate(expression)
    assert got == expected and type(got) is type(expected)


def test_calculator_functions_and_constants():
    assert calculate("sqrt(16) + floor(2.7) + abs(-3) + round(2.567, 2)") == 4.0 + 2 + 3 + 2.57
    assert calculate("log(e) + cos(pi)") == pytest.approx(0.0)
    assert calculate("2 + 2 =") == 4


@pytest.mark.parametrize(
    "expression, words",
    [
        ("__import__('os').system('true')", "not allowed"),
        ("x + 1", "the name 'x'"),
        ("(1).__class__", "attribute access"),
        ("math.sqrt(4)", "attribute access"),
        ("open('f')", "the function 'open'"),
        ("9 ** 9 ** 9", "too large"),
        ("10 ** 100000", "too large"),
        ("(10 ** 2000) * (10 ** 2000)", "too large"),
        ("round(1, -10 ** 9)", "100 digits"),
        ("1 / 0", "division by zero"),
        ("10.0 ** 400", "too large"),
        ("sqrt(-1)", "undefined"),
        ("2 ^ 10", "write **"),
        ("True + 1", "constant True"),
        ("'a' * 3", "constant 'a'"),
        ("[1, 2]", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 2000, "longer than"),
    ],
)
def test_calculator_refuses_what_is_not_arithmetic(expression, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        calculate(expression)


def test_calculator_tool_reports_refusals_as_text():
    calc = resolve(["calculator"])[0]
    assert calc.invoke({"expression": "6 * 7"}) == "42"
    assert calc.invoke({"expression": "2 ** 10 ** 10"}).startswith("Error: the result would have over")
    assert math.isclose(float(calc.invoke({"expression": "sqrt(2)"})), math.sqrt(2))


def test_tool_decorator_builds_a_json_schema():
    @tool
    def search(query: str, limit: int = 5, tags: list[str] | None = None, mode: Literal["web", "news"] = "web"):
        """Search the web for pages.

        Args:
            query: what to look for
            limit (int): how many results
        """
        return []

    assert search.name == "search" and search.description == "Search the web for pages."
    assert search.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "limit": {"type": "integer", "description": "how many results"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"enum": ["web", "news"]},
        },
        "required": ["query"],
    }
    assert search.spec["function"]["parameters"] is search.parameters

    @tool(name="lookup", description="Look a word up.")
    def define(word: str, strict: bool, weight: float) -> str:
        """:param word: the word"""
        return word.upper()

    assert (define.name, define.description) == ("lookup", "Look a word up.")
    assert define.parameters["properties"] == {
        "word": {"type": "string", "description": "the word"},
        "strict": {"type": "boolean"},
        "weight": {"type": "number"},
    }
    assert define.invoke({"word": "hi", "strict": True, "weight": 1.0}) == "HI"


def test_interpreter_results_read_as_short_observations():
    long = "".join(f"line {i}\n" for i in range(1000))
    shown = describe(Result("ok", stdout=long, files={"plot.png": b"", "data.csv": b"", "b.SVG": b""}))
    assert shown.startswith("line 0\nline 1\n") and "line 999" in shown and "characters cut" in shown
    assert len(shown) < 2 * OUTPUT_CHARS and shown.endswith("Images saved: b.SVG, plot.png\nFiles written: data.csv")
    assert describe(Result("timeout")) == "The code timed out and was stopped."
    assert describe(Result("limit", limit="memory")) == "The code was stopped by the sandbox's memory limit."
    assert describe(Result("ok", value="42")) == "42"
    assert describe(Result("ok")) == "Finished execution with no output."


def test_code_interpreter_keeps_state_within_a_run_and_isolates_runs(tokenizer):
    def script(*codes: str) -> Scripted:
        calls = [f"Action: code_interpreter\nAction Input: {json.dumps({'code': c})}\n" for c in codes]
        return Scripted(*calls, "Final Answer: done")

    first = run(
        None,
        tokenizer,
        "q",
        tools=["code_interpreter"],
        generate_fn=script("secret = 41\n_ = open('note.txt', 'w').write('hi')", "print('out'); secret + 1"),
    )
    assert first.steps[0].observation == "Files written: note.txt"
    assert first.steps[1].observation == "out\n42"
    second = run(
        None,
        tokenizer,
        "q",
        tools=["code_interpreter"],
        generate_fn=script("import os\nprint(os.path.exists('note.txt'))\nsecret"),
    )
    observed = second.steps[0].observation
    assert observed.startswith("False\nerror:\n") and "NameError: name 'secret' is not defined" in observed


# ---------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    model = qianwen.Transformer(qianwen.preset("tiny-1m", vocab_size=151936))
    model.init_weights(0)
    out = tmp_path_factory.mktemp("agent-checkpoint")
    qianwen.save(model.eval(), tokenizer, out)
    return out


def test_agent_command_prints_the_trace_the_library_gives(checkpoint, capsys):
    question = "What is 6 * 7?"
    args = ["--tools", "calculator", "--max-steps", "2", "--max-new-tokens", "8", question]
    assert main(["agent", "--model", str(checkpoint), *args]) == 0
    out, err = capsys.readouterr()
    model, tok = qianwen.load(checkpoint)
    events = []
    result = run(model, tok, question, ["calculator"], 2, 8, on_event=lambda *event: events.append(event))
    assert out == f"Question: {question}\n" + "".join(f"{label}: {text}\n" for label, text in events)
    assert events and events[0][0] in ("Thought", "Action", "Final Answer")
    expected_note = {"answer": "", "max_steps": "--max-steps 2", "length": "ran out of tokens"}[result.finish_reason]
    assert expected_note in err and "Traceback" not in err


def test_run_many_answers_as_run_does_question_by_question(checkpoint):
    model, tok = qianwen.load(checkpoint)
    questions = ["What is 6 * 7?", "计算 12 + 30。", "What is 2 ** 10?"]
    alone = [run(model, tok, q, ["calculator"], 2, 8) for q in questions]
    together = run_many(model, tok, questions, lambda: ["calculator"], 2, 8, batch_size=2)
    assert [(r.text, r.answer, r.finish_reason) for r in together] == [
        (r.text, r.answer, r.finish_reason) for r in alone
    ]


def test_a_prompt_past_the_window_is_refused_before_generating(tokenizer):
    model = qianwen.Transformer(qianwen.preset("tiny-1m", vocab_size=151936, max_position_embeddings=256))
    with pytest.raises(ValueError, match="window; use fewer tools or a shorter question"):
        run(model, tokenizer, "q", tools=["calculator", "code_interpreter"])


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "required: QUESTION"),
        (["--tools", "calculator,abacus", "q"], "no built-in tool 'abacus'"),
        (["--tools", ",", "q"], "at least one tool"),
        ([" "], "question is empty"),
        (["--max-steps", "0", "q"], "--max-steps"),
    ],
)
def test_agent_command_user_errors(args, words, tmp_path, capsys):
    # The model directory does not exist: every one of these must fail before loading it.
    assert main(["agent", "--model", str(tmp_path / "nowhere"), *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
