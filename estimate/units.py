"""Reading and writing the quantities of a projection: token counts, ranges, human-sized numbers.

Token and parameter counts are written the way papers write them ("15.6T", "300B", "1.4e12").
Suffixes are decimal and case-insensitive: K = 1e3, M = 1e6, B (or G) = 1e9, T = 1e12.
"""

from __future__ import annotations

import math
import re

SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_COUNT = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.I)

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0


def parse_count(text: str | float | int, what: str = "count") -> float:
    """A positive count from "15.6T", "300B", "1e12", "2,000,000" or a number.

    Raises ValueError naming the bad text and the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise ValueError(
                f"cannot read {what} {text!r}: expected a number with an optional suffix "
                "K, M, B or T (e.g. 300B, 15.6T, 1.4e12, 2_000_000)"
            )
        value = float(m.group(1).replace("_", "").replace(",", ""))
        value *= SUFFIXES.get(m.group(2).lower(), 1.0)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {text!r}")
    return value


def parse_value_range(text: str) -> tuple[float, float | None, float | None]:
    """An assumption on the command line: "0.4" (a point) or "0.4:0.35:0.55" (central:low:high).

    Returns (central, low, high); low/high are None for a point value.
    """
    parts = [p.strip() for p in str(text).split(":")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"cannot read {text!r}: expected a number, or CENTRAL:LOW:HIGH like 0.4:0.35:0.55"
        ) from None
    if len(values) == 1:
        return values[0], None, None
    if len(values) != 3:
        raise ValueError(f"{text!r}: give one number or three (CENTRAL:LOW:HIGH), not {len(values)}")
    central, low, high = values
    if not low <= central <= high:
        raise ValueError(f"{text!r}: need LOW <= CENTRAL <= HIGH, got {low} / {central} / {high}")
    return central, low, high


def human(x: float | None, digits: int = 3) -> str:
    """1.23e6 -> "1.23M"; decimal suffixes up to T, scientific beyond."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    ax = abs(x)
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if scale <= ax < 1000 * scale:
            return f"{x / scale:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def sig(x: float | None, digits: int = 3) -> str:
    """`digits` significant digits, thousands separated: 2412.7 -> "2,410", 0.01234 -> "0.0123"."""
    if x is None:
        return "n/a"
    if x == 0 or abs(x) < 10 ** (digits - 1):
        return f"{x:.{digits}g}"
    rounded = round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)
    return f"{rounded:,.0f}"


def fmt(x: float | None, digits: int = 3) -> str:
    """A plain number with `digits` significant digits, or "n/a"."""
    return "n/a" if x is None else f"{x:.{digits}g}"
