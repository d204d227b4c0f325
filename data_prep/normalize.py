"""Normalisation: Unicode NFC, control characters, whitespace and line endings, per domain.

Prose and code want different treatment: prose can have runs of spaces collapsed and blank
lines squeezed, while code keeps its indentation, tabs and blank-line layout. Both get NFC
(one encoding of each accented character, so equal text hashes equally in dedup), `\\n` line
endings and no C0/C1 control characters other than tab and newline.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace

from data_prep.document import Document, Drop
from data_prep.steps import Step

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_FORMAT = re.compile("[\ufeff\u200b\u2060\u00ad]")  # BOM, zero-width space, word joiner, SHY
_UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUN = re.compile(r"[ \t]{2,}")
_TRAILING = re.compile(r"[ \t]+$", re.M)


@dataclass
class DomainNormalizeConfig:
    nfc: bool = True  # Unicode canonical composition
    line_endings: bool = True  # \r\n and \r -> \n
    strip_control: bool = True  # drop C0/C1 control characters except \t and \n
    strip_format: bool = True  # drop BOM, zero-width space, word joiner, soft hyphen
    unicode_spaces: bool = False  # no-break and other Unicode spaces -> " "
    collapse_spaces: bool = False  # runs of spaces/tabs inside a line -> one space
    strip_trailing: bool = True  # trailing spaces/tabs on every line
    max_blank_lines: int = -1  # at most this many consecutive blank lines; -1 = unlimited
    final_newline: bool = False  # end the text with exactly one "\n"


def _prose() -> DomainNormalizeConfig:
    return DomainNormalizeConfig(unicode_spaces=True, collapse_spaces=True, max_blank_lines=1)


def _code() -> DomainNormalizeConfig:
    return DomainNormalizeConfig(max_blank_lines=2, final_newline=True)


@dataclass
class NormalizeConfig:
    enabled: bool = True
    prose: DomainNormalizeConfig = field(default_factory=_prose)
    code: DomainNormalizeConfig = field(default_factory=_code)


def normalize_text(text: str, c: DomainNormalizeConfig) -> str:
    if c.line_endings:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if c.nfc:
        text = unicodedata.normalize("NFC", text)
    if c.strip_control:
        text = _CONTROL.sub("", text)
    if c.strip_format:
        text = _FORMAT.sub("", text)
    if c.unicode_spaces:
        text = _UNICODE_SPACES.sub(" ", text)
    if c.collapse_spaces:
        text = _SPACE_RUN.sub(" ", text)
    if c.strip_trailing:
        text = _TRAILING.sub("", text)
    if c.max_blank_lines >= 0:
        n = c.max_blank_lines
        text = re.sub(r"\n{" + str(n + 2) + ",}", "\n" * (n + 1), text)
    text = text.lstrip("\n").rstrip()
    if c.final_newline and text:
        text += "\n"
    return text


class Normalizer(Step):
    """Normalise a document's text with its domain's settings; drop it if nothing is left."""

    name = "normalize"
    reasons = ("empty_after_normalize",)

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg

    def process(self, doc: Document) -> Document | Drop:
        c = self.cfg.code if doc.domain == "code" else self.cfg.prose
        text = normalize_text(doc.text, c)
        if not text.strip():
            return self.drop("empty_after_normalize", f"{doc.nbytes} bytes of whitespace/controls")
        return doc if text == doc.text else replace(doc, text=text)
