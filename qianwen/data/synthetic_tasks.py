"""Tasks of the synthetic set (see synthetic.py; the word problems are in synthetic_arith.py): simple verifiable
instructions and tool-use problems, in English or Chinese. Every generator is a pure function of a
`random.Random`; every Example carries its answer and what the answer was computed from, and the wrong or
wrong-language replies that preference pairs need are rendered here from the same data."""

from __future__ import annotations

import json
import operator
import random
from dataclasses import dataclass, field

from qianwen.react_prompt import CODE_INTERPRETER, react_prompt

LANGS = ("en", "zh")
INSTRUCTION_KINDS = ("reverse", "sort", "count", "repeat", "uppercase", "answer_in")
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}  # divisions are exact
SHOWN = {"+": "+", "-": "-", "*": "×", "/": "÷"}


@dataclass(frozen=True)
class Example:
    kind: str  # "arithmetic", "tool", an instruction kind, or "answer_in_en" / "answer_in_zh"
    lang: str  # the language of the prompt, "en" or "zh"
    prompt: str  # the user's message (for tools, the whole ReAct prompt)
    answer: str  # what check_answer compares a reply with
    response: str  # the reference reply, without <|im_end|>; for tools, written once the code has run
    key: tuple  # the task itself, whatever its wording and language: held-out sets share no key with training
    data: dict = field(default_factory=dict)  # what the answer is computed from


# ---------------------------------------------------------------------------
# Verifiable instructions

# Common words, none a palindrome (reversing must change them), for the word tasks.
WORDS = tuple(
    """apple banana orange garden window pencil rocket silver planet forest river castle dragon pillow button
    mirror candle basket ladder kitten puppy monkey rabbit turtle spider butter cheese coffee cookie dinner lemon
    mango melon peach grape cherry carrot potato tomato onion pepper sugar honey bread pasta salad summer winter
    spring autumn morning evening sunday monday friday holiday birthday picture camera guitar piano violin
    trumpet music dance story poem letter number circle square triangle yellow purple green brown black white
    school teacher student library office market street bridge tunnel island desert valley mountain ocean beach
    cloud thunder rain snow storm wind shadow sunset moon star comet galaxy robot engine wheel bottle jacket
    shirt pocket wallet ticket travel voyage signal puzzle riddle wonder secret silence marble copper bronze
    crystal diamond velvet cotton paper eraser folder screen keyboard mouse printer cable socket kettle spoon
    plate bowl fork knife table chair sofa blanket carpet curtain lamp clock watch flower tulip daisy maple
    willow bamboo cactus meadow harbor anchor sailor pirate knight prince queen captain doctor farmer baker
    driver singer painter writer hunter jungle tiger zebra panda koala eagle falcon parrot dolphin whale shark
    salmon lobster""".split()  # noqa: SIM905 (a word list reads better as text)
)

_PROMPTS = {
    "reverse": (
        ['Reverse the word "{word}".', 'Write the word "{word}" backwards.', 'Spell "{word}" in reverse order.'],
        ["把单词“{word}”倒过来写。", "请把“{word}”的字母顺序反过来写。", "将单词“{word}”反向拼写出来。"],
    ),
    "asc": (
        ["Sort these numbers from smallest to largest: {numbers}.", "Put these numbers in ascending order: {numbers}."],
        ["把这些数从小到大排列：{numbers}。", "请将下列数字按升序排列：{numbers}。"],
    ),
    "desc": (
        [
            "Sort these numbers from largest to smallest: {numbers}.",
            "Put these numbers in descending order: {numbers}.",
        ],
        ["把这些数从大到小排列：{numbers}。", "请将下列数字按降序排列：{numbers}。"],
    ),
    "count": (
        [
            'How many times does the letter "{letter}" appear in the word "{word}"?',
            'Count how many times "{letter}" occurs in "{word}".',
        ],
        ["字母“{letter}”在单词“{word}”中出现了几次？", "数一数单词“{word}”里有几个字母“{letter}”。"],
    ),
    "repeat": (
        [
            'Repeat the word "{word}" {times} times, separated by spaces.',
            'Write "{word}" {times} times in a row, with a space between each.',
        ],
        ["把单词“{word}”重复写 {times} 遍，用空格隔开。", "请将“{word}”连写 {times} 次，中间用空格分开。"],
    ),
    "uppercase": (
        ['Write "{phrase}" in capital letters.', 'Convert "{phrase}" to upper case.'],
        ["把“{phrase}”改写成大写字母。", "请将“{phrase}”全部转换为大写。"],
    ),
    "answer_in_en": (["Answer in English: what is {a} {sym} {b}?"], ["请用英文回答：{a} {sym} {b} 等于多少？"]),
    "answer_in_zh": (["Answer in Chinese: what is {a} {sym} {b}?"], ["请用中文回答：{a} {sym} {b} 等于多少？"]),
}
_REPLIES = {
    "reverse": ('"{word}" reversed is "{value}".', "“{word}”倒过来是“{value}”。"),
    "asc": ("From smallest to largest: {value}.", "从小到大排列：{value}。"),
    "desc": ("From largest to smallest: {value}.", "从大到小排列：{value}。"),
    "count": (
        'The word "{word}" contains the letter "{letter}" {value} {times}.',
        "字母“{letter}”在“{word}”中出现了 {value} 次。",
    ),
    "repeat": ("{value}", "好的：\n{value}"),
    "uppercase": ("In capital letters: {value}", "改成大写字母：{value}"),
    "answer_in": ("{a} {op_en} {b} is {value}.", "{a} {op_zh} {b} 等于 {value}。"),
}
_OP_WORDS = {"+": ("plus", "加"), "*": ("times", "乘以")}


