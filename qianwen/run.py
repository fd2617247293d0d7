"""`qianwen run`: the recipe end to end, stage by stage, into one run directory.

Stages meet through files in the run directory (DESIGN.md): tasks/ -> tokenizer/ -> data/ -> base/ -> sft/ ->
rm/ -> ppo/ -> eval/ -> samples.json -> report.md + report.html. A stage whose outputs are complete is skipped on a
re-run, and an interrupted pretraining, SFT or reward model resumes from its newest checkpoint. `start` (the
command's --from) redoes one stage and every later one; `only` (--only) redoes one stage alone and then renders the
report card again, which reads nothing but files. The outputs of a stage to redo are renamed aside and only then
deleted, so a half-deleted directory never passes for a finished one; run.json records what each stage took.

A stage can take a user's artefact instead of making one, named by a bare key: `base=DIR` (a Hugging Face Qwen
model directory, a real Qwen checkpoint say) becomes base/ and pretraining is skipped; `sft=DIR` and `rm=DIR`
(a `qianwen rm` output) do the same for their stages, and `tokenizer=DIR` (or `tokenizer=qwen`, the released
151,851-id vocabulary) for the tokenizer. A model's files are copied, not linked: the run directory then stands on
its own (the original may move or go), and nothing written under the run directory can reach the user's files;
copying a 1.8B checkpoint (3.7 GB) takes seconds. A tokenizer is read and written again in qianwen's layout
(qwen.tiktoken + Hugging Face files). With `base=` and no `tokenizer=`, tokenizer/ becomes base's tokenizer, so
the data (and the long-context evaluation that reads it) is tokenised the way the model reads.

The recipe (qianwen/recipes/tiny.toml by default) holds one section per stage; docs/RECIPES.md documents every
key, and any key can be overridden as `section.key=value`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import qianwen
from qianwen.config import apply_overrides, load_recipe
from qianwen.recipe import EVALUATED, RunSettings, Settings, check_sections, eval_options, eval_tasks, recipe_path
from qianwen.util import atomic_write

LEDGER = "run.json"
PROVIDED = "provided.json"  # written into a directory copied from a user's artefact
SAMPLES = "samples.json"
SAMPLE_PROMPT = "def fibonacci(n):\n"
SAMPLE_TOKENS = 48
CHAT_PROMPT = "Tom has 12 apples and buys 7 more. How many apples does he have now?"
REWARD_SCORES = "eval/reward.json"  # the reward model on sft/'s and ppo/'s held-out replies
PLOTS = ("pretrain.png", "sft.png", "rm.png", "ppo.png")

Log = Callable[..., None]


class RunError(RuntimeError):
    """A stage that could not run or failed its own check; the message says which and why."""


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple[str, ...]  # paths under the run directory that a re-run of the stage replaces
    needs: tuple[str, ...] = ()  # stages whose outputs it reads
    uses: tuple[str, ...] = ()  # stages whose outputs it reads when they are there


STAGES = (
    Stage("tasks", ("tasks",)),  # first: with tasks.corpus, the tokenizer and pretraining read some of them too
    Stage("tokenizer", ("tokenizer",), (), ("tasks",)),
    Stage("data", ("data",), ("tokenizer",), ("tasks",)),
    Stage("pretrain", ("base", "checkpoints/pretrain", "metrics/pretrain.jsonl"), ("data",)),
    Stage("sft", ("sft", "checkpoints/sft", "metrics/sft.jsonl"), ("pretrain", "tasks")),
    Stage(
        "rm",
        ("rm-pmp", "rm", "checkpoints/rm-pmp", "checkpoints/rm", "metrics/rm-pmp.jsonl", "metrics/rm.jsonl"),
        ("sft", "tasks"),
    ),
    Stage("ppo", ("ppo", "checkpoints/ppo", "metrics/ppo.jsonl"), ("sft", "rm", "tasks")),
    Stage("eval", ("eval",), ("pretrain", "sft", "ppo", "tasks", "data"), ("rm",)),
    Stage("sample", (SAMPLES,), ("pretrain",), ("sft", "ppo")),
    Stage("report", ("report.md", "report.html", *PLOTS)),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}
ARTEFACTS = {"tokenizer": "tokenizer", "base": "pretrain", "sft": "sft", "rm": "rm"}  # [run] key -> stage
DIRECTORY = {"tokenizer": "tokenizer", "pretrain": "base", "sft": "sft", "rm": "rm"}  # stage -> its directory


# ---------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Artefact:
    key: str  # the [run] key that named it
    source: Path  # resolved: a directory, or qwen.tiktoken for tokenizer=qwen


@dataclass
class Context:
    out: Path
    settings: Settings
    log: Log
    artefacts: dict[str, Artefact]  # stage -> what the user gave it


def run(
    out: str | os.PathLike,
    recipe: str = "tiny",
    overrides: Sequence[str] = (),
    seed: int = 0,
    log: Log = print,
    start: str | None = None,
    only: str | None = None,
) -> Path:
    """Run the recipe into `out`, skipping finished stages; `start` redoes that stage and every later one, `only`
    that stage alone (and the report card). Returns the report's path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the run (a new one, or a run to go on with).")
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in NAMES:
            raise ValueError(f"{flag} {name!r} is not a stage; the stages are {', '.join(NAMES)}.")
    if start and only:
        raise ValueError("give --from or --only, not both.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "qianwen run drives its stages from one process; under torchrun start the training commands "
            "(qianwen pretrain, sft, rm with --recipe and out=RUN_DIR), then `qianwen run` finishes the rest "
            "(docs/RECIPES.md shows the sequence)."
        )
    path = recipe_path(recipe)
    sections = apply_overrides(load_recipe(path), overrides, default_section="run")
    settings = check_sections(sections, out, seed)
    ctx = Context(out, settings, log, artefacts(settings.run))
    redo = set(NAMES[NAMES.index(start) :]) if start else {only} if only else set()
    check_plan(ctx, redo, only)

    out.mkdir(parents=True, exist_ok=True)
    ledger = read_ledger(out)
    for name in sorted(redo, key=NAMES.index):
        for relative in BY_NAME[name].outputs:
            remove(out, relative)
        ledger["stages"].pop(name, None)
    ledger |= {"recipe": str(path), "seed": seed, "overrides": list(overrides)}
    atomic_write(out / LEDGER, json.dumps(ledger, indent=2) + "\n")
    log(f"qianwen run -> {out} (recipe {path}, seed {seed})")

    from qianwen import report

    for index, name in enumerate(NAMES, 1):
        if only and name not in (only, "report"):
            continue
        log(f"[{index}/{len(NAMES)}] {name}")
        if done(ctx, name):
            log(f"      {report.summary(out, name)}  (done before, skipped)")
            continue
        begin = time.perf_counter()
        WORK[name](ctx)
        seconds = time.perf_counter() - begin
        artefact = ctx.artefacts.get(name)
        ledger["stages"][name] = {
            "seconds": round(seconds, 3),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": report.machine(),
            **({"provided": f"{artefact.key}={artefact.source}"} if artefact else {}),
        }
        atomic_write(out / LEDGER, json.dumps(ledger, indent=2) + "\n")
        if name != "report":
            log(f"      {report.summary(out, name)}  ({seconds:.1f}s)")
    if only and only != "report":
        stale = dependents(only)
        stale = [s for s in stale if done(ctx, s)]
        if stale:
            log(f"note: {', '.join(stale)} still hold outputs made from the old {only}; --from {stale[0]} redoes them.")
    final = out / ("ppo" if done(ctx, "ppo") else "sft")
    log(f"\nreport: {out / 'report.md'} (and report.html)")
    log(f"chat with the model: {report.cli_name()} chat --model {final}")
    return out / "report.md"


