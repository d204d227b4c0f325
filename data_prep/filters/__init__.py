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


# the quality filters in the order they run: FiltersConfig field -> the Step it configures
FILTERS: dict[str, type[Step]] = {
    "language": LanguageFilter,
    "gopher_repetition": GopherRepetition,
    "gopher_quality": GopherQuality,
    "c4": C4Filter,
    "fineweb": FineWebFilter,
    "code": CodeFilter,
}


def build_filters(cfg: FiltersConfig) -> list[Step]:
    """The enabled filters, in the order they run."""
    return [step(getattr(cfg, name)) for name, step in FILTERS.items() if getattr(cfg, name).enabled]


__all__ = [
    "C4Config",
    "C4Filter",
    "CodeFilter",
    "CodeFilterConfig",
    "FILTERS",
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
