"""The admin endpoints and the classifier watcher: feedback for retraining, and layer 3 hot reload.

``POST /guardrail/feedback`` takes ``{"id": "gr-...", "on_topic": true|false}``, the id being a request's
``x-guardrail-id``, and appends a ``{"type": "feedback", ...}`` record to the interaction log, where
`guardrail retrain` joins it to the request's record. ``POST /guardrail/reload`` loads the classifier
file again now. Both want ``Authorization: Bearer <admin_token>`` and answer 404 while no token is
set, so an unconfigured proxy exposes nothing. The token is compared in constant time and never logged.

``watching`` runs, for the app's lifetime, a watcher that stats the classifier and its model card every
``reload_interval`` seconds and reloads when either changed, plus a SIGHUP handler that reloads. A file
that does not load (corrupt, half-written, for another encoder) leaves the model in force and is
logged once per state of the files, not at every poll; the next change is tried again. Writers should
still replace the files by rename: a file rewritten in place within the filesystem's timestamp
granularity at the same size would go unnoticed. Loading runs in a worker thread, one load at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guardrail.asgi import error_response
from guardrail.errors import ConfigError, ModelError
from guardrail.gate import BodyTooLarge, Gate, check_declared_length, limited
from guardrail.guard import Guard
from guardrail.layers.classifier import Classifier, card_path
from guardrail.protocols.base import BadRequest
from guardrail.protocols.openai import parse_json_object
from guardrail.settings import Settings

logger = logging.getLogger("guardrail.admin")

FEEDBACK_PATH = "/guardrail/feedback"
RELOAD_PATH = "/guardrail/reload"
MAX_BODY_BYTES = 64 * 2**10
_ID = re.compile(r"gr-[0-9a-f]{24}")
_EVERY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

# A file as last seen: (inode, mtime_ns, size), None when missing. The inode tells a renamed-in
# replacement apart even when its mtime and size match the old file's.
FileStamp = tuple[int, int, int] | None
Stamps = tuple[FileStamp, FileStamp]  # the model, its card

# One classifier load at a time in the process, whoever asks (endpoint, watcher, SIGHUP): otherwise a
# slow load of an older file could land after a quicker load of the newer one.
_loading = threading.Lock()


class Reloader:
    """Reloads a guard's classifier off the event loop and notices when its files change."""

    def __init__(self, guard: Guard, settings: Settings) -> None:
        self.guard = guard
        self.settings = settings
        # Touched only under _loading.
        self._known: tuple[Classifier, Stamps] | None = None  # the model in force and its files then
        self._failed: Stamps | None = None  # the files as they were when they last failed to load

    @property
    def path(self) -> Path | None:
        """The classifier file to load: the configured one, else the one in force, else None."""
        if self.settings.classifier is not None:
            return self.settings.classifier
        current = self.guard.classifier
        return current.path if current is not None else None

    async def reload(self, reason: str) -> Classifier:
        """Load the classifier file now and put it in force; logs and raises ``ModelError`` (keeping the
        current model) when it does not load, ``ConfigError`` when there is no classifier."""
        path = self.path
        if path is None:
            raise ConfigError(
                "no classifier is configured: set classifier (--classifier, GUARDRAIL_CLASSIFIER)"
            )
        try:
            classifier = await asyncio.to_thread(self._load, path)
        except ModelError as exc:
            logger.error("%s: %s; the current classifier stays in force", reason, exc)
            raise
        logger.info("%s: classifier %s loaded, threshold %.4f", reason, classifier.name, classifier.threshold)
        return classifier

    def poll(self) -> Classifier | None:
        """Reload if the files differ from those in force (blocking: call it in a thread); the new
        model, or None. A failure is logged once per state of the files and never raised."""
        path = self.path
        if path is None:
            return None
        with _loading:
            stamps = _stamps(path)
            if stamps == self._known_stamps(path, stamps) or stamps == self._failed:
                return None
            try:
                classifier = self._swap(path, stamps)
            except ModelError as exc:
                logger.error(
                    "classifier %s changed but does not load: %s; the current classifier stays in force "
                    "until the file changes again",
                    path, exc,
                )  # fmt: skip
                return None
        logger.info("classifier %s changed: reloaded, threshold %.4f", classifier.name, classifier.threshold)
        return classifier

    async def watch(self, interval: float) -> None:
        """Poll every ``interval`` seconds until cancelled."""
        last_error = ""
        while True:
            await asyncio.sleep(interval)
            try:
                # stat() can hang on a network filesystem: not on the event loop.
                await asyncio.to_thread(self.poll)
            except Exception as exc:
                # The watcher must outlive a surprise; say so once, not at every poll.
                if repr(exc) != last_error:
                    logger.exception("classifier watcher: unexpected error; still watching")
                last_error = repr(exc)
            else:
                last_error = ""

    def _load(self, path: Path) -> Classifier:
        with _loading:
            return self._swap(path, _stamps(path))

    def _swap(self, path: Path, stamps: Stamps) -> Classifier:
        # Stamps taken before the load: if a file changes during it, the next poll loads it again.
        try:
            classifier = self.guard.reload(path, self.settings.classifier_threshold)
        except ModelError:
            self._failed = stamps
            raise
        self._known, self._failed = (classifier, stamps), None
        return classifier

    def _known_stamps(self, path: Path, now: Stamps) -> Stamps | None:
        """The stamps of the files the model in force came from; None when unknown or not ``path``."""
        current = self.guard.classifier
        if current is None or current.path != path:
            return None
        if self._known is not None and self._known[0] is current:
            return self._known[1]
        # Loaded elsewhere (at start-up): its model file's stamp is known, its card's is taken as is.
        model = now[0]
        if model is None or (model[1], model[2]) != current.stamp:
            return None
        self._known = (current, now)
        return now


