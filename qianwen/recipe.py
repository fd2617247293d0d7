"""The recipe of `qianwen run`: a TOML file of one section per stage, read into checked settings.

Every section is built into its dataclass (the training stages' own configs, and the ones below for the stages
that live in the run) before the first stage starts, so a misspelt key or a wrong type fails in a second, naming
the valid keys. docs/RECIPES.md documents every key of every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

RECIPES = Path(__file__).parent / "recipes"
EVALUATED = ("base", "sft", "ppo")  # the models of a run that the eval stage scores


@dataclass
class RunSettings:
    tokenizer: str = ""
    base: str = ""
    sft: str = ""
    rm: str = ""
    require_data: bool = False


@dataclass
class TokenizerSettings:
    vocab_size: int = 8192
    max_bytes: int = 0
    inputs: list[str] = field(default_factory=list)


@dataclass
class TaskSettings:
    seed: int = 0
    sft: int = 2000
    pairs: int = 1000
    pmp: int = 4000
    ppo: int = 1000
    eval_size: int = 200
    flip: float = 0.1
    corpus: int = 0  # examples also written as pretraining text, read beside the [data] inputs
    facts: int = 0  # practice sheets of arithmetic facts, also pretraining text
    max_number: int = 0  # every number of an arithmetic problem at most this (0 = no cap)
    tool_digits: int = 5  # digits of the tool problems' first factor


@dataclass
class LongContextSettings:
    enabled: bool = True
    lengths: str = "0.5,1,2,4,8"
    tokens: int = 0
    schedule: str = ""


@dataclass
class EvalSettings:
    tasks: str = "arith,instruct"
    chat_tasks: str = "tool"
    limit: int = 100
    chat_limit: int = 0
    batch_size: int = 16
    max_new_tokens: int = 64
    base_shots: int = 3  # solved problems before each arith question for base/ (0: ChatML, as the chat models)
    device: str = "auto"
    options: dict = field(default_factory=dict)
    longctx: LongContextSettings = field(default_factory=LongContextSettings)


@dataclass
class Settings:
    run: RunSettings
    tokenizer: TokenizerSettings
    data_inputs: list[str]
    prep: object  # qianwen.data.config.PrepConfig
    model: dict
    pretrain: object  # qianwen.train.pretrain.PretrainConfig
    tasks: TaskSettings
    sft: object
    rm: object
    ppo: object
    eval: EvalSettings

    def corpus(self, out: Path) -> list[str]:
        """What the tokenizer and data prep read: the synthetic tasks' pretraining text when tasks.corpus or
        tasks.facts > 0, then data.inputs (the standard library when none). The tasks come first so that a byte
        cap (data.read.max_bytes) trims the general text, not them."""
        if not (self.tasks.corpus or self.tasks.facts):
            return self.data_inputs
        from qianwen.util import STDLIB

        return [str(out / "tasks" / "corpus"), *(self.data_inputs or [STDLIB])]


def recipe_path(name: str) -> Path:
    """A recipe by name (tiny) or path (my.toml)."""
    path = Path(name)
    if path.suffix != ".toml":
        path = RECIPES / f"{name}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES.glob("*.toml"))
            raise ValueError(f"unknown recipe {name!r}; use one of {known} or a path to a .toml file.")
    return path


def check_sections(sections: dict, out: Path, seed: int) -> Settings:
    """Every stage's settings built and checked before the first stage starts, so a typo fails in a second."""
    from qianwen.config import build, preset
    from qianwen.data.config import PrepConfig

    known = [f.name for f in fields(RunSettings)]
    unknown = sorted(set(sections.get("run", {})) - set(known))
    if unknown:
        raise ValueError(
            f"unknown run key(s) {unknown}; the bare keys are {', '.join(known)}, and a stage's keys take its "
            "section, e.g. pretrain.steps=10."
        )
    data = dict(sections.get("data", {}))
    inputs = data.pop("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise ValueError(
            f"data.inputs must be a list of paths, got {inputs!r}; write e.g. 'data.inputs=[\"corpus/\"]'."
        )
    prep = build(PrepConfig, data, "data")
    prep.check()
    model = dict(sections.get("model", {}))
    preset(model.get("preset", "tiny-10m"), **{k: v for k, v in model.items() if k != "preset"})
    settings = Settings(
        run=build(RunSettings, sections.get("run", {}), "run"),
        tokenizer=build(TokenizerSettings, sections.get("tokenizer", {}), "tokenizer"),
        data_inputs=inputs,
        prep=prep,
        model=model,
        pretrain=pretrain_config(sections, out, seed),
        tasks=build(TaskSettings, sections.get("tasks", {}), "tasks"),
        sft=alignment_config("sft", sections, out, seed),
        rm=alignment_config("rm", sections, out, seed),
        ppo=alignment_config("ppo", sections, out, seed),
        eval=build(EvalSettings, sections.get("eval", {}), "eval"),
    )
    if settings.tokenizer.max_bytes < 0:
        raise ValueError("tokenizer.max_bytes cannot be negative; give 0 to read every input byte.")
    check_eval(settings.eval, out)
    return settings


