"""FineWeb quality filters (Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for
the Finest Text Data at Scale", section 3.3).

FineWeb added three heuristics, chosen by comparing what separates a high- from a low-quality
subset of the crawl, on top of the C4 and Gopher rules: drop a document when at most 12% of its
lines end in punctuation, when at least 67% of its lines are short, or when duplicated lines
hold too many of its characters. A fourth rule from the datatrove implementation drops
list-like pages with more than 0.3 newlines per word.

Units and comparisons follow the released code that produced FineWeb (huggingface/datatrove
`src/datatrove/pipeline/filters/fineweb_quality_filter.py`): `<=`/`>=` at the thresholds, a
short line has at most 30 characters (the paper: "shorter than 30"; set short_line_length=29),
and duplicated lines may hold less than 1% of the characters (the paper's section 3.6 prints
0.1). One deliberate difference: blank lines are not lines here (`count_blank_lines: true`
counts them, as datatrove's `text.split("\n")` does), since normalised prose keeps a blank line
between paragraphs. docs/data.md has the rule table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_prep.document import Document, Drop
from data_prep.filters.text import nonempty_lines
from data_prep.steps import Step

# datatrove's stop_chars (. ' " ! ?) and the curly closing quotes
FINEWEB_TERMINAL = (".", "'", '"', "!", "?", "”", "’")


@dataclass
class FineWebConfig:
    enabled: bool = True
    domains: list[str] = field(default_factory=lambda: ["prose"])
    min_line_punct_ratio: float = 0.12  # drop at or below
    max_short_line_ratio: float = 0.67  # drop at or above
    short_line_length: int = 30  # a line of at most this many characters is short
    max_char_dup_ratio: float = 0.01  # drop at or above
    max_newline_ratio: float = 0.3  # newlines per whitespace word; drop above
    count_blank_lines: bool = False  # blank lines count as lines (datatrove) or not


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
        all_lines = [ln.strip() for ln in doc.text.split("\n")] if c.count_blank_lines else lines
        punct = sum(ln.endswith(FINEWEB_TERMINAL) for ln in all_lines) / len(all_lines)
        if punct <= c.min_line_punct_ratio:
            return self.drop("line_punct_ratio", f"{punct:.2f} <= {c.min_line_punct_ratio}")
        short = sum(len(ln) <= c.short_line_length for ln in all_lines) / len(all_lines)
        if short >= c.max_short_line_ratio:
            return self.drop("short_line_ratio", f"{short:.2f} >= {c.max_short_line_ratio}")
        seen: set[str] = set()
        dup_chars = 0
        for ln in lines:
            if ln in seen:
                dup_chars += len(ln)
            seen.add(ln)
        total = sum(map(len, lines))
        dup = dup_chars / total
        if dup >= c.max_char_dup_ratio:
            return self.drop("char_dup_ratio", f"{dup:.3f} >= {c.max_char_dup_ratio}")
        words = len(doc.text.split())
        nl = doc.text.count("\n") / max(words, 1)
        if nl > c.max_newline_ratio:
            return self.drop("newline_ratio", f"{nl:.2f} newlines per word > {c.max_newline_ratio}")
        return doc
