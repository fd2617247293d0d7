"""`qianwen run` on a micro recipe: every artefact of the run directory exists and loads, the report card (Markdown
and self-contained HTML) names every stage and embeds its plots, a re-run skips what is finished, --only and
--from redo exactly what they say, a user's model stands in for a stage, and bad input is one `error:` line."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import qianwen
from qianwen.cli import main
from qianwen.run import NAMES, PLOTS, run
from qianwen.tokenizer import Tokenizer
from qianwen.train.reward import load_reward_model

MICRO = [
    "tokenizer.vocab_size=512",
    "tokenizer.max_bytes=300000",
    "data.read.max_bytes=300000",
    "model.preset=tiny-1m",
    "model.hidden_size=32",
    "pretrain.steps=3",
    "pretrain.seq_length=64",
    "pretrain.batch_size=2",
    "pretrain.eval_batches=1",
    "tasks.sft=24",
    "tasks.pairs=24",
    "tasks.pmp=24",
    "tasks.ppo=8",
    "tasks.eval_size=4",
    "tasks.corpus=200",
    "tasks.facts=20",
    "sft.steps=2",
    "sft.seq_length=256",
    "rm.pmp_steps=1",
    "rm.steps=1",
    "rm.seq_length=256",
    "rm.batch_size=2",
    "ppo.steps=1",
    "ppo.prompts_per_step=2",
    "ppo.max_new_tokens=4",
    "eval.limit=2",
    "eval.chat_limit=2",
    "eval.max_new_tokens=4",
    "eval.options.tool.agent_max_new_tokens=8",
    "eval.longctx.lengths=0.5,1,2",
    "eval.longctx.tokens=0",
]
# What each stage writes; a re-run of the stage must replace them and leave every other stage's alone.
OUTPUTS = {
    "tokenizer": ["tokenizer/qwen.tiktoken"],
    "data": ["data/index.json"],
    "pretrain": ["base/model.safetensors"],
    "tasks": ["tasks/manifest.json"],
    "sft": ["sft/model.safetensors"],
    "rm": ["rm/model.safetensors"],
    "ppo": ["ppo/model.safetensors"],
    "eval": ["eval/base.json", "eval/sft.json", "eval/ppo.json", "eval/reward.json"],
    "sample": ["samples.json"],
    "report": ["report.md", "report.html", *PLOTS],
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """One micro run, and what it printed."""
    out = tmp_path_factory.mktemp("micro") / "run"
    lines: list[str] = []
    run(out, overrides=MICRO, seed=1, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return out, "\n".join(lines)


@pytest.fixture
def copied(finished, tmp_path) -> Path:
    """A copy of the finished run to change."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def cli(out: Path, *args: str, then: tuple[str, ...] = ()) -> list[str]:
    """The command line: flags and artefacts, the micro overrides, then overrides of those (the last one wins)."""
    return ["run", "--out", str(out), "--seed", "1", *args, *MICRO, *then]


def stamps(out: Path) -> dict[str, int]:
    return {stage: [(out / f).stat().st_mtime_ns for f in files] for stage, files in OUTPUTS.items()}


def changed(before: dict, after: dict) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


def assert_one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err


# ---------------------------------------------------------------------------
# The run directory


