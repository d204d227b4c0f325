"""Optional language identification with lingua (github.com/pemistahl/lingua-py), which ships
its n-gram models inside the package and so works offline.

A prose document is kept when the detector's most likely language is one of `languages` with
confidence at least `min_confidence`. FineWeb (Penedo et al. 2024) and Gopher keep English
with a fastText / langdetect score threshold in the same way; lingua is used here because it
needs no model download. Install with `pip install -e '.[lang]'` (part of the dev install).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from data_prep.document import Document, Drop
from data_prep.steps import Step


@dataclass
class LanguageConfig:
    enabled: bool = False
    domains: list[str] = field(default_factory=lambda: ["prose"])
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep
    # languages the detector chooses between (fewer is faster and steadier); [] = all of lingua's
    candidates: list[str] = field(
        default_factory=lambda: ["en", "de", "fr", "es", "it", "pt", "nl"]
    )
    min_confidence: float = 0.5
    max_chars: int = 2000  # classify this prefix of the document


class Detector(Protocol):
    def detect(self, text: str) -> tuple[str, float]: ...


class LinguaDetector:
    """(ISO 639-1 code, confidence) of the most likely language, from lingua."""

    def __init__(self, candidates: list[str]) -> None:
        try:
            from lingua import IsoCode639_1, Language, LanguageDetectorBuilder
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "filters.language.enabled=true needs lingua: pip install lingua-language-detector"
            ) from e
        if candidates:
            langs = [
                Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in candidates
            ]
            builder = LanguageDetectorBuilder.from_languages(*langs)
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        self.detector = builder.build()

    def detect(self, text: str) -> tuple[str, float]:
        values: Any = self.detector.compute_language_confidence_values(text)
        if not values:
            return "unknown", 0.0
        top = values[0]
        return top.language.iso_code_639_1.name.lower(), float(top.value)


class LanguageFilter(Step):
    name = "language"
    reasons = ("wrong_language", "low_confidence")

    def __init__(self, cfg: LanguageConfig, detector: Detector | None = None) -> None:
        self.cfg = cfg
        self.domains = tuple(cfg.domains)
        self.keep = {c.lower() for c in cfg.languages}
        self.detector = detector if detector is not None else LinguaDetector(cfg.candidates)

    def process(self, doc: Document) -> Document | Drop:
        lang, conf = self.detector.detect(doc.text[: self.cfg.max_chars])
        doc.metadata["language"] = lang
        doc.metadata["language_confidence"] = round(conf, 3)
        if lang not in self.keep:
            return self.drop("wrong_language", f"{lang} ({conf:.2f})")
        if conf < self.cfg.min_confidence:
            return self.drop("low_confidence", f"{lang} {conf:.2f} < {self.cfg.min_confidence}")
        return doc
