"""The record every pipeline step passes along, and the marker a step returns to drop one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document: a stable `id`, its `text`, where it came from and what kind of text it is.

    `domain` ("prose" or "code") routes the document to the filters that suit it.
    `metadata` carries whatever a reader or step wants to keep (file path, line number, ...).
    """

    id: str
    text: str
    source: str
    domain: str = "prose"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass"))


@dataclass
class Drop:
    """Returned by a step instead of a document: the document is removed for `reason`.

    `detail` is a short human-readable note for the report (e.g. "mean word length 2.1 < 3").
    """

    reason: str
    detail: str = ""


@dataclass
class BadRecord:
    """Something a reader could not turn into a document (invalid UTF-8, malformed JSON, ...).

    Readers yield these instead of raising, so bad input is counted under its own reason in the
    read stage's accounting and never lost silently.
    """

    reason: str
    id: str
    source: str
    nbytes: int
    detail: str = ""
    snippet: str = ""