def _stamp(path: Path) -> FileStamp:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _stamps(path: Path) -> Stamps:
    return (_stamp(path), _stamp(card_path(path)))


@contextlib.asynccontextmanager
async def watching(reloader: Reloader) -> AsyncIterator[Reloader]:
    """While inside, reload the classifier when its files change and on SIGHUP.

    Give it the ``Reloader`` the admin routes use: one record of the files in force for the process, so
    a model loaded by ``POST /guardrail/reload`` is not loaded again by the next poll, and a file that
    failed there is not logged again by the watcher."""
    settings = reloader.settings
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload_quietly() -> None:
        try:
            await reloader.reload("SIGHUP")
        except ConfigError as exc:
            logger.warning("SIGHUP: nothing to reload: %s", exc)
        except ModelError:
            pass  # logged by reload, and the current model stays

    def on_sighup() -> None:
        task = loop.create_task(reload_quietly())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    hangup = getattr(signal, "SIGHUP", None)
    try:
        if hangup is not None:
            loop.add_signal_handler(hangup, on_sighup)
    except (NotImplementedError, RuntimeError, ValueError):
        # Windows, or an event loop outside the main thread (a test server): no signal, no fuss.
        hangup = None
    try:
        if settings.reload_interval > 0:
            # The files as they are now are the baseline: the card's state at load time is not recorded.
            await asyncio.to_thread(reloader.poll)
            tasks.add(loop.create_task(reloader.watch(settings.reload_interval), name="guardrail-watcher"))
        yield reloader
    finally:
        if hangup is not None:
            loop.remove_signal_handler(hangup)
        for task in tasks:
            task.cancel()
        # A load already in a worker thread finishes there; nothing waits for it.
        await asyncio.gather(*tasks, return_exceptions=True)


def admin_routes(gate: Gate, reloader: Reloader) -> list[Route]:
    """``/guardrail/feedback`` and ``/guardrail/reload``; place them before any catch-all route."""
    admin = _Admin(gate, reloader)
    # Every method is routed here, so a GET gets 405 rather than reaching a passthrough to the upstream.
    return [
        Route(FEEDBACK_PATH, admin.feedback, methods=_EVERY_METHOD),
        Route(RELOAD_PATH, admin.reload, methods=_EVERY_METHOD),
    ]


class _Admin:
    def __init__(self, gate: Gate, reloader: Reloader) -> None:
        self.gate = gate
        self.reloader = reloader
        token = reloader.settings.admin_token
        self._token = token.encode() if token is not None else None

    async def feedback(self, request: Request) -> Response:
        """Record a human label for one logged request."""
        refused = self._check(request)
        if refused is not None:
            return refused
        try:
            payload = parse_json_object(await _read_body(request))
            id, on_topic = _feedback(payload)
        except ClientDisconnect:
            return Response(status_code=499)
        except BodyTooLarge as exc:
            return error_response(413, str(exc), "invalid_request_error")
        except BadRequest as exc:
            return error_response(400, str(exc), "invalid_request_error")
        log = self.gate.log
        if log is None:
            return error_response(
                409, "feedback needs the interaction log, which is off: set log_path", "invalid_request_error"
            )
        record = {
            "type": "feedback",
            "id": id,
            "on_topic": on_topic,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "source": "human",
        }
        if not log.write(record):
            self.gate.metrics.log_dropped.inc()
            return error_response(
                503, "the interaction log is full or closed: try again later", "server_error"
            )
        return JSONResponse({"status": "recorded", "id": id}, 202)

    async def reload(self, request: Request) -> Response:
        """Load the classifier file again and put it in force."""
        refused = self._check(request)
        if refused is not None:
            return refused
        try:
            classifier = await self.reloader.reload("POST /guardrail/reload")
        except ConfigError as exc:
            return error_response(409, str(exc), "invalid_request_error")
        except ModelError as exc:
            return error_response(500, f"{exc}; the current classifier stays in force", "server_error")
        return JSONResponse(
            {"status": "reloaded", "classifier": classifier.name, "threshold": classifier.threshold}
        )

    def _check(self, request: Request) -> Response | None:
        """The answer to a request the admin endpoints refuse, or None to go on."""
        if self._token is None:
            return error_response(
                404,
                "the admin endpoints are off: set admin_token (GUARDRAIL_ADMIN_TOKEN, or admin_token "
                "in the config file) to turn them on",
                "not_found_error",
            )
        if request.method != "POST":
            return error_response(
                405, f"use POST for {request.url.path}", "invalid_request_error", {"allow": "POST"}
            )
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        # Header values are latin-1 in Starlette: back to the bytes the client sent.
        given = credentials.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            return error_response(
                401,
                "the admin endpoints need Authorization: Bearer <admin_token>",
                "authentication_error",
                {"www-authenticate": "Bearer"},
            )
        return None


async def _read_body(request: Request) -> bytes:
    check_declared_length(request.headers.raw, MAX_BODY_BYTES)
    return b"".join([chunk async for chunk in limited(request.stream(), MAX_BODY_BYTES)])


def _feedback(payload: dict[str, object]) -> tuple[str, bool]:
    """The id and label of a feedback body, or ``BadRequest``; values are never echoed back."""
    id, on_topic = payload.get("id"), payload.get("on_topic")
    if id is None:
        raise BadRequest("'id' is missing: give the x-guardrail-id of the request")
    if not isinstance(id, str) or not _ID.fullmatch(id):
        raise BadRequest("'id' must be \"gr-\" and 24 lowercase hex digits, as in x-guardrail-id")
    if on_topic is None:
        raise BadRequest("'on_topic' is missing: give true or false")
    if not isinstance(on_topic, bool):
        raise BadRequest("'on_topic' must be true or false")
    return id, on_topic
