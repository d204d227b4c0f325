"""Small text helpers shared by the quality filters."""

from __future__ import annotations

import string

PUNCT = set(string.punctuation) | set("“”‘’«»…–—¡¿")
_STRIP = "".join(sorted(PUNCT))
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "…", ":")


def words_of(text: str) -> list[str]:
    """Whitespace-separated tokens with surrounding punctuation removed; punctuation-only tokens
    are not words."""
    out = []
    for tok in text.split():
        w = tok.strip(_STRIP)
        if w:
            out.append(w)
    return out


def nonempty_lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.strip()]