def pretrain_config(sections: dict, out: Path, seed: int):
    from qianwen.config import build
    from qianwen.train.pretrain import PretrainConfig

    section = {**sections.get("pretrain", {}), "data": str(out / "data"), "out": str(out)}
    section.setdefault("seed", seed)
    return build(PretrainConfig, section, "pretrain")


def alignment_config(name: str, sections: dict, out: Path, seed: int):
    """The stage's settings with the run's paths filled in. The models come from the run directory; the data
    defaults to the synthetic tasks (and PPO-ptx's to data/), and a recipe may name its own files instead."""
    from qianwen.config import build

    tasks = out / "tasks"
    models = {
        "sft": {"model": out / "base", "out": out},
        "rm": {"model": out / "sft", "out": out},
        "ppo": {"policy": out / "sft", "reward_model": out / "rm", "out": out},
    }[name]
    data = {
        "sft": {"data": tasks / "sft.jsonl"},
        "rm": {"data": tasks / "rm.jsonl", "pmp_data": tasks / "pmp.jsonl", "eval_data": tasks / "rm_eval.jsonl"},
        "ppo": {"prompts": tasks / "ppo.jsonl"},
    }[name]
    if "data" in sections.get(name, {}):
        data.pop("eval_data", None)  # the synthetic held-out pairs score the synthetic training pairs only
    section = {"seed": seed, **{k: str(v) for k, v in data.items()}, **sections.get(name, {})}
    section.update({k: str(v) for k, v in models.items()})
    if name == "ppo" and section.get("ptx_coef") and not section.get("ptx_data"):
        section["ptx_data"] = str(out / "data")  # PPO-ptx mixes in the run's own pretraining data
    if name == "sft":
        from qianwen.train.sft import SFTConfig as cls
    elif name == "rm":
        from qianwen.train.reward import RMConfig as cls
    else:
        from qianwen.train.ppo import PPOConfig as cls
    return build(cls, section, name)


def eval_tasks(settings: EvalSettings, model: str) -> list[str]:
    """The tasks one model of the run is scored on: `tasks` for all, `chat_tasks` for the chat models (they
    follow ChatML and ReAct), the long-context table for base/."""
    from qianwen.eval import tasks

    names = tasks.resolve(settings.tasks) if settings.tasks.strip() else []
    if model != "base" and settings.chat_tasks.strip():
        names += tasks.resolve(settings.chat_tasks)
    if model == "base" and settings.longctx.enabled:
        names.append("longctx")
    return list(dict.fromkeys(names))


def eval_options(settings: EvalSettings, out: Path) -> dict[str, str]:
    """KEY=VALUE options for the harness: `[eval.options]` (nested tables become task.key) and the long-context
    settings, as the command line would give them."""

    def flat(table: dict, prefix: str = "") -> dict[str, str]:
        items = {}
        for key, value in table.items():
            if isinstance(value, dict):
                items |= flat(value, f"{prefix}{key}.")
            else:
                items[f"{prefix}{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return items

    extra = {"max_new_tokens": str(settings.max_new_tokens), **flat(settings.options)}
    if settings.longctx.enabled:
        extra |= {"longctx.data": str(out / "data"), "longctx.lengths": settings.longctx.lengths}
        if settings.longctx.tokens:
            extra["longctx.tokens"] = str(settings.longctx.tokens)
        if settings.longctx.schedule:
            extra["longctx.schedule"] = settings.longctx.schedule
    return extra


def check_eval(settings: EvalSettings, out: Path) -> None:
    from qianwen.eval import harness, tasks

    for name in ("limit", "batch_size", "max_new_tokens"):
        if getattr(settings, name) < 1:
            raise ValueError(f"eval.{name} must be at least 1, got {getattr(settings, name)}.")
    if settings.device != "auto":
        import torch

        try:
            device = torch.device(settings.device)
        except RuntimeError:
            raise ValueError(f"eval.device={settings.device!r} is not a torch device; use auto, cpu or cuda.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"eval.device={settings.device} asks for a GPU but torch sees none; use auto or cpu.")
    if settings.chat_limit < 0:
        raise ValueError(f"eval.chat_limit must be 0 (= eval.limit) or more, got {settings.chat_limit}.")
    names = list(dict.fromkeys(n for model in EVALUATED for n in eval_tasks(settings, model)))
    modules = {name: tasks.load(name) for name in names}
    # Options of a known task the recipe does not run now (eval.chat_tasks="" on a recipe that sets tool's) wait
    # unused; a key for no task at all is still a typo.
    idle = set(tasks.TASKS) - set(modules)
    extra = {k: v for k, v in eval_options(settings, out).items() if k.rpartition(".")[0] not in idle}
    harness.check_extra(modules, extra)
    try:
        multiples = [float(m) for m in settings.longctx.lengths.split(",")]
    except ValueError:
        multiples = []
    if settings.longctx.enabled and (not multiples or min(multiples) <= 0):
        raise ValueError(
            f"eval.longctx.lengths={settings.longctx.lengths!r} is not a list of positive multiples of the training "
            'length; write e.g. "0.5,1,2,4".'
        )
