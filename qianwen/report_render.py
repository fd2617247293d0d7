"""The report card's two renderings, Markdown and one self-contained HTML page, from the same list of blocks.

A block is a heading, a paragraph, a table, an image or a code block. Text may hold `code` spans, the only inline
markup the report uses, so neither renderer has to parse Markdown. The HTML page carries its images as base64
data URIs and its style inline: it opens anywhere, offline, as one file.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

_CODE_SPAN = re.compile(r"`([^`]+)`")
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, monospace; font-size: .9rem; }
pre { background: #f6f6f6; padding: .7rem; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; }
"""


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: str  # relative to the run directory
    alt: str


@dataclass
class Code:
    text: str
    language: str = "text"


Block = Heading | Paragraph | Table | Image | Code


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside the text."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_cell(h) for h in block.header) + " |"]
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        elif isinstance(block, Image):
            parts.append(f"![{block.alt}]({block.path})")
        else:
            fence = _fence(block.text)
            parts.append(f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}")
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    return _CODE_SPAN.sub(r"<code>\1</code>", html.escape(str(text)))


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?\s*%?", str(text).strip()))


def page(blocks: list[Block], root: Path, title: str) -> str:
    """One HTML file; each image is read from `root` and embedded (a missing one shows its alt text)."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
            rows = [
                "<tr>"
                + "".join(
                    f'<td class="num">{_inline(c)}</td>' if _numeric(c) else f"<td>{_inline(c)}</td>" for c in row
                )
                + "</tr>"
                for row in block.rows
            ]
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif isinstance(block, Image):
            path = root / block.path
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}"></p>')
            else:
                body.append(f"<p>[{html.escape(block.alt)}: {html.escape(block.path)} is missing]</p>")
        else:
            body.append(f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
