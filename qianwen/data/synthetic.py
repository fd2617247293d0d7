"""Task data a program can check (issue 4, deliverable 1), seeded, in English and Chinese: what the tiny recipe
fine-tunes on, trains its reward model on, runs PPO on and is scored with.

    make_all("runs/tiny/synthetic", seed=0)      # every file below, and manifest.json

What makes a reply right or wrong (`check_answer`, `flaws`) is in qianwen/checks.py, shared with evaluation.

Tasks (synthetic_arith.py, synthetic_tasks.py): GSM8K-style word problems ending "The answer is N." /
"答案是 N。"; simple instructions (reverse, sort, count letters, repeat, upper case, answer in a given language);
ReAct transcripts (QWEN_SPEC.md section 7) for arithmetic too large to do in one's head, whose Observation is
what the code really printed in qianwen.sandbox.

Files, all JSONL but the manifest:
- sft.jsonl: `{"messages": [system, user, assistant], "kind", "lang", "answer", "data"}`.
- pmp.jsonl (preference-model pretraining: larger, a fraction of labels flipped), rm.jsonl (clean, RM fine-tuning),
  rm_eval.jsonl (clean, held out): `{"messages": [system, user], "chosen", "rejected", "kind", "lang", "answer",
  "rejection", "flipped", "chosen_ended", "rejected_ended"}`. A reply that ends carries the literal `<|im_end|>`
  at its end; a trainer strips it and appends the token id (never encode it as special from the text: the same
  text in user data must stay plain). `rejection` names what is wrong with the bad reply: a wrong answer (a
  plausible mistake), rambling (the right content buried in repeated filler), the wrong language, or unended
  (cut off, no final line and no `<|im_end|>`).
- ppo.jsonl: `{"prompt", "answer", "kind", "lang", "data"}`, prompts with a programmatic reward (no tool tasks: PPO
  generates without running tools).
- arith_eval.jsonl, instruct_eval.jsonl, tool_eval.jsonl: the same shape as ppo.jsonl, held out. No task (its
  numbers, word or list, whatever the wording or language) in any held-out file is in a training file: held-out
  files draw from a fixed fifth of every task space (a hash of the task decides), training files from the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from qianwen.checks import END, REJECTIONS
from qianwen.data import synthetic_arith, synthetic_tasks
from qianwen.data.synthetic_tasks import LANGS, Example, tool_transcript
from qianwen.tokenizer import DEFAULT_SYSTEM
from qianwen.util import atomic_write

GENERATORS: dict[str, Callable[[random.Random, str], Example]] = {
    "arithmetic": synthetic_arith.arithmetic,
    "instruction": synthetic_tasks.instruction,
    "tool": synthetic_tasks.tool_problem,
}
MIX = {"arithmetic": 0.5, "instruction": 0.3, "tool": 0.2}
PPO_MIX = {"arithmetic": 0.7, "instruction": 0.3}
EVAL_SETS = {
    "arith_eval": {"arithmetic": 1.0},
    "instruct_eval": {"instruction": 1.0},
    "tool_eval": {"tool": 1.0},
}
# The share of every task space (each template's numbers, each instruction's words...) kept for the held-out sets.
# Training draws only from the rest, held-out sets only from it: a split by task, as benchmarks split. Holding out
# exactly the tasks the held-out sets happened to draw used up the small spaces instead: at max_number 30 the
# "father's age" template has 20 tasks, arith_eval drew 17 of them, and training saw the other 3, so 40% of the
# held-out arithmetic came from four templates training had barely seen (benchmarks/ANALYSIS.md, session 10).
HELD_OUT_SHARE = 0.2
CORPUS_PER_FILE = 40
SHEETS_PER_FILE = 40
# Codes per sandbox start: a start costs ~50 ms, so the tiny recipe's 37,682 took 4.0 s at 500 and take 1.1 s here.
SANDBOX_BATCH = 5000


class SandboxError(RuntimeError):
    """The tool transcripts' code could not run in qianwen.sandbox."""


# ---------------------------------------------------------------------------
# Drawing tasks


def held_out_task(key: tuple) -> bool:
    """Whether a task (its key: the numbers, word or list, whatever the wording or language) is in the held-out
    share of its space; a hash of the key decides, the same in every process and run."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < HELD_OUT_SHARE * 2**64


def draw(
    rng: random.Random,
    n: int,
    mix: dict[str, float],
    held_out: bool = False,
    distinct: bool = False,
    generators: dict[str, Callable[[random.Random, str], Example]] = GENERATORS,
) -> list[Example]:
    """`n` examples of the groups in `mix` (arithmetic, instruction, tool) by weight, in either language, from the
    held-out share of the tasks when `held_out` and from the rest otherwise, no prompt twice (no task twice when
    `distinct`, as held-out sets want)."""
    groups, weights = list(mix), list(mix.values())
    examples, seen, misses = [], set(), 0
    while len(examples) < n:
        example = generators[rng.choices(groups, weights)[0]](rng, rng.choice(LANGS))
        mark = example.key if distinct else example.prompt
        if held_out_task(example.key) != held_out or mark in seen:
            misses += 1
            if misses > 1000 + 50 * n:
                raise ValueError(f"there are not {n} different {'/'.join(groups)} tasks to draw; ask for fewer.")
            continue
        seen.add(mark)
        examples.append(example)
    return examples


_DRIVER = """import contextlib, io, json
printed = []
for code in json.load(open("codes.json")):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__name__": "__main__"})
    printed.append(out.getvalue())
