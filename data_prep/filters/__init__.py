"""Quality filters, each a Step with named rejection reasons and thresholds from YAML.

Prose filters (language, Gopher repetition and quality, C4, FineWeb) apply to "prose"
documents and the code preset to "code" documents by default; each filter's `domains` list
can change that. `build_filters` returns the enabled ones in the order they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_prep.filters.c4 import C4Config, C4Filter
from data_prep.filters.code import CodeFilter, CodeFilterConfig
from data_prep.filters.fineweb import FineWebConfig, FineWebFilter
from data_prep.filters.gopher import (
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
)
from data_prep.filters.lang import LanguageConfig, LanguageFilter
from data_prep.filters.pii import PIIConfig, PIIScrubber
from data_prep.steps import Step


@dataclass
class FiltersConfig:
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    code: CodeFilterConfig = field(default_factory=CodeFilterConfig)


def build_filters(cfg: FiltersConfig) -> list[Step]:
    steps: list[Step] = []
    if cfg.language.enabled:
        steps.append(LanguageFilter(cfg.language))
    if cfg.gopher_repetition.enabled:
        steps.append(GopherRepetition(cfg.gopher_repetition))
    if cfg.gopher_quality.enabled:
        steps.append(GopherQuality(cfg.gopher_quality))
    if cfg.c4.enabled:
        steps.append(C4Filter(cfg.c4))
    if cfg.fineweb.enabled:
        steps.append(FineWebFilter(cfg.fineweb))
    if cfg.code.enabled:
        steps.append(CodeFilter(cfg.code))
    return steps


__all__ = [
    "C4Config",
    "C4Filter",
    "CodeFilter",
    "CodeFilterConfig",
    "FineWebConfig",
    "FineWebFilter",
    "FiltersConfig",
    "GopherQuality",
    "GopherQualityConfig",
    "GopherRepetition",
    "GopherRepetitionConfig",
    "LanguageConfig",
    "LanguageFilter",
    "PIIConfig",
    "PIIScrubber",
    "build_filters",
]
