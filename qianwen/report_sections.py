"""The report card's sections, one per stage, read from the files the stage wrote: a one-line summary (which
`qianwen run` also prints), how much the stage processed, and the tables, plots and text of its part of the card.
A stage whose files are missing has no section (None), and the card says it has not run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import qianwen
from qianwen.recipe import EVALUATED
from qianwen.report_plots import records as metrics
from qianwen.report_render import Block, Code, Heading, Image, Paragraph, Table

COMPRESSION_TOKENS = 1 << 18  # of the validation split, decoded to measure bytes per token


@dataclass
class Section:
    summary: str  # one line, also printed by `qianwen run` after the stage
    processed: str = "—"  # how much the stage read or trained on
    blocks: list[Block] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Small readers and formats


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _provided(directory: Path) -> str | None:
    marker = read_json(directory / "provided.json")
    return f"{marker['key']}={marker['source']}" if marker else None


def duration(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def _number(metric: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if metric in ("acc", "worked_acc", "exact_match") or "accuracy" in metric or metric.startswith("pass@"):
        return f"{value:.1%}"
    return f"{value:.4g}"


def _world(out: Path, stage: str) -> int:
    """Processes that trained the stage (1 unless its checkpoint says otherwise)."""
    pointer = out / "checkpoints" / stage / "latest"
    if pointer.is_file():
        trainer = read_json(out / "checkpoints" / stage / pointer.read_text().strip() / "trainer.json")
        if trainer:
            return int(trainer.get("world_size", 1))
    return 1


def _copied(directory: Path, what: str) -> Section:
    from qianwen.checkpoint import read_config

    config = read_config(directory)[1]
    source = _provided(directory)
    rows = [
        ["parameters", f"{config.num_params:,}"],
        ["layers x hidden", f"{config.num_layers} x {config.hidden_size}"],
        ["heads (key/value)", f"{config.num_heads} ({config.num_kv_heads})"],
        ["vocabulary", f"{config.vocab_size:,}"],
        ["training length", f"{config.seq_length:,}"],
    ]
    summary = f"{what} is the user's model {source} ({config.num_params / 1e6:,.1f}M parameters), copied"
    return Section(
        summary, "— (copied)", [Paragraph(f"`{directory.name}/` is a copy of `{source}`."), Table(["", ""], rows)]
    )


# ---------------------------------------------------------------------------
# One section per stage


def _val_tokens(data: Path, limit: int) -> np.ndarray | None:
    index = read_json(data / "index.json")
    if not index:
        return None
    pieces, total = [], 0
    for entry in index.get("splits", {}).get("val", []):
        path = data / entry["file"]
        if total >= limit or not path.is_file() or not entry["tokens"]:
            continue
        shard = np.memmap(path, dtype="<u4", mode="r")[: limit - total]
        pieces.append(np.asarray(shard, dtype=np.int64))
        total += len(pieces[-1])
    return np.concatenate(pieces) if pieces else None


def _compression(out: Path) -> list[str] | None:
    """Bytes per token of the run's tokenizer and of Qwen's on (the start of) the validation split of data/."""
    from qianwen.tokenizer import Tokenizer, qwen_vocabulary

    tokens = _val_tokens(out / "data", COMPRESSION_TOKENS)
    if tokens is None:
        return None
    tok = Tokenizer.from_file(out / "tokenizer")
    ordinary = [int(t) for t in tokens if not tok.is_special(int(t))]
    text = tok.decode_bytes(ordinary).decode("utf-8", errors="replace")
    size = len(text.encode("utf-8"))
    qwen = len(Tokenizer.from_file(qwen_vocabulary()).encode(text))
    return [
        "the validation split of data/",
        f"{size / max(len(ordinary), 1):.3f}",
        f"{size / max(qwen, 1):.3f}",
        f"{size:,}",
    ]


def section_tokenizer(out: Path, measure: bool = True) -> Section | None:
    directory = out / "tokenizer"
    meta, source = read_json(directory / "bpe.json"), _provided(directory)
    if meta is None and source is None:
        return None
    header = ["held-out text", "this tokenizer (bytes/token)", "Qwen's 151,851 ids (bytes/token)", "bytes"]
    rows = []
    if meta:
        held = meta.get("held_out") or {}
        summary = f"{meta['vocab_size']:,} ids trained on {meta['corpus']['train_bytes'] / 1e6:.1f} MB"
        processed = f"{meta['corpus']['train_bytes'] / 1e6:,.1f} MB of text"
        if held.get("bytes_per_token"):
            summary += (
                f"; {held['bytes_per_token']:.3f} bytes/token on held-out text "
                f"(Qwen's 151,851 ids: {held['qwen_bytes_per_token']:.3f})"
            )
            rows.append(
                [
                    "blocks held out of the tokenizer's corpus",
                    f"{held['bytes_per_token']:.3f}",
                    f"{held['qwen_bytes_per_token']:.3f}",
                    f"{held['bytes']:,}",
                ]
            )
    else:
        from qianwen.tokenizer import Tokenizer

        summary = f"{Tokenizer.from_file(directory).vocab_size:,} ids from the user's {source}"
        processed = "— (copied)"
    measured = _compression(out) if measure else None
    if measured:
        rows.append(measured)
    blocks: list[Block] = [Paragraph(summary + ".")]
    if rows:
        blocks += [Paragraph("Compression (more bytes per token is better):"), Table(header, rows)]
    return Section(summary, processed, blocks)


def section_data(out: Path) -> Section | None:
    stats = read_json(out / "data" / "stats.json")
    if stats is None or not (out / "data" / "index.json").is_file():
        return None
    train, val = stats["output"]["train"], stats["output"]["val"]
    removed = {n: sum(s["removed"].values()) for n, s in stats["stages"].items() if s.get("enabled", True)}
    summary = (
        f"{stats['read']['documents']:,} documents read, {train['documents']:,} kept for training "
        f"({train['tokens']:,} tokens) and {val['documents']:,} for validation ({val['tokens']:,} tokens); removed "
        + ", ".join(f"{name} {n}" for name, n in removed.items())
    )
    rows = [
        [
            name,
            f"{s['documents_in']:,}",
            f"{s['documents_out']:,}",
            f"{s['bytes_in'] / 1e6:,.2f}",
            f"{s['bytes_out'] / 1e6:,.2f}",
            ", ".join(f"{rule} {n:,}" for rule, n in s["removed"].items()) or "none",
        ]
        if s.get("enabled", True)
        else [name, "off", "", "", "", ""]
        for name, s in stats["stages"].items()
    ]
    read = stats["read"]
    malformed = f", {read['malformed']:,} malformed record(s) skipped" if read["malformed"] else ""
    blocks: list[Block] = [
        Paragraph(
            f"Read {read['files']:,} file(s): {read['documents']:,} documents, {read['bytes'] / 1e6:,.2f} MB"
            f"{malformed}. Each filter "
            "in order (stats.json holds examples of what each removed):"
        ),
        Table(["filter", "documents in", "documents out", "MB in", "MB out", "removed"], rows),
        Table(
            ["split", "documents", "tokens", "shards"],
            [[s, f"{o['documents']:,}", f"{o['tokens']:,}", str(o["shards"])] for s, o in stats["output"].items()],
        ),
    ]
    return Section(summary, f"{train['tokens'] + val['tokens']:,} tokens written", blocks)


def section_pretrain(out: Path, plots: dict[str, str]) -> Section | None:
    base = out / "base"
    if _provided(base):
        return _copied(base, "base/")
    meta, records = read_json(base / "qianwen.json"), metrics(out, "pretrain")
    train = [r for r in records if "loss" in r]
    if meta is None or meta.get("stage") != "pretrain" or not train:
        return None
    val = [r for r in records if "val_loss" in r]
    first, last = train[0], train[-1]
    summary = f"{_steps(last['step'])}, {last['tokens']:,} tokens; train loss {first['loss']:.2f} -> {last['loss']:.2f}"
    if val:
        summary += f", validation loss {val[-1]['val_loss']:.3f} ({val[-1]['val_bpb']:.3f} bits/byte)"
    if meta.get("unigram_entropy"):
        summary += f" vs the data's unigram entropy {meta['unigram_entropy']:.3f}"
    config = qianwen.ModelConfig.from_dict(meta["model"])
    tokens = last["tokens"]  # already counts every process
    rows = [
        ["parameters", f"{config.num_params:,}"],
        ["layers x hidden, heads", f"{config.num_layers} x {config.hidden_size}, {config.num_heads}"],
        ["vocabulary, training length", f"{config.vocab_size:,}, {config.seq_length:,}"],
        ["optimizer (peak rate)", _optimizer(meta)],
        ["tokens/s (last logged step)", f"{last.get('tokens_per_s', 0):,.0f}"],
        ["MFU (last logged step)", f"{last['mfu']:.1%}" if last.get("mfu") is not None else "—"],
    ]
    blocks: list[Block] = [Paragraph(summary + "."), Table(["model", ""], rows)]
    if val:
        header = ["step", "validation loss", "bits/byte"]
        blocks.append(Table(header, [[str(r["step"]), f"{r['val_loss']:.4f}", f"{r['val_bpb']:.4f}"] for r in val]))
    if "pretrain" in plots:
        blocks.append(Image(plots["pretrain"], "pretraining: loss, learning rate, gradient norm, bits per byte"))
    return Section(summary, f"{tokens:,} tokens", blocks)


def _optimizer(meta: dict) -> str:
    config = meta.get("config", {})
    adamw = f"AdamW ({config.get('lr', 0):g})"
    if meta.get("optimizer") == "muon":
        return f"Muon for the layers' matrices ({config.get('muon_lr', 0):g}) + {adamw}"
    return adamw


def section_tasks(out: Path) -> Section | None:
    manifest = read_json(out / "tasks" / "manifest.json")
    if manifest is None:
        return None
    counts = {name: files["records"] for name, files in manifest["files"].items()}
    corpus = manifest.get("corpus", {}).get("examples", 0)
    if corpus:
        counts["corpus/ (pretraining text)"] = corpus
    facts = manifest.get("corpus", {}).get("facts", 0)
    if facts:
        counts["corpus/ (sheets of arithmetic facts)"] = facts
    summary = "synthetic tasks (arithmetic, instructions, tool use; English and Chinese): " + ", ".join(
        f"{name} {n:,}" for name, n in counts.items()
    )
    rows = [[name, f"{n:,}"] for name, n in counts.items()]
    cap = manifest.get("max_number") or 0
    sizes = (
        f"Arithmetic problems keep every number at or below {cap:,} (tasks.max_number)"
        if cap
        else "Arithmetic problems use the templates' full ranges (tasks.max_number = 0)"
    )
    sizes += f"; the tool problems' first factor has {manifest.get('tool_digits', 5)} digits (tasks.tool_digits)."
    return Section(
        summary,
        f"{sum(counts.values()):,} records",
        [Paragraph(summary + "."), Paragraph(sizes), Table(["file", "records"], rows)],
    )


def section_sft(out: Path, plots: dict[str, str]) -> Section | None:
    if _provided(out / "sft"):
        return _copied(out / "sft", "sft/")
    meta, records = read_json(out / "sft" / "qianwen.json"), metrics(out, "sft")
    train = [r for r in records if "loss" in r]
    if meta is None or meta.get("stage") != "sft" or not train:
        return None
    val = [r for r in records if "val_loss" in r]
    conversations = meta["conversations"]
    summary = (
        f"{_steps(train[-1]['step'])} on {conversations['train']:,} conversations; loss {train[0]['loss']:.2f} -> "
        f"{train[-1]['loss']:.2f}"
    )
    if val:
        summary += f", held-out loss {val[-1]['val_loss']:.3f}"
    config = meta.get("config", {})
    seen = train[-1]["step"] * config.get("batch_size", 1) * config.get("grad_accum", 1) * _world(out, "sft")
    skipped = ", ".join(f"{reason} {n}" for reason, n in conversations.get("skipped", {}).items()) or "none"
    blocks: list[Block] = [
        Paragraph(
            f"{summary}. {conversations['val']:,} conversations held out; skipped: {skipped}. Learning rate "
            f"{config.get('lr')}{' with LoRA' if config.get('lora') else ''}."
        )
    ]
    if "sft" in plots:
        blocks.append(Image(plots["sft"], "SFT loss"))
    return Section(summary, f"{seen:,} conversations", blocks)


def section_rm(out: Path, plots: dict[str, str]) -> Section | None:
    if _provided(out / "rm"):
        return _copied(out / "rm", "rm/")
    meta = read_json(out / "rm" / "qianwen.json")
    if meta is None or meta.get("stage") != "rm":
        return None
    rows, accuracy, seen, kinds, held_from = [], {}, 0, {}, ""
    for stage in ("rm-pmp", "rm"):
        stage_meta, records = read_json(out / stage / "qianwen.json"), metrics(out, stage)
        if stage_meta is None:
            continue
        val = [r for r in records if "val_accuracy" in r]
        train = [r for r in records if "loss" in r]
        accuracy[stage] = stage_meta.get("val_accuracy")
        config, pairs = stage_meta.get("config", {}), stage_meta.get("pairs", {})
        steps = train[-1]["step"] if train else 0
        seen += steps * config.get("batch_size", 1) * config.get("grad_accum", 1) * _world(out, stage)
        kinds[stage] = stage_meta.get("val_accuracy_by_rejection") or {}
        held_from = pairs.get("val_from", held_from)
        rows.append(
            [
                stage,
                f"{pairs.get('train', 0):,} / {pairs.get('val', 0):,}",
                str(steps),
                _number("accuracy", val[-1]["val_accuracy"]) if val else "—",
                f"{val[-1]['val_margin']:.3f}" if val else "—",
            ]
        )
    summary = "held-out pairwise accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items() if v is not None)
    reward = meta.get("reward") or {}
    names = sorted({n for by in kinds.values() for n in by})
    held = f" ({held_from})" if held_from else ""
    blocks: list[Block] = [
        Paragraph(
            "Preference-model pretraining on the large noisy set (rm-pmp), then the clean pairs (rm); accuracy is "
            f"the share of held-out pairs{held} where the chosen reply scores higher."
        ),
        Table(["stage", "pairs train / held out", "steps", "held-out accuracy", "mean margin"], rows),
    ]
    if names:
        blocks.append(Paragraph("Held-out accuracy by what is wrong with the rejected reply:"))
        table = [
            [stage, *(_number("accuracy", by[n]) if n in by else "—" for n in names)] for stage, by in kinds.items()
        ]
        blocks.append(Table(["stage", *(n.replace("_", " ") for n in names)], table))
    if reward:
        blocks.append(
            Paragraph(
                f"Reward on training replies: mean {reward['mean']:.3f}, std {reward['std']:.3f} (PPO normalises by them)."
            )
        )
    if "rm" in plots:
        blocks.append(Image(plots["rm"], "reward model: held-out accuracy and loss per stage"))
    return Section(summary, f"{seen:,} pairs", blocks)


def section_ppo(out: Path, plots: dict[str, str]) -> Section | None:
    meta, records = read_json(out / "ppo" / "qianwen.json"), metrics(out, "ppo")
    if meta is None or meta.get("stage") != "ppo" or not records:
        return None
    first, last = records[0], records[-1]
    summary = (
        f"{_steps(last['step'])}; reward {first['reward']:.3f} -> {last['reward']:.3f}, KL {last['kl']:.3f} nats, "
        f"replies ended {first['ended_fraction']:.0%} -> {last['ended_fraction']:.0%}"
    )
    config = meta.get("config", {})
    per_step = config.get("prompts_per_step", 1) * config.get("samples_per_prompt", 1)
    replies = per_step * len(records)
    tokens = round(sum(r["response_length"] * per_step for r in records))
    keys = [
        ("reward", "reward"),
        ("kl", "KL (nats per reply)"),
        ("response_length", "reply length"),
        ("ended_fraction", "replies ended"),
        ("clip_frac", "clip fraction"),
        ("value_loss", "value loss"),
    ]
    rows = [[label, _fmt(first.get(key)), _fmt(last.get(key))] for key, label in keys if key in first or key in last]
    blocks: list[Block] = [
        Paragraph(
            f"{summary}. The value model trains alone for the first {config.get('value_warmup_steps')} steps; "
            f"KL coefficient {config.get('kl_coef')}, policy lr {config.get('lr')}."
        ),
        Table(["", f"step {first['step']}", f"step {last['step']}"], rows),
    ]
    if "ppo" in plots:
        blocks.append(Image(plots["ppo"], "PPO: reward, KL, clip fraction, reply length"))
    blocks += _held_out_reward(out)
    return Section(summary, f"{replies:,} replies ({tokens:,} tokens)", blocks)


def _held_out_reward(out: Path) -> list[Block]:
    """The reward model on sft/'s and ppo/'s greedy replies to the held-out prompts (eval/reward.json)."""
    scores = read_json(out / "eval" / "reward.json")
    if not scores or not scores.get("tasks"):
        return []
    first, second = scores["models"]
    rows = [
        [
            task,
            f"{t['mean'][first]:+.3f}",
            f"{t['mean'][second]:+.3f}",
            f"{t['preferred'][second]} / {t['preferred'][first]} of {t['different_replies']}",
        ]
        for task, t in sorted(scores["tasks"].items())
    ]
    skipped = "".join(f" Not compared: {task}, as {why}." for task, why in sorted(scores.get("skipped", {}).items()))
    return [
        Paragraph(
            f"What PPO optimises, on prompts it never saw: the reward model's normalised score of {first}/'s and "
            f"{second}/'s greedy replies to the evaluation's held-out prompts, and, where the two replies differ, "
            f"how many of {second}/'s it scores higher than {first}/'s.{skipped}"
        ),
        Table(
            ["held-out task", f"{first} reward", f"{second} reward", f"{second} preferred / {first} preferred"], rows
        ),
    ]


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"


def _longctx(out: Path, summary: dict) -> list[Block]:
    """The long-context table (QWEN_SPEC.md section 2's layout) and plot from base/'s evaluation."""
    from qianwen.checkpoint import read_config
    from qianwen.eval.tasks.longctx import DEFAULT_SCHEDULE, VARIANTS, window_schedule

    task = summary["tasks"]["longctx"]
    ppl: dict[str, dict[int, float]] = {key: {} for key in VARIANTS}
    for name, value in task["metrics"].items():
        length, _, key = name.removeprefix("ppl@").partition("/")
        ppl[key][int(length)] = value
    lengths = sorted({length for values in ppl.values() for length in values})
    rows = [
        [label] + [f"{ppl[key][n]:.2f}" if n in ppl[key] else "—" for n in lengths]
        for key, (label, _) in VARIANTS.items()
    ]
    config = read_config(out / "base")[1]
    windows = window_schedule(config, summary.get("options", {}).get("longctx.schedule") or DEFAULT_SCHEDULE)
    blocks: list[Block] = [
        Heading(3, "Long context (base/)"),
        Paragraph(
            f"Perplexity on the validation split of data/ by context length; training length {config.seq_length}, "
            f"windows per layer {', '.join(map(str, windows))}. With windows, each layer's NTK and LogN factors are "
            "those of the span it attends, so a layer whose window is within the training length keeps the trained "
            "rotary base and no LogN."
        ),
        Table(["", *map(str, lengths)], rows),
    ]
    blocks += [Image(f"eval/{name}", "perplexity by context length") for name in task.get("files", [])]
    return blocks


def section_eval(out: Path) -> Section | None:
    summaries = {m: read_json(out / "eval" / f"{m}.json") for m in EVALUATED}
    found = {m: s for m, s in summaries.items() if s}
    if not found:
        return None
    columns = list(found)
    rows, samples = [], 0
    tasks = list(dict.fromkeys(t for s in found.values() for t in s["tasks"] if t != "longctx"))
    for task in tasks:
        metrics = list(dict.fromkeys(k for s in found.values() for k in s["tasks"].get(task, {}).get("metrics", {})))
        for metric in metrics:
            cells = []
            for model in columns:
                value = found[model]["tasks"].get(task, {}).get("metrics", {}).get(metric)
                cells.append("—" if value is None else _number(metric, value))
            rows.append([task, metric, *cells])
    samples = sum(t["samples"] for s in found.values() for t in s["tasks"].values())
    headline = []
    for task in tasks:
        for metric, label in _headline_metrics(task, found):
            values = []
            for model in columns:
                value = found[model]["tasks"].get(task, {}).get("metrics", {}).get(metric)
                if value is not None:
                    values.append(f"{model} {_number(metric, value)}")
            headline.append(f"{label}: {', '.join(values)}")
    limit = next(iter(found.values())).get("limit")
    summary = f"held-out scores ({limit} per task at most) " + "; ".join(headline)
    blocks: list[Block] = [
        Paragraph(
            "Each model on the held-out synthetic tasks (tasks/*_eval.jsonl); `instruct` checks each instruction "
            "with the checker that labels the reward model's pairs (`clean_accuracy`: right, ended and not rambling); "
            "`tool` answers each question directly and through the ReAct agent with the code interpreter. "
            "Per-sample logs are in eval/."
        ),
        Table(["task", "metric", *[f"{m}/" for m in columns]], rows),
    ]
    blocks += _paired(out, "sft", "ppo")
    if "base" in found and "longctx" in found["base"]["tasks"]:
        blocks += _longctx(out, found["base"])
        summary += "; long-context table for base/"
    return Section(summary, f"{samples:,} samples", blocks)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven among wins + losses fair coins."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(first: Path, second: Path) -> dict[str, tuple[int, int]]:
    """For two per-sample logs of the same prompts: per correctness field (`correct`, `agent_correct`...), how
    many samples only the first got right and how many only the second. Logs of different prompts give {}."""
    rows = []
    for path in (first, second):
        with open(path, encoding="utf-8") as f:
            rows.append([json.loads(line) for line in f if line.strip()])
    a, b = rows
    if len(a) != len(b) or any(
        x.get("prompt", x.get("question")) != y.get("prompt", y.get("question")) for x, y in zip(a, b)
    ):
        return {}
    fields = [k for k in (a[0] if a else {}) if k.endswith("correct") and isinstance(a[0][k], bool)]
    return {
        k: (sum(x[k] and not y[k] for x, y in zip(a, b)), sum(y[k] and not x[k] for x, y in zip(a, b))) for k in fields
    }


def _paired(out: Path, first: str, second: str) -> list[Block]:
    """Problem by problem, where two models' held-out answers differ in being right: how many each got right
    alone, and the sign test's p: whether a gap in accuracy is more than the luck of a few problems."""
    rows = []
    for path in sorted((out / "eval").glob(f"{first}.*.jsonl")):
        task = path.name.removeprefix(f"{first}.").removesuffix(".jsonl")
        other = out / "eval" / f"{second}.{task}.jsonl"
        if not other.is_file():
            continue
        for field_name, (only_first, only_second) in paired_counts(path, other).items():
            label = task if field_name == "correct" else f"{task} {field_name.removesuffix('_correct')}"
            p = sign_test(only_second, only_first)
            rows.append([label, str(only_second), str(only_first), f"{p:.2f}"])
    if not rows:
        return []
    return [
        Paragraph(
            f"{second}/ against {first}/ problem by problem: the held-out problems only one of them answers "
            "right, and the two-sided sign test's p over those (a small p: the gap is more than the luck of a "
            "few problems)."
        ),
        Table(["held-out task", f"right only for {second}/", f"right only for {first}/", "sign test p"], rows),
    ]


def _headline_metrics(task: str, found: dict) -> list[tuple[str, str]]:
    """The metrics a task's headline shows: its first, and those of the same kind beside it (the tool task's
    `direct_accuracy` and `agent_accuracy`, so the headline does not show the direct answers alone)."""
    names = list(dict.fromkeys(k for s in found.values() for k in s["tasks"].get(task, {}).get("metrics", {})))
    if not names:
        return []
    kind = names[0].rpartition("_")[2] if "_" in names[0] else None
    same = [n for n in names if kind and "/" not in n and n.endswith(f"_{kind}")]
    if len(same) < 2:
        return [(names[0], task)]
    return [(n, f"{task} {n.removesuffix(f'_{kind}')}") for n in same]


def section_sample(out: Path) -> Section | None:
    samples = read_json(out / "samples.json")
    if samples is None:
        return None
    base = samples["base"]
    chat = samples.get("chat")
    intro = (
        f"base/ continues a held-out tool question in its pretraining text's form (the right answer is {base['answer']}):"
        if "answer" in base
        else f"base/ completes `{base['prompt'].strip()}`:"
    )
    blocks: list[Block] = [
        Paragraph(intro),
        Code(base["prompt"] + base["completion"]),
    ]
    if chat:
        right = f" (held out; the right answer is {chat['answer']})" if "answer" in chat else ""
        blocks += [Paragraph(f'{chat["model"]}/ answers "{chat["prompt"]}"{right}:'), Code(chat["reply"])]
    return Section(f"samples from base/ and {chat['model'] + '/' if chat else 'no chat model'}", "—", blocks)


def sections(out: Path, plots: dict[str, str]) -> dict[str, Section | None]:
    return {
        "tokenizer": section_tokenizer(out),
        "data": section_data(out),
        "pretrain": section_pretrain(out, plots),
        "tasks": section_tasks(out),
        "sft": section_sft(out, plots),
        "rm": section_rm(out, plots),
        "ppo": section_ppo(out, plots),
        "eval": section_eval(out),
        "sample": section_sample(out),
    }


def summary_of(out: Path, stage: str) -> str:
    """One stage's summary line (without the slower measurements of its full section)."""
    plots = {s: f"{s}.png" for s in ("pretrain", "sft", "rm", "ppo")}
    section = {
        "tokenizer": lambda: section_tokenizer(out, measure=False),
        "data": lambda: section_data(out),
        "pretrain": lambda: section_pretrain(out, plots),
        "tasks": lambda: section_tasks(out),
        "sft": lambda: section_sft(out, plots),
        "rm": lambda: section_rm(out, plots),
        "ppo": lambda: section_ppo(out, plots),
        "eval": lambda: section_eval(out),
        "sample": lambda: section_sample(out),
    }[stage]()
    return section.summary if section else "not run yet"
