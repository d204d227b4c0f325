"""Loading a YAML config into a dataclass: the one way train, data_prep and estimate do it.

Precedence: the dataclass defaults, then the YAML file, then `key=value` command-line
overrides (OmegaConf dotlist syntax, list indices included: `sources.0.path=...`). Unknown keys
and bad values are one-line ValueErrors naming where they came from: the file or the command
line. OmegaConf (a project dependency) is imported inside the function, so importing
`contracts` stays standard-library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def load_structured(schema: type, path: str | Path | None = None, overrides: Sequence[str] = (),
                    *, example: str = "key=value", prepare: Callable | None = None) -> Any:
    """An instance of the dataclass `schema` from defaults < YAML file < overrides.

    `prepare(base, user, overrides) -> (base, user, overrides)` may adjust the three before
    they are merged (train uses it for model presets and the spelling of off switches).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override {bad[0]!r} is not of the form key=value (e.g. {example})")
    user = OmegaConf.load(path) if path else OmegaConf.create()
    base = OmegaConf.structured(schema)
    if prepare is not None:
        base, user, overrides = prepare(base, user, overrides)
    where = str(path) if path else "defaults"
    try:
        merged = OmegaConf.merge(base, user)
        for override in overrides:  # one at a time, so an error names the override
            where = f"command-line override {override!r}"
            merged.merge_with_dotlist([override])
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ValueError(f"unknown config key {e.full_key!r} (in {where})") from None
    except ValidationError as e:
        raise ValueError(
            f"bad value for config key {e.full_key!r} (in {where}): {e.msg.splitlines()[0]}"
        ) from None
    return OmegaConf.to_object(merged)


# Valid ranges of config values: every key of a config dataclass has one, checked at config
# time (`check_ranges`), so that a bad value is one line naming it, before anything runs.

@dataclass(frozen=True)
class Range:
    """A finite number in [lo, hi] (`open_lo`/`open_hi` exclude the bound); `note` says what a
    special value within it means (e.g. "0 = off"); `optional`: None (unset) is valid too."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    note: str = ""
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)
              and (self.lo is None or (value > self.lo if self.open_lo else value >= self.lo))
              and (self.hi is None or (value < self.hi if self.open_hi else value <= self.hi)))
        if ok:
            return None
        finite = isinstance(value, (int, float)) and not math.isfinite(value)
        return ("a finite number " if finite else "") + str(self)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = (f"in {'(' if self.open_lo else '['}{_number(self.lo)}, {_number(self.hi)}"
                    f"{')' if self.open_hi else ']'}")
        elif self.lo is not None:
            text = f"{'>' if self.open_lo else '>='} {_number(self.lo)}"
        else:
            text = f"{'<' if self.open_hi else '<='} {_number(self.hi)}"
        return text + (f" ({self.note})" if self.note else "")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Choice:
    """One of a few words."""

    values: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"one of {', '.join(self.values)}"


@dataclass(frozen=True)
class Text:
    """A string; `empty=False` refuses the empty (or blank) one."""

    empty: bool = True

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and (self.empty or value.strip()):
            return None
        return "a non-empty string" if not self.empty else "a string"


@dataclass(frozen=True)
class Flag:
    """true or false (the typed config refuses anything else before the ranges are checked)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "true or false"


@dataclass(frozen=True)
class Each:
    """A list whose every item is valid by `item`."""

    item: Any

    def problem(self, value: Any) -> str | None:
        if isinstance(value, (list, tuple)) and all(self.item.problem(v) is None for v in value):
            return None
        return f"a list of numbers {self.item}"


def check_ranges(config: Any, ranges: dict[str, Any], prefix: str = "",
                 skip: tuple[str, ...] = ()) -> None:
    """Raise ValueError, one line ("optim.lr must be > 0, got inf"), for the first field of the
    dataclass instance `config` outside its range in `ranges` (field name -> Range, Choice,
    Text, Flag or Each), in the table's order. A field without a range is a bug of the config's
    code (TypeError): every key must say what it accepts. `skip`: nested sections, checked on their own."""
    missing = [f.name for f in fields(config) if f.name not in ranges and f.name not in skip]
    if missing:
        raise TypeError(f"config key {prefix}{missing[0]} has no valid range (add it to RANGES)")
    for name, valid in ranges.items():  # in the table's order: a field others derive from first
        value = getattr(config, name)
        problem = valid.problem(value)
        if problem:
            raise ValueError(f"{prefix}{name} must be {problem}, got {value!r}")
