"""One settings path: command-line flags, then ``GUARDRAIL_*`` environment variables, then defaults.

Every entry point builds one frozen ``Settings`` with ``Settings.load(**flags)``; the environment is read
then, never at import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from guardrail.errors import ConfigError
from guardrail.models import DEFAULT_MODEL, default_cache_dir


@dataclass(frozen=True)
class Settings:
    """Everything the guard needs to start."""

    model: str = DEFAULT_MODEL
    cache_dir: Path | None = None
    threads: int = 1
    target_pass: float = 0.95
    threshold: float | None = None
    cache_size: int = 4096

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Merge flags (None means not given) over ``GUARDRAIL_<NAME>`` variables over defaults."""
        environ = os.environ if environ is None else environ
        unknown = set(flags) - {field.name for field in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for field in fields(cls):
            flag = flags.get(field.name)
            if flag is not None:
                values[field.name] = flag
            elif environ.get(f"GUARDRAIL_{field.name.upper()}", "").strip():
                # An empty variable counts as unset, as in most shells' configuration habits.
                raw = environ[f"GUARDRAIL_{field.name.upper()}"].strip()
                values[field.name] = _convert(field.name, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    @property
    def cache_path(self) -> Path:
        """The cache directory in force."""
        return self.cache_dir or default_cache_dir()

    def validate(self) -> None:
        """Raise ``ConfigError`` for values no guard can run with."""
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if not 0.5 <= self.target_pass < 1:
            raise ConfigError(f"target_pass must be in [0.5, 1), got {self.target_pass}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        if self.cache_size < 0:
            raise ConfigError(f"cache_size must be 0 or more, got {self.cache_size}")


_TYPES: dict[str, type] = {"threads": int, "target_pass": float, "threshold": float, "cache_size": int}


def _convert(name: str, raw: str) -> Any:
    if name == "cache_dir":
        return Path(raw)
    kind = _TYPES.get(name, str)
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"GUARDRAIL_{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
