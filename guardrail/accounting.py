"""Tokens and money: what the upstream reported spending, and an honest estimate of what refusing saved.

A request the guard refuses would have cost its prompt (system, history, user text and tools, as the
upstream counts them) plus a completion. Neither is known, since the request never went out, so both are
estimated from the requests that did:

- **Prompt tokens** follow ``base + per_message * messages + chars / chars_per_token`` (plus layer 2's
  instruction, below): a plain characters-per-token ratio misses the chat template's tokens around
  every message and before the reply. The numbers are fitted per model (the request's ``model``) by
  least squares on the ``usage.prompt_tokens`` the upstream reports, from decayed sums (each
  observation weighs ``DECAY`` times the one after it, a memory of about a thousand requests) plus a
  prior at OpenAI's published overheads and four characters a token. So the estimate starts sane,
  moves to the data as it comes, and keeps the prior where the data says nothing (when every request
  has the same number of messages, the prior splits the constant between ``base`` and
  ``per_message``). The fit is solved when an estimate needs it after new observations, never per
  observation.
- A sample describes what was sent. A request that carried layer 2's instruction counts the system
  message the instruction may have added, and the instruction's characters as a term of their own with
  its own rate: it is one fixed text, and how it tokenizes says little about the clients' text
  (estimated at the clients' rate, it put blocked requests 10% low on SmolLM2's and Qwen2.5's token
  counts). A refused request is estimated as the client sent it, without the instruction.
- **Completion tokens** are the decayed mean of ``usage.completion_tokens`` on answered requests (the
  LLM's own refusals, short by design, and broken-off replies left out); ``DEFAULT_COMPLETION_TOKENS``
  until a reply has been seen.

A model without observations of its own uses the fit over all models, and the defaults before any.
Tokens become USD through a ``PriceTable`` (per model, per million prompt and completion tokens); a model
it does not price costs nothing in the metrics, and its tokens are still counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from guardrail.metrics import LAYERS, Metrics
from guardrail.prices import PriceTable
from guardrail.protocols.base import Conversation
from guardrail.protocols.openai import SYSTEM_ROLES

# OpenAI's chat format costs about 3 tokens per message plus its role, and 3 to start the reply;
# English text runs about 4 characters a token. Other templates differ by a few tokens, which the fit
# learns.
DEFAULT_CHARS_PER_TOKEN = 4.0
DEFAULT_TOKENS_PER_MESSAGE = 4.0
DEFAULT_BASE_TOKENS = 3.0
# A chat answer until replies have been seen: LMSYS-Chat-1M's replies average about 215 tokens.
DEFAULT_COMPLETION_TOKENS = 200.0
DECAY = 0.999  # per observation: the last ~1,000 requests of a model count
MAX_MODELS = 32  # models fitted apart; more names (clients choose them) share the fit over all models
# Tokens per 1,000 characters, the unit the fit works in so that its sums stay well scaled.
_KILO = 1000.0
# The prior, as ridge penalties toward the defaults (in the fit's units: tokens, and tokens per 1,000
# characters). The template's overheads weigh as much as ten observations: traffic of one shape (every
# request with one user turn) only tells their sum. The client's text rate weighs little, so a few
# requests of different lengths settle it. The instruction's rate weighs least of all: every request
# layer 2 passes carries the same instruction, so the data tells its tokens together with the base, and
# the base's firmer prior leaves them to the instruction. On SmolLM2's and Qwen2.5's own token counts
# for benchmarks/token_estimate.py's conversations, other strengths within 10x did as well.
_PRIOR = (10.0, 10.0, 0.05, 0.01)
# A fit is solved when an estimate needs it and the observations since its last solution are more
# than a 64th of the (decayed) weight behind it: after each of the first 64, then every 16 or so.
_STALE = 64
# Bounds on a fitted rate, tokens per 1,000 characters: whatever the data, 0.5 to 20 characters a token.
_MIN_RATE, _MAX_RATE = _KILO / 20, _KILO / 0.5


class PromptSize(NamedTuple):
    """What a chat request's prompt holds, measured cheaply (on the event loop, for every request)."""

    chars: int  # characters of the client's message text, tool calls and tool definitions
    messages: int
    system: bool  # it has a system (or developer) message, where layer 2's instruction is appended
    media: bool  # it has image, audio or file parts, whose tokens characters do not measure
    added: int = 0  # characters the guard added: layer 2's instruction

    def with_instruction(self, chars: int) -> PromptSize:
        """The request as sent with layer 2's instruction of ``chars`` characters (see ``inject``)."""
        if self.system:  # after the owner's text and a blank line
            return PromptSize(self.chars, self.messages, True, self.media, self.added + chars + 2)
        return PromptSize(self.chars, self.messages + 1, True, self.media, self.added + chars)