def dependents(stage: str) -> list[str]:
    """The stages that read `stage`'s outputs, directly or through another stage (the report card aside)."""
    found = [stage]
    for later in STAGES[NAMES.index(stage) + 1 : -1]:
        if set(later.needs + later.uses) & set(found):
            found.append(later.name)
    return found[1:]


def artefacts(settings: RunSettings) -> dict[str, Artefact]:
    """The user's artefacts by stage, each checked to be what its stage makes; base's tokenizer stands in for
    tokenizer/ when no tokenizer is given."""
    from qianwen.tokenizer import qwen_vocabulary

    given = {}
    for key, stage in ARTEFACTS.items():
        value = getattr(settings, key).strip()
        if not value:
            continue
        if key == "tokenizer" and value == "qwen":
            source = qwen_vocabulary()
        else:
            source = Path(value).expanduser().resolve()
            check_artefact(key, value, source)
        given[stage] = Artefact(key, source)
    if "pretrain" in given:
        if "tokenizer" in given and not same_vocabulary(given["tokenizer"].source, given["pretrain"].source):
            raise ValueError(
                f"tokenizer={settings.tokenizer} and base={settings.base} have different vocabularies; drop "
                "tokenizer= and the run uses base's."
            )
        given.setdefault("tokenizer", Artefact("base", given["pretrain"].source))
    return given


