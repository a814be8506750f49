"""Multi-turn: follow-ups stay on topic, and off-topic requests split across turns or smuggled after an
on-topic opener are caught, by the guard and through the proxy."""

from __future__ import annotations

from typing import Any

import pytest

from guardrail.guard import PLEASANTRY, Guard, Query, topical_sentences

from upstreams import FakeOpenAI, ProxyServer

OPENER = "Can I book a viewing for the two bed flat on Oak Lane this Saturday?"

# An on-topic opener, then an unrelated request in the same message.
SMUGGLED = [
    "I'd like to book a viewing for the flat on Oak Lane. Also, can you write me a poem about cats?",
    "I want to rent a two bed flat near the station. By the way, what's the weather in Paris tomorrow?",
    "Can I get a valuation for my house? And give me a recipe for banana bread.",
    "My boiler is broken at 12 Mill Lane. Also what is the capital of Australia?",
    "Is the cottage on Church Road still for sale?\nSeparately, summarise the plot of Hamlet for my essay.",
]
# Several sentences, all in scope: greetings, thanks and context around the request must not block.
MULTI_SENTENCE_ON_TOPIC = [
    "Hi there! Hope you're well. Can I book a viewing for the cottage on Church Road this Saturday?",
    "Thanks for your help yesterday. Is the flat at 3 Oak Lane still available?",
    "Good morning, how are you? I'd like to book a viewing for the flat on Oak Lane.",
    "Sorry to bother you again. My kitchen tap is still leaking.",
    "We are a family of four with a dog. Do you have any three bed houses with a garden to rent?",
    "I saw your advert online. Is the flat on Queens Road still available?",
    "My landlord hasn't fixed the heating. It's been two weeks and it's freezing. What can I do?",
    "I got a new job in Manchester. I need a flat by September. What do you have under 900 a month?",
    "We want to sell our house. We have lived here for ten years. How much do you think it is worth?",
    "I'm a first time buyer. I have a deposit saved. How do I get started?",
]


@pytest.mark.parametrize("text", SMUGGLED)
def test_a_request_smuggled_after_an_on_topic_opener_is_caught(guard: Guard, text: str) -> None:
    assert guard.check(text).allowed  # the message as a whole reads as on topic...
    verdict = guard.judge(text)
    assert not verdict.allowed  # ...but one of its sentences is clearly not
    assert verdict.sentence is not None and verdict.sentence in text
    assert verdict.sentence not in text.split(".")[0]  # it is the smuggled part, not the opener


@pytest.mark.parametrize("text", MULTI_SENTENCE_ON_TOPIC)
def test_on_topic_messages_of_several_sentences_pass(guard: Guard, text: str) -> None:
    verdict = guard.judge(text)
    assert verdict.allowed, verdict
    assert verdict.sentence is None


def test_an_off_topic_request_split_across_turns_is_caught(guard: Guard) -> None:
    # The second turn carries the request: judged alone, it is off topic.
    assert not guard.judge(
        "a short poem about the sea for my mum's birthday", previous="Can you write something?"
    ).allowed
    # A bare follow-up to an off-topic turn stays off topic: judged with that turn, not alone.
    verdict = guard.judge("and tomorrow?", previous="What's the weather like in Paris today?")
    assert not verdict.allowed and verdict.context
    # An off-topic turn after an on-topic one is judged alone.
    assert not guard.judge("what's a good recipe for lasagne?", previous=OPENER).allowed


@pytest.mark.parametrize(
    "follow_up", ["and the second one?", "how much is it?", "what can I do?", "yes please"]
)
def test_follow_ups_to_an_on_topic_turn_stay_on_topic(guard: Guard, follow_up: str) -> None:
    verdict = guard.judge(follow_up, previous=OPENER)
    assert verdict.allowed
    assert verdict.context


def test_topical_sentences() -> None:
    assert topical_sentences("Can I book a viewing on Saturday?") == []  # one sentence: judged whole
    assert topical_sentences("Hi! Thanks so much. Is the flat on Oak Lane still free?\nAnd a poem.") == [
        "Is the flat on Oak Lane still free?"
    ]  # the greeting, the thanks and the three-word sentence carry no topic of their own
    assert topical_sentences("Is it free? Also, what is the capital of Peru?") == [
        "Also, what is the capital of Peru?"
    ]


@pytest.mark.parametrize(
    ("text", "pleasantry"),
    [
        ("Good morning, how are you?", True),
        ("Hope you're well.", True),
        ("Thanks for your help yesterday.", True),
        ("Sorry to bother you again.", True),
        ("Hello there, I need a flat.", True),
        ("Thailand is lovely in May, what flights are there?", False),  # "thanks" must be a word
        ("What is the capital of Australia?", False),
    ],
)
def test_pleasantries(text: str, pleasantry: bool) -> None:
    assert bool(PLEASANTRY.match(text)) is pleasantry


def test_judge_many_batches_the_sentences_of_many_messages(guard: Guard) -> None:
    queries = [Query(text) for text in SMUGGLED + MULTI_SENTENCE_ON_TOPIC]
    verdicts = guard.judge_many(queries)
    assert [v.allowed for v in verdicts] == [False] * len(SMUGGLED) + [True] * len(MULTI_SENTENCE_ON_TOPIC)
    # The same answers one at a time.
    assert [guard.judge(q.text).allowed for q in queries] == [v.allowed for v in verdicts]


def test_the_proxy_refuses_a_smuggled_request(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    messages: Any = [
        {"role": "user", "content": OPENER},
        {"role": "assistant", "content": "Of course, Saturday at 11 works."},
        {"role": "user", "content": SMUGGLED[0]},
    ]
    raw = proxy.sdk().chat.completions.with_raw_response.create(model="m", messages=messages)

    assert raw.headers["x-guardrail-verdict"] == "blocked"
    assert raw.parse().choices[0].message.content == proxy.settings.refusal
    assert fake_upstream.requests == []
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert record["verdict"] == "blocked"
    assert record["sentence"] == "Also, can you write me a poem about cats?"
