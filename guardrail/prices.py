"""Prices: USD per million prompt and completion tokens, per model, from the ``prices`` setting.

A ``PriceTable`` names models (as clients send them in ``model``) and an optional ``default`` for every
other model; a model it does not price costs None, and its tokens are still counted (see
``accounting.py``). The setting is a TOML table, or inline JSON, or the path of a ``.json`` or
``.toml`` file holding the same table.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrail.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Price:
    """USD per million prompt (input) and completion (output) tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        """The USD of so many tokens."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


@dataclass(frozen=True)
class PriceTable:
    """Prices per model, and a ``default`` for models the table does not name (None: not priced)."""

    models: tuple[tuple[str, Price], ...] = ()
    default: Price | None = None
    _lookup: dict[str | None, Price] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lookup", dict(self.models))

    @classmethod
    def of(cls, models: Mapping[str, Price], default: Price | None = None) -> PriceTable:
        """A table from a mapping of model names to prices."""
        return cls(tuple(sorted(models.items())), default)

    def price(self, model: str | None) -> Price | None:
        """The price of ``model``: its own, else the default, else None."""
        return self._lookup.get(model, self.default)

    def cost(self, model: str | None, prompt_tokens: float, completion_tokens: float) -> float | None:
        """The USD of so many tokens of ``model``, or None when it has no price."""
        price = self._lookup.get(model, self.default)
        return None if price is None else price.cost(prompt_tokens, completion_tokens)

    @classmethod
    def parse(cls, value: Any, where: str, base: Path | None = None) -> PriceTable:
        """A price table from a setting: a table (TOML, or a mapping), or a string, either inline JSON or
        the path of a ``.json`` or ``.toml`` file (relative to ``base`` when given). ``''``: no prices."""
        if isinstance(value, PriceTable):
            return value
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return cls()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except ValueError as exc:
                    raise ConfigError(f"{where}: prices is not valid JSON: {exc}") from exc
            else:
                value = _read_prices(Path(text) if base is None else base / text, where)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: prices must be a table of models, a .json or .toml file, or inline JSON; "
                f"got {value!r}"
            )
        models: dict[str, Price] = {}
        default = None
        for model, entry in value.items():
            if not isinstance(model, str) or not model.strip():
                raise ConfigError(f"{where}: prices: a model name must be a non-empty string, got {model!r}")
            price = _price(entry, f"{where}: prices.{model}")
            if model == "default":
                default = price
            else:
                models[model] = price
        return cls.of(models, default)


def _read_prices(path: Path, where: str) -> Any:
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(f"{where}: prices file {path} must end in .json or .toml")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read prices file {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(data) if path.suffix == ".json" else tomllib.loads(data.decode())
    except (ValueError, UnicodeDecodeError) as exc:  # JSON's and TOML's decode errors are ValueErrors
        kind = path.suffix[1:].upper()
        raise ConfigError(f"{where}: prices file {path} is not valid {kind}: {exc}") from exc


def _price(entry: Any, where: str) -> Price:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a table with input and output, got {entry!r}")
    unknown = sorted(set(entry) - {"input", "output"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; use input and output")
    values = []
    for key in ("input", "output"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}.{key} must be USD per million tokens (a number), got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}.{key} must be 0 or more, got {value!r}")
        values.append(float(value))
    return Price(*values)