def prompt_size(conversation: Conversation) -> PromptSize:
    """The size of a request as the client sent it, from its parsed OpenAI chat body.

    Without a chat body (a custom JSON API) only the judged message and its context are known.
    """
    payload = conversation.payload
    if payload is None:
        text, previous = conversation.text, conversation.previous
        count = (text is not None) + (previous is not None)
        return PromptSize(len(text or "") + len(previous or ""), count, False, False)
    chars = count = 0
    system = media = False
    messages = payload.get("messages")
    # type() rather than isinstance(): the payload is parsed JSON, and this runs for every request.
    for message in messages if type(messages) is list else ():
        if type(message) is not dict:
            continue
        count += 1
        content = message.get("content")
        if type(content) is str:
            chars += len(content)
        elif type(content) is list:
            for part in content:
                if type(part) is dict and part.get("type") == "text":
                    text = part.get("text")
                    chars += len(text) if type(text) is str else 0
                else:
                    media = True
        if not system and message.get("role") in SYSTEM_ROLES:
            system = True
        if "tool_calls" in message:
            chars += _json_chars(message["tool_calls"])
    if "tools" in payload:
        chars += _json_chars(payload["tools"])
    if "functions" in payload:
        chars += _json_chars(payload["functions"])
    return PromptSize(chars, count, system, media)


def _json_chars(value: Any) -> int:
    if not value:
        return 0
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # nesting deeper than orjson writes: uncounted
        return 0


class PromptFit(NamedTuple):
    """The prompt-token model in force for one model."""

    base: float
    per_message: float
    chars_per_token: float  # of the client's text
    instruction_chars_per_token: float  # of layer 2's instruction
    observations: float  # the decayed weight of the data behind it; 0 for the defaults


# The fit's features are (1, messages, client characters, instruction characters), characters in
# thousands so that the sums stay well scaled. A model's statistics, in one list: the upper triangle
# of the features' outer product (10), the features times the tokens (4), and for completions a count
# and a sum (2), all decayed.
_N = 4
_TRIANGLE = [(i, j) for i in range(_N) for j in range(i, _N)]
_WEIGHT, _TOKENS = 14, 15


class _Model:
    """Decayed sufficient statistics of one model's observations, and its fit once solved."""

    __slots__ = ("fit", "n", "s", "since")

    def __init__(self, s: list[float] | None = None) -> None:
        self.s = s if s is not None else [0.0] * 16
        self.n = 0  # prompt observations
        self.since = 0  # prompt observations since the fit was solved
        self.fit: tuple[float, float, float, float] | None = None

    @property
    def weight(self) -> float:
        """The decayed count of prompt observations."""
        return self.s[0]

    def add(self, m: float, c: float, i: float, y: float, g: float) -> None:
        s = self.s
        s[0] = s[0] * g + 1.0
        s[1] = s[1] * g + m
        s[2] = s[2] * g + c
        s[3] = s[3] * g + i
        s[4] = s[4] * g + m * m
        s[5] = s[5] * g + m * c
        s[6] = s[6] * g + m * i
        s[7] = s[7] * g + c * c
        s[8] = s[8] * g + c * i
        s[9] = s[9] * g + i * i
        s[10] = s[10] * g + y
        s[11] = s[11] * g + m * y
        s[12] = s[12] * g + c * y
        s[13] = s[13] * g + i * y
        self.n += 1
        self.since += 1

    def solve(self, prior: tuple[float, ...]) -> tuple[float, float, float, float]:
        """The ridge solution: base, per message, and tokens per 1,000 characters of client text and of
        the instruction."""
        s = self.s
        a = [[0.0] * _N for _ in range(_N)]
        for (i, j), value in zip(_TRIANGLE, s, strict=False):
            a[i][j] = a[j][i] = value
        r = s[10:14]
        for i, penalty in enumerate(_PRIOR):
            a[i][i] += penalty
            r[i] += penalty * prior[i]
        # Gaussian elimination: the matrix is symmetric positive definite (the prior sees to it).
        for i in range(_N):
            for j in range(i + 1, _N):
                f = a[j][i] / a[i][i]
                for k in range(i, _N):
                    a[j][k] -= f * a[i][k]
                r[j] -= f * r[i]
        x = [0.0] * _N
        for i in reversed(range(_N)):
            x[i] = (r[i] - sum(a[i][k] * x[k] for k in range(i + 1, _N))) / a[i][i]
        base, per_message, rate, instruction_rate = x
        self.fit = (
            base,
            per_message,
            min(max(rate, _MIN_RATE), _MAX_RATE),
            min(max(instruction_rate, _MIN_RATE), _MAX_RATE),
        )
        self.since = 0
        return self.fit


