"""`longctx`: perplexity at multiples of the training length, with Qwen's inference-time long-context tricks
(QWEN_SPEC.md section 2) switched on one after another: baseline, + dynamic NTK, + dynamic NTK + LogN,
+ dynamic NTK + LogN + window; and, after the report's four rows, the windows alone, which tell how much of the
last row is the windows' doing.

Held-out text comes from the same sources as `bpb` (data=DIR, files=A,B or --data-dir). For a context length L
the text is cut into non-overlapping windows of L + 1 tokens and the model reads each window's first L tokens
in one forward pass; perplexity is exp of the mean loss over ALL L positions of every window (the report's
protocol: perplexity over the whole sequence, so the early, short-context positions count too). Every length
scores the same span of text, the first `tokens` tokens (default: four windows of the longest length), so the
lengths differ only in how much context each prediction sees; `--limit N` caps the windows per length. Rows
per batch shrink as L grows (batch_size x seq_length tokens per batch).

The switches are set on a copy of the model's config for each variant (every variant sets all three, so a
checkpoint that ships with them on still gets a true baseline) and the model's own config comes back after.
With windows on, each layer's NTK factor and LogN factors are those of the span it attends, at most its window
(model.py, `_Spans`): a layer whose window is at most the training length keeps the trained rotary base and no
LogN, so with such a schedule the last two rows are equal by construction, and NTK and LogN act only in layers
whose windows reach past the training length.

Options: lengths=0.5,1,2,4,8 (multiples of seq_length), tokens=N, schedule=LO:HI (windows from LO x seq_length
at the first layer to HI x seq_length at the last, linear in between) or schedule=W1,W2,... (tokens, one per
layer).

The default window schedule, 0.5:1 (half the training length at the first layer, rising linearly to the full
training length at the last), was chosen from these measurements: the tiny recipe's base model (6 layers, training
length T = 256), the first 8,192 tokens of its validation split, perplexity at 1x / 4x / 8x T with dynamic NTK +
LogN + window and with the windows alone (`qianwen eval --model runs/tiny/base --tasks longctx --data-dir
runs/tiny/data longctx.schedule=S`):

| schedule (windows per layer)            | NTK + LogN + window | window alone       |
|-----------------------------------------|---------------------|--------------------|
| none (full attention)                   | 2.29 / 3.30 / 4.45  | 2.29 / 3.25 / 4.53 (baseline) |
| 0.125:1 (32 .. 256)                     | 2.30 / 2.23 / 2.22  | the same           |
| 0.25:1 (64 .. 256)                      | 2.29 / 2.22 / 2.21  | the same           |
| 0.5:1 (128 .. 256), the default         | 2.29 / 2.21 / 2.20  | the same           |
| 1:1 (256 in every layer)                | 2.29 / 2.22 / 2.21  | the same           |
| 0.5:0.5 (128 in every layer)            | 2.29 / 2.21 / 2.20  | the same           |
| 1:2 (256 .. 512)                        | 2.29 / 2.58 / 2.60  | 2.29 / 2.84 / 3.01 |
| 0.5:2 (128 .. 512)                      | 2.29 / 2.55 / 2.57  | 2.29 / 2.68 / 2.80 |
| 0.5:4 (128 .. 1024)                     | 2.29 / 3.16 / 3.50  | 2.29 / 3.05 / 3.40 |
| 0.5:8 (128 .. 2048)                     | 2.29 / 3.31 / 4.43  | 2.29 / 3.24 / 4.22 |
| 0.5:1, the last layer full              | 2.29 / 2.37 / 2.53  | 2.29 / 2.51 / 2.63 |
| 256 x 5, the last layer full            | 2.29 / 2.38 / 2.53  | 2.29 / 2.51 / 2.64 |
| 128 x 4, the last two layers full       | 2.29 / 2.47 / 2.78  | 2.29 / 2.70 / 3.09 |

Every schedule whose windows stay within T holds perplexity at or below the in-length value out to 8x; 0.125:1
starts to cost in length. Letting upper layers attend past T (the report's longer windows higher up) costs
perplexity on this model, and there NTK and LogN, sized to each layer's span, win back 5-10% over the windows
alone. (Applying the whole text's NTK factor and LogN to every layer, windowed or not, as a literal reading of the
report's last row would, gives 3.06 at 4x and 3.71 at 8x with 0.5:1 on the same model: the stretched rotary base
costs where the windows already bound every attended distance.)
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

import qianwen
from qianwen.eval.harness import TaskOptions, TaskResult
from qianwen.eval.tasks.bpb import check_vocabulary, held_out_tokens, token_nats, windows_of

NAME = "longctx"
OPTIONS: dict[str, object] = {
    "data": "",
    "files": "",
    "lengths": "0.5,1,2,4,8",
    "tokens": 0,  # 0 = four windows of the longest length
    "schedule": "",  # "" = DEFAULT_SCHEDULE
}
DEFAULT_SCHEDULE = (0.5, 1.0)  # see the measurements above
VARIANTS = {  # metric key: (table row, switches)
    "baseline": ("baseline", (False, False, False)),
    "ntk": ("+ dynamic NTK", (True, False, False)),
    "ntk_logn": ("+ dynamic NTK + LogN", (True, True, False)),
    "ntk_logn_window": ("+ dynamic NTK + LogN + window", (True, True, True)),
    "window": ("window alone", (False, False, True)),
}


def window_schedule(config: qianwen.ModelConfig, spec: str | tuple[float, float] = DEFAULT_SCHEDULE) -> list[int]:
    """Per-layer attention windows: `(lo, hi)` or "LO:HI" multiples of seq_length from the first layer to the
    last (linear in between), or "W1,W2,..." tokens per layer."""
    n, T = config.num_layers, config.seq_length
    if isinstance(spec, str) and ":" not in spec:
        try:
            windows = [int(w) for w in spec.split(",")]
        except ValueError:
            raise ValueError(f"schedule={spec} is neither LO:HI nor a list of integers; write e.g. 0.25:1.") from None
        if len(windows) != n or min(windows) < 1:
            raise ValueError(f"schedule={spec} needs {n} positive windows, one per layer of this model.")
        return windows
    if isinstance(spec, str):
        try:
            lo, hi = (float(x) for x in spec.split(":"))
        except ValueError:
            raise ValueError(f"schedule={spec} is not LO:HI (multiples of seq_length); write e.g. 0.25:1.") from None
    else:
        lo, hi = spec
    if lo <= 0 or hi <= 0:
        raise ValueError(f"schedule={spec}: window multiples must be positive.")
    return [max(1, round(T * (lo + (hi - lo) * i / max(n - 1, 1)))) for i in range(n)]


@contextmanager
def long_context(model: qianwen.Transformer, ntk: bool, logn: bool, windows: list[int] | None) -> Iterator[None]:
    """The model in eval mode (the switches act only there) with these switches; config and mode restored after."""
    config, was_training = model.config, model.training
    model.config = config.replace(use_dynamic_ntk=ntk, use_logn_attn=logn, attention_windows=windows)
    model.eval()
    try:
        yield
    finally:
        model.config = config
        model.train(was_training)


def lengths_of(config: qianwen.ModelConfig, spec: str | list[float]) -> list[int]:
    try:
        multiples = [float(m) for m in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        multiples = []
    finite = all(math.isfinite(m) for m in multiples)
    lengths = sorted({round(m * config.seq_length) for m in multiples}) if finite else []
    if not lengths or lengths[0] < 1:
        raise ValueError(
            f"lengths={spec} must be positive multiples of seq_length ({config.seq_length}), comma-separated, e.g. "
            "0.5,1,2,4,8."
        )
    return lengths


def perplexity(model: qianwen.Transformer, windows: list[np.ndarray], rows: int) -> tuple[float, int]:
    """exp(mean nats) over every target of `windows`, `rows` windows per forward; and the number of targets."""
    nats, targets = 0.0, 0
    for start in range(0, len(windows), rows):
        loss = token_nats(model, torch.from_numpy(np.stack(windows[start : start + rows])))
        nats += float(loss.sum())
        targets += loss.numel()
    return math.exp(nats / targets), targets


def evaluate(model: qianwen.Transformer, tokenizer: qianwen.Tokenizer, options: TaskOptions) -> TaskResult:
    settings = {**OPTIONS, **options.extra}
    config = model.config
    T = config.seq_length
    lengths = lengths_of(config, settings["lengths"])
    span = int(settings["tokens"]) or 4 * lengths[-1] + 1
    tokens, source = held_out_tokens(tokenizer, options, NAME, span)
    check_vocabulary(tokens, model, source)
    schedule = settings["schedule"] or DEFAULT_SCHEDULE
    windows = window_schedule(config, schedule)

    per_length = {L: list(windows_of(tokens, L, tail=False))[: options.limit] for L in lengths}
    skipped = [L for L, w in per_length.items() if not w]
    if len(skipped) == len(lengths):
        raise ValueError(f"{source} holds {len(tokens)} tokens, too few for one window of {lengths[0] + 1}.")
    if skipped:
        print(f"{NAME}: {source} is too short for lengths {skipped}; they are left out.", file=sys.stderr)
    scored = [L for L in lengths if per_length[L]]

    ppl: dict[str, dict[int, float]] = {key: {} for key in VARIANTS}
    samples = []
    bar = tqdm(total=len(VARIANTS) * len(scored), desc=NAME, unit="run", file=sys.stderr, disable=None)
    for key, (_, (ntk, logn, windowed)) in VARIANTS.items():
        with long_context(model, ntk, logn, windows if windowed else None):
            for L in scored:
                rows = max(1, options.batch_size * T // L)
                value, targets = perplexity(model, per_length[L], rows)
                ppl[key][L] = value
                samples.append(
                    {"variant": key, "length": L, "windows": len(per_length[L]), "targets": targets, "ppl": value}
                )
                bar.update()
    bar.close()

    metrics = {f"ppl@{L}/{key}": ppl[key][L] for key in VARIANTS for L in scored}
    table = markdown_table(ppl, lengths, T, windows)
    return TaskResult(NAME, metrics, samples, table_md=table, files={"longctx.png": plot(ppl, scored, T)})


def markdown_table(ppl: dict[str, dict[int, float]], lengths: list[int], T: int, windows: list[int]) -> str:
    """QWEN_SPEC.md section 2's layout: a row per variant, a column per length; a missing length shows as —."""
    head = "| | " + " | ".join(str(L) for L in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for key, (row, _) in VARIANTS.items():
        cells = [f"{ppl[key][L]:.2f}" if L in ppl[key] else "—" for L in lengths]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Training length {T}; windows per layer: {', '.join(map(str, windows))}.")
    return "\n".join(lines) + "\n"


def plot(ppl: dict[str, dict[int, float]], lengths: list[int], T: int) -> bytes:
    """Perplexity against context length, one line per variant, as PNG bytes."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for key, (row, _) in VARIANTS.items():
        # the windows-alone row dashed and hollow, so it stays visible where it lies on the last report row
        style = {"linestyle": "--", "marker": "s", "fillstyle": "none"} if key == "window" else {"marker": "o"}
        ax.plot(lengths, [ppl[key][L] for L in lengths], label=row, **style)
    ax.axvline(T, color="grey", linestyle="--", linewidth=1, label=f"training length {T}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    # plain numbers ("9", "20") on the log axis rather than the default 9x10^0
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by context length")
    ax.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
