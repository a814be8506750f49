"""One settings path: command-line flags, then ``GUARDRAIL_*`` environment variables, then a TOML file,
then defaults.

Every entry point builds one frozen ``Settings`` with ``Settings.load(config=..., **flags)``; the
environment and the file are read then, never at import time. The TOML file holds the same names at its
top level (``upstream = "http://..."``, ``read_timeout = 60``); relative paths in it are relative to
the file. The file is ``--config``, else ``GUARDRAIL_CONFIG``, else none.

``prices`` is the one setting with a structure: in the TOML file a table per model
(``[prices."gpt-4o-mini"]`` with ``input`` and ``output``, USD per million tokens, and an optional
``[prices.default]``); as a flag or ``GUARDRAIL_PRICES``, the same as inline JSON or the path of a
``.json`` or ``.toml`` file holding it (see ``PriceTable.parse``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from guardrail.errors import ConfigError
from guardrail.models import DEFAULT_MODEL, default_cache_dir
from guardrail.prices import PriceTable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Mode = Literal["enforce", "shadow"]
MODES: tuple[Mode, ...] = ("enforce", "shadow")
DEFAULT_REFUSAL = "I'm sorry, this question is off-topic. I cannot answer that."
# Layer 2: the system instruction added to every passed request. Placeholders: {title}, {description},
# {scenarios} (the document's scenarios, one "- " bullet a line) and {refusal}.
DEFAULT_INSTRUCTION = (
    "You are {title}: {description} If the user's question is unrelated to this, reply exactly: {refusal}"
)
INSTRUCTION_FIELDS = frozenset({"title", "description", "scenarios", "refusal"})


@dataclass(frozen=True)
class Settings:
    """Everything the guard and the server need to start."""

    # The guard.
    scenario: Path | None = None
    model: str = DEFAULT_MODEL
    cache_dir: Path | None = None
    threads: int = 1
    target_pass: float = 0.95
    threshold: float | None = None
    cache_size: int = 4096
    # Layer 3: a classifier written by `guardrail retrain` (its model card sits beside it), watched for
    # changes every reload_interval seconds (0: only SIGHUP or POST /guardrail/reload reload it).
    classifier: Path | None = None
    classifier_threshold: float | None = None
    reload_interval: float = 2.0
    # Layer 2.
    instruction: bool = True
    instruction_template: str = DEFAULT_INSTRUCTION
    # The server.
    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    mode: Mode = "enforce"
    refusal: str = DEFAULT_REFUSAL
    max_body_bytes: int = 10 * 2**20
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    max_connections: int = 100
    # Encoder threads per server process; unset: 2 with one process, the cores shared out among several.
    encoder_workers: int | None = None
    max_batch: int = 32
    # Server processes (guardrail serve --workers N); their metrics add up in one scrape.
    workers: int = 1
    # The token for POST /guardrail/feedback and /guardrail/reload; unset, those endpoints are off.
    admin_token: str | None = field(default=None, repr=False)  # a secret: never in logs or reprs
    # The interaction log; an empty path turns it off.
    log_path: Path | None = Path("interactions.jsonl")
    log_max_bytes: int = 100 * 2**20
    log_backups: int = 5
    log_queue: int = 10_000
    # USD per million tokens by model, for the *_usd_total metrics; empty: tokens are counted, not money.
    prices: PriceTable = field(default_factory=PriceTable)

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, config: Path | None = None, **flags: Any
    ) -> Settings:
        """Merge flags (None means not given) over ``GUARDRAIL_<NAME>`` over the TOML file over defaults."""
        environ = os.environ if environ is None else environ
        names = {field.name for field in fields(cls)}
        unknown = set(flags) - names
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if config is None and environ.get("GUARDRAIL_CONFIG", "").strip():
            config = Path(environ["GUARDRAIL_CONFIG"].strip())
        values: dict[str, Any] = _read_toml(config, names) if config is not None else {}
        for name in names:
            flag = flags.get(name)
            variable = f"GUARDRAIL_{name.upper()}"
            if flag is not None:
                values[name] = _coerce(name, flag, f"--{name.replace('_', '-')}")
            elif environ.get(variable, "").strip():
                # An empty variable counts as unset, as in most shells' configuration habits.
                values[name] = _coerce(name, environ[variable].strip(), variable)
        settings = cls(**values)
        settings.validate()
        return settings

    @property
    def encoders(self) -> int:
        """Encoder threads in each server process: ``encoder_workers`` when set, else 2 for a single
        process, and with several the cores shared out (at least 1 each), so that N processes do not
        each start 2 and oversubscribe the machine."""
        if self.encoder_workers is not None:
            return self.encoder_workers
        if self.workers == 1:
            return 2
        return max(1, cores() // self.workers)

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
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.refusal.strip():
            raise ConfigError("refusal must not be empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.encoder_workers is not None and self.encoder_workers < 1:
            raise ConfigError(f"encoder_workers must be at least 1, got {self.encoder_workers}")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        if self.log_max_bytes < 1024:
            raise ConfigError(f"log_max_bytes must be at least 1024, got {self.log_max_bytes}")
        if self.log_backups < 0:
            raise ConfigError(f"log_backups must be 0 or more, got {self.log_backups}")
        if self.classifier_threshold is not None and not 0.0 <= self.classifier_threshold <= 1.0:
            raise ConfigError(f"classifier_threshold must be in [0, 1], got {self.classifier_threshold}")
        if not (math.isfinite(self.reload_interval) and self.reload_interval >= 0):
            raise ConfigError(f"reload_interval must be 0 or more seconds, got {self.reload_interval}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("admin_token must be at least 16 characters")
        check_instruction_template(self.instruction_template)
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise ConfigError(f"upstream must be an http:// or https:// URL, got {self.upstream!r}")


_AT_LEAST_ONE = ("max_body_bytes", "max_connections", "max_batch", "log_queue", "workers")


def cores() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_instruction_template(template: str) -> None:
    """Raise ``ConfigError`` for a template with unknown placeholders or broken braces."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"instruction_template: {exc} (write a literal brace as {{{{ or }}}})") from exc
    unknown = sorted(fields - INSTRUCTION_FIELDS)
    if unknown:
        raise ConfigError(
            f"instruction_template: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
            f"use {', '.join('{' + n + '}' for n in sorted(INSTRUCTION_FIELDS))}"
        )
    if "refusal" not in fields:
        raise ConfigError("instruction_template must contain {refusal}: layer 2 recognises that sentence")