def _instruction_value(kind: str, data: dict) -> object:
    if kind == "reverse":
        return data["word"][::-1]
    if kind == "sort":
        return sorted(data["numbers"], reverse=data["order"] == "desc")
    if kind == "count":
        return data["word"].count(data["letter"])
    if kind == "repeat":
        return data["times"]
    if kind == "uppercase":
        return data["phrase"].upper()
    return APPLY[data["op"]](data["a"], data["b"])


def _shown(kind: str, data: dict, value: object) -> str:
    """A value as the reply and the answer write it."""
    if kind == "sort":
        return ", ".join(map(str, value))
    if kind == "repeat":
        return " ".join([data["word"]] * value)
    return str(value)


def instruction_reply(kind: str, data: dict, value: object, lang: str) -> str:
    """The reply to an instruction saying `value` (the right one or not) in `lang`."""
    name = data["order"] if kind == "sort" else "answer_in" if kind.startswith("answer_in") else kind
    fields = {**data, "value": _shown(kind, data, value), "times": "time" if value == 1 else "times"}
    if "op" in data:
        fields.update(op_en=_OP_WORDS[data["op"]][0], op_zh=_OP_WORDS[data["op"]][1])
    return _REPLIES[name][LANGS.index(lang)].format(**fields)


def instruction(rng: random.Random, lang: str, kind: str | None = None) -> Example:
    """A simple instruction whose reply a program can check; `kind` one of INSTRUCTION_KINDS (default: any)."""
    kind = kind or rng.choice(INSTRUCTION_KINDS)
    if kind == "reverse":
        data = {"word": rng.choice(WORDS)}
        key = data["word"]
    elif kind == "sort":
        data = {"numbers": rng.sample(range(1, 100), rng.randint(4, 7)), "order": rng.choice(["asc", "desc"])}
        key = (tuple(data["numbers"]), data["order"])
    elif kind == "count":
        word = rng.choice(WORDS)
        data = {"word": word, "letter": rng.choice(sorted(set(word)))}
        key = (word, data["letter"])
    elif kind == "repeat":
        data = {"word": rng.choice(WORDS), "times": rng.randint(2, 5)}
        key = (data["word"], data["times"])
    elif kind == "uppercase":
        data = {"phrase": " ".join(rng.sample(WORDS, rng.randint(2, 3)))}
        key = data["phrase"]
    elif kind == "answer_in":
        # Mostly the other language than the question's: that is the instruction worth learning.
        target = lang if rng.random() < 0.3 else LANGS[1 - LANGS.index(lang)]
        op = rng.choice(["+", "*"])
        a, b = (rng.randint(2, 30), rng.randint(2, 30)) if op == "+" else (rng.randint(2, 12), rng.randint(2, 12))
        data = {"a": a, "op": op, "b": b, "sym": SHOWN[op], "target": target}
        kind, key = f"answer_in_{target}", (a, op, b)
    else:
        raise ValueError(f"unknown instruction kind {kind!r}; use one of {', '.join(INSTRUCTION_KINDS)}.")
    prompt_key = data["order"] if kind == "sort" else kind
    fields = {**data, "numbers": _shown("sort", data, data["numbers"])} if kind == "sort" else data
    value = _instruction_value(kind, data)
    return Example(
        kind=kind,
        lang=lang,
        prompt=rng.choice(_PROMPTS[prompt_key][LANGS.index(lang)]).format(**fields),
        answer=_shown(kind, data, value),
        response=instruction_reply(kind, data, value, data.get("target", lang)),
        key=(kind, key),
        data=data,
    )


def _wrong_instruction_value(example: Example, rng: random.Random) -> object:
    kind, data = example.kind, example.data
    right = _instruction_value(kind, data)
    if kind == "reverse":
        i = rng.choice([i for i in range(len(right) - 1) if right[i] != right[i + 1]])
        return rng.choice([data["word"], right[:i] + right[i + 1] + right[i] + right[i + 2 :]])
    if kind == "sort":
        if rng.random() < 0.5:
            return right[::-1]
        i = rng.randrange(len(right) - 1)
        return [*right[:i], right[i + 1], right[i], *right[i + 2 :]]
    if kind in ("count", "repeat"):
        return right + 1 if right == 1 or rng.random() < 0.5 else right - 1
    if kind == "uppercase":
        words = data["phrase"].split()
        return rng.choice([" ".join(w.capitalize() for w in words), " ".join([words[0].upper(), *words[1:]])])
    return right + rng.choice([1, -1, 10]) if right > 10 else right + rng.choice([1, 10])