class TokenEstimator:
    """Prompt and completion tokens of requests, learned online per model from the upstream's usage."""

    def __init__(
        self,
        chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
        tokens_per_message: float = DEFAULT_TOKENS_PER_MESSAGE,
        base_tokens: float = DEFAULT_BASE_TOKENS,
        completion_tokens: float = DEFAULT_COMPLETION_TOKENS,
        decay: float = DECAY,
        max_models: int = MAX_MODELS,
    ) -> None:
        if not (chars_per_token > 0 and completion_tokens >= 0 and 0 < decay <= 1 and max_models >= 0):
            raise ValueError(
                "chars_per_token must be positive, completion_tokens and max_models 0 or more, "
                "and decay in (0, 1]"
            )
        rate = _KILO / chars_per_token
        self.prior = (base_tokens, tokens_per_message, rate, rate)
        self.default_completion = completion_tokens
        self.decay = decay
        self.max_models = max_models
        self._models: dict[str | None, _Model] = {}
        self._others = _Model()  # the models past max_models, together
        # Every model's statistics summed, for a model without its own: summed when asked for, and
        # again once the observations since are more than a _STALE-th of the weight it holds.
        self._pool: _Model | None = None
        self._stale = 0

    def observe(
        self,
        model: str | None,
        size: PromptSize | None,
        prompt_tokens: int | None,
        completion_tokens: int | None = None,
    ) -> None:
        """Learn from one request: sent as ``size``, its prompt cost ``prompt_tokens``, and its answer
        ``completion_tokens``; None (or a prompt of 0 tokens) leaves that part out."""
        if size is None or prompt_tokens is None or prompt_tokens <= 0:
            size = None
        if completion_tokens is not None and completion_tokens < 0:
            completion_tokens = None
        if size is None and completion_tokens is None:
            return
        stats = self._own(model)
        g = self.decay
        if size is not None:
            stats.add(size.messages, size.chars / _KILO, size.added / _KILO, float(prompt_tokens or 0), g)
        if completion_tokens is not None:
            s = stats.s
            s[_WEIGHT] = s[_WEIGHT] * g + 1.0
            s[_TOKENS] = s[_TOKENS] * g + completion_tokens
        self._stale += 1

    def prompt_tokens(self, model: str | None, size: PromptSize) -> float:
        """The prompt tokens a request of ``size`` costs, never below one per message (or one)."""
        a, b, k, ki = self._fit(model)
        estimate = a + b * size.messages + (k * size.chars + ki * size.added) / _KILO
        return max(estimate, float(size.messages), 1.0)

    def completion_tokens(self, model: str | None) -> float:
        """The mean completion tokens of an answer."""
        stats = self._models.get(model)
        if stats is None or not stats.s[_WEIGHT]:
            stats = self._pooled()
        weight = stats.s[_WEIGHT]
        return stats.s[_TOKENS] / weight if weight else self.default_completion

    def text_tokens(self, model: str | None, chars: int) -> float:
        """The tokens of ``chars`` characters of plain text (a reply's, say), at the fitted rate."""
        return self._fit(model)[2] * chars / _KILO

    def fit(self, model: str | None) -> PromptFit:
        """The prompt-token model used for ``model`` now."""
        a, b, k, ki = self._fit(model)
        stats = self._models.get(model)
        weight = (stats if stats and stats.n else self._pooled()).weight
        return PromptFit(a, b, _KILO / k, _KILO / ki, weight)

    def _own(self, model: str | None) -> _Model:
        stats = self._models.get(model)
        if stats is None:
            if len(self._models) >= self.max_models:
                return self._others
            stats = self._models[model] = _Model()
        return stats

    def _pooled(self) -> _Model:
        pool = self._pool
        if pool is None or self._stale * _STALE > pool.weight + pool.s[_WEIGHT]:
            models = [*self._models.values(), self._others]
            pool = self._pool = _Model([sum(column) for column in zip(*(m.s for m in models), strict=True)])
            pool.n = sum(m.n for m in models)
            self._stale = 0
        return pool

    def _fit(self, model: str | None) -> tuple[float, float, float, float]:
        stats = self._models.get(model)
        if stats is None or not stats.n:
            stats = self._pooled()
        fit = stats.fit
        if fit is None or stats.since * _STALE > stats.weight:
            fit = stats.solve(self.prior)
        return fit