_KINDS: dict[str, type] = {
    "threads": int,
    "target_pass": float,
    "threshold": float,
    "cache_size": int,
    "port": int,
    "max_body_bytes": int,
    "connect_timeout": float,
    "read_timeout": float,
    "max_connections": int,
    "encoder_workers": int,
    "workers": int,
    "max_batch": int,
    "log_max_bytes": int,
    "log_backups": int,
    "log_queue": int,
    "classifier_threshold": float,
    "reload_interval": float,
    "instruction": bool,
}
_PATHS = {"scenario", "cache_dir", "log_path", "classifier"}
_NAMES: dict[type, str] = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, where: str, typed: bool = False, base: Path | None = None) -> Any:
    """Turn a flag, environment or TOML value into the setting's type, or say where it was wrong.

    ``typed`` values come from TOML, which has numbers: a quoted number there is a mistake. ``base``
    is the TOML file's directory, which a file path in it is relative to.
    """
    if name == "prices":
        return PriceTable.parse(value, where, base)
    if name in _PATHS:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a path, got {value!r}")
        # An empty log path turns the log off; an empty scenario or cache path means "not set".
        return Path(value) if value.strip() else None
    kind = _KINDS.get(name, str)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and not typed and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    wrong = isinstance(value, bool) or (kind is str and not isinstance(value, str))
    if wrong or (typed and kind is not str and isinstance(value, str)):
        raise ConfigError(f"{where}: {name} must be {_NAMES[kind]}, got {value!r}")
    try:
        result = kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name}={value!r} is not a valid {kind.__name__}") from exc
    if kind is int and isinstance(value, float) and value != result:
        raise ConfigError(f"{where}: {name} must be a whole number, got {value!r}")
    if kind is float and not math.isfinite(result):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    return result


def _read_toml(path: Path, names: set[str]) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    values = {
        name: _coerce(name, value, str(path), typed=True, base=path.parent) for name, value in table.items()
    }
    for name in _PATHS:
        value = values.get(name)
        if isinstance(value, Path) and not value.is_absolute():
            values[name] = path.parent / value
    return values
