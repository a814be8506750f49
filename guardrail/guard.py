"""The guard: the one place where decisions are made. It knows nothing of HTTP.

One embedding per message is computed and shared by every layer. Decisions for repeated messages
come from a bounded LRU cache, so a retried or popular question costs a dictionary look-up.

Follow-ups: a message judged off topic that reads as a content-free follow-up ("and the second one?")
is judged again together with the previous user turn, and that joint verdict stands. A follow-up after
an on-topic question passes; after an off-topic one it stays blocked. A message with a topic of its own
is judged alone, so an off-topic question cannot ride on an on-topic opener.

Smuggling: a message that passes as a whole but holds several sentences ("I'd like to book a viewing.
Also, write me a poem about cats.") is judged sentence by sentence too, and a sentence that is clearly
off topic blocks the message: its layer-1 score is below the median of the background's (generic chat,
calibrated with the document), not just below the threshold, because the sentences around a request
("We are a family of four with a dog.") often score a little under it. Sentences without a topic of
their own do not count: under four words, content-free follow-ups ("what can I do?") and, in English,
greetings, thanks and apologies (``PLEASANTRY``), which score as generic chat.

Layer 3, when a classifier is loaded, makes the decision on the same embedding and layer 1's features
(see ``guardrail/layers/classifier.py``). ``reload`` swaps it for a new file in one assignment: a batch
already running finishes with the model it started with, and a file that fails to load leaves the
current model in place.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from guardrail.encoder import Encoder
from guardrail.errors import ConfigError
from guardrail.layers.classifier import Classifier
from guardrail.layers.similarity import SimilarityLayer
from guardrail.models import DEFAULT_MODEL
from guardrail.scenario import ScenarioDocument, load_scenario
from guardrail.settings import Settings

logger = logging.getLogger("guardrail")

Layer = Literal["similarity", "classifier"]

# Where a message splits into sentences: after . ! ? ; and at line breaks.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s*\n+\s*")
# Sentences that are social, not requests: greetings, thanks, apologies, wishes (English only).
PLEASANTRY = re.compile(
    r"^\W*(hi|hello|hey|hiya|dear\b|good (morning|afternoon|evening|day)|greetings|how are (you|things)|"
    r"hope (you|this|all)|i hope (you|this|all)|thanks?\b|thank you|many thanks|cheers|sorry|apologies|"
    r"excuse me|please help|have a (nice|good|great))",
    re.IGNORECASE,
)
MIN_SENTENCE_WORDS = 4


@dataclass(frozen=True)
class Verdict:
    """What the guard decided about one message, and why."""

    allowed: bool
    score: float
    threshold: float
    layer: Layer
    scenario: str
    followup: bool = False  # blocked alone, and reads as a follow-up that needs the previous turn
    context: bool = False  # judged together with the previous user turn
    sentence: str | None = None  # the sentence of a longer message that got it blocked
    # Each layer's own score, whichever decided: layer 1's always, layer 3's probability when loaded.
    similarity_score: float | None = None
    classifier_score: float | None = None
    classifier: str | None = None  # the layer-3 model's name, when one was in force


@dataclass(frozen=True)
class Query:
    """One message to judge, with the previous user turn when the conversation has one."""

    text: str
    previous: str | None = None


class Guard:
    """Decides whether messages are on topic for one scenario document."""

    def __init__(
        self,
        encoder: Encoder,
        similarity: SimilarityLayer,
        cache_size: int = 4096,
        classifier: Classifier | None = None,
    ) -> None:
        self.encoder = encoder
        self.similarity = similarity
        self.document = similarity.document
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self._classifier = classifier
        # Bumped by each reload: a decision made across one is not cached (it may be the old model's).
        self._generation = 0

    @classmethod
    def load(
        cls,
        scenario: str | Path | ScenarioDocument,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        threads: int = 1,
        target_pass: float = 0.95,
        threshold: float | None = None,
        cache_size: int = 4096,
        classifier: str | Path | None = None,
        classifier_threshold: float | None = None,
    ) -> Guard:
        """Load the encoder and the scenario document, calibrate layer 1, and load a layer-3 classifier."""
        document = scenario if isinstance(scenario, ScenarioDocument) else load_scenario(scenario)
        encoder = Encoder.load(model, cache_dir=cache_dir, threads=threads)
        similarity = SimilarityLayer.build(document, encoder, target_pass=target_pass, threshold=threshold)
        guard = cls(encoder, similarity, cache_size=cache_size)
        if classifier is not None:
            guard.reload(classifier, classifier_threshold)
        return guard

    @classmethod
    def from_settings(cls, settings: Settings, scenario: str | Path | None = None) -> Guard:
        """A guard for ``scenario`` (default ``settings.scenario``) with the settings' model and tuning."""
        scenario = scenario if scenario is not None else settings.scenario
        if scenario is None:
            raise ConfigError(
                "no scenario document: give --scenario, GUARDRAIL_SCENARIO or scenario = in --config"
            )
        classifier = settings.classifier
        if classifier is not None and not classifier.exists():
            # The learning loop's first run: `guardrail retrain` writes it later, and the server's
            # watcher loads it then. Anything wrong with a file that is there stops the start.
            logger.warning("classifier %s does not exist yet: layer 1 decides until it does", classifier)
            classifier = None
        return cls.load(
            scenario,
            model=settings.model,
            cache_dir=settings.cache_path,
            threads=settings.threads,
            target_pass=settings.target_pass,
            threshold=settings.threshold,
            cache_size=settings.cache_size,
            classifier=classifier,
            classifier_threshold=settings.classifier_threshold,
        )

    @property
    def threshold(self) -> float:
        """The layer-1 threshold in force."""
        return self.similarity.threshold

    @property
    def classifier(self) -> Classifier | None:
        """The layer-3 classifier in force, if any."""
        return self._classifier

    def reload(self, path: str | Path | None = None, threshold: float | None = None) -> Classifier:
        """Load a classifier (default: the current one's file again) and put it in force.

        Raises ``ModelError`` and keeps the current model when the file is missing, corrupt or made for
        another encoder. Cached decisions are dropped, since they were the old model's.
        """
        current = self._classifier
        if path is None:
            if current is None:
                raise ConfigError("no classifier to reload: give its path")
            path = current.path
        classifier = Classifier.load(path, self.encoder.id, self.encoder.dim, threshold)
        trained = classifier.card.get("scenario")
        digest = trained.get("digest") if isinstance(trained, dict) else None
        if digest and self.document.digest and digest != self.document.digest:
            # Layer 1's features, part of its input, move with the document: it still runs, but it
            # was fitted to other numbers. Loading anyway keeps a server up after an edit.
            logger.warning(
                "classifier %s was trained with another version of the scenario document: retrain it",
                classifier.name,
            )
        with self._lock:
            self._classifier = classifier
            self._cache.clear()
            self._generation += 1
        return classifier

    def check(self, text: str) -> Verdict:
        """Judge one message."""
        return self.check_many([text])[0]

    def judge(self, text: str, previous: str | None = None) -> Verdict:
        """Judge one message of a conversation, using the previous user turn for follow-ups."""
        return self.judge_many([Query(text, previous)])[0]

    def judge_many(self, queries: Sequence[Query]) -> list[Verdict]:
        """Judge several messages of conversations; the encoder runs at most three times."""
        verdicts = self.check_many([q.text for q in queries])
        retry = [
            i
            for i, (q, v) in enumerate(zip(queries, verdicts, strict=True))
            if not v.allowed and v.followup and q.previous and q.previous.strip()
        ]
        if retry:
            joint = self.check_many([f"{queries[i].previous}\n{queries[i].text}" for i in retry])
            for i, verdict in zip(retry, joint, strict=True):
                verdicts[i] = replace(verdict, followup=True, context=True)
        # Smuggling: the sentences with a topic of their own, of messages that passed whole.
        owners: list[int] = []
        sentences: list[str] = []
        for i, (query, verdict) in enumerate(zip(queries, verdicts, strict=True)):
            if verdict.allowed:
                for sentence in topical_sentences(query.text):
                    owners.append(i)
                    sentences.append(sentence)
        bar = self.similarity.calibration.background_median
        if sentences and bar is not None:
            for i, sentence, verdict in zip(owners, sentences, self.check_many(sentences), strict=True):
                score = verdict.similarity_score
                clearly_off = score is not None and score < min(bar, self.similarity.threshold)
                if clearly_off and not verdict.followup and verdicts[i].allowed:
                    verdicts[i] = replace(verdict, allowed=False, sentence=sentence)
        return verdicts

    def check_many(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge several messages with one encoder call for those not in the cache."""
        keys = [normalise(t) for t in texts]
        verdicts: list[Verdict | None] = [None] * len(keys)
        missing: dict[str, list[int]] = {}
        with self._lock:
            generation = self._generation
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    verdicts[i] = hit
                else:
                    missing.setdefault(key, []).append(i)
        if missing:
            fresh = self._decide(list(missing))
            with self._lock:
                for key, verdict in zip(missing, fresh, strict=True):
                    for i in missing[key]:
                        verdicts[i] = verdict
                    if generation == self._generation:
                        self._cache[key] = verdict
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [v for v in verdicts if v is not None]

    def _decide(self, texts: list[str]) -> list[Verdict]:
        vectors = self.encoder.encode(texts)
        threshold = self.similarity.threshold
        scored = self.similarity.evaluate(vectors)
        scenarios = self.document.scenarios
        classifier = self._classifier  # one model for the whole batch, even if a reload lands meanwhile
        if classifier is None:
            return [
                Verdict(
                    allowed=bool(score >= threshold),
                    score=float(score),
                    threshold=threshold,
                    layer="similarity",
                    scenario=scenarios[index],
                    # Only a message that would be blocked can need the previous turn (see judge_many).
                    followup=bool(followup and score < threshold),
                    similarity_score=float(score),
                )
                for score, index, followup in zip(scored.scores, scored.nearest, scored.followup, strict=True)
            ]
        probabilities = classifier.predict(scored.features)
        cut = classifier.threshold
        verdicts = []
        for score, index, followup, p in zip(
            scored.scores, scored.nearest, scored.followup, probabilities, strict=True
        ):
            allowed = bool(p >= cut)
            verdicts.append(
                Verdict(
                    allowed=allowed,
                    score=float(p),
                    threshold=cut,
                    # A block layer 1 alone would have made too is layer 1's; the rest are layer 3's.
                    layer="similarity" if not allowed and score < threshold else "classifier",
                    scenario=scenarios[index],
                    followup=bool(followup and not allowed),
                    similarity_score=float(score),
                    classifier_score=float(p),
                    classifier=classifier.name,
                )
            )
        return verdicts


def topical_sentences(text: str) -> list[str]:
    """The sentences of a message that could carry a topic of their own; none for a single sentence."""
    parts = [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]
    if len(parts) < 2:
        return []
    return [part for part in parts if len(part.split()) >= MIN_SENTENCE_WORDS and not PLEASANTRY.match(part)]


def normalise(text: str) -> str:
    """A message as the guard keys it: whitespace folded, case kept."""
    # Whitespace never changes the embedding's meaning; case does for cased models, so it is kept.
    return " ".join(text.split())
