"""Pipeline steps: small objects with one job each, in the style of datatrove.

A step has a `name`, the `reasons` it may drop a document for, the `domains` it applies to, and
`process(doc) -> Document | Drop`. A returned Document may be a changed copy (normalisation,
line removal, PII scrubbing). `run_steps` routes each document through the steps that apply to
its domain (prose filters never see code), stopping at the first Drop, and records every step's
accounting in a StepStats plus the stage totals under "<step>/<reason>".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

from data_prep.document import Document, Drop
from data_prep.stats import StepStats


class Step:
    name: str = "step"
    reasons: tuple[str, ...] = ()  # every reason `process` may drop a document for
    domains: tuple[str, ...] = ("prose", "code")

    def applies(self, doc: Document) -> bool:
        return doc.domain in self.domains

    def process(self, doc: Document) -> Document | Drop:  # pragma: no cover - interface
        raise NotImplementedError

    def drop(self, reason: str, detail: str = "") -> Drop:
        if reason not in self.reasons:
            raise ValueError(f"{self.name}: unknown reason {reason!r}; declared: {self.reasons}")
        return Drop(reason, detail)

    def bump(self, counter: str, n: int = 1) -> None:
        """Count something that is not a drop (lines removed, e-mails replaced, ...)."""
        if n and self._stats is not None:
            self._stats.bump(counter, n)

    _stats: StepStats | None = None


def run_steps(
    steps: Sequence[Step],
    docs: Iterable[Document],
    stage: StepStats,
    step_stats: dict[str, StepStats],
    dropped: list[tuple[Document, str, str]] | None = None,
) -> Iterator[Document]:
    """Yield the documents that pass all applicable steps; account for every one of them."""
    for doc in docs:
        stage.count_in(doc.nbytes)
        original = doc.text
        for step in steps:
            if not step.applies(doc):
                continue
            st = step_stats[step.name]
            step._stats = st
            t = time.perf_counter()
            before = doc.nbytes
            st.count_in(before)
            out = step.process(doc)
            st.seconds += time.perf_counter() - t
            if isinstance(out, Drop):
                st.drop(doc, out.reason, out.detail)
                stage.drop(doc, f"{step.name}/{out.reason}", out.detail)
                if dropped is not None:
                    dropped.append((doc, f"{step.name}/{out.reason}", out.detail))
                break
            st.keep(out.nbytes, modified=out.text != doc.text)
            doc = out
        else:
            stage.keep(doc.nbytes, modified=doc.text != original)
            yield doc