def test_every_artefact_exists_and_loads(finished):
    out, printed = finished
    for i, stage in enumerate(NAMES, 1):
        assert f"[{i}/{len(NAMES)}] {stage}" in printed
    assert "bytes/token on held-out text" in printed and "unigram entropy" in printed
    assert f"chat --model {out / 'ppo'}" in printed

    tok = Tokenizer.from_file(out / "tokenizer")
    assert tok.vocab_size == 512
    assert json.loads((out / "data" / "index.json").read_text())["vocab_size"] == 512
    assert set(json.loads((out / "data" / "stats.json").read_text())["stages"]) >= {"exact_dedup", "filters"}
    for directory in ("base", "sft", "ppo"):
        model, model_tok = qianwen.load(out / directory)
        assert model.config.vocab_size == 512 and model.config.hidden_size == 32
        assert model_tok.encode("import os") == tok.encode("import os")
    reward, _, stats = load_reward_model(out / "rm")
    assert set(stats) == {"mean", "std"} and reward.score.weight.shape == (1, 32)
    assert qianwen.load(out / "rm-pmp")[0].config.hidden_size == 32
    assert json.loads((out / "tasks" / "manifest.json").read_text())["files"]["sft.jsonl"]["records"] == 24
    for stage in ("pretrain", "sft", "rm-pmp", "rm", "ppo"):
        records = [json.loads(line) for line in (out / "metrics" / f"{stage}.jsonl").read_text().splitlines()]
        assert records and all("step" in r for r in records), stage
    scored = {m: set(json.loads((out / "eval" / f"{m}.json").read_text())["tasks"]) for m in ("base", "sft", "ppo")}
    assert scored == {
        "base": {"arith", "instruct", "longctx"},
        "sft": {"arith", "instruct", "tool"},
        "ppo": {"arith", "instruct", "tool"},
    }
    compared = json.loads((out / "eval" / "reward.json").read_text())
    assert compared["models"] == ["sft", "ppo"] and set(compared["tasks"]) == {"arith", "instruct"}
    assert all(
        t["prompts"] == 2 and 0 <= sum(t["preferred"].values()) <= t["different_replies"]
        for t in compared["tasks"].values()
    )
    assert (out / "eval" / "base.longctx.longctx.png").is_file()
    windows = [json.loads(line) for line in (out / "eval" / "base.longctx.jsonl").read_text().splitlines()]
    assert len({w["targets"] for w in windows}) == 1  # every length scores the same span, whatever eval.limit
    samples = json.loads((out / "samples.json").read_text())
    assert samples["base"]["prompt"] and samples["chat"]["model"] == "ppo"
    # held-out tasks: the base model reads a tool question as its pretraining text showed them, the chat model a
    # word problem, each with its right answer beside it
    held = {
        n: [json.loads(x) for x in (out / "tasks" / f"{n}.jsonl").read_text().splitlines()]
        for n in ("tool_eval", "arith_eval")
    }
    tool, arith = (next(r for r in held[n] if r["lang"] == "en") for n in ("tool_eval", "arith_eval"))
    assert samples["base"]["prompt"] == f"Question: {tool['data']['question']}\nAnswer:"
    assert samples["base"]["answer"] == tool["answer"] and samples["chat"]["answer"] == arith["answer"]
    ledger = json.loads((out / "run.json").read_text())
    assert list(ledger["stages"]) == list(NAMES) and all(s["seconds"] >= 0 for s in ledger["stages"].values())


def test_the_report_card_names_every_stage_and_embeds_its_plots(finished):
    out, _ = finished
    report = (out / "report.md").read_text()
    for i, stage in enumerate(NAMES[:-1], 1):
        assert f"## {i}. {stage}" in report
        assert re.search(rf"\| {i}\. {stage} \| [\d.]+ s \|", report), stage  # its time in the stages table
    for words in (
        "## Environment",
        "git ",
        "torch",
        "bytes/token",
        "| exact_dedup |",
        "tokens written",
        "### Long context",
        "| instruct | ",  # the reward model on sft/'s and ppo/'s held-out replies
        "ppo preferred / sft preferred",
        "tool direct: sft ",  # the headline shows the agent beside the direct answers
        "tool agent: sft ",
        "right only for ppo/",  # problem by problem, with the sign test
        "| tool agent | ",
        "| corpus/ (sheets of arithmetic facts) | 20 |",
    ):
        assert words in report, words
    # tokens per stage, from the files the stages wrote
    assert f"| {2 * 3 * 64:,} tokens |" in report  # pretraining: 3 steps of 2 x 64
    assert "| + dynamic NTK + LogN + window |" in report
    for command in (f"chat --model {out / 'ppo'}", f"serve --model {out / 'ppo'}", f"eval --model {out / 'ppo'}"):
        assert command in report

    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert set(PLOTS) <= set(images) and "eval/base.longctx.longctx.png" in images
    html = (out / "report.html").read_text()
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:)', html)  # no CDN, nothing fetched
    for image in images:
        data = (out / image).read_bytes()
        assert data.startswith(b"\x89PNG") and imread(out / image).ndim == 3
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html, image
    for i, stage in enumerate(NAMES[:-1], 1):
        assert f"<h2>{i}. {stage}</h2>" in html


# ---------------------------------------------------------------------------
# Re-runs