def check_artefact(key: str, value: str, source: Path) -> None:
    """One sentence when `source` is not what stage `key` makes."""
    from qianwen.checkpoint import CheckpointError, TensorSource, read_config
    from qianwen.tokenizer import Tokenizer, TokenizerError

    if key == "tokenizer":
        what = "a tokenizer (a directory with qwen.tiktoken or tokenizer.json), or qwen"
    else:
        what = "a Hugging Face Qwen model directory (config.json, weights and tokenizer files)"
    if not source.exists():
        raise ValueError(f"{key}={value} does not exist; give {what}.")
    try:
        if key == "tokenizer":
            Tokenizer.from_file(source)
            return
        if not source.is_dir() or not (source / "config.json").is_file():
            raise ValueError(f"{key}={value} is not a model directory (it has no config.json); give {what}.")
        read_config(source)
        weights = TensorSource(source)
        names = set(weights.names())
        weights.close()
        Tokenizer.from_file(source)
    except (CheckpointError, TokenizerError) as exc:
        detail = str(exc) if str(exc).endswith((".", "?")) else f"{exc}."
        kind = "tokenizer" if key == "tokenizer" else "model"
        raise ValueError(f"{key}={value} is not a usable {kind}: {detail}") from None
    if key == "rm" and "score.weight" not in names:
        raise ValueError(
            f"rm={value} is a language model, not a reward model (it has no score.weight); give a `qianwen rm` "
            "output, or leave rm= out and the run trains one."
        )


def same_vocabulary(a: Path, b: Path) -> bool:
    from qianwen.tokenizer import Tokenizer

    x, y = Tokenizer.from_file(a), Tokenizer.from_file(b)
    return x.ranks == y.ranks and x.special_tokens == y.special_tokens


def check_plan(ctx: Context, redo: set[str], only: str | None) -> None:
    """Refuse, before anything changes, a run that would mix a user's artefact with outputs made without it,
    leave --only without its inputs, or train on a corpus the recipe says the user must give."""
    out = ctx.out
    for stage, artefact in ctx.artefacts.items():
        target = out / DIRECTORY[stage]
        if stage in redo or not done(ctx, stage) or in_place(ctx, stage, artefact):
            continue
        holds = f"a copy of {provided(target)}" if provided(target) else "one the run made"
        if stage == "tokenizer":
            raise ValueError(
                f"{artefact.key}={artefact.source} brings a tokenizer other than the one in {target} ({holds}); add "
                "--from tokenizer to rebuild the run on it, or choose a new --out."
            )
        raise ValueError(
            f"{target} already holds {holds}; add --from {stage} to replace it with {artefact.key}={artefact.source} "
            "(the stages after it run again), or choose a new --out."
        )
    if only:
        for stage, artefact in ctx.artefacts.items():
            if stage != only and not in_place(ctx, stage, artefact):
                raise ValueError(
                    f"{artefact.key}= feeds the {stage} stage, which --only {only} does not run; use --from {stage}, "
                    f"or drop {artefact.key}=."
                )
        needs = () if only in ctx.artefacts else BY_NAME[only].needs
        missing = [n for n in needs if not done(ctx, n)]
        if missing:
            raise ValueError(
                f"--only {only} reads the outputs of {', '.join(missing)}, which {out} does not have yet; run "
                "`qianwen run` without --only first."
            )
    settings = ctx.settings
    will_run = {n for n in NAMES if (n in redo or not done(ctx, n)) and (not only or n == only)}
    reads_corpus = [s for s in ("tokenizer", "data") if s in will_run and s not in ctx.artefacts]
    if settings.run.require_data and not settings.data_inputs and reads_corpus:
        raise ValueError(
            "this recipe trains on your own corpus (run.require_data = true) but data.inputs is empty; set it to "
            "your files or directories, e.g. 'data.inputs=[\"corpus/\"]'."
        )
    paths = settings.data_inputs if reads_corpus else []
    paths = paths + (settings.tokenizer.inputs if "tokenizer" in reads_corpus else [])
    for item in paths:
        if not Path(item).expanduser().exists():
            raise ValueError(f"the recipe's inputs name {item}, which does not exist; fix the path or the override.")
    policy = policy_vocabulary(ctx, redo) if "rm" in ctx.artefacts else None
    if policy is not None and not same_vocabulary(policy, ctx.artefacts["rm"].source):
        raise ValueError(
            f"rm={ctx.artefacts['rm'].source} reads another vocabulary than the policy ({policy}); PPO scores the "
            "policy's tokens with it, so the two must share one."
        )


