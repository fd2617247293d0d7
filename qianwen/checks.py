"""Whether a reply to a synthetic task (qianwen.data.synthetic) is right, and what is wrong with it: the one
checker that labels the generated preference pairs and scores the held-out sets (the `instruct` eval task).

    check_answer("sort", "1, 4, 8", "From smallest to largest: 1, 4, 8")         # True
    flaws("arithmetic", "42", "The answer is 41.<|im_end|>", lang="en")        # ["wrong_answer"]

A reply carries the literal `<|im_end|>` at its end when it ended (a generated one: when decoding stopped at that
token), and is "unended" otherwise.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

END = "<|im_end|>"
REJECTIONS = ("wrong_answer", "wrong_language", "rambling", "unended")

_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
_NUMBERS = re.compile(_NUMBER)
_FINAL = re.compile(rf"(?:final\s*answer|answer\s+is|answer\s*[:：]|答案\s*(?:是|为)?|####)[\s:：*$]*({_NUMBER})", re.I)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]+")
_SENTENCES = re.compile(r"[^.!?。！？\n]+")
_REPLY_LANG = {"answer_in_en": "en", "answer_in_zh": "zh"}


def final_number(reply: str) -> Fraction | None:
    """The number a reply gives as its answer: the one after the last "The answer is", "答案是", "Final Answer:" or
    "####", else the last number in the reply; None when there is none."""
    matches = list(_FINAL.finditer(reply))
    found = matches[-1].group(1) if matches else (_NUMBERS.findall(reply) or [None])[-1]
    return None if found is None else Fraction(found.replace(",", ""))


def language(text: str) -> str | None:
    """The text's language: "zh" when its Chinese characters number at least a third of its Latin letters (so a
    Chinese reply quoting an English word stays Chinese), else "en" when it has Latin letters, else None."""
    cjk, latin = len(_CJK.findall(text)), sum(map(len, _LATIN.findall(text)))
    if cjk and cjk * 3 >= latin:
        return "zh"
    return "en" if latin else None


def rambles(text: str, times: int = 3) -> bool:
    """Whether a sentence (of four characters or more) comes back `times` times or more."""
    counts = Counter(" ".join(s.lower().split()) for s in _SENTENCES.findall(text))
    return any(n >= times for sentence, n in counts.items() if len(sentence) >= 4)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _ints(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


def _same_number(expected: str, text: str) -> bool:
    return final_number(text) == Fraction(expected)


def _last_int(expected: str, text: str) -> bool:
    return _ints(text)[-1:] == [int(expected)]


# Whether a reply (its end marker removed) gives the expected answer, language aside.
_CHECKS: dict[str, Callable[[str, str], bool]] = {
    "arithmetic": _same_number,
    "tool": _same_number,
    "reverse": lambda expected, text: [w.lower() for w in _LATIN.findall(text)][-1:] == [expected.lower()],
    "sort": lambda expected, text: _ints(_last_line(text)) == _ints(expected),
    "count": _last_int,
    "repeat": lambda expected, text: _LATIN.findall(_last_line(text)) == expected.split(),
    "uppercase": lambda expected, text: (
        [w for w in _LATIN.findall(_last_line(text)) if w.isupper()] == expected.split()
    ),
    "answer_in_en": _last_int,
    "answer_in_zh": _last_int,
}
KINDS = tuple(_CHECKS)


def flaws(kind: str, expected: str, reply: str, lang: str | None = None) -> list[str]:
    """What is wrong with `reply`, as names from REJECTIONS (empty: a good reply). A reply has ended when it ends
    with `<|im_end|>`. The language is checked for "answer in" instructions, and for arithmetic when `lang` (the
    question's language) is given."""
    if kind not in _CHECKS:
        raise ValueError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}.")
    text = reply.rstrip()
    ended = text.endswith(END)
    text = text.removesuffix(END)
    found = [] if _CHECKS[kind](str(expected), text) else ["wrong_answer"]
    wanted = _REPLY_LANG.get(kind, lang if kind == "arithmetic" else None)
    if wanted is not None and language(text) != wanted:
        found.append("wrong_language")
    if rambles(text):
        found.append("rambling")
    if not ended:
        found.append("unended")
    return found


def check_answer(kind: str, expected: str, reply: str, lang: str | None = None) -> bool:
    """Whether `reply` answers right (and in the right language where that is checked; see `flaws`), however
    rambling or unended it is: "The answer is N." / "答案是 N。" / "Final Answer: N" (commas, "$" and "**"
    allowed), else the last number, for arithmetic; the reply's last line for sorting, repeating, upper case."""
    return answered(flaws(kind, expected, reply, lang))


def answered(found: list[str]) -> bool:
    """Whether a reply with these flaws (from `flaws`) still answers right: rambling and unended ones can."""
    return not {"wrong_answer", "wrong_language"} & set(found)