def test_a_rerun_skips_every_finished_stage(copied, capsys):
    before = stamps(copied)
    assert main(cli(copied)) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == len(NAMES) - 1
    assert changed(before, stamps(copied)) == {"report"}


def test_only_redoes_one_stage_and_the_report(copied, capsys):
    before = stamps(copied)
    assert main(cli(copied, "--only", "eval")) == 0
    printed = capsys.readouterr().out
    assert "[8/10] eval" in printed and "[10/10] report" in printed and "[7/10] ppo" not in printed
    assert "note:" not in printed  # nothing reads the evaluation but the report card, made again
    assert changed(before, stamps(copied)) == {"eval", "report"}


def test_from_redoes_that_stage_and_every_later_one(copied, capsys):
    (copied / "ppo" / "stale.txt").write_text("a file of the old ppo/ that must go")
    before = stamps(copied)
    assert main(cli(copied, "--from", "ppo")) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == NAMES.index("ppo")
    assert changed(before, stamps(copied)) == {"ppo", "eval", "sample", "report"}
    assert not (copied / "ppo" / "stale.txt").exists()
    assert not list(copied.glob(".trash-*"))
    assert len((copied / "metrics" / "ppo.jsonl").read_text().splitlines()) == 1


def test_redoing_pretraining_starts_it_over(copied, capsys):
    # Resuming would find the finished checkpoint and train nothing: the redo must train from step 0.
    before = stamps(copied)
    assert main(cli(copied, "--only", "pretrain", then=("pretrain.steps=2",))) == 0
    records = [json.loads(line) for line in (copied / "metrics" / "pretrain.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert changed(before, stamps(copied)) == {"pretrain", "report"}
    assert "sft, rm, ppo, eval, sample still hold outputs made from the old pretrain; --from sft redoes them" in (
        capsys.readouterr().out
    )


# ---------------------------------------------------------------------------
# A user's artefacts


def users_model(finished, tmp_path) -> Path:
    """The micro run's base model as a user would hand it over: a plain Hugging Face directory."""
    mine = tmp_path / "my-model"
    shutil.copytree(finished[0] / "base", mine)
    (mine / "qianwen.json").unlink()
    return mine


def test_only_pretrain_with_a_users_base_copies_it(finished, copied, tmp_path, capsys):
    mine = users_model(finished, tmp_path)
    assert main(cli(copied, "--only", "pretrain", f"base={mine}")) == 0
    capsys.readouterr()
    for path in mine.iterdir():
        assert (copied / "base" / path.name).read_bytes() == path.read_bytes()
    assert json.loads((copied / "base" / "provided.json").read_text())["source"] == str(mine.resolve())
    assert not (copied / "metrics" / "pretrain.jsonl").exists()  # no training of its own to show
    report = (copied / "report.md").read_text()
    assert f"base/ is the user's model base={mine.resolve()}" in report
    assert not (copied / "pretrain.png").exists()
    # Done now: later runs skip it without being told again, and the same artefact again changes nothing.
    assert main(cli(copied)) == 0
    assert capsys.readouterr().out.count("done before, skipped") == len(NAMES) - 1
    assert main(cli(copied, f"base={mine}")) == 0


def test_a_fresh_run_on_a_users_qwen_model(tmp_path, capsys):
    """A model with Qwen's 151,851-id vocabulary stands in for a real checkpoint: tokenizer/ becomes its
    tokenizer, so data/ and the long-context table read text the way the model does."""
    from qianwen.config import ModelConfig
    from qianwen.tokenizer import qwen_vocabulary

    config = ModelConfig(vocab_size=151851, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                         seq_length=128, max_position_embeddings=1024)  # fmt: skip
    model = qianwen.Transformer(config)
    model.init_weights(0)
    qwen = Tokenizer.from_file(qwen_vocabulary())
    qianwen.save(model, qwen, tmp_path / "qwen-toy")
    out = tmp_path / "run"
    light = ("sft.batch_size=2", "eval.chat_tasks=", "eval.longctx.lengths=0.5,1")
    assert main(cli(out, f"base={tmp_path / 'qwen-toy'}", then=light)) == 0
    printed = capsys.readouterr().out
    assert "[4/10] pretrain" in printed and "pretrain: wrote" not in printed
    assert Tokenizer.from_file(out / "tokenizer").ranks == qwen.ranks
    assert json.loads((out / "data" / "index.json").read_text())["vocab_size"] == 151851
    assert qianwen.load(out / "ppo")[0].config.vocab_size == 151851
    assert "longctx" in json.loads((out / "eval" / "base.json").read_text())["tasks"]
    assert "from the user's base=" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------
# User errors: one sentence, exit status 2, nothing changed


def _bad_stage(out, tmp_path):
    return cli(out, "--from", "pretrian"), "'pretrian' is not a stage; the stages are tasks, tokenizer, data, pretrain"


def _both_flags(out, tmp_path):
    return cli(out, "--from", "sft", "--only", "rm"), "not allowed with"


def _missing_base(out, tmp_path):
    return cli(out, "--from", "pretrain", f"base={tmp_path / 'nowhere'}"), "does not exist; give a Hugging Face"


def _not_a_model(out, tmp_path):
    (tmp_path / "notes").mkdir()
    return cli(
        out, "--from", "pretrain", f"base={tmp_path / 'notes'}"
    ), "is not a model directory (it has no config.json)"


def _lm_as_reward_model(out, tmp_path):
    return cli(out, "--from", "rm", f"rm={out / 'sft'}"), "is a language model, not a reward model"


def _replace_without_from(out, tmp_path):
    return cli(out, f"sft={out / 'ppo'}"), "already holds one the run made; add --from sft"


def _other_vocabulary(out, tmp_path):
    return cli(out, "--from", "pretrain", "tokenizer=qwen"), "brings a tokenizer other than the one in"


def _only_without_inputs(out, tmp_path):
    return cli(tmp_path / "empty", "--only", "sft"), "--only sft reads the outputs of pretrain, tasks"


def _unknown_run_key(out, tmp_path):
    return cli(out, "bsae=x"), "unknown run key(s) ['bsae']; the bare keys are tokenizer, base, sft, rm"


def _misspelt_section_key(out, tmp_path):
    return cli(out, "pretrain.stepz=3"), "unknown config key pretrain.stepz; valid keys in [pretrain]"


def _out_is_a_file(out, tmp_path):
    return cli(out / "run.json"), "is a file; give a directory for the run"


ERRORS = [
    _bad_stage,
    _out_is_a_file,
    _both_flags,
    _missing_base,
    _not_a_model,
    _lm_as_reward_model,
    _replace_without_from,
    _other_vocabulary,
    _only_without_inputs,
    _unknown_run_key,
    _misspelt_section_key,
]


@pytest.mark.parametrize("case", ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_user_errors_are_one_sentence_and_change_nothing(case, copied, tmp_path, capsys):
    args, words = case(copied, tmp_path)
    before = stamps(copied)
    assert main(args) == 2
    printed, err = capsys.readouterr()
    assert_one_error_line(err)
    assert words in err and printed == "", err
    assert stamps(copied) == before
    assert not (tmp_path / "empty").exists()


def test_a_recipe_needing_data_says_so_before_starting(tmp_path, capsys):
    assert main(["run", "--recipe", "small", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "data.inputs is empty" in err and not (tmp_path / "x").exists()
    assert main(["run", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'; use one of ['qwen-1.8b', 'small', 'tiny']" in capsys.readouterr().err


def test_tokens_of_the_validation_split_are_those_the_tokenizer_wrote(finished):
    # The report measures compression by decoding data/'s validation split; it must be the tokenizer's own ids.
    out, _ = finished
    index = json.loads((out / "data" / "index.json").read_text())
    shard = np.fromfile(out / "data" / index["splits"]["val"][0]["file"], dtype="<u4")
    assert shard.max() < 512


# ---------------------------------------------------------------------------
# Recipes and their documentation

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((ROOT / "qianwen" / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_builds_every_section(path, tmp_path):
    from qianwen.config import apply_overrides, load_recipe, preset
    from qianwen.recipe import check_sections

    recipe = load_recipe(path)
    sections = apply_overrides(recipe, ['data.inputs=["corpus/"]'], default_section="run")
    settings = check_sections(sections, tmp_path / "run", 0)
    model = dict(settings.model)
    config = preset(model.pop("preset", "tiny-10m"), **{"vocab_size": settings.tokenizer.vocab_size, **model})
    assert config.seq_length == settings.pretrain.seq_length or not settings.pretrain.seq_length
    assert settings.sft.model == str(tmp_path / "run" / "base") and settings.ppo.reward_model.endswith("rm")
    assert "docs/RECIPES.md" in path.read_text()
    if path.stem == "small":
        assert 100e6 <= config.num_params <= 500e6
    if path.stem == "qwen-1.8b":  # QWEN_SPEC.md sections 1, 5 and 6
        config = preset(recipe["model"]["preset"], vocab_size=151936)
        assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size) == (
            2048,
            24,
            16,
            5504,
        )
        assert settings.run.tokenizer == "qwen" and settings.pretrain.seq_length == 2048
        p = settings.pretrain
        assert (p.lr, p.min_lr_ratio, p.beta1, p.beta2, p.eps, p.dtype) == (3e-4, 0.1, 0.9, 0.95, 1e-8, "bf16")
        assert 3.9e6 < p.batch_size * p.grad_accum * 64 * p.seq_length < 4.3e6  # ~4M tokens on 64 GPUs
        assert 2.1e12 < p.steps * 2048 * 2048 < 2.3e12  # 2.2T tokens
        s = settings.sft
        assert (s.batch_size * s.grad_accum * 8, s.steps, s.warmup_steps, s.lr, s.dropout) == (
            128,
            4000,
            1430,
            2e-6,
            0.1,
        )
        assert (settings.rm.lr, settings.rm.batch_size * 8) == (3e-6, 64)
        o = settings.ppo
        assert (o.kl_coef, o.lr, o.value_lr, o.value_warmup_steps, o.value_clip, o.top_p, o.samples_per_prompt) == (
            0.04, 1e-6, 5e-6, 50, 0.15, 0.9, 2
        )  # fmt: skip
        assert o.ptx_data == str(tmp_path / "run" / "data")


def test_the_recipe_reference_documents_every_key_and_no_other():
    import dataclasses
    import typing
    from collections import defaultdict

    from qianwen.config import SECTIONS, ModelConfig
    from qianwen.data.config import PrepConfig
    from qianwen.recipe import EvalSettings, RunSettings, TaskSettings, TokenizerSettings
    from qianwen.train.ppo import PPOConfig
    from qianwen.train.pretrain import PretrainConfig
    from qianwen.train.reward import RMConfig
    from qianwen.train.sft import SFTConfig

    def keys_of(cls, prefix: str = "") -> set[str]:
        hints, found = typing.get_type_hints(cls), set()
        for f in dataclasses.fields(cls):
            nested = dataclasses.is_dataclass(hints[f.name])
            found |= keys_of(hints[f.name], f"{prefix}{f.name}.") if nested else {prefix + f.name}
        return found

    expected = {
        "run": keys_of(RunSettings),
        "model": {"preset"} | keys_of(ModelConfig),
        "tokenizer": keys_of(TokenizerSettings),
        "data": {"inputs"} | keys_of(PrepConfig),
        "pretrain": keys_of(PretrainConfig),
        "tasks": keys_of(TaskSettings),
        "sft": keys_of(SFTConfig),
        "rm": keys_of(RMConfig),
        "ppo": keys_of(PPOConfig),
        "eval": keys_of(EvalSettings),
    }
    # Rows of a table under "## [a], [b]" are keys of those sections; under "### [eval.longctx]" keys of eval
    # prefixed longctx.; under a heading naming `filters.text.KEY`, keys with that prefix in the section above.
    documented: dict[str, set[str]] = defaultdict(set)
    targets: list[tuple[str, str]] = []
    section = None
    for line in (ROOT / "docs" / "RECIPES.md").read_text().splitlines():
        if line.startswith("#"):
            tables, patterns = re.findall(r"\[([a-z_.]+)\]", line), re.findall(r"`([a-z_.]+)KEY`", line)
            if patterns:
                targets = [(section, p) for p in patterns]
            else:
                targets = [(t.partition(".")[0], t.partition(".")[2] + "." if "." in t else "") for t in tables]
                section = tables[0] if tables and line.startswith("## ") else section
        elif line.startswith("| `"):
            key = re.match(r"\| `([^`]+)`", line).group(1)
            for where, prefix in targets:
                documented[where].add(prefix + key)
    assert set(documented) == set(expected) == set(SECTIONS)
    for name in expected:
        assert documented[name] == expected[name], name
