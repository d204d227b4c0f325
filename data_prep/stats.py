"""Accounting: every step and stage counts documents and bytes in, kept, and dropped by reason.

The invariant `in = kept + sum(dropped)` is checked for every step, every stage and the whole
run (records read, bad ones included, = documents packed + everything dropped anywhere), so no
document leaves the pipeline without a recorded reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_prep.document import BadRecord, Document


def printable(text: str) -> str:
    """`text` made safe to write as UTF-8 (lone surrogates become backslash escapes)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class AccountingError(RuntimeError):
    """Raised when documents went missing: in != kept + dropped."""


@dataclass
class Counts:
    docs: int = 0
    bytes: int = 0

    def add(self, nbytes: int, n: int = 1) -> None:
        self.docs += n
        self.bytes += nbytes


@dataclass
class StepStats:
    """What one step (or a whole stage) saw, forwarded and dropped, by reason."""

    name: str
    examples_per_reason: int = 3
    snippet_chars: int = 300
    seen: Counts = field(default_factory=Counts)
    kept: Counts = field(default_factory=Counts)
    dropped: dict[str, Counts] = field(default_factory=dict)
    modified: int = 0  # kept documents whose text the step changed
    counters: dict[str, int] = field(default_factory=dict)  # step-specific (lines removed, ...)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0

    def count_in(self, nbytes: int) -> None:
        self.seen.add(nbytes)

    def keep(self, nbytes: int, modified: bool = False) -> None:
        self.kept.add(nbytes)
        self.modified += int(modified)

    def drop(self, rec: Document | BadRecord, reason: str, detail: str = "") -> None:
        nbytes = rec.nbytes
        self.dropped.setdefault(reason, Counts()).add(nbytes)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.examples_per_reason:
            text = rec.text if isinstance(rec, Document) else rec.snippet
            ex.append(
                {
                    "id": printable(rec.id),
                    "source": printable(rec.source),
                    "detail": printable(detail),
                    "snippet": printable(text[: self.snippet_chars]),
                }
            )

    def bump(self, counter: str, n: int = 1) -> None:
        if n:
            self.counters[counter] = self.counters.get(counter, 0) + n

    @property
    def dropped_docs(self) -> int:
        return sum(c.docs for c in self.dropped.values())

    @property
    def dropped_bytes(self) -> int:
        return sum(c.bytes for c in self.dropped.values())

    def check(self) -> None:
        """Raise AccountingError unless seen = kept + dropped, in documents."""
        if self.seen.docs != self.kept.docs + self.dropped_docs:
            raise AccountingError(
                f"{self.name}: {self.seen.docs} documents in != {self.kept.docs} kept + "
                f"{self.dropped_docs} dropped {dict((r, c.docs) for r, c in self.dropped.items())}"
            )

    def merge(self, other: StepStats) -> None:
        """Add `other`'s counts (from another worker's batch) to these."""
        self.seen.add(other.seen.bytes, other.seen.docs)
        self.kept.add(other.kept.bytes, other.kept.docs)
        for r, c in other.dropped.items():
            self.dropped.setdefault(r, Counts()).add(c.bytes, c.docs)
        self.modified += other.modified
        for k, v in other.counters.items():
            self.bump(k, v)
        for r, exs in other.examples.items():
            mine = self.examples.setdefault(r, [])
            mine.extend(exs[: max(0, self.examples_per_reason - len(mine))])
        self.seconds += other.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "docs_in": self.seen.docs,
            "bytes_in": self.seen.bytes,
            "docs_kept": self.kept.docs,
            "bytes_kept": self.kept.bytes,
            "docs_dropped": self.dropped_docs,
            "bytes_dropped": self.dropped_bytes,
            "dropped": {
                r: {"docs": c.docs, "bytes": c.bytes} for r, c in sorted(self.dropped.items())
            },
            "modified": self.modified,
            "counters": dict(sorted(self.counters.items())),
            "examples": {r: self.examples[r] for r in sorted(self.examples)},
            "seconds": round(self.seconds, 6),  # time inside the step, summed over workers
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        s = cls(d["name"])
        s.seen = Counts(d["docs_in"], d["bytes_in"])
        s.kept = Counts(d["docs_kept"], d["bytes_kept"])
        s.dropped = {r: Counts(c["docs"], c["bytes"]) for r, c in d["dropped"].items()}
        s.modified = d["modified"]
        s.counters = dict(d["counters"])
        s.examples = {r: list(v) for r, v in d["examples"].items()}
        s.seconds = d["seconds"]
        return s
