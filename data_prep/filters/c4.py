"""C4 clean-up rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.2, the Colossal Clean Crawled Corpus).

C4 works mostly on lines: it keeps only lines that end in terminal punctuation and have enough
words, removes lines mentioning JavaScript (warnings to enable it) and cookie / terms-of-use
boilerplate, strips Wikipedia-style citation markers, and then drops whole documents that
contain "lorem ipsum" placeholder text or a curly bracket (a cheap code detector), or that have
too few sentences left. We follow the datatrove defaults: lines of at least 3 words and at
least 5 sentences per document. The naughty-word list is not included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from data_prep.document import Document, Drop
from data_prep.steps import Step

CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]|\[update\]", re.I)
SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
POLICY = [
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
]
C4_TERMINAL = (".", "!", "?", '"', "”")


@dataclass
class C4Config:
    enabled: bool = True
    domains: list[str] = field(default_factory=lambda: ["prose"])
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True  # drop lines not ending in . ! ? "
    min_words_per_line: int = 3  # drop shorter lines
    filter_javascript: bool = True  # drop lines mentioning javascript
    filter_policy: bool = True  # drop lines with cookie / terms-of-use phrases
    policy_phrases: list[str] = field(default_factory=lambda: list(POLICY))
    filter_lorem_ipsum: bool = True  # drop documents containing "lorem ipsum"
    filter_curly_bracket: bool = True  # drop documents containing "{"
    min_sentences: int = 5  # drop documents with fewer sentences left


def count_sentences(text: str) -> int:
    return len(SENTENCE_END.findall(text))


class C4Filter(Step):
    name = "c4"
    reasons = ("lorem_ipsum", "curly_bracket", "too_few_sentences")

    def __init__(self, cfg: C4Config) -> None:
        self.cfg = cfg
        self.domains = tuple(cfg.domains)

    def process(self, doc: Document) -> Document | Drop:
        c = self.cfg
        text = doc.text
        low = text.lower()
        if c.filter_lorem_ipsum and "lorem ipsum" in low:
            return self.drop("lorem_ipsum")
        if c.filter_curly_bracket and "{" in text:
            i = text.index("{")
            return self.drop("curly_bracket", repr(text[max(0, i - 30) : i + 30]))
        kept = []
        for line in text.split("\n"):
            if c.remove_citations:
                line, k = CITATION.subn("", line)
                self.bump("citations_removed", k)
            s = line.strip()
            if not s:
                if kept and kept[-1] != "":
                    kept.append("")  # keep paragraph breaks between kept lines
                continue
            ls = s.lower()
            if c.filter_no_terminal_punct and (not s.endswith(C4_TERMINAL) or s.endswith("...")):
                self.bump("lines_removed:no_terminal_punct")
            elif len(s.split()) < c.min_words_per_line:
                self.bump("lines_removed:too_few_words")
            elif c.filter_javascript and "javascript" in ls:
                self.bump("lines_removed:javascript")
            elif c.filter_policy and any(p in ls for p in c.policy_phrases):
                self.bump("lines_removed:policy")
            else:
                kept.append(line.rstrip())
        out = "\n".join(kept).strip()
        n = count_sentences(out)
        if n < c.min_sentences:
            return self.drop("too_few_sentences", f"{n} sentences left < {c.min_sentences}")
        return doc if out == text else replace(doc, text=out)
