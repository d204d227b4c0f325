"""FineWeb quality filters (Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for
the Finest Text Data at Scale", section 3.3).

FineWeb added three heuristics, chosen by comparing what separates a high- from a low-quality
subset of the crawl, on top of the C4 and Gopher rules: drop a document when too few lines end
in punctuation (< 12%), when too many lines are short (> 67% under 30 characters), or when too
many characters sit in duplicated lines (> 1%). A fourth rule from the datatrove implementation
drops list-like pages with many newlines per word (> 0.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_prep.document import Document, Drop
from data_prep.filters.text import TERMINAL_PUNCT, nonempty_lines
from data_prep.steps import Step


@dataclass
class FineWebConfig:
    enabled: bool = True
    domains: list[str] = field(default_factory=lambda: ["prose"])
    min_line_punct_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    short_line_length: int = 30
    max_char_dup_ratio: float = 0.01
    max_newline_ratio: float = 0.3  # newlines per word


class FineWebFilter(Step):
    name = "fineweb"
    reasons = ("line_punct_ratio", "short_line_ratio", "char_dup_ratio", "newline_ratio")

    def __init__(self, cfg: FineWebConfig) -> None:
        self.cfg = cfg
        self.domains = tuple(cfg.domains)

    def process(self, doc: Document) -> Document | Drop:
        c = self.cfg
        lines = [ln.strip() for ln in nonempty_lines(doc.text)]
        if not lines:
            return self.drop("line_punct_ratio", "no lines")
        punct = sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / len(lines)
        if punct < c.min_line_punct_ratio:
            return self.drop("line_punct_ratio", f"{punct:.2f} < {c.min_line_punct_ratio}")
        short = sum(len(ln) < c.short_line_length for ln in lines) / len(lines)
        if short > c.max_short_line_ratio:
            return self.drop("short_line_ratio", f"{short:.2f} > {c.max_short_line_ratio}")
        seen: set[str] = set()
        dup_chars = 0
        for ln in lines:
            if ln in seen:
                dup_chars += len(ln)
            seen.add(ln)
        total = sum(map(len, lines))
        dup = dup_chars / total
        if dup > c.max_char_dup_ratio:
            return self.drop("char_dup_ratio", f"{dup:.3f} > {c.max_char_dup_ratio}")
        words = len(doc.text.split())
        nl = doc.text.count("\n") / max(words, 1)
        if nl > c.max_newline_ratio:
            return self.drop("newline_ratio", f"{nl:.2f} newlines per word > {c.max_newline_ratio}")
        return doc