# ---------------------------------------------------------------------------
# Tool use: arithmetic too large for one's head, in Qwen's ReAct format (QWEN_SPEC.md section 7)

_THOUGHT = {
    "en": "These numbers are too large to work out reliably in my head, so I will use the code interpreter.",
    "zh": "这些数太大，心算容易出错，我用代码解释器来算。",
}
_GUESS = {"en": "I can work this out in my head.", "zh": "这个我心算就可以。"}


def tool_prompt(question: str) -> str:
    """The ReAct prompt offering the code interpreter, for `question`."""
    f = CODE_INTERPRETER["function"]
    return react_prompt(question, [(f["name"], "Code Interpreter", f["description"], f["parameters"])])


def tool_transcript(code: str, observation: str, lang: str) -> str:
    """The assistant turn: think, call the interpreter, read what it printed, answer with it."""
    return (
        f"Thought: {_THOUGHT[lang]}\nAction: code_interpreter\n"
        f"Action Input: {json.dumps({'code': code}, ensure_ascii=False)}\n"
        f"Observation: {observation}\nThought: I now know the final answer\nFinal Answer: {observation}"
    )


def tool_problem(rng: random.Random, lang: str, digits: int = 5) -> Example:
    """Arithmetic to answer with the code interpreter: a `digits`-digit number times one a digit shorter (less
    some number), or the sum of four to six numbers of `digits` + 1 to `digits` + 2 digits. The response is empty
    until the code has run in the sandbox (see synthetic.with_observations)."""
    form = rng.choice(["product", "sum", "factory", "difference"])
    a, b = rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(10 ** (digits - 2), 10 ** (digits - 1) - 1)
    if form == "sum":
        numbers = tuple(rng.randint(10**digits, 10 ** (digits + 2) - 1) for _ in range(rng.randint(4, 6)))
        shown = ", ".join(map(str, numbers))
        questions = [f"What is the sum of {shown}?"], [f"求这些数的和：{shown}。"]
        code, value = f"print(sum([{shown}]))", sum(numbers)
    elif form == "difference":
        c = rng.randint(10 ** (digits - 1), min(10 ** (digits + 1), a * b) - 1)
        numbers = (a, b, c)
        questions = [f"What is {a} × {b} - {c}?"], [f"{a} × {b} - {c} 等于多少？"]
        code, value = f"print({a} * {b} - {c})", a * b - c
    else:
        numbers = (a, b)
        questions = (
            (
                [f"What is {a} × {b}?", f"Calculate {a} multiplied by {b}."],
                [f"{a} 乘以 {b} 等于多少？", f"计算 {a} × {b}。"],
            )
            if form == "product"
            else (
                [f"A factory makes {a} parts a day. How many parts does it make in {b} days?"],
                [f"一家工厂每天生产{a}个零件。{b}天一共生产多少个零件？"],
            )
        )
        code, value = f"print({a} * {b})", a * b
    question = rng.choice(questions[LANGS.index(lang)])
    return Example(
        kind="tool",
        lang=lang,
        prompt=tool_prompt(question),
        answer=str(value),
        response="",
        key=("tool", form, numbers),
        data={"question": question, "code": code},
    )


def _near_miss(n: int, rng: random.Random) -> int:
    """`n` with one digit (not the first, unless it is the only one) off by one: a slip in copying or in long
    multiplication."""
    digits = list(str(n))
    i = rng.randrange(1, len(digits)) if len(digits) > 1 else 0
    digits[i] = str((int(digits[i]) + rng.choice([1, 9])) % 10)
    return int("".join(digits))


# ---------------------------------------------------------------------------
# Replies that preference pairs reject


def wrong_reply(example: Example, rng: random.Random) -> str:
    """A well-formed reply in the right language whose answer is wrong by a plausible mistake."""
    if example.kind == "tool":
        # Skipping the tool and answering from memory: what the tool transcripts are there to train away.
        guess = _near_miss(int(example.answer), rng)
        return f"Thought: {_GUESS[example.lang]}\nThought: I now know the final answer\nFinal Answer: {guess}"
    value = _wrong_instruction_value(example, rng)
    return instruction_reply(example.kind, example.data, value, example.data.get("target", example.lang))


def other_language_reply(example: Example) -> str | None:
    """The right answer in the wrong language for an "answer in" instruction; None for the other kinds here."""
    if not example.kind.startswith("answer_in_"):
        return None
    other = LANGS[1 - LANGS.index(example.data["target"])]
    return instruction_reply(example.kind, example.data, int(example.answer), other)
