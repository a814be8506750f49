"""End to end, the learning loop: traffic through ``guardrail serve`` in front of a real llama.cpp server,
human feedback on what got through, ``guardrail retrain`` on the log, a hot reload, and layer 3 blocking
an off-topic question that layer 1 had let through.

The bot's owner decides that furnishing and decorating advice is not the agency's business. Layer 1
cannot know that from the scenario document (those questions mention flats and bedrooms), so they pass;
the owner marks them off topic with ``POST /guardrail/feedback``, and the retrained classifier learns it.
Assertions are about the proxy's behaviour, never the small model's wording.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from llm import LlamaServer, gguf_path
from test_local_llm import API_KEY, Guardrail

ADMIN = "admin-token-for-the-e2e-test-0123"
ROOT = Path(__file__).resolve().parents[2]

HOMES = ["two bed flat", "studio", "cottage", "three bed house", "maisonette", "bungalow"]
STREETS = ["Oak Lane", "Mill Road", "Church Street", "Station Avenue", "Park Road"]
ON_TOPIC = [
    template.format(home=home, street=street)
    for (home, street), template in zip(
        itertools.islice(itertools.product(HOMES, STREETS), 24),
        itertools.cycle(
            [
                "Can I book a viewing of the {home} on {street} this weekend?",
                "Is the {home} on {street} still available to rent?",
                "What is the asking price of the {home} on {street}?",
                "I'd like to make an offer on the {home} on {street}",
                "The boiler in my {home} on {street} is broken, can someone come and fix it?",
            ]
        ),
        strict=False,
    )
]
DECOR = [
    "Can you help me choose furniture for my new flat?",
    "Recommend a cosy rug for the lounge of my apartment",
    "What's the best way to decorate a small bedroom?",
    "Which sofa would suit the living room of my new flat?",
    "What colour should I paint the walls of my new apartment?",
    "Suggest some wall art for the hallway of my flat",
    "How should I arrange the furniture in my studio apartment?",
    "What kind of curtains would look good in my new flat's bedroom?",
    "Which bed frame fits best in a small flat bedroom?",
    "Give me ideas to make my rented flat feel cosier",
    "What lighting would brighten up the kitchen of my flat?",
    "Which dining table suits an open plan flat?",
    "How can I decorate my new home on a budget?",
    "Help me pick cushions and throws for my apartment's sofa",
    "What furniture do I need for a one bedroom flat?",
    "Suggest a colour scheme for the living room of my house",
]
OFF_TOPIC = [
    "Give me a recipe for banana bread",
    "What's the weather in Lisbon tomorrow?",
    "Write a poem about the sea",
    "Who won the football world cup in 2010?",
    "How do I fix a python import error?",
    "Translate good morning into Japanese",
    "What is the capital of Australia?",
    "Tell me a joke about cats",
    "How many calories are in an avocado?",
    "Summarise the plot of Hamlet",
    "What's a good name for a goldfish?",
    "Explain quantum computing simply",
    "Plan a three day trip to Rome",
    "How do I bake sourdough bread?",
    "What time does the sun set in Oslo in June?",
    "Recommend a good science fiction novel",
    "How do I train for a marathon?",
    "What's the best pizza topping?",
    "Help me write a cover letter for a nursing job",
    "Convert 100 dollars to euros",
]


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    with LlamaServer(gguf_path("smollm2"), api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("learning-loop")


@pytest.fixture(scope="module")
def proxy(llama: LlamaServer, model_cache: Path, workdir: Path) -> Iterator[Guardrail]:
    # The classifier does not exist yet: layer 1 decides until `guardrail retrain` writes it.
    environ = {
        "GUARDRAIL_CLASSIFIER": str(workdir / "real_estate.onnx"),
        "GUARDRAIL_ADMIN_TOKEN": ADMIN,
        "GUARDRAIL_RELOAD_INTERVAL": "0",  # reloaded by the request below, not by the watcher
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():
            patch.setenv(name, value)
        server = Guardrail(llama.base_url, workdir / "interactions.jsonl", model_cache)
    yield server
    server.stop()


def ask(client: openai.OpenAI, text: str) -> dict[str, str]:
    """One question through the proxy; its x-guardrail-* headers."""
    messages: Any = [{"role": "user", "content": text}]
    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=messages, max_tokens=4, temperature=0
    )
    raw.parse()
    return {k: v for k, v in raw.headers.items() if k.startswith("x-guardrail-")}


def admin(proxy: Guardrail, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN}"}
    return httpx.post(f"{proxy.base_url}{path}", json=body, headers=headers, timeout=60)


def test_feedback_retrain_and_reload_block_what_layer_1_let_through(
    proxy: Guardrail, workdir: Path, model_cache: Path
) -> None:
    client = proxy.client()
    # 1. Traffic. Layer 1 passes the on-topic questions and most of the decorating ones.
    on_topic = {text: ask(client, text) for text in ON_TOPIC}
    assert all(headers["x-guardrail-verdict"] == "passed" for headers in on_topic.values())
    for text in OFF_TOPIC:
        assert ask(client, text)["x-guardrail-verdict"] == "blocked"
    decor = {text: ask(client, text) for text in DECOR}
    slipped = [text for text, headers in decor.items() if headers["x-guardrail-verdict"] == "passed"]
    assert len(slipped) >= 8, "layer 1 was expected to let most decorating questions through"
    assert all(decor[text]["x-guardrail-layer"] == "similarity" for text in slipped)

    # 2. The owner labels what slipped through as off topic, and confirms some good answers.
    labels = [(decor[text], False) for text in slipped] + [(on_topic[text], True) for text in ON_TOPIC]
    for headers, label in labels:
        response = admin(proxy, "/guardrail/feedback", {"id": headers["x-guardrail-id"], "on_topic": label})
        assert response.status_code == 202, response.text

    # 3. The log has the labels: the feedback, the requests it names, and layer 2's fields.
    deadline = time.monotonic() + 10
    while True:  # the log writer flushes within about 50 ms
        records = [orjson.loads(line) for line in proxy.log_path.read_bytes().splitlines() if line.strip()]
        if sum(r.get("type") == "feedback" for r in records) == len(labels) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    feedback = [r for r in records if r.get("type") == "feedback"]
    assert [r["on_topic"] for r in feedback] == [label for _, label in labels]
    requests = {r["id"]: r for r in records if "verdict" in r}
    assert all(r["id"] in requests for r in feedback)
    assert all("llm_refused" in r for r in requests.values())
    assert sum(r["instruction"] for r in requests.values()) == len(ON_TOPIC) + len(slipped)

    # 4. Retrain on the log, into the file the running proxy is configured with.
    model = workdir / "real_estate.onnx"
    retrain = subprocess.run(
        [str(Path(sys.executable).with_name("guardrail")), "retrain", "--logs", str(proxy.log_path),
         "--scenario", "scenarios/real_estate.md", "--out", str(model), "--cache-dir", str(model_cache)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert retrain.returncode == 0, retrain.stdout + retrain.stderr
    assert model.exists() and model.with_suffix(".json").exists()

    # 5. Hot reload, without a restart.
    response = admin(proxy, "/guardrail/reload")
    assert response.status_code == 200, response.text
    assert response.json()["classifier"] == "real_estate"

    # 6. What slipped through before is now blocked by layer 3; on-topic questions still reach the LLM.
    after = {text: ask(client, text) for text in slipped}
    blocked = [text for text, headers in after.items() if headers["x-guardrail-verdict"] == "blocked"]
    assert len(blocked) >= len(slipped) - 1, after
    assert all(after[text]["x-guardrail-layer"] == "classifier" for text in blocked)
    passed = [ask(client, text)["x-guardrail-verdict"] for text in ON_TOPIC[:10]]
    assert passed.count("passed") >= 9, passed