class Saved(NamedTuple):
    """What refusing one request saved, by the estimate: its layer, tokens and USD (None: unpriced)."""

    layer: str  # "similarity", "classifier" or "instruction" (the LLM refused, after layer 2)
    prompt_tokens: float
    completion_tokens: float
    usd: float | None
    shadow: bool  # shadow mode: what blocking would have saved, not a saving

    def record(self) -> dict[str, Any]:
        """The interaction record's ``saved`` field."""
        return {
            "layer": self.layer,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usd": self.usd,
            "shadow": self.shadow,
        }


class Accounting:
    """Counts one gate's upstream usage and estimated savings into its metrics, and keeps learning."""

    def __init__(
        self,
        metrics: Metrics,
        prices: PriceTable | None = None,
        estimator: TokenEstimator | None = None,
        instruction: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.prices = prices if prices is not None else PriceTable()
        self.estimator = estimator if estimator is not None else TokenEstimator()
        self.instruction_chars = len(instruction) if instruction else 0
        # Series made once, up front: labels() takes a lock and builds a key.
        self._saved = {
            (layer, shadow): (
                (metrics.tokens_would_save if shadow else metrics.tokens_saved).labels(layer, "prompt"),
                (metrics.tokens_would_save if shadow else metrics.tokens_saved).labels(layer, "completion"),
                (metrics.cost_would_save if shadow else metrics.cost_saved).labels(layer),
            )
            for layer in LAYERS
            for shadow in (False, True)
        }
        self._upstream_prompt = metrics.upstream_tokens.labels("prompt")
        self._upstream_completion = metrics.upstream_tokens.labels("completion")

    def account(
        self,
        action: str,
        layer: str | None,
        model: str | None,
        size: PromptSize,
        usage: Mapping[str, Any] | None = None,
        reply: str | None = None,
        refused: bool | None = None,
        instructed: bool = False,
        complete: bool = True,
    ) -> Saved | None:
        """Count one request (``Gate.record``'s verdict and outcome); returns what refusing it saved.

        A blocked (or, in shadow mode, would-block) request saved its prompt and an answer; a passed one
        that the LLM refused after layer 2's instruction saved the rest of an answer. ``size`` is the
        request as the client sent it; ``complete`` is False when the reply broke off.
        """
        estimator = self.estimator
        saved = None
        if (action == "blocked" or action == "would-block") and layer in LAYERS:
            prompt = estimator.prompt_tokens(model, size)
            completion = estimator.completion_tokens(model)
            saved = self._count(layer, prompt, completion, model, action == "would-block")
        prompt_used = completion_used = None
        if usage is not None:
            prompt_used = _tokens(usage.get("prompt_tokens"))
            completion_used = _tokens(usage.get("completion_tokens"))
        if refused and instructed and action == "passed":
            # The refusal's own tokens were spent: what it saved is the rest of a usual answer.
            spent: float
            if completion_used is None:
                spent = estimator.text_tokens(model, len(reply or ""))
            else:
                spent = completion_used
            completion = max(0.0, estimator.completion_tokens(model) - spent)
            saved = self._count("instruction", 0.0, completion, model, False)
        if prompt_used is None and completion_used is None:
            return saved
        if prompt_used:
            self._upstream_prompt.inc(prompt_used)
        if completion_used:
            self._upstream_completion.inc(completion_used)
        usd = self.prices.cost(model, prompt_used or 0, completion_used or 0)
        if usd:
            self.metrics.upstream_cost.inc(usd)
        sent = None  # a size the prompt's tokens describe: not when images or audio went with it
        if not size.media:
            sent = size.with_instruction(self.instruction_chars) if instructed else size
        estimator.observe(model, sent, prompt_used, completion_used if complete and not refused else None)
        return saved

    def _count(self, layer: str, prompt: float, completion: float, model: str | None, shadow: bool) -> Saved:
        prompt_series, completion_series, cost_series = self._saved[layer, shadow]
        prompt_series.inc(prompt)
        completion_series.inc(completion)
        usd = self.prices.cost(model, prompt, completion)
        if usd is not None:
            cost_series.inc(usd)
        return Saved(layer, prompt, completion, usd, shadow)


def _tokens(value: Any) -> int | None:
    """A usage field as a token count, or None when it is missing or not a count."""
    # type() rather than isinstance(): True is an int too, and not a count. Past 2**53 an int has no
    # float, and a counter would raise.
    return value if type(value) is int and 0 <= value < 2**53 else None
