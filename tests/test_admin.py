from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from guardrail.admin import MAX_BODY_BYTES, Reloader, admin_routes, watching
from guardrail.errors import ModelError
from guardrail.gate import Gate
from guardrail.guard import Guard, Verdict
from guardrail.interactions import InteractionLog, new_id, read_interactions
from guardrail.layers.classifier import card_path
from guardrail.protocols.base import Conversation
from guardrail.settings import Settings

from classifiers import card_bytes, classifier_bytes, replace_file, write_classifier
from samples import OFF_TOPIC, ON_TOPIC
from upstreams import serve

TOKEN = "test-admin-token-7d41c2a9e0b8"
AUTH = {"authorization": f"Bearer {TOKEN}"}
INTERVAL = 0.05
GARBAGE = b"this is not an ONNX model" * 40


@pytest.fixture
def fresh(guard: Guard) -> Guard:
    """A guard of its own (no classifier, no cache) sharing the session's encoder and layer 1."""
    return Guard(guard.encoder, guard.similarity, cache_size=0)


@pytest.fixture
def model(tmp_path: Path, fresh: Guard) -> Path:
    """A valid classifier file (threshold 0.5), loaded into ``fresh``."""
    path = write_classifier(tmp_path / "topic.onnx", fresh, threshold=0.5)
    fresh.reload(path)
    return path


@pytest.fixture
def make_gate(fresh: Guard) -> Iterator[Callable[..., Gate]]:
    gates: list[Gate] = []

    def make(log: InteractionLog | None = None) -> Gate:
        gates.append(Gate(fresh, log=log))
        return gates[-1]

    yield make
    for gate in gates:
        gate.batcher.close()


