"""C4 clean-up rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.2, the Colossal Clean Crawled Corpus).

C4 works mostly on lines: it keeps only lines that end in terminal punctuation and have enough
words, removes lines mentioning JavaScript (warnings to enable it) and cookie / terms-of-use
boilerplate, strips Wikipedia-style citation markers, and then drops whole documents that
contain "lorem ipsum" placeholder text or a curly bracket (a cheap code detector), or that have
too few sentences left. The naughty-word list is not included.

The defaults follow the paper and its released code (tensorflow/datasets
`tensorflow_datasets/text/c4_utils.py`, `clean_page`): lines of at least 5 whitespace words,
at least 3 sentences per page, lines with a word over 1,000 characters removed (code only).
datatrove's `C4QualityFilter` swaps the two counts (3 words, 5 sentences); set
`min_words_per_line: 3, min_sentences: 5` for it. The paper drops a page containing "lorem
ipsum" or "{" anywhere; the released code looks only at lines kept so far (ending in a terminal
mark, long enough, not a JavaScript notice): `doc_rules_scope` chooses ("kept_lines", default,
what produced the C4 dataset, or "page"). docs/data.md has the rule table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from data_prep.document import Document, Drop
from data_prep.steps import Step

CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")  # c4_utils.py's citation_regex
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
DOC_RULES_SCOPES = ("kept_lines", "page")


@dataclass
class C4Config:
    enabled: bool = True
    domains: list[str] = field(default_factory=lambda: ["prose"])
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True  # drop lines not ending in . ! ? "
    min_words_per_line: int = 5  # drop lines with fewer whitespace words
    max_word_length: int | None = 1000  # drop lines with a longer word (None: off)
    filter_javascript: bool = True  # drop lines mentioning javascript
    filter_policy: bool = True  # drop lines with cookie / terms-of-use phrases
    policy_phrases: list[str] = field(default_factory=lambda: list(POLICY))
    filter_lorem_ipsum: bool = True  # drop documents containing "lorem ipsum"
    filter_curly_bracket: bool = True  # drop documents containing "{"
    # where lorem ipsum and "{" are looked for: "kept_lines" (released code) or "page" (paper)
    doc_rules_scope: str = "kept_lines"
    min_sentences: int = 3  # drop documents with fewer sentences left


def count_sentences(text: str) -> int:
    return len(SENTENCE_END.findall(text))


class C4Filter(Step):
    name = "c4"
    reasons = ("lorem_ipsum", "curly_bracket", "too_few_sentences")

    def __init__(self, cfg: C4Config) -> None:
        self.cfg = cfg
        self.domains = tuple(cfg.domains)
        if cfg.doc_rules_scope not in DOC_RULES_SCOPES:
            raise ValueError(
                f"c4.doc_rules_scope={cfg.doc_rules_scope!r}; valid: {', '.join(DOC_RULES_SCOPES)}"
            )

    def process(self, doc: Document) -> Document | Drop:
        c = self.cfg
        text = doc.text
        page = c.doc_rules_scope == "page"
        if page and c.filter_lorem_ipsum and "lorem ipsum" in text.lower():
            return self.drop("lorem_ipsum")
        if page and c.filter_curly_bracket and "{" in text:
            return self.drop("curly_bracket", _around(text, "{"))
        kept = []
        for line in text.split("\n"):
            if c.max_word_length and any(len(w) > c.max_word_length for w in line.split()):
                self.bump("lines_removed:too_long_word")
                continue
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
            elif not page and c.filter_lorem_ipsum and "lorem ipsum" in ls:
                return self.drop("lorem_ipsum")
            elif c.filter_javascript and "javascript" in ls:
                self.bump("lines_removed:javascript")
            elif not page and c.filter_curly_bracket and "{" in s:
                return self.drop("curly_bracket", _around(s, "{"))
            elif c.filter_policy and any(p in ls for p in c.policy_phrases):
                self.bump("lines_removed:policy")
            else:
                kept.append(line.rstrip())
        out = "\n".join(kept).strip()
        n = count_sentences(out)
        if n < c.min_sentences:
            return self.drop("too_few_sentences", f"{n} sentences left < {c.min_sentences}")
        return doc if out == text else replace(doc, text=out)


def _around(text: str, sub: str) -> str:
    i = text.index(sub)
    return repr(text[max(0, i - 30) : i + 30])
