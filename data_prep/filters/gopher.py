"""Gopher quality and repetition filters (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A, MassiveWeb).

Quality: the paper keeps documents of 50 to 100,000 words whose mean word length is 3 to 10
characters, whose ratio of `#` symbols and of ellipses to words is at most 0.1, where at most
90% of lines start with a bullet and at most 30% end with an ellipsis, where at least 80% of
words contain an alphabetic character and that contain at least two English stop words
("the", "be", "to", "of", "and", "that", "have", "with"). Text that fails these is usually
boilerplate, lists, tables or machine-generated.

Repetition: repeated content is a sign of low quality and, the paper found, hurts models. A
document is removed when too many of its lines or paragraphs are duplicates (by count, 0.3,
or by characters, 0.2), when its most frequent 2-, 3- or 4-gram covers more than 20%, 18%, 16%
of its characters, or when the n-grams occurring more than once cover more than 15%, 14%, 13%,
12%, 11%, 10% of its characters for n = 5..10.

A word is a whitespace-separated token, punctuation-only ones included (the paper's unit); the
units of every rule and where they differ from datatrove and Dolma are in docs/data.md
("Filter rules").
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from data_prep.document import Document, Drop
from data_prep.filters.text import WORD_DEFINITIONS, bare, nonempty_lines, words_of
from data_prep.steps import Step

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
BULLETS = ("•", "*", "-", "‣", "◦", "⁃", "·", "●", "▪", "–")


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    domains: list[str] = field(default_factory=lambda: ["prose"])
    # what a word is for every rule below: "whitespace" (the paper's unit, default) or
    # "strip_punct" (surrounding punctuation removed, punctuation-only tokens not counted)
    word_definition: str = "whitespace"
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_hash_ratio: float = 0.1  # "#" per word
    max_ellipsis_ratio: float = 0.1  # "..." or "…" per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2  # distinct stop words present
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))


class GopherQuality(Step):
    name = "gopher_quality"
    reasons = (
        "too_few_words",
        "too_many_words",
        "short_mean_word_length",
        "long_mean_word_length",
        "hash_ratio",
        "ellipsis_ratio",
        "bullet_lines",
        "ellipsis_lines",
        "non_alpha_words",
        "few_stop_words",
    )

    def __init__(self, cfg: GopherQualityConfig) -> None:
        self.cfg = cfg
        self.domains = tuple(cfg.domains)
        self.stop_words = frozenset(w.lower() for w in cfg.stop_words)
        if cfg.word_definition not in WORD_DEFINITIONS:
            raise ValueError(
                f"gopher_quality.word_definition={cfg.word_definition!r}; "
                f"valid: {', '.join(WORD_DEFINITIONS)}"
            )

    def process(self, doc: Document) -> Document | Drop:
        c = self.cfg
        text = doc.text
        words = words_of(text, c.word_definition)
        n = len(words)
        if n < c.min_words:
            return self.drop("too_few_words", f"{n} words < {c.min_words}")
        if n > c.max_words:
            return self.drop("too_many_words", f"{n} words > {c.max_words}")
        mean_len = sum(map(len, words)) / n
        if mean_len < c.min_mean_word_length:
            return self.drop("short_mean_word_length", f"{mean_len:.2f} < {c.min_mean_word_length}")
        if mean_len > c.max_mean_word_length:
            return self.drop("long_mean_word_length", f"{mean_len:.2f} > {c.max_mean_word_length}")
        hashes = text.count("#") / n
        if hashes > c.max_hash_ratio:
            return self.drop("hash_ratio", f"{hashes:.3f} '#' per word > {c.max_hash_ratio}")
        ellipses = (text.count("...") + text.count("…")) / n
        if ellipses > c.max_ellipsis_ratio:
            return self.drop("ellipsis_ratio", f"{ellipses:.3f} per word > {c.max_ellipsis_ratio}")
        lines = nonempty_lines(text)
        if lines:
            bullets = sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines)
            if bullets > c.max_bullet_lines_ratio:
                return self.drop("bullet_lines", f"{bullets:.2f} > {c.max_bullet_lines_ratio}")
            ell = sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines)
            if ell > c.max_ellipsis_lines_ratio:
                return self.drop("ellipsis_lines", f"{ell:.2f} > {c.max_ellipsis_lines_ratio}")
        alpha = sum(any(ch.isalpha() for ch in w) for w in words) / n
        if alpha < c.min_alpha_words_ratio:
            return self.drop("non_alpha_words", f"{alpha:.2f} < {c.min_alpha_words_ratio}")
        stops = len(self.stop_words.intersection(map(bare, words)))
        if stops < c.min_stop_words:
            return self.drop("few_stop_words", f"{stops} distinct stop words < {c.min_stop_words}")
        return doc


def _dup_fraction(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in them)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    total = sum(map(len, parts))
    return dup / len(parts), (dup_chars / total if total else 0.0)


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the most frequent word n-gram (times its count) over all word characters;
    0 when no n-gram occurs twice."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(map(len, gram)) * count / sum(map(len, words))


def dup_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of words covered by any word n-gram that occurs more than once, over all
    word characters (overlapping occurrences count each word once)."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / sum(map(len, words))


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    domains: list[str] = field(default_factory=lambda: ["prose"])
    max_dup_line_fraction: float = 0.3
    max_dup_para_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    max_dup_para_char_fraction: float = 0.2
    # n -> maximum character fraction of the most frequent n-gram
    top_ngram_max_fraction: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    # n -> maximum character fraction covered by n-grams that occur more than once
    dup_ngram_max_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


class GopherRepetition(Step):
    name = "gopher_repetition"
    reasons = (
        "dup_line_fraction",
        "dup_para_fraction",
        "dup_line_char_fraction",
        "dup_para_char_fraction",
        *(f"top_{n}gram_char_fraction" for n in range(2, 5)),
        *(f"dup_{n}gram_char_fraction" for n in range(5, 11)),
    )

    def __init__(self, cfg: GopherRepetitionConfig) -> None:
        self.cfg = cfg
        self.domains = tuple(cfg.domains)
        bad = [f"top {n}" for n in cfg.top_ngram_max_fraction if not 2 <= n <= 4]
        bad += [f"dup {n}" for n in cfg.dup_ngram_max_fraction if not 5 <= n <= 10]
        if bad:
            raise ValueError(
                f"gopher_repetition: n-gram sizes {bad} unsupported; "
                "top_ngram_max_fraction: 2..4, dup_ngram_max_fraction: 5..10"
            )

    def process(self, doc: Document) -> Document | Drop:
        c = self.cfg
        text = doc.text
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        frac, chars = _dup_fraction(paras)
        if frac > c.max_dup_para_fraction:
            return self.drop("dup_para_fraction", f"{frac:.2f} > {c.max_dup_para_fraction}")
        if chars > c.max_dup_para_char_fraction:
            return self.drop(
                "dup_para_char_fraction", f"{chars:.2f} > {c.max_dup_para_char_fraction}"
            )
        lines = [ln.strip() for ln in nonempty_lines(text)]
        frac, chars = _dup_fraction(lines)
        if frac > c.max_dup_line_fraction:
            return self.drop("dup_line_fraction", f"{frac:.2f} > {c.max_dup_line_fraction}")
        if chars > c.max_dup_line_char_fraction:
            return self.drop(
                "dup_line_char_fraction", f"{chars:.2f} > {c.max_dup_line_char_fraction}"
            )
        words = text.split()
        for n, limit in sorted(c.top_ngram_max_fraction.items()):
            f = top_ngram_char_fraction(words, n)
            if f > limit:
                return self.drop(f"top_{n}gram_char_fraction", f"{f:.3f} > {limit}")
        for n, limit in sorted(c.dup_ngram_max_fraction.items()):
            f = dup_ngram_char_fraction(words, n)
            if f > limit:
                return self.drop(f"dup_{n}gram_char_fraction", f"{f:.3f} > {limit}")
        return doc
