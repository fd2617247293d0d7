"""Arithmetic word problems in GSM8K style for the synthetic set (see synthetic.py): one to three operations
with whole-number results, in English and Chinese, from varied templates (shopping, distances, sharing, ages...).
The reply shows one line of working per step and ends "The answer is N." / "答案是 N。"; the wrong replies that
preference pairs need carry one plausible mistake through the later steps."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from qianwen.data.synthetic_tasks import APPLY, LANGS, SHOWN, Example

FINAL = {"en": "The answer is {}.", "zh": "答案是 {}。"}
# A slip of the wrong operation: the mistake of misreading the question.
_CONFUSED = {"+": "-", "-": "+", "*": "+", "/": "-"}


@dataclass(frozen=True)
class Op:
    a: int | str  # a number from the question, or "#i", the result of step i
    op: str  # + - * / (divisions are exact)
    b: int | str
    en: str  # what the step finds, written before its working
    zh: str


def solve(ops: list[Op], slip: tuple[int, Callable] | None = None) -> list[list] | None:
    """[a, op, b, result] for each step, or None when a step has no positive whole result. `slip` = (i, fn) makes
    step i go wrong, fn(a, op, b) giving (op shown, result), and the later steps carry the mistake on."""
    steps: list[list] = []
    for i, o in enumerate(ops):
        a, b = (steps[int(x[1:])][3] if isinstance(x, str) else x for x in (o.a, o.b))
        op, c = slip[1](a, o.op, b) if slip and slip[0] == i else (o.op, None)
        if c is None:
            if op == "/" and a % b:
                return None
            c = APPLY[op](a, b)
        if c <= 0:
            return None
        steps.append([a, op, b, c])
    return steps


def arithmetic_reply(labels: list[list[str]], steps: list[list], lang: str) -> str:
    """One line of working per step, then the final line."""
    i = LANGS.index(lang)
    colon, stop = (": ", ".") if lang == "en" else ("：", "。")
    lines = [f"{label[i]}{colon}{a} {SHOWN[op]} {b} = {c}{stop}" for label, (a, op, b, c) in zip(labels, steps)]
    return "\n".join([*lines, FINAL[lang].format(steps[-1][3])])


NAMES = (
    ("Tom", "小明"),
    ("Anna", "小红"),
    ("Li Lei", "李雷"),
    ("Han Meimei", "韩梅梅"),
    ("Sam", "小刚"),
    ("Emma", "小丽"),
    ("Ben", "小军"),
    ("Lucy", "露西"),
    ("Jack", "小杰"),
    ("Mia", "小美"),
)
ITEMS = (
    ("apples", "苹果", "个"),
    ("notebooks", "笔记本", "本"),
    ("pencils", "铅笔", "支"),
    ("oranges", "橙子", "个"),
    ("cups", "杯子", "个"),
    ("toy cars", "玩具车", "辆"),
    ("T-shirts", "T恤", "件"),
    ("books", "书", "本"),
    ("tickets", "门票", "张"),
    ("flowers", "花", "朵"),
)

# Each template draws its numbers and returns (English, Chinese, steps, the question's numbers in order).
_TEMPLATES: list[Callable[[random.Random], tuple]] = []


def _template(fn: Callable[[random.Random], tuple]) -> Callable[[random.Random], tuple]:
    _TEMPLATES.append(fn)
    return fn


@_template
def _change(r: random.Random) -> tuple:
    (en, zh), (item, item_zh, unit) = r.choice(NAMES), r.choice(ITEMS)
    n, p = r.randint(2, 9), r.randint(2, 15)
    bill = r.choice([b for b in (20, 50, 100, 200) if b > n * p])
    return (
        f"{en} buys {n} {item} at ${p} each and pays with a ${bill} bill. How many dollars of change does {en} get?",
        f"{zh}买了{n}{unit}{item_zh}，每{unit}{p}元，付了{bill}元。应该找回多少元？",
        [Op(n, "*", p, f"Cost of the {item}", f"{item_zh}的总价"), Op(bill, "-", "#0", "Change", "找回的钱")],
        (n, p, bill),
    )


@_template
def _train(r: random.Random) -> tuple:
    v, h = r.randint(40, 120), r.randint(2, 9)
    return (
        f"A train travels at {v} km per hour for {h} hours. How many kilometres does it travel?",
        f"一列火车每小时行驶{v}千米，行驶了{h}小时。它一共行驶了多少千米？",
        [Op(v, "*", h, "Distance", "行驶的路程")],
        (v, h),
    )


@_template
def _cycling(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    d, days, more = r.randint(20, 80), r.randint(2, 7), r.randint(5, 40)
    return (
        f"{en} cycles {d} km every day for {days} days, and then another {more} km. "
        f"How many kilometres does {en} cycle in all?",
        f"{zh}连续{days}天每天骑车{d}千米，之后又骑了{more}千米。{zh}一共骑了多少千米？",
        [
            Op(d, "*", days, f"Distance in {days} days", f"{days}天骑的路程"),
            Op("#0", "+", more, "Total", "一共骑的路程"),
        ],
        (d, days, more),
    )


@_template
def _stickers(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    k, q = r.randint(2, 9), r.randint(2, 20)
    return (
        f"{en} has {k * q} stickers and shares them equally among {k} friends. How many stickers does each get?",
        f"{zh}有{k * q}张贴纸，平均分给{k}个朋友。每个朋友分到多少张？",
        [Op(k * q, "/", k, "Stickers for each friend", "每个朋友分到的贴纸")],
        (k * q, k),
    )


@_template
def _candies(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    k, q = r.randint(2, 8), r.randint(3, 15)
    b = r.randint(1, k * q - 1)
    a = k * q - b
    return (
        f"{en} has {a} candies and buys {b} more, then shares all of them equally among {k} children. "
        "How many candies does each child get?",
        f"{zh}有{a}颗糖，又买了{b}颗，然后把所有的糖平均分给{k}个孩子。每个孩子分到多少颗？",
        [Op(a, "+", b, "Candies in all", "糖的总数"), Op("#0", "/", k, "Candies for each child", "每个孩子分到的糖")],
        (a, b, k),
    )


@_template
def _ages(r: random.Random) -> tuple:
    (a_en, a_zh), (b_en, b_zh) = r.sample(NAMES, 2)
    a, d, y = r.randint(5, 15), r.randint(2, 30), r.randint(2, 10)
    return (
        f"{a_en} is {a} years old. {b_en} is {d} years older than {a_en}. How old will {b_en} be in {y} years?",
        f"{a_zh}今年{a}岁，{b_zh}比{a_zh}大{d}岁。{y}年后{b_zh}多少岁？",
        [
            Op(a, "+", d, f"{b_en}'s age now", f"{b_zh}现在的年龄"),
            Op("#0", "+", y, f"{b_en}'s age in {y} years", f"{y}年后{b_zh}的年龄"),
        ],
        (a, d, y),
    )


@_template
def _father(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    a, m = r.randint(3, 12), r.randint(3, 6)
    return (
        f"{en} is {a} years old, and {en}'s father is {m} times as old. How many years older is the father?",
        f"{zh}今年{a}岁，爸爸的年龄是{zh}的{m}倍。爸爸比{zh}大多少岁？",
        [Op(a, "*", m, "The father's age", "爸爸的年龄"), Op("#0", "-", a, "Difference", "年龄差")],
        (a, m),
    )


@_template
def _savings(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    s, w = r.randint(3, 25), r.randint(2, 12)
    c = r.randint(1, s * w - 1)
    return (
        f"{en} saves ${s} every week for {w} weeks and then spends ${c} on a present. "
        f"How many dollars does {en} have left?",
        f"{zh}每周存{s}元，存了{w}周，然后花{c}元买了一份礼物。{zh}还剩多少元？",
        [Op(s, "*", w, "Money saved", "存下的钱"), Op("#0", "-", c, "Money left", "剩下的钱")],
        (s, w, c),
    )


@_template
def _reading(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    per, d = r.randint(5, 30), r.randint(2, 10)
    pages = per * d + r.randint(10, 200)
    return (
        f"A book has {pages} pages. {en} reads {per} pages a day for {d} days. How many pages are still unread?",
        f"一本书有{pages}页，{zh}每天读{per}页，读了{d}天。还有多少页没有读？",
        [Op(per, "*", d, "Pages read", "读过的页数"), Op(pages, "-", "#0", "Pages left", "剩下的页数")],
        (pages, per, d),
    )


@_template
def _cookies(r: random.Random) -> tuple:
    k, boxes = r.randint(4, 12), r.randint(3, 15)
    sold = r.randint(1, boxes - 1)
    return (
        f"A baker makes {k * boxes} cookies and packs them in boxes of {k}. She sells {sold} boxes. "
        "How many boxes are left?",
        f"面包师做了{k * boxes}块饼干，每{k}块装一盒，卖掉了{sold}盒。还剩多少盒？",
        [Op(k * boxes, "/", k, "Boxes packed", "装好的盒数"), Op("#0", "-", sold, "Boxes left", "剩下的盒数")],
        (k * boxes, k, sold),
    )


@_template
def _tables(r: random.Random) -> tuple:
    c, per, t = r.randint(2, 6), r.randint(20, 35), r.randint(4, 8)
    absent = r.choice([x for x in range(1, 2 * t + 1) if (c * per - x) % t == 0])
    return (
        f"A school has {c} classes of {per} students. {absent} students are absent today. The students who are "
        f"present sit at tables of {t}, and every table is full. How many tables are used?",
        f"学校有{c}个班，每班{per}名学生，今天有{absent}名学生缺席。到校的学生每{t}人坐一张桌子，"
        "每张桌子都坐满了。一共用了多少张桌子？",
        [
            Op(c, "*", per, "Students in all", "学生总数"),
            Op("#0", "-", absent, "Students present", "到校的学生"),
            Op("#1", "/", t, "Tables used", "用的桌子数"),
        ],
        (c, per, absent, t),
    )


@_template
def _two_items(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    (i1, z1, u1), (i2, z2, u2) = r.sample(ITEMS, 2)
    n1, p1, n2, p2 = r.randint(2, 9), r.randint(2, 20), r.randint(2, 9), r.randint(2, 20)
    return (
        f"{en} buys {n1} {i1} at ${p1} each and {n2} {i2} at ${p2} each. How many dollars does {en} spend in all?",
        f"{zh}买了{n1}{u1}{z1}，每{u1}{p1}元，又买了{n2}{u2}{z2}，每{u2}{p2}元。一共花了多少元？",
        [
            Op(n1, "*", p1, f"Cost of the {i1}", f"{z1}的总价"),
            Op(n2, "*", p2, f"Cost of the {i2}", f"{z2}的总价"),
            Op("#0", "+", "#1", "Total cost", "一共花的钱"),
        ],
        (n1, p1, n2, p2),
    )


@_template
def _marbles(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    a, b = r.randint(10, 60), r.randint(2, 30)
    c = r.randint(1, a + b - 1)
    return (
        f"{en} has {a} marbles, wins {b} more, and then gives {c} to a friend. How many marbles does {en} have now?",
        f"{zh}有{a}颗弹珠，又赢了{b}颗，然后送给朋友{c}颗。{zh}现在有多少颗弹珠？",
        [Op(a, "+", b, "Marbles after winning", "赢了以后的弹珠"), Op("#0", "-", c, "Marbles now", "现在的弹珠")],
        (a, b, c),
    )


@_template
def _orchard(r: random.Random) -> tuple:
    rows, per, k = r.randint(3, 12), r.randint(4, 15), r.randint(2, 6)
    sold = r.randint(1, rows * per * k - 1)
    return (
        f"An orchard has {rows} rows of {per} apple trees. Each tree gives {k} baskets of apples. "
        f"The farmer sells {sold} baskets. How many baskets are left?",
        f"果园里有{rows}排苹果树，每排{per}棵。每棵树结{k}筐苹果，农民卖掉了{sold}筐。还剩多少筐？",
        [
            Op(rows, "*", per, "Trees", "苹果树的棵数"),
            Op("#0", "*", k, "Baskets of apples", "苹果的筐数"),
            Op("#1", "-", sold, "Baskets left", "剩下的筐数"),
        ],
        (rows, per, k, sold),
    )


@_template
def _wages(r: random.Random) -> tuple:
    en, zh = r.choice(NAMES)
    h, n = r.randint(8, 30), r.randint(3, 40)
    return (
        f"{en} earns ${h} an hour and works {n} hours this week. How many dollars does {en} earn this week?",
        f"{zh}每小时挣{h}元，这周工作了{n}小时。{zh}这周挣了多少元？",
        [Op(h, "*", n, "Pay for the week", "这周挣的钱")],
        (h, n),
    )


@_template
def _tank(r: random.Random) -> tuple:
    a = r.randint(100, 900)
    b = r.randint(10, a - 1)
    return (
        f"A tank holds {a} litres of water. {b} litres are used in the garden. How many litres are left?",
        f"水箱里有{a}升水，浇花用掉了{b}升。还剩多少升？",
        [Op(a, "-", b, "Water left", "剩下的水")],
        (a, b),
    )


@_template
def _balloons(r: random.Random) -> tuple:
    a, b = r.randint(5, 90), r.randint(5, 90)
    return (
        f"There are {a} red balloons and {b} blue balloons at a party. How many balloons are there in all?",
        f"聚会上有{a}个红气球和{b}个蓝气球。一共有多少个气球？",
        [Op(a, "+", b, "Balloons in all", "气球的总数")],
        (a, b),
    )


@_template
def _pizza(r: random.Random) -> tuple:
    p, s = r.randint(2, 6), r.randint(4, 12)
    k = r.choice([d for d in range(2, 13) if p * s % d == 0])
    return (
        f"There are {p} pizzas, each cut into {s} slices. {k} friends share the slices equally. "
        "How many slices does each friend get?",
        f"有{p}个披萨，每个切成{s}块。{k}个朋友平均分，每人分到多少块？",
        [Op(p, "*", s, "Slices in all", "一共的块数"), Op("#0", "/", k, "Slices for each friend", "每人分到的块数")],
        (p, s, k),
    )


def arithmetic(rng: random.Random, lang: str, max_number: int = 0) -> Example:
    """A word problem of one to three operations with a whole-number answer, and its worked reply; with
    `max_number`, one whose every number (in the question, the working and the answer) is at most that."""
    for _ in range(10_000):
        template = rng.choice(_TEMPLATES)
        en, zh, ops, numbers = template(rng)
        if max_number and max(numbers) > max_number:
            continue  # most draws under a small cap end here, before the working is computed
        steps = solve(ops)
        if not max_number or max(n for a, _, b, c in steps for n in (a, b, c)) <= max_number:
            break
    else:
        raise ValueError(f"no arithmetic problem keeps every number at or below max_number={max_number}; raise it.")
    labels = [[o.en, o.zh] for o in ops]
    return Example(
        kind="arithmetic",
        lang=lang,
        prompt=en if lang == "en" else zh,
        answer=str(steps[-1][3]),
        response=arithmetic_reply(labels, steps, lang),
        key=("arithmetic", template.__name__, numbers),
        data={"ops": [[o.a, o.op, o.b] for o in ops], "labels": labels, "steps": steps},
    )


def _miscopied(example: Example, rng: random.Random) -> list[list] | None:
    """The steps with one of the question's numbers copied wrong (another of its numbers, or off by 1 to 3) and
    the rest worked from it: a third of the tiny recipe's SFT model's wrong answers look like this."""
    literal = [(i, k) for i, o in enumerate(example.data["ops"]) for k in (0, 2) if not isinstance(o[k], str)]
    given = sorted({example.data["ops"][i][k] for i, k in literal})
    for _ in range(20):
        i, k = rng.choice(literal)
        right = example.data["ops"][i][k]
        wrong = rng.choice(
            [n for n in given if n != right] + [right + d for d in (-3, -2, -1, 1, 2, 3) if right + d > 0]
        )
        ops = [Op(*o, "", "") for o in example.data["ops"]]
        ops[i] = Op(*(wrong if j == k else x for j, x in enumerate(example.data["ops"][i])), "", "")
        steps = solve(ops)
        if steps and steps[-1][3] != int(example.answer):
            return steps
    return None


def _slipped(example: Example, rng: random.Random) -> list[list]:
    """The steps with one plausible mistake carried through: a number of the question copied wrong (a third of
    the time), a result off by 1 or 10, or the wrong operation."""
    if rng.random() < 1 / 3 and (steps := _miscopied(example, rng)) is not None:
        return steps
    ops = [Op(a, op, b, "", "") for a, op, b in example.data["ops"]]
    for _ in range(20):
        i, off = rng.randrange(len(ops)), rng.choice([-10, -1, 1, 10, 0])
        steps = solve(ops, (i, _slip(off)))
        if steps and steps[-1][3] != int(example.answer):
            return steps
    return solve(ops, (len(ops) - 1, _slip(1)))


def _slip(off: int) -> Callable:
    """A result off by `off`, or (0) the wrong operation."""
    if off:
        return lambda a, op, b: (op, APPLY[op](a, b) + off)
    return lambda a, op, b: (_CONFUSED[op], None)


def wrong_reply(example: Example, rng: random.Random) -> str:
    """The worked reply with one plausible mistake, in the right language."""
    return arithmetic_reply(example.data["labels"], _slipped(example, rng), example.lang)


def other_language_reply(example: Example) -> str:
    """The right working and answer, in the language the question is not in."""
    return arithmetic_reply(example.data["labels"], example.data["steps"], LANGS[1 - LANGS.index(example.lang)])


def facts(max_number: int) -> dict[str, list[tuple[int, int, int]]]:
    """Every a op b = c with a, b and c whole numbers from 1 to `max_number`, by operation: the facts the word
    problems' working is made of."""
    span = range(1, max_number + 1)
    pairs = [(a, b) for a in span for b in span]
    return {
        op: [
            (a, b, APPLY[op](a, b))
            for a, b in pairs
            if 1 <= APPLY[op](a, b) <= max_number and not (op == "/" and a % b)
        ]
        for op in APPLY
    }


FACT_LINES = 20
FACT_HEADINGS = ("Arithmetic practice:", "算术练习：")
FACT_MAX = 100  # the facts' range when the word problems have no cap


def fact_sheet(rng: random.Random, table: dict[str, list[tuple[int, int, int]]], lines: int = FACT_LINES) -> str:
    """A practice sheet of `lines` facts from `table` (see `facts`), each operation as likely as the others: a
    9M model trained for minutes learns its sums and products from these, not from the word problems, where each
    fact comes a few times (benchmarks/ANALYSIS.md, session 11)."""
    ops = list(table)
    rows = []
    for _ in range(lines):
        op = rng.choice(ops)
        a, b, c = rng.choice(table[op])
        rows.append(f"{a} {SHOWN[op]} {b} = {c}")
    return "\n".join([rng.choice(FACT_HEADINGS), *rows])
