"""The report card's training curves, drawn with matplotlib from metrics/<stage>.jsonl.

pretrain.png: training and validation loss, learning rate, gradient norm, validation bits per byte.
sft.png: training and held-out loss. rm.png: held-out pairwise accuracy and training loss, for preference-model
pretraining (rm-pmp) and the reward model (rm). ppo.png: reward, KL to the reference, clip fraction and reply
length per step. A stage with no metrics (not run yet, or fed a user's model) gets no figure.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from qianwen.util import atomic_write

Series = tuple[str, list[float], list[float]]  # label, steps, values
Panel = tuple[str, list[Series]]  # title, curves


def records(out: Path, stage: str) -> list[dict]:
    path = out / "metrics" / f"{stage}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(rows: list[dict], key: str, label: str | None = None) -> list[Series]:
    points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [(label or key, [p[0] for p in points], [p[1] for p in points])] if points else []


def figure(panels: list[Panel], columns: int = 2) -> bytes:
    """A grid of small line plots, as PNG bytes."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.6 * columns, 3.1 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for index, (title, curves) in enumerate(panels, 1):
        ax = fig.add_subplot(rows, columns, index)
        for label, steps, values in curves:
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def panels(out: Path) -> dict[str, list[Panel]]:
    """Each stage's panels, only those with data."""
    pre, sft, ppo = records(out, "pretrain"), records(out, "sft"), records(out, "ppo")
    rm = {stage: records(out, stage) for stage in ("rm-pmp", "rm")}
    found = {
        "pretrain": [
            ("loss", series(pre, "loss", "train") + series(pre, "val_loss", "validation")),
            ("learning rate", series(pre, "lr")),
            ("gradient norm", series(pre, "grad_norm")),
            ("validation bits per byte", series(pre, "val_bpb")),
        ],
        "sft": [("loss", series(sft, "loss", "train") + series(sft, "val_loss", "held out"))],
        "rm": [
            (
                "held-out pairwise accuracy",
                [s for stage, rows in rm.items() for s in series(rows, "val_accuracy", stage)],
            ),
            ("training loss", [s for stage, rows in rm.items() for s in series(rows, "loss", stage)]),
        ],
        "ppo": [
            ("reward (reward model's score)", series(ppo, "reward")),
            ("KL to the reference (nats per reply)", series(ppo, "kl")),
            ("clip fraction", series(ppo, "clip_frac")),
            ("reply length (tokens)", series(ppo, "response_length")),
        ],
    }
    return {stage: [p for p in found_panels if p[1]] for stage, found_panels in found.items()}


def draw(out: Path) -> dict[str, str]:
    """Write <stage>.png for every stage with metrics (and delete a stale one for a stage without);
    returns stage -> file name."""
    written = {}
    for stage, stage_panels in panels(out).items():
        path = out / f"{stage}.png"
        if stage_panels:
            atomic_write(path, figure(stage_panels))
            written[stage] = path.name
        elif path.is_file():
            path.unlink()
    return written
