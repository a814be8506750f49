"""The one error tree of guardrail.

    GuardrailError
     ├── ScenarioError        a scenario document is malformed (names the file and line)
     ├── DataError            an evaluation or training file is malformed (names the file and line)
     ├── ModelError           a model cannot be resolved, exported or loaded
     │    └── MissingExtraError   an optional dependency is not installed (says what to install)
     ├── ConfigError          a setting is invalid
     └── UpstreamError        the upstream cannot be reached, timed out, or broke off (the proxy's 502/504)

Library errors (onnxruntime, tokenizers, huggingface_hub, torch) are translated into these at the
boundary with ``raise ... from``, so callers and the CLI only ever catch ``GuardrailError``.
"""

from __future__ import annotations

from typing import Literal


class GuardrailError(Exception):
    """Base class of every error guardrail raises on purpose."""


class ScenarioError(GuardrailError):
    """A scenario document is malformed."""

    def __init__(self, message: str, path: str = "<scenario>", line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class DataError(GuardrailError):
    """An evaluation or training data file is malformed."""

    def __init__(self, message: str, path: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class ModelError(GuardrailError):
    """A model cannot be resolved, exported or loaded."""


class MissingExtraError(ModelError):
    """An optional dependency is missing; the message carries the exact install hint."""


class ConfigError(GuardrailError):
    """A setting is invalid."""


Failure = Literal["unreachable", "timeout", "broken"]


class UpstreamError(GuardrailError):
    """The upstream cannot be reached, did not answer in time, or broke off mid-response.

    ``detail`` starts with the failure's name as httpx names it (ConnectError, ReadTimeout, ...):
    library-neutral, and what people search their logs for.
    """

    def __init__(self, kind: Failure, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail

    @property
    def status(self) -> int:
        """What the client is answered with when no response has started: 504 or 502."""
        return 504 if self.kind == "timeout" else 502
