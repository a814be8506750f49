"""The most frequent blocked topics: refused messages clustered by meaning, for ``guardrail report``.

The most recent ``max_texts`` refused messages (blocked, would-block, and answered by the LLM with the
refusal) are deduplicated, embedded with the guard's own encoder and clustered by average linkage on
cosine similarity, merging while two groups' messages are on average at least ``SIMILARITY`` alike. On
unit vectors the mean pairwise cosine of two groups is the dot product of their mean vectors, so a group
is its weighted mean and the nearest-neighbour chain finds the same merges as the full pairwise matrix
without holding it: memory is one vector per distinct message. The number of topics comes out of that
one threshold rather than a k chosen in advance; unlike k-means there is no random start, and a stray
message stays alone instead of pulling a topic off course. Each topic is shown with its most central
message (nearest the topic's mean), examples and the words that set it apart from the other blocked
messages.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from guardrail.guard import normalise

Encode = Callable[[Sequence[str]], NDArray[np.float32]]

# Mean cosine for two groups to merge. With all-MiniLM-L6-v2, phrasings of one topic ("will it rain in
# Lisbon?", "do I need an umbrella tomorrow?") average 0.3 to 0.5, and different topics about 0.1.
SIMILARITY = 0.25
_EXAMPLES = 5
_WORDS = 6
_STOPWORD_LIST = (
    "the and for you your are can how what who whom why when where which with this that these those "
    "from have has had was were will would should could does did not but all any our out about into "
    "there their them they its it's i'm i'd i've don't can't won't get got just like want need please "
    "tell give make know some more most very much many also than then too one two who's what's"
)
_STOPWORDS = frozenset(_STOPWORD_LIST.split())


@dataclass(frozen=True)
class _Refused:
    id: str
    text: str
    layer: str


@dataclass(frozen=True)
class Topic:
    """A cluster of refused messages: candidates for an off-topic example or a missing scenario."""

    size: int  # messages, repeats included
    distinct: int
    representative: str  # the most central message
    examples: list[str]
    words: list[str]  # what sets the topic apart from the other refused messages
    layers: dict[str, int]  # messages refused by each layer
    said_on_topic: int  # human feedback on its messages
    said_off_topic: int


def average_linkage(
    vectors: NDArray[np.float32], weights: NDArray[np.float64], similarity: float
) -> list[list[int]]:
    """Clusters of unit ``vectors`` whose members are on average at least ``similarity`` alike.

    Average linkage by the nearest-neighbour chain: each group is held as its weighted mean, and the
    mean cosine between two groups is the dot product of their means.
    """
    n = len(vectors)
    sums = vectors.astype(np.float32) * weights[:, None].astype(np.float32)
    totals = weights.astype(np.float64).copy()
    means = vectors.astype(np.float32).copy()
    members = [[i] for i in range(n)]
    active = np.ones(n, dtype=bool)
    done: list[list[int]] = []
    chain: list[int] = []
    while active.any():
        if not chain:
            chain.append(int(np.argmax(active)))
        a = chain[-1]
        sims = means @ means[a]
        sims[~active] = -np.inf
        sims[a] = -np.inf
        b = int(np.argmax(sims))
        if sims[b] < similarity:  # a merges with nothing now, nor later: merging only lowers means
            active[a] = False
            done.append(members[a])
            chain.pop()
        elif len(chain) > 1 and sims[chain[-2]] >= sims[b]:  # reciprocal nearest neighbours
            b = chain[-2]
            del chain[-2:]
            sums[a] += sums[b]
            totals[a] += totals[b]
            means[a] = sums[a] / totals[a]
            members[a] += members[b]
            active[b] = False
            means[b] = 0.0
        else:
            chain.append(b)
    return done


def find_topics(
    messages: Sequence[_Refused], encode: Encode, feedback: dict[str, bool], similarity: float = SIMILARITY
) -> list[Topic]:
    """Cluster refused messages into topics of two messages or more, largest first."""
    groups: dict[str, list[_Refused]] = {}
    for message in messages:
        groups.setdefault(normalise(message.text), []).append(message)
    if not groups:
        return []
    keys = list(groups)
    texts = [groups[key][-1].text for key in keys]
    weights = np.array([len(groups[key]) for key in keys], dtype=np.float64)
    vectors = encode(texts)
    words = [set(re.findall(r"[^\W\d_][\w'-]{2,}", text.lower())) - _STOPWORDS for text in texts]
    df = Counter(word for ws in words for word in ws)
    topics: list[Topic] = []
    for cluster in average_linkage(vectors, weights, similarity):
        size = int(weights[cluster].sum())
        if size < 2:
            continue
        mean = (vectors[cluster] * weights[cluster, None]).sum(axis=0)
        chosen = _examples(vectors, cluster, mean)
        local = Counter(word for i in cluster for word in words[i])
        least = 2 if len(cluster) > 2 else 1
        scored = [
            (count / len(cluster) * math.log(len(keys) / df[word]), word)
            for word, count in local.items()
            if count >= least
        ]
        members = [m for i in cluster for m in groups[keys[i]]]
        labels = [feedback[m.id] for m in members if m.id in feedback]
        topics.append(
            Topic(
                size=size,
                distinct=len(cluster),
                representative=texts[chosen[0]],
                examples=[texts[i] for i in chosen[1:]],
                words=[word for _, word in sorted(scored, key=lambda s: (-s[0], s[1]))[:_WORDS]],
                layers=dict(Counter(m.layer for m in members).most_common()),
                said_on_topic=sum(labels),
                said_off_topic=len(labels) - sum(labels),
            )
        )
    topics.sort(key=lambda topic: (-topic.size, topic.representative))
    return topics


def _examples(vectors: NDArray[np.float32], cluster: list[int], mean: NDArray[np.float32]) -> list[int]:
    """The representative, the member nearest the topic's mean, then up to ``_EXAMPLES`` more: central
    but unlike those already picked (maximal marginal relevance), so they show different phrasings."""
    central = vectors[cluster] @ (mean / np.linalg.norm(mean))
    order = [int(i) for i in np.argsort(-central, kind="stable")[:200]]
    picked, rest = order[:1], order[1:]
    while rest and len(picked) <= _EXAMPLES:
        overlap = (vectors[[cluster[i] for i in rest]] @ vectors[[cluster[i] for i in picked]].T).max(axis=1)
        picked.append(rest.pop(int(np.argmax(central[rest] - overlap))))
    return [cluster[i] for i in picked]
