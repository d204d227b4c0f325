"""Small text helpers shared by the quality filters."""

from __future__ import annotations

import string

PUNCT = set(string.punctuation) | set("“”‘’«»…–—¡¿")
_STRIP = "".join(sorted(PUNCT))


WORD_DEFINITIONS = ("whitespace", "strip_punct")


def words_of(text: str, definition: str = "strip_punct") -> list[str]:
    """The words of `text`. "whitespace": every whitespace-separated token, punctuation-only
    ones (`*`, `--`) included, as Gopher counts them (Rae et al. 2021, app. A; Dolma's
    reimplementation splits with `str.split()`). "strip_punct": tokens with surrounding
    punctuation removed and punctuation-only tokens left out (tokenclock's definition before
    issue 14)."""
    if definition == "whitespace":
        return text.split()
    if definition != "strip_punct":
        raise ValueError(f"word definition {definition!r}; valid: {', '.join(WORD_DEFINITIONS)}")
    out = []
    for tok in text.split():
        w = tok.strip(_STRIP)
        if w:
            out.append(w)
    return out


def bare(word: str) -> str:
    """`word` lower-cased without surrounding punctuation ("The," -> "the")."""
    return word.strip(_STRIP).lower()


def nonempty_lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.strip()]