def admin_app(gate: Gate, settings: Settings, routes: list[Route] | None = None) -> Starlette:
    """Our routes in a small app whose lifespan runs the watcher, as the proxy's will."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with watching(reloader):
            yield

    reloader = Reloader(gate.guard, settings)
    return Starlette(routes=[*admin_routes(gate, reloader), *(routes or [])], lifespan=lifespan)


def error_message(response: Any) -> str:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return str(body["error"]["message"])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.002)
    return time.monotonic() - start


def admin_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "guardrail.admin" and r.levelname == "ERROR"]


# Feedback.


@pytest.mark.parametrize("on_topic", [True, False])
def test_feedback_is_appended_to_the_interaction_log(
    tmp_path: Path, make_gate: Callable[..., Gate], on_topic: bool
) -> None:
    log = InteractionLog(tmp_path / "log.jsonl")
    log.start()
    id = new_id()
    with TestClient(admin_app(make_gate(log), Settings(admin_token=TOKEN))) as client:
        response = client.post("/guardrail/feedback", json={"id": id, "on_topic": on_topic}, headers=AUTH)
    log.close()
    assert response.status_code == 202
    assert response.json() == {"status": "recorded", "id": id}
    (record,) = read_interactions([log.path])
    when = record.pop("time")
    assert record == {"type": "feedback", "id": id, "on_topic": on_topic, "source": "human"}
    assert when.endswith("+00:00")
    assert len(when.split(".")[1]) == len("123+00:00")  # milliseconds
    assert abs(time.time() - datetime.fromisoformat(when).timestamp()) < 60
    assert TOKEN not in log.path.read_text()


def test_feedback_with_the_log_off_is_409(make_gate: Callable[..., Gate]) -> None:
    with TestClient(admin_app(make_gate(None), Settings(admin_token=TOKEN))) as client:
        response = client.post("/guardrail/feedback", json={"id": new_id(), "on_topic": True}, headers=AUTH)
    assert response.status_code == 409
    assert "feedback needs the interaction log" in error_message(response)


def test_feedback_with_the_log_queue_full_is_503(tmp_path: Path, make_gate: Callable[..., Gate]) -> None:
    log = InteractionLog(tmp_path / "log.jsonl", queue_size=1)  # not started: the queue fills at once
    gate = make_gate(log)
    with TestClient(admin_app(gate, Settings(admin_token=TOKEN))) as client:
        first = client.post("/guardrail/feedback", json={"id": new_id(), "on_topic": True}, headers=AUTH)
        second = client.post("/guardrail/feedback", json={"id": new_id(), "on_topic": False}, headers=AUTH)
    log.close()
    assert first.status_code == 202
    assert second.status_code == 503
    assert "full" in error_message(second)
    assert gate.metrics.log_dropped._value.get() == 1
    assert [r["on_topic"] for r in read_interactions([log.path])] == [True]


ID = "gr-0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"on_topic": true}', "'id' is missing"),
        (b'{"id": 42, "on_topic": true}', "'id' must be"),
        (b'{"id": "gr-0123456789ABCDEF01234567", "on_topic": true}', "'id' must be"),
        (b'{"id": "gr-0123456789abcdef0123456", "on_topic": true}', "'id' must be"),
        (b'{"id": "gr-0123456789abcdef01234567\\n", "on_topic": true}', "'id' must be"),
        (b'{"id": "xx-0123456789abcdef01234567", "on_topic": true}', "'id' must be"),
        (b'{"id": "' + ID.encode() + b'"}', "'on_topic' is missing"),
        (b'{"id": "' + ID.encode() + b'", "on_topic": "yes"}', "'on_topic' must be true or false"),
        (b'{"id": "' + ID.encode() + b'", "on_topic": 1}', "'on_topic' must be true or false"),
    ],
)
def test_malformed_feedback_is_400_naming_the_problem(
    tmp_path: Path, make_gate: Callable[..., Gate], body: bytes, problem: str
) -> None:
    log = InteractionLog(tmp_path / "log.jsonl")
    with TestClient(admin_app(make_gate(log), Settings(admin_token=TOKEN))) as client:
        response = client.post(
            "/guardrail/feedback", content=body, headers={**AUTH, "content-type": "application/json"}
        )
    log.close()
    assert response.status_code == 400
    assert problem in error_message(response)
    assert error_message(response).count("0123456789") == 0  # values are not echoed
    assert not log.path.exists()


@pytest.mark.parametrize("chunked", [False, True])
def test_feedback_body_over_64_kib_is_413(
    make_gate: Callable[..., Gate], tmp_path: Path, chunked: bool
) -> None:
    log = InteractionLog(tmp_path / "log.jsonl")
    body = b'{"id": "' + ID.encode() + b'", "on_topic": true, "note": "' + b"x" * MAX_BODY_BYTES + b'"}'
    content: Any = iter([body[:1000], body[1000:]]) if chunked else body
    with TestClient(admin_app(make_gate(log), Settings(admin_token=TOKEN))) as client:
        response = client.post("/guardrail/feedback", content=content, headers=AUTH)
        fits = client.post("/guardrail/feedback", content=body[: MAX_BODY_BYTES - 2] + b'"}', headers=AUTH)
    log.close()
    assert MAX_BODY_BYTES == 64 * 1024
    assert response.status_code == 413
    assert "larger than the limit" in error_message(response)
    assert fits.status_code == 202  # just under the limit is fine
    assert len(list(read_interactions([log.path]))) == 1


# Authentication, for both endpoints.


@pytest.mark.parametrize("path", ["/guardrail/feedback", "/guardrail/reload"])
def test_admin_endpoints_are_404_without_an_admin_token(make_gate: Callable[..., Gate], path: str) -> None:
    with TestClient(admin_app(make_gate(None), Settings())) as client:
        response = client.post(path, json={"id": ID, "on_topic": True}, headers=AUTH)
    assert response.status_code == 404
    assert "admin_token" in error_message(response)
    assert "GUARDRAIL_ADMIN_TOKEN" in error_message(response)


@pytest.mark.parametrize("path", ["/guardrail/feedback", "/guardrail/reload"])
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer wrong-token-é".encode(),
    ],
)
def test_a_missing_or_wrong_token_is_401(
    tmp_path: Path,
    model: Path,
    make_gate: Callable[..., Gate],
    caplog: pytest.LogCaptureFixture,
    path: str,
    authorization: str | bytes | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    log = InteractionLog(tmp_path / "log.jsonl")
    gate = make_gate(log)
    before = gate.guard.classifier
    headers: Any = {} if authorization is None else {"authorization": authorization}
    with TestClient(admin_app(gate, Settings(admin_token=TOKEN, reload_interval=0))) as client:
        response = client.post(path, json={"id": ID, "on_topic": True}, headers=headers)
    log.close()
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <admin_token>" in error_message(response)
    assert TOKEN[:12] not in response.text
    assert TOKEN[:12] not in caplog.text
    assert not log.path.exists()
    assert gate.guard.classifier is before


@pytest.mark.parametrize("path", ["/guardrail/feedback", "/guardrail/reload"])
def test_other_methods_are_405(make_gate: Callable[..., Gate], path: str) -> None:
    with TestClient(admin_app(make_gate(None), Settings(admin_token=TOKEN))) as client:
        response = client.get(path, headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_settings_repr_hides_the_admin_token() -> None:
    assert TOKEN not in repr(Settings(admin_token=TOKEN))


# POST /guardrail/reload.


def test_reload_puts_the_new_file_in_force(model: Path, make_gate: Callable[..., Gate]) -> None:
    gate = make_gate()
    old = gate.guard.classifier
    write_classifier(model, gate.guard, threshold=0.7, inverted=True)
    with TestClient(admin_app(gate, Settings(admin_token=TOKEN, reload_interval=0))) as client:
        assert gate.guard.classifier is old  # no polling: only the request reloads
        response = client.post("/guardrail/reload", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"status": "reloaded", "classifier": "topic", "threshold": 0.7}
    assert gate.guard.classifier is not old
    verdict = gate.guard.check(ON_TOPIC[0])
    assert (verdict.allowed, verdict.layer, verdict.threshold) == (False, "classifier", 0.7)


def test_reload_loads_the_configured_file_and_its_threshold_override(
    tmp_path: Path, fresh: Guard, make_gate: Callable[..., Gate]
) -> None:
    path = write_classifier(tmp_path / "first.onnx", fresh, threshold=0.5)
    settings = Settings(admin_token=TOKEN, classifier=path, classifier_threshold=0.25, reload_interval=0)
    gate = make_gate()
    assert gate.guard.classifier is None
    with TestClient(admin_app(gate, settings)) as client:
        response = client.post("/guardrail/reload", headers=AUTH)
    assert response.json() == {"status": "reloaded", "classifier": "first", "threshold": 0.25}
    assert gate.guard.check(OFF_TOPIC[0]).threshold == 0.25


def test_reload_without_a_classifier_is_409(make_gate: Callable[..., Gate]) -> None:
    with TestClient(admin_app(make_gate(), Settings(admin_token=TOKEN))) as client:
        response = client.post("/guardrail/reload", headers=AUTH)
    assert response.status_code == 409
    assert "no classifier is configured" in error_message(response)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("model", "onnxruntime cannot load it"),
        ("card", "cannot read its model card"),
        ("encoder", "trained on the embeddings of another-model@v1"),
        ("missing", "does not exist"),
    ],
)
def test_a_failed_reload_is_500_and_keeps_the_old_model(
    model: Path,
    make_gate: Callable[..., Gate],
    caplog: pytest.LogCaptureFixture,
    damage: str,
    problem: str,
) -> None:
    gate = make_gate()
    old = gate.guard.classifier
    if damage == "model":
        replace_file(model, GARBAGE)
    elif damage == "card":
        replace_file(card_path(model), b'{"format": ')
    elif damage == "encoder":
        replace_file(card_path(model), card_bytes(gate.guard, encoder="another-model@v1"))
    else:
        model.unlink()
    with TestClient(admin_app(gate, Settings(admin_token=TOKEN, reload_interval=0))) as client:
        response = client.post("/guardrail/reload", headers=AUTH)
    assert response.status_code == 500
    assert problem in error_message(response)
    assert "the current classifier stays in force" in error_message(response)
    assert gate.guard.classifier is old
    assert gate.guard.check(ON_TOPIC[0]).layer == "classifier"
    (logged,) = admin_errors(caplog)
    assert problem in logged


# The watcher and SIGHUP.


def test_the_watcher_picks_up_a_replaced_model_within_two_intervals(
    model: Path, make_gate: Callable[..., Gate], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guardrail.admin")
    gate = make_gate()
    old = gate.guard.classifier
    assert gate.guard.check(ON_TOPIC[0]).allowed
    with TestClient(admin_app(gate, Settings(reload_interval=INTERVAL))):
        time.sleep(3 * INTERVAL)
        assert gate.guard.classifier is old  # unchanged files are not reloaded
        # Same threshold and same model size: only the inode and mtime tell the new file apart.
        replace_file(model, classifier_bytes(gate.guard, inverted=True))
        elapsed = wait_for(lambda: gate.guard.classifier is not old)
    # Two intervals, plus the load and a loaded machine's scheduling.
    assert elapsed < 2 * INTERVAL + 0.5
    verdict = gate.guard.check(ON_TOPIC[0])
    assert (verdict.allowed, verdict.layer) == (False, "classifier")
    assert any("changed: reloaded" in r.getMessage() for r in caplog.records)


def test_the_watcher_reloads_when_only_the_card_changes(model: Path, make_gate: Callable[..., Gate]) -> None:
    gate = make_gate()
    with TestClient(admin_app(gate, Settings(reload_interval=INTERVAL))):
        replace_file(card_path(model), card_bytes(gate.guard, threshold=0.875))
        wait_for(lambda: gate.guard.classifier is not None and gate.guard.classifier.threshold == 0.875)
    assert gate.guard.check(OFF_TOPIC[0]).threshold == 0.875


def test_the_watcher_notices_a_file_changed_before_it_started(
    model: Path, make_gate: Callable[..., Gate]
) -> None:
    gate = make_gate()
    old = gate.guard.classifier
    time.sleep(0.02)  # a new mtime even on a coarse clock
    with open(model, "ab") as file:  # rewritten in place: the inode stays, the size and mtime change
        file.write(b"\0")
    replace_file(model, classifier_bytes(gate.guard, inverted=True))
    with TestClient(admin_app(gate, Settings(reload_interval=INTERVAL))):
        wait_for(lambda: gate.guard.classifier is not old)
    assert not gate.guard.check(ON_TOPIC[0]).allowed


def test_a_corrupt_file_keeps_the_old_model_and_is_logged_once_per_state(
    model: Path, make_gate: Callable[..., Gate], caplog: pytest.LogCaptureFixture
) -> None:
    gate = make_gate()
    old = gate.guard.classifier
    with TestClient(admin_app(gate, Settings(reload_interval=INTERVAL))):
        replace_file(model, GARBAGE)
        wait_for(lambda: len(admin_errors(caplog)) == 1)
        time.sleep(10 * INTERVAL)  # ten more polls see the same bad file
        assert len(admin_errors(caplog)) == 1
        assert gate.guard.classifier is old
        assert gate.guard.check(ON_TOPIC[0]).allowed
        replace_file(model, GARBAGE + b"!")  # another bad file: said once more
        wait_for(lambda: len(admin_errors(caplog)) == 2)
        replace_file(model, classifier_bytes(gate.guard, inverted=True))
        wait_for(lambda: gate.guard.classifier is not old)
        time.sleep(4 * INTERVAL)
    errors = admin_errors(caplog)
    assert len(errors) == 2
    assert str(model) in errors[0]
    assert "onnxruntime cannot load it" in errors[0]
    assert "stays in force" in errors[0]
    assert not gate.guard.check(ON_TOPIC[0]).allowed


def test_a_half_written_file_is_retried_when_it_changes_again(
    model: Path, make_gate: Callable[..., Gate], caplog: pytest.LogCaptureFixture
) -> None:
    gate = make_gate()
    old = gate.guard.classifier
    data = classifier_bytes(gate.guard, inverted=True)
    with TestClient(admin_app(gate, Settings(reload_interval=INTERVAL))):
        with open(model, "wb") as file:  # a writer that does not rename, caught halfway
            file.write(data[: len(data) // 2])
        wait_for(lambda: len(admin_errors(caplog)) == 1)
        assert gate.guard.classifier is old
        with open(model, "ab") as file:
            file.write(data[len(data) // 2 :])
        wait_for(lambda: gate.guard.classifier is not old)
    assert len(admin_errors(caplog)) == 1
    assert not gate.guard.check(ON_TOPIC[0]).allowed


def test_no_polling_when_the_interval_is_0(model: Path, make_gate: Callable[..., Gate]) -> None:
    gate = make_gate()
    old = gate.guard.classifier
    with TestClient(admin_app(gate, Settings(reload_interval=0))):
        write_classifier(model, gate.guard, threshold=0.9)
        time.sleep(0.3)
        assert gate.guard.classifier is old


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads_and_the_handler_is_removed_at_shutdown(
    model: Path, fresh: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guardrail.admin")
    old = fresh.classifier

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with watching(Reloader(fresh, Settings(reload_interval=0))):
            # Never send SIGHUP without a handler: its default action ends the test process.
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            write_classifier(model, fresh, threshold=0.625, inverted=True)
            await asyncio.sleep(0.2)
            assert fresh.classifier is old
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(1000):
                if fresh.classifier is not old:
                    break
                await asyncio.sleep(0.01)
        assert not loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(scenario())
    assert fresh.classifier is not old
    assert fresh.classifier is not None and fresh.classifier.threshold == 0.625
    assert any(r.getMessage().startswith("SIGHUP: classifier topic loaded") for r in caplog.records)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_without_a_classifier_warns(fresh: Guard, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with watching(Reloader(fresh, Settings())):
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(500):
                if caplog.records:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert [(r.name, r.levelname) for r in caplog.records] == [("guardrail.admin", "WARNING")]
    assert "no classifier is configured" in caplog.records[0].getMessage()
    assert fresh.classifier is None


# Zero failed requests while models are swapped under load.


def in_force(guard: Guard) -> float:
    assert guard.classifier is not None
    return guard.classifier.threshold


def swaps(guard: Guard, path: Path, count: int, reload: Callable[[], bool]) -> list[float]:
    """Swap models ``count`` times: the two models in turn, each with a higher threshold than the last,
    and every fourth time a corrupt file that must not load. Returns the thresholds put in force."""
    thresholds = []
    for k in range(count):
        threshold = round(0.5 + 0.005 * (k + 1), 4)  # above the first model's
        if k % 4 == 3:
            replace_file(path, GARBAGE)
            replace_file(card_path(path), card_bytes(guard, threshold))
            before = guard.classifier
            assert not reload()
            assert guard.classifier is before
        else:
            write_classifier(path, guard, threshold=threshold, inverted=k % 2 == 1)
            assert reload()
            assert in_force(guard) == threshold
            thresholds.append(threshold)
        time.sleep(0.005)
    return thresholds


def check_verdict(verdict: Verdict, before: float, after: float) -> None:
    # Thresholds only go up, so the model that decided was in force at some point during the call.
    assert before <= verdict.threshold <= after, (before, verdict.threshold, after)
    assert verdict.classifier_score is not None
    assert verdict.layer in ("classifier", "similarity")


def test_no_call_fails_while_models_are_swapped_under_load(model: Path, fresh: Guard) -> None:
    guard = fresh
    texts = ON_TOPIC + OFF_TOPIC
    stop = threading.Event()
    failures: list[BaseException] = []
    calls = [0] * 4

    def client(n: int) -> None:
        k = n
        while not stop.is_set():
            k += 1
            text = texts[k % len(texts)]
            try:
                before = in_force(guard)
                if n % 2 == 0:
                    verdicts = [guard.judge("and the second one?", previous=text)]
                else:
                    verdicts = guard.check_many([text, texts[(k + 7) % len(texts)]])
                after = in_force(guard)
                for verdict in verdicts:
                    check_verdict(verdict, before, after)
                calls[n] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    def reload() -> bool:
        try:
            guard.reload(model)
        except ModelError:
            return False
        return True

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    try:
        thresholds = swaps(guard, model, 40, reload)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len(thresholds) == 30
    assert all(c > 5 for c in calls), calls


def test_no_request_fails_while_the_server_swaps_models(
    model: Path, make_gate: Callable[..., Gate], caplog: pytest.LogCaptureFixture
) -> None:
    gate = make_gate()
    guard = gate.guard

    async def judge(request: Request) -> JSONResponse:
        payload = await request.json()
        decision = await gate.decide(Conversation(payload["text"], payload.get("previous")))
        assert decision.verdict is not None
        return JSONResponse(
            {
                "threshold": decision.verdict.threshold,
                "layer": decision.verdict.layer,
                "classifier_score": decision.verdict.classifier_score,
            }
        )

    settings = Settings(admin_token=TOKEN, reload_interval=INTERVAL)
    app = admin_app(gate, settings, [Route("/judge", judge, methods=["POST"])])
    stop = threading.Event()
    failures: list[BaseException | str] = []
    served = [0] * 6
    texts = ON_TOPIC + OFF_TOPIC

    with serve(app) as url:

        def client(n: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                k = n
                while not stop.is_set():
                    k += 1
                    try:
                        before = in_force(guard)
                        response = http.post("/judge", json={"text": texts[k % len(texts)]})
                        after = in_force(guard)
                        if response.status_code != 200:
                            failures.append(f"{response.status_code}: {response.text}")
                            return
                        body = response.json()
                        assert before <= body["threshold"] <= after, (before, body, after)
                        assert body["classifier_score"] is not None
                        served[n] += 1
                    except BaseException as exc:
                        failures.append(exc)
                        return

        def reload() -> bool:
            response = httpx.post(f"{url}/guardrail/reload", headers=AUTH, timeout=30)
            assert response.status_code in (200, 500), response.text
            return response.status_code == 200

        threads = [threading.Thread(target=client, args=(n,)) for n in range(len(served))]
        for thread in threads:
            thread.start()
        try:
            thresholds = swaps(guard, model, 24, reload)
            # And by the watcher alone: a replaced file is in force within a few polls, under load.
            write_classifier(model, guard, threshold=0.9)
            wait_for(lambda: in_force(guard) == 0.9)
            time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    assert failures == []
    assert len(thresholds) == 18
    assert all(s > 5 for s in served), served
    # The corrupt files were logged (by the endpoint, and perhaps once more by the watcher), not raised.
    assert len(admin_errors(caplog)) >= 6