def in_place(ctx: Context, stage: str, artefact: Artefact) -> bool:
    """Whether the stage's directory already holds this artefact (a tokenizer: the same vocabulary)."""
    target = ctx.out / DIRECTORY[stage]
    if stage == "tokenizer":
        return done(ctx, "tokenizer") and same_vocabulary(target, artefact.source)
    return provided(target) == str(artefact.source)


def policy_vocabulary(ctx: Context, redo: set[str]) -> Path | None:
    """Where the policy PPO trains will take its tokenizer from, when that is known before the run starts."""
    for stage in ("sft", "pretrain", "tokenizer"):
        if stage in ctx.artefacts:
            return ctx.artefacts[stage].source
        if stage not in redo and done(ctx, stage):
            return ctx.out / DIRECTORY[stage]
    return None


def provided(directory: Path) -> str | None:
    """The source a directory was copied from, if it holds a user's artefact."""
    marker = directory / PROVIDED
    return json.loads(marker.read_text())["source"] if marker.is_file() else None


def remove(out: Path, relative: str) -> None:
    """Delete one output of the run: renamed aside first (an interrupted delete leaves nothing that looks
    finished), and a link is unlinked, never followed out of the run directory."""
    path = out / relative
    for leftover in (path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        trash = out / f".trash-{path.name}-{os.getpid()}"
        path.rename(trash)
        shutil.rmtree(trash)


def read_ledger(out: Path) -> dict:
    path = out / LEDGER
    ledger = json.loads(path.read_text()) if path.is_file() else {}
    ledger.setdefault("stages", {})
    return ledger


def _stage_of(directory: Path) -> str | None:
    meta = directory / "qianwen.json"
    return json.loads(meta.read_text()).get("stage") if meta.is_file() else None


def _has_tasks(summary: Path, wanted: list[str]) -> bool:
    return summary.is_file() and set(wanted) <= set(json.loads(summary.read_text()).get("tasks", {}))


def done(ctx: Context, name: str) -> bool:
    """Whether the stage's outputs are complete (each is written last, or renamed into place whole)."""
    out = ctx.out
    if name == "tokenizer":
        return (out / "tokenizer" / "bpe.json").is_file() or provided(out / "tokenizer") is not None
    if name == "data":
        return (out / "data" / "index.json").is_file() and (out / "data" / "stats.json").is_file()
    if name in ("pretrain", "sft", "rm"):
        directory = out / DIRECTORY[name]
        return _stage_of(directory) == name or provided(directory) is not None
    if name == "tasks":
        return (out / "tasks" / "manifest.json").is_file()
    if name == "ppo":
        return _stage_of(out / "ppo") == "ppo"
    if name == "eval":
        scored = all(_has_tasks(out / "eval" / f"{m}.json", eval_tasks(ctx.settings.eval, m)) for m in EVALUATED)
        return scored and ((out / REWARD_SCORES).is_file() or _reply_samples(out) is None)
    if name == "sample":
        return (out / SAMPLES).is_file()
    return False  # the report card is rendered on every run: it only reads files


# ---------------------------------------------------------------------------
# The stages' work


def _indent(log: Log) -> Log:
    return lambda *a, **k: log("     ", *a, **k)


def copy_artefact(ctx: Context, stage: str) -> None:
    """The stage's directory becomes a copy of the user's model directory (its top-level files), marked as
    such; what an interrupted training of the stage left (checkpoints, metrics) goes first."""
    from qianwen.train.loop import write_model_dir

    artefact = ctx.artefacts[stage]
    for relative in BY_NAME[stage].outputs:
        remove(ctx.out, relative)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for path in sorted(artefact.source.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
        marker = {"key": artefact.key, "source": str(artefact.source), "copied": datetime.now().isoformat()}
        atomic_write(tmp / PROVIDED, json.dumps(marker, indent=2) + "\n")

    write_model_dir(ctx.out / DIRECTORY[stage], write)


def tokenizer_stage(ctx: Context) -> None:
    from qianwen.bpe import train
    from qianwen.tokenizer import Tokenizer
    from qianwen.train.loop import write_model_dir

    directory = ctx.out / "tokenizer"
    artefact = ctx.artefacts.get("tokenizer")
    if artefact is None:
        s = ctx.settings.tokenizer
        inputs = s.inputs or ctx.settings.corpus(ctx.out)
        train(inputs, s.vocab_size, directory, max_bytes=s.max_bytes or None, force=True, log=_indent(ctx.log))
        return
    tok = Tokenizer.from_file(artefact.source)

    def write(tmp: Path) -> None:
        tok.save(tmp)
        marker = {"key": artefact.key, "source": str(artefact.source), "copied": datetime.now().isoformat()}
        atomic_write(tmp / PROVIDED, json.dumps(marker, indent=2) + "\n")

    write_model_dir(directory, write)


def data_stage(ctx: Context) -> None:
    from qianwen.data.prep import prep, summary

    directory = ctx.out / "data"
    begin = time.perf_counter()
    stats = prep(ctx.settings.corpus(ctx.out), ctx.out / "tokenizer", directory, ctx.settings.prep)
    for line in summary(stats, directory, time.perf_counter() - begin).splitlines():
        ctx.log(f"      {line}")


def pretrain_stage(ctx: Context) -> None:
    from qianwen.train.pretrain import pretrain

    if "pretrain" in ctx.artefacts:
        copy_artefact(ctx, "pretrain")
        return
    resume = (ctx.out / "checkpoints" / "pretrain" / "latest").is_file()
    if resume:
        ctx.log("      resuming from the newest checkpoint")
    pretrain(ctx.settings.pretrain, dict(ctx.settings.model), resume=resume)


def tasks_stage(ctx: Context) -> None:
    from qianwen.data.synthetic import make_all

    make_all(ctx.out / "tasks", **asdict(ctx.settings.tasks))


def sft_stage(ctx: Context) -> None:
    from qianwen.train.sft import sft

    if "sft" in ctx.artefacts:
        copy_artefact(ctx, "sft")
        return
    sft(ctx.settings.sft, resume=(ctx.out / "checkpoints" / "sft" / "latest").is_file())


def rm_stage(ctx: Context) -> None:
    from qianwen.train.reward import reward_model

    if "rm" in ctx.artefacts:
        copy_artefact(ctx, "rm")
        return
    resume = any((ctx.out / "checkpoints" / s / "latest").is_file() for s in ("rm-pmp", "rm"))
    reward_model(ctx.settings.rm, resume=resume)


def ppo_stage(ctx: Context) -> None:
    from qianwen.train.ppo import ppo

    if not same_vocabulary(ctx.out / "sft", ctx.out / "rm"):
        raise RunError(
            f"{ctx.out / 'rm'} reads another vocabulary than the policy {ctx.out / 'sft'}; PPO scores the policy's "
            "tokens with the reward model, so redo the reward model from this policy (--from rm)."
        )
    ppo(ctx.settings.ppo, resume=(ctx.out / "checkpoints" / "ppo" / "latest").is_file())


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eval_stage(ctx: Context) -> None:
    """Each model of the run scored by the harness; a model whose summary lacks a wanted task is scored again.
    The chat tasks have their own sample limit (an agent run is several generations and a sandbox), longctx none."""
    from qianwen.eval import harness, tasks

    settings, out = ctx.settings.eval, ctx.out
    extra = eval_options(settings, out)
    chat = set(tasks.resolve(settings.chat_tasks)) if settings.chat_tasks.strip() else set()
    for stage in EVALUATED:
        wanted = eval_tasks(settings, stage)
        target = out / "eval" / f"{stage}.json"
        if _has_tasks(target, wanted):
            continue
        modules = {name: tasks.load(name) for name in wanted}
        mine = {k: v for k, v in extra.items() if _reads(modules, k)}
        if stage == "base" and "arith" in modules and settings.base_shots:
            # A base model answers in its pretraining format, from solved examples: the report's few-shot protocol.
            mine = {**mine, "arith.shots": settings.base_shots}
        ctx.log(f"      scoring {stage}/ on {', '.join(wanted)}")
        model, tok = qianwen.load(out / stage, device=_device(settings.device))
        meta = {"model": str(out / stage), "limit": settings.limit, "options": mine}
        limits = {n: _limit(settings, n, chat) for n in wanted}
        finished: list = []
        for limit in dict.fromkeys(limits.values()):
            subset = {n: m for n, m in modules.items() if limits[n] == limit}
            options = harness.TaskOptions(out / "tasks", limit, settings.batch_size, ctx.settings.pretrain.seed)
            # Each write holds the groups scored before this one too, so the summary is never partial.
            write = lambda d, t=target, f=list(finished), m=meta: harness.write_outputs(t, f + d, m)
            finished += harness.run_tasks(model, tok, subset, options, mine, write)
    if not (out / REWARD_SCORES).is_file() and (samples := _reply_samples(out)):
        from qianwen.train.reward import compare_replies

        ctx.log("      scoring sft/ and ppo/ replies with rm/")
        scores = compare_replies(out / "rm", samples, device=str(_device(settings.device)))
        atomic_write(out / REWARD_SCORES, json.dumps(scores, indent=2))


def _reply_samples(out: Path) -> dict[str, dict[str, Path]] | None:
    """sft/'s and ppo/'s per-sample logs of the tasks that answer prompts with a reply (arith, instruct), for
    the reward model to compare; None when the run has no reward model or no such logs."""
    if _stage_of(out / "rm") != "rm":
        return None
    found: dict[str, dict[str, Path]] = {"sft": {}, "ppo": {}}
    for model, tasks in found.items():
        for path in sorted((out / "eval").glob(f"{model}.*.jsonl")):
            with open(path, encoding="utf-8") as f:
                head = json.loads(f.readline() or "{}")
            if {"prompt", "reply"} <= head.keys():
                tasks[path.name.split(".")[1]] = path
    return found if found["sft"].keys() & found["ppo"].keys() else None


def _limit(settings, task: str, chat: set[str]) -> int | None:
    if task == "longctx":
        # The table scores the same span of text at every length (eval.longctx.tokens); a sample limit would
        # cut the short lengths' windows and compare unlike spans.
        return None
    return settings.chat_limit or settings.limit if task in chat else settings.limit


def _reads(modules: dict, key: str) -> bool:
    """Whether one of these tasks takes option `key` (bare, or task.key), so each model gets only its own."""
    task, dot, bare = key.rpartition(".")
    if dot:
        return task in modules
    return any(not hasattr(m, "OPTIONS") or bare in m.OPTIONS for m in modules.values())


def first_held_out(path: Path) -> dict | None:
    """The first English record of a held-out task file of the run, if there is one."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return next((r for r in map(json.loads, f) if r.get("lang") == "en"), None)


def sample_stage(ctx: Context) -> None:
    """The pretrained model completes a held-out tool question in its pretraining text's form when it read the
    tasks' text (else a line of code); the final chat model answers a held-out word problem."""
    out, device = ctx.out, _device(ctx.settings.eval.device)
    tool = first_held_out(out / "tasks" / "tool_eval.jsonl") if ctx.settings.tasks.corpus else None
    prompt, stop = (f"Question: {tool['data']['question']}\nAnswer:", "\n\n") if tool else (SAMPLE_PROMPT, None)
    model, tok = qianwen.load(out / "base", device=device)
    tokens = SAMPLE_TOKENS * 2 if tool else SAMPLE_TOKENS  # a whole ReAct transcript
    completion = qianwen.generate(model, tok, tok.encode(prompt), tokens, stop_ids=[tok.eod_id], stop=stop)
    samples = {"base": {"prompt": prompt, "completion": completion.text}}
    if tool:
        samples["base"]["answer"] = tool["answer"]
    ctx.log("      base/ completes " + repr(prompt) + ":")
    for line in (prompt + completion.text).splitlines()[:8]:
        ctx.log("        " + line)
    chat = next((d for d in ("ppo", "sft") if done(ctx, d)), None)
    if chat is not None:
        arith = first_held_out(out / "tasks" / "arith_eval.jsonl")
        question = arith["prompt"] if arith else CHAT_PROMPT
        model, tok = qianwen.load(out / chat, device=device)
        reply = qianwen.generate(model, tok, tok.render_chat([{"role": "user", "content": question}]), 64)
        ctx.log(f"      {chat}/ answers {question!r}: {reply.text!r}")
        samples["chat"] = {"model": chat, "prompt": question, "reply": reply.text}
        if arith:
            samples["chat"]["answer"] = arith["answer"]
    atomic_write(out / SAMPLES, json.dumps(samples, indent=2, ensure_ascii=False) + "\n")


def report_stage(ctx: Context) -> None:
    from qianwen import report

    report.write(ctx.out)


WORK: dict[str, Callable[[Context], None]] = {
    "tokenizer": tokenizer_stage,
    "data": data_stage,
    "pretrain": pretrain_stage,
    "tasks": tasks_stage,
    "sft": sft_stage,
    "rm": rm_stage,
    "ppo": ppo_stage,
    "eval": eval_stage,
    "sample": sample_stage,
    "report": report_stage,
}
