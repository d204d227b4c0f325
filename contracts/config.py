"""Loading a YAML config into a dataclass: the one way train, data_prep and estimate do it.

Precedence: the dataclass defaults, then the YAML file, then `key=value` command-line
overrides (OmegaConf dotlist syntax, list indices included: `sources.0.path=...`). Unknown keys
and bad values are one-line ValueErrors naming where they came from: the file or the command
line. OmegaConf (a project dependency) is imported inside the function, so importing
`contracts` stays standard-library only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
