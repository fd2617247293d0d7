"""JSONL training records read line by line: every line that cannot be used is counted by reason, and the
first few are named by file and line, so nothing is dropped silently (SFT conversations, preference pairs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

EXAMPLES_SHOWN = 5


class Skip(Exception):
    """A record that cannot be used: `reason` is counted, `detail` shown for the first few."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Records:
    items: list = field(default_factory=list)
    lines: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # "file:line: detail" of the first few skipped


def read_records(path: str | Path, convert: Callable[[object], object], missing: str) -> Records:
    """`convert` applied to each JSON line of `path` (it raises Skip for records it cannot use); `missing` is
    the sentence for a file that does not exist."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; {missing}")
    out = Records()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.lines += 1
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise Skip("bad JSON", f"not JSON ({exc.msg})") from None
                out.items.append(convert(record))
            except Skip as skip:
                out.skipped[skip.reason] = out.skipped.get(skip.reason, 0) + 1
                if len(out.examples) < EXAMPLES_SHOWN:
                    out.examples.append(f"{path}:{number}: {skip.detail}")
    if not out.items:  # said here, with the counts, before anything is built on nothing
        skipped = ", ".join(f"{n} {reason}" for reason, n in out.skipped.items())
        first = f"; the first: {out.examples[0]}" if out.examples else ""
        raise ValueError(f"{path} holds no usable record: {out.lines} line(s), skipped {skipped or 'none'}{first}.")
    return out