print(json.dumps(printed))
"""


def run_tool_code(codes: Sequence[str]) -> dict[str, str]:
    """What each piece of code prints when it runs in qianwen.sandbox, each in a fresh namespace; identical code
    runs once, and many share one sandbox start."""
    try:
        from qianwen.sandbox import run
    except ImportError as exc:
        raise SandboxError(
            f"tool transcripts run their code in qianwen.sandbox, which cannot load here: {exc}."
        ) from None
    unique = list(dict.fromkeys(codes))
    printed: dict[str, str] = {}
    for start in range(0, len(unique), SANDBOX_BATCH):
        batch = unique[start : start + SANDBOX_BATCH]
        try:
            result = run(_DRIVER, files={"codes.json": json.dumps(batch).encode()}, timeout=120)
        except (RuntimeError, OSError) as exc:
            raise SandboxError(f"tool transcripts run their code in qianwen.sandbox, which failed: {exc}") from None
        if result.status != "ok":
            detail = result.stderr.strip().splitlines()[-1:] or [result.limit or result.status]
            raise SandboxError(f"the sandbox could not run the tool transcripts' code ({result.status}: {detail[0]}).")
        printed.update(zip(batch, json.loads(result.stdout)))
    return printed


def with_observations(examples: list[Example]) -> list[Example]:
    """The examples, tool problems given their transcripts: the Observation is what the code printed."""
    pending = [e.data["code"] for e in examples if e.kind == "tool" and not e.response]
    printed = run_tool_code(pending) if pending else {}
    done = []
    for e in examples:
        if e.kind == "tool" and not e.response:
            observation = printed[e.data["code"]].rstrip("\n")
            if observation != e.answer:
                raise SandboxError(f"{e.data['code']!r} printed {observation!r} in the sandbox, not {e.answer}.")
            transcript = tool_transcript(e.data["code"], observation, e.lang)
            e = replace(e, response=transcript, data={**e.data, "observation": observation})
        done.append(e)
    return done


# ---------------------------------------------------------------------------
# Preference pairs

_FILLER = {
    "en": (
        "Let me think about this carefully.",
        "Hmm, let me read the question again.",
        "I want to be sure about this.",
        "Let me check that once more.",
    ),
    "zh": ("让我仔细想一想。", "我再读一遍题目。", "我要确保没有弄错。", "让我再检查一下。"),
}


def _rambling(example: Example, rng: random.Random) -> str:
    filler = rng.choice(_FILLER[example.lang])
    tool = example.kind == "tool"
    if tool:
        filler = f"Thought: {filler}"  # rambling in the ReAct format's own words, where a thought may go
    lines = []
    for i, line in enumerate(example.response.split("\n")):
        if not tool or line.startswith(("Thought:", "Final Answer:")):
            lines += [filler] * rng.randint(2 if i == 0 else 1, 3 if i == 0 else 2)
        lines.append(line)
    return "\n".join([*lines, *[filler] * rng.randint(1, 2)])


def _unended(example: Example, rng: random.Random) -> str:
    """The reply without its final line, and often cut further, mid-word, as when tokens run out."""
    text = example.response
    body = text.rsplit("\n", 1)[0]
    longest = len(body) if body != text else len(body) - 1
    return body[: rng.randint(max(1, len(body) // 3), longest)].rstrip()


def _other_language(example: Example) -> str | None:
    if example.kind == "arithmetic":
        return synthetic_arith.other_language_reply(example)
    return synthetic_tasks.other_language_reply(example)


def rejections_for(example: Example) -> list[str]:
    """The kinds of bad reply that can be made for `example` (the wrong language only where it is checked)."""
    return [r for r in REJECTIONS if r != "wrong_language" or _other_language(example) is not None]


def preference_pair(example: Example, rng: random.Random, rejection: str | None = None) -> dict:
    """A record of pmp/rm.jsonl: the reference reply against a bad one (`rejection`, default: any that fits)."""
    options = rejections_for(example)
    rejection = rejection or rng.choice(options)
    if rejection not in options:
        raise ValueError(f"a {example.kind} example cannot be rejected as {rejection!r}; use one of {options}.")
    if rejection == "wrong_answer":
        wrong = synthetic_arith.wrong_reply if example.kind == "arithmetic" else synthetic_tasks.wrong_reply
        rejected = wrong(example, rng) + END
    elif rejection == "wrong_language":
        rejected = _other_language(example) + END
    elif rejection == "rambling":
        rejected = _rambling(example, rng) + END
    else:
        rejected = _unended(example, rng)
    return {
        "messages": _messages(example),
        "chosen": example.response + END,
        "rejected": rejected,
        "kind": example.kind,
        "lang": example.lang,
        "answer": example.answer,
        "rejection": rejection,
        "flipped": False,
        "chosen_ended": True,
        "rejected_ended": rejection != "unended",
    }


def preference_pairs(examples: Sequence[Example], rng: random.Random, flip: float = 0.0) -> list[dict]:
    """One pair per example, the kinds of bad reply dealt in turn (a shuffled round of the kinds an example allows,
    per task kind), so a set holds them in equal shares rather than as chance falls: a held-out accuracy then does
    not move with how many hard pairs (wrong answers) the draw happened to hold. round(flip * n) of the pairs,
    chosen at random, have their labels swapped (`flipped`)."""
    decks: dict[tuple, list[str]] = {}
    pairs = []
    for example in examples:
        options = rejections_for(example)
        deck = decks.setdefault((example.kind, *options), [])
        if not deck:
            deck.extend(rng.sample(options, len(options)))
        pairs.append(preference_pair(example, rng, deck.pop()))
    for i in sorted(rng.sample(range(len(pairs)), round(flip * len(pairs)))):
        p = pairs[i]
        p.update(
            chosen=p["rejected"],
            rejected=p["chosen"],
            chosen_ended=p["rejected_ended"],
            rejected_ended=p["chosen_ended"],
            flipped=True,
        )
    return pairs


# ---------------------------------------------------------------------------
# Records and files


def _messages(example: Example) -> list[dict]:
    return [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": example.prompt}]


def sft_record(example: Example) -> dict:
    messages = [*_messages(example), {"role": "assistant", "content": example.response}]
    return {
        "messages": messages,
        "kind": example.kind,
        "lang": example.lang,
        "answer": example.answer,
        "data": example.data,
    }


def prompt_record(example: Example) -> dict:
    """A record of ppo.jsonl and of the held-out sets (for tools, data["question"] is the bare question)."""
    return {
        "prompt": example.prompt,
        "answer": example.answer,
        "kind": example.kind,
        "lang": example.lang,
        "data": example.data,
    }


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _counts(records: list[dict], pairs: bool) -> dict:
    counts = {
        "records": len(records),
        "kinds": dict(sorted(Counter(r["kind"] for r in records).items())),
        "langs": dict(sorted(Counter(r["lang"] for r in records).items())),
    }
    if pairs:
        counts["rejections"] = dict(sorted(Counter(r["rejection"] for r in records).items()))
        counts["flipped"] = sum(r["flipped"] for r in records)
    return counts


def make_all(
    out_dir: str | os.PathLike,
    seed: int = 0,
    sft: int = 2000,
    pairs: int = 1000,
    pmp: int = 4000,
    ppo: int = 1000,
    eval_size: int = 200,
    flip: float = 0.1,
    corpus: int = 0,
    facts: int = 0,
    max_number: int = 0,
    tool_digits: int = 5,
) -> dict:
    """Write the whole synthetic set into `out_dir` and return its manifest (also manifest.json): `sft`
    conversations, `pairs` clean preference pairs (rm.jsonl), `pmp` noisy ones with a fraction `flip` of labels
    swapped, `ppo` prompts, and `eval_size` records in each held-out file; and `corpus` more examples as plain
    "Question: ... Answer: ..." text files in `out_dir/corpus/`, for pretraining to read beside other text (the
    held-out tasks are never among them), with `facts` practice sheets of arithmetic facts ("7 × 4 = 28") beside
    them, every number at most `max_number` (FACT_MAX when 0). `max_number` (0 = none) caps every number of an
    arithmetic problem, its working and answer included, and `tool_digits` sizes the tool problems' numbers: the
    knobs that fit the tasks to a model's size. The same seed gives the same bytes."""
    sizes = {"sft": sft, "pairs": pairs, "pmp": pmp, "ppo": ppo, "eval": eval_size, "corpus": corpus, "facts": facts}
    for name, value in {**sizes, "max_number": max_number}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the {name} size must be a whole number, 0 or more, got {value!r}.")
    if isinstance(tool_digits, bool) or not isinstance(tool_digits, int) or not 2 <= tool_digits <= 12:
        raise ValueError(f"tool_digits must be a whole number from 2 to 12, got {tool_digits!r}.")
    if isinstance(flip, bool) or not isinstance(flip, int | float) or not 0 <= flip < 0.5:
        raise ValueError(f"flip is the fraction of PMP labels to swap and must be in [0, 0.5), got {flip!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a directory for the synthetic set.")

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}/{name}")  # a stream per file: one training size changed leaves the rest alone

    gens = {
        **GENERATORS,
        "arithmetic": partial(synthetic_arith.arithmetic, max_number=max_number),
        "tool": partial(synthetic_tasks.tool_problem, digits=tool_digits),
    }
    held = {
        name: draw(rng(name), eval_size, mix, held_out=True, distinct=True, generators=gens)
        for name, mix in {**EVAL_SETS, "rm_eval": MIX}.items()
    }
    train = {
        name: draw(rng(name), size, mix, generators=gens)
        for name, size, mix in [
            ("sft", sft, MIX),
            ("rm", pairs, MIX),
            ("pmp", pmp, MIX),
            ("ppo", ppo, PPO_MIX),
            ("corpus", corpus, MIX),
        ]
    }
    # Every tool problem's code runs in one pass through the sandbox.
    sets = {**held, **train}
    done = iter(with_observations([e for examples in sets.values() for e in examples]))
    sets = {name: [next(done) for _ in examples] for name, examples in sets.items()}

    files = {
        "sft.jsonl": [sft_record(e) for e in sets["sft"]],
        "pmp.jsonl": preference_pairs(sets["pmp"], rng("pmp/pairs"), flip),
        "rm.jsonl": preference_pairs(sets["rm"], rng("rm/pairs")),
        "rm_eval.jsonl": preference_pairs(sets["rm_eval"], rng("rm_eval/pairs")),
        "ppo.jsonl": [prompt_record(e) for e in sets["ppo"]],
        **{f"{name}.jsonl": [prompt_record(e) for e in sets[name]] for name in EVAL_SETS},
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(out / name, records)
    sheets = []
    if facts:
        table, sheet_rng = synthetic_arith.facts(max_number or synthetic_arith.FACT_MAX), rng("facts")
        sheets = [synthetic_arith.fact_sheet(sheet_rng, table) for _ in range(facts)]
    corpus_files = write_corpus(out / "corpus", sets["corpus"], sheets)
    manifest = {
        "seed": seed,
        "sizes": sizes,
        "flip": flip,
        "max_number": max_number,
        "tool_digits": tool_digits,
        "files": {
            name: _counts(records, name in ("pmp.jsonl", "rm.jsonl", "rm_eval.jsonl"))
            for name, records in files.items()
        },
        "corpus": {"examples": len(sets["corpus"]), "facts": facts, "files": corpus_files},
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest


def corpus_text(example: Example) -> str:
    """One example as pretraining text; a tool problem without the ReAct prompt's tool list (it is the same
    for every problem, and SFT shows it)."""
    question = example.data["question"] if example.kind == "tool" else example.prompt
    return f"Question: {question}\nAnswer: {example.response}"


def write_corpus(directory: Path, examples: list[Example], sheets: Sequence[str] = ()) -> int:
    """The examples as text files of CORPUS_PER_FILE each (documents of a size that text filters expect), and
    the fact sheets as files of SHEETS_PER_FILE; the old files go first, so a smaller corpus leaves none behind.
    Returns the number of files."""
    if directory.exists():
        shutil.rmtree(directory)
    texts = [corpus_text(e) for e in examples]
    files = [
        (f"{stem}-{n:05d}.txt", items[start : start + size])
        for stem, items, size in [("part", texts, CORPUS_PER_FILE), ("facts", sheets, SHEETS_PER_FILE)]
        for n, start in enumerate(range(0, len(items), size))
    ]
    if files:
        directory.mkdir(parents=True)
    for name, chunk in files:
        atomic_write(directory / name, "\n\n".join(chunk) + "\n")
    return len(files)


def summary(manifest: dict, out_dir: str | os.PathLike, seconds: float) -> str:
    """What `qianwen data synthetic` prints: one line per file."""
    lines = [f"wrote the synthetic set (seed {manifest['seed']}) to {out_dir} in {seconds:.1f} s:"]
    for name, counts in manifest["files"].items():
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts["kinds"].items())
        flipped = f"; {counts['flipped']} flipped" if counts.get("flipped") else ""
        lines.append(f"  {name:20s} {counts['records']:6d}  ({kinds}{flipped})")
    corpus = manifest.get("corpus", {})
    if corpus.get("examples") or corpus.get("facts"):
        facts = f", and {corpus['facts']} sheets of arithmetic facts" if corpus.get("facts") else ""
        lines.append(
            f"  {'corpus/':20s} {corpus['examples']:6d}  (pretraining text{facts}, in {corpus['files']} files)"
        )
    return "\n".join(lines)
