"""Stage 1: Unicode NFC and whitespace normalisation.

Indentation is kept (code depends on it); what goes is trailing whitespace on
each line, carriage returns, leading and trailing blank lines, and blank runs
longer than two lines (PEP 8 puts two blank lines between top-level
definitions, so two are kept).
"""

from __future__ import annotations

import re
import unicodedata

_BLANK_RUN = re.compile(r"\n{4,}")


def normalize(text: str) -> str:
    """NFC text with "\\n" newlines, no trailing spaces, and at most two blank lines in a row."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Eight times faster than a multiline regex for trailing space.
    text = "\n".join([line.rstrip() for line in text.split("\n")])
    text = _BLANK_RUN.sub("\n\n\n", text)
    # Only newlines are stripped at the start: the first line's indentation is part of the code.
    return text.lstrip("\n").rstrip()


_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens (letters, digits, underscore), the units of MinHash shingles and decontamination n-grams."""
    return _WORD.findall(text.lower())
