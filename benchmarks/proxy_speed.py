"""Proxy overhead: a fast local stub upstream called directly, and through `guardrail serve`.

Two processes besides this one: a stub upstream (a bare asyncio HTTP/1.1 server answering every
request with one small fixed ``chat.completion``) and the proxy (`guardrail serve` on
``scenarios/real_estate.md``, interaction log on, as in production). This process is the closed-loop
load generator: N keep-alive connections, each sending its next request as soon as the previous one is
answered. Every user message is unique (a template-made real-estate question with its own house number
or reference), so the guard's decision cache never hits.

For 1, 8 and 32 clients, a run straight to the stub and a run through the proxy alternate, repeated
five times; medians are quoted. Added latency is proxy minus direct, within each repeat. The encoder's
own numbers come from the same run, in this process, while the servers are idle. This machine's speed
drifts by 10 to 25% within a minute (other tenants), so each target holds the proxy against the encoder
timed right beside it:

- latency: at 1 client, each repeat runs 5 rounds of one encoder call on one message timed 60 times (1
  intra-op thread), then 100 requests through the proxy, then 100 through the floor (below). The target
  is that, in the median over all rounds, the round's added p50 exceeds the round's encoder p50 by
  <= 1 ms;
- throughput: first, the most the bare encoder does on this machine, in messages/s: one session with 1
  intra-op thread shared by 2 threads (what the proxy's micro-batcher does), and one session with 2
  intra-op threads, at batch sizes 1, 8, 16 and 32 (also again after the HTTP runs, for the table).
  Then in each repeat the best of those configurations runs for 2 s just before the 32-client runs and
  2 s just after them. The target is that, in the median over the repeats, proxy messages/s at 32
  clients is >= 0.85x the mean of those two. The ratio to the best of the sweeps, this script's measure
  until 2026-11-22, is reported too; it held a median of the proxy's runs against the fastest of 16
  passes timed minutes away from them, so a slow minute during the HTTP runs alone could fail it.

A third server, the floor, runs at 1 and 32 clients after the proxy in each repeat: a minimal guarding
forwarder in this script (``--serve-floor``: uvicorn, the same guard and micro-batcher, aiohttp, and
nothing else), so the report can tell the proxy's own costs from the design's.

CPU seconds per request come from /proc for each of the proxy's threads (its event loop is the main
thread; the others are the batcher's encoder workers, the log writer and any native thread pools), for
the stub, and for the load generator's thread.

Why these tools: against the stub at 32 connections, an ``httpx.AsyncClient`` load generator cost
0.9 to 2.6 ms of CPU per request (it would take a core from the proxy), ``wrk`` about 11 us and the raw
asyncio client used here 20 to 30 us (under 1% of a core at the proxy's rate), with exact request
counts and per-request checks of the status and the ``x-guardrail-verdict`` header. The stub costs
about 12 us per request; a bare ASGI app under uvicorn and httptools cost 45 us.

    GUARDRAIL_CACHE_DIR=/tmp/gcache python benchmarks/proxy_speed.py [--quick] [--no-record]
        [--cache-dir DIR] [--profile raw.txt]

``--profile`` also samples the proxy with py-spy (``pip install py-spy``) during one more run at
32 clients and summarises where its event-loop thread spends its time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent
SCENARIO = "scenarios/real_estate.md"
CLIENTS = (1, 8, 32)
FLOOR_CLIENTS = (1, 32)  # the reference forwarder runs at these
BATCHES = (1, 8, 16, 32)
LATENCY_BUDGET_MS = 1.0  # added p50 at 1 client <= one encoder call + this
THROUGHPUT_TARGET = 0.85  # proxy messages/s at 32 clients / the bare encoder's best
ROUNDS = 5  # encoder timings and 1-client runs interleaved in each repeat
PAIRED_SECONDS = 2.0  # the bare encoder's best configuration, timed beside each 32-client run

T = TypeVar("T")

STREETS = ["Maple Street", "Oak Lane", "Riverside Drive", "Church Road", "Station Avenue", "Elm Close",
           "Mill Lane", "Park Road", "Victoria Street", "Queens Road", "Harbour View", "Kings Avenue"]  # fmt: skip
HOMES = ["two bed flat", "3 bedroom house", "studio apartment", "cottage", "townhouse", "semi",
         "ground floor flat", "detached house", "bungalow", "maisonette"]  # fmt: skip
WHEN = ["this Saturday", "tomorrow afternoon", "next Tuesday morning", "after work on Friday", "on Monday",
        "next week", "this weekend", "on Thursday at 5"]  # fmt: skip
# Each on-topic template has a number slot, so there are tens of thousands of distinct messages.
# fmt: off
ON_TOPIC: list[tuple[str, dict[str, list[str]]]] = [
    ("can I book a viewing for the {home} at {n} {street} {when}?", {"home": HOMES, "street": STREETS, "when": WHEN}),
    ("is the {home} at {n} {street} close to {amenity}?", {"home": HOMES, "street": STREETS, "amenity": [
        "any good primary schools", "a train station", "the supermarket", "a bus stop", "a park"]}),
    ("the {thing} in my flat at {n} {street} has {problem} since {when}", {"street": STREETS,
        "when": ["yesterday", "last week", "Monday night", "the weekend", "this morning"],
        "thing": ["boiler", "shower", "kitchen tap", "washing machine", "front door lock", "heating"],
        "problem": ["stopped working", "been leaking", "been making a loud noise", "broken down"]}),
    ("any update on the {issue} I reported {when}? reference {ref}", {"ref": [str(r) for r in range(1000, 10000)],
        "issue": ["leaking tap", "broken window", "damp patch", "faulty oven", "blocked drain", "mould"],
        "when": ["last week", "on Monday", "two days ago", "a fortnight ago", "yesterday"]}),
    ("I would like to make an offer of {price} on the {home} at {n} {street}", {"home": HOMES, "street": STREETS,
        "price": [f"{k}k" for k in range(180, 900, 5)]}),
    ("I am a landlord and want you to {service} my {home} at {n} {street}", {"home": HOMES, "street": STREETS,
        "service": ["manage", "find tenants for", "value", "market", "let"]}),
    ("can I get a valuation for my {home} at {n} {street} before {when}?", {"home": HOMES, "street": STREETS,
        "when": ["the end of the month", "we move abroad", "next spring", "Christmas", "the summer"]}),
    ("do you have any {home}s to {deal} near {street} for under {price}?", {"home": HOMES, "street": STREETS,
        "deal": ["rent", "buy"], "price": [f"{k}0 a month" for k in range(60, 300)]}),
]
OFF_TOPIC: list[tuple[str, dict[str, list[str]]]] = [
    ("can you give me a recipe for {dish} for {n} people?", {"dish": [
        "banana bread", "a roast chicken", "chocolate chip cookies", "vegetable lasagne", "pizza dough"]}),
    ("what will the weather be like in {city} on {month} {n}?", {"city": [
        "London", "Madrid", "Berlin", "Chicago", "Tokyo", "Sydney", "Lisbon"], "month": [
        "May", "June", "July", "August", "September"]}),
    ("write me a short {kind} about {topic} for my {person} who turns {n}", {"kind": [
        "poem", "story", "limerick", "toast"], "topic": ["autumn leaves", "our dog Max", "the sea", "friendship"],
        "person": ["sister", "best friend", "grandmother", "colleague"]}),
    ("how many calories are in {n} grams of {food}?", {"food": [
        "rice", "pasta", "peanut butter", "cheddar", "dark chocolate", "porridge oats"]}),
    ("please help me {task} before {n} o'clock {when}", {"task": [
        "fix this python error", "write a cover letter", "translate a paragraph into French",
        "plan a trip to Rome", "summarise an article about climate change"], "when": ["today", "tomorrow"]}),
]
# fmt: on


def make_messages(templates: list[tuple[str, dict[str, list[str]]]], count: int, seed: int) -> list[str]:
    """``count`` distinct messages (after the guard's whitespace normalisation), in random order."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        template, slots = rng.choice(templates)
        values = {name: rng.choice(choices) for name, choices in slots.items()}
        text = template.format(n=rng.randint(1, 250), **values)
        key = " ".join(text.split())
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


def http_request(port: int, text: str) -> bytes:
    """One keep-alive chat-completion request, as bytes on the wire."""
    body = json.dumps(
        {
            "model": "stub-model",
            "messages": [
                {"role": "system", "content": "You are the assistant of a real estate agency."},
                {"role": "user", "content": text},
            ],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"authorization: Bearer sk-benchmark\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# The stub upstream ---------------------------------------------------------------------------------

STUB_BODY = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Happy to help."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34},
    }
).encode()
STUB_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(STUB_BODY),
    STUB_BODY,
)


class StubProtocol(asyncio.Protocol):
    """Answers each request on a keep-alive connection with ``STUB_RESPONSE``, parsing only its length."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            length = _content_length(buffer[: end + 2].lower())
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            self.transport.write(STUB_RESPONSE)
        self.buffer = buffer


def serve_stub() -> None:
    """Run the stub on a free port, print the port, serve until terminated by the benchmark."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the benchmark, which stops the stub

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(StubProtocol, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    _run(main())


# The floor: the least a guarding proxy of this design can do -----------------------------------------


def serve_floor(upstream_port: int, cache_dir: Path | None) -> None:
    """A minimal guarding forwarder, for reference: uvicorn, the same guard and micro-batcher, aiohttp.

    No settings, log, metrics, headers filtering, error handling or disconnect watch: it reads the body,
    judges the last message, forwards it with aiohttp and relays the reply. What ``guardrail serve`` costs
    beyond this is the price of being a production proxy; what this costs is the price of the design
    (uvicorn in, the encoder off the loop, aiohttp out).
    """
    import aiohttp
    import orjson
    import uvicorn

    from guardrail.batching import Batcher
    from guardrail.guard import Guard, Query

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard = Guard.load(ROOT / SCENARIO, cache_dir=cache_dir)
    batcher = Batcher(guard.judge_many)
    url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    session: aiohttp.ClientSession | None = None
    port = free_port()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                session = aiohttp.ClientSession()
                await send({"type": "lifespan.startup.complete"})
                print(port, flush=True)
            assert session is not None
            await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        verdict = await batcher.submit(Query(orjson.loads(body)["messages"][-1]["content"]))
        headers = [
            (k.decode(), v.decode()) for k, v in scope["headers"] if k not in (b"host", b"content-length")
        ]
        assert session is not None
        async with session.post(url, data=body, headers=headers) as reply:
            kept = [
                (k.lower(), v)
                for k, v in reply.raw_headers
                if k.lower() not in (b"transfer-encoding", b"connection")
            ]
            kept.append((b"x-guardrail-verdict", b"passed" if verdict.allowed else b"blocked"))
            await send({"type": "http.response.start", "status": reply.status, "headers": kept})
            async for chunk in reply.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _content_length(head: bytes) -> int:
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    return int(head[start + 17 : head.index(b"\r\n", start + 2)])


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (uvicorn uses it too), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# The load generator --------------------------------------------------------------------------------


@dataclass
class Run:
    """One closed-loop run: per-request latencies, verdict headers, and what it cost."""

    clients: int
    latencies: list[float]  # seconds, in request order
    verdicts: list[str]  # x-guardrail-verdict of each response ("" when absent)
    wall: float
    errors: int
    cpu: dict[str, float]  # CPU seconds: client, stub, proxy, proxy_loop (its main thread), proxy_other
    others: list[float]  # CPU seconds of each of the proxy's other threads, busiest first

    @property
    def per_s(self) -> float:
        return len(self.latencies) / self.wall

    def ms(self, q: float, verdict: str | None = None) -> float:
        samples = [x for x, v in zip(self.latencies, self.verdicts, strict=True) if verdict in (None, v)]
        return float(np.percentile(samples, q)) * 1e3 if samples else float("nan")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str]:
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    if b"\r\ncontent-length:" in head:
        await reader.readexactly(_content_length(head))
    elif b"\r\ntransfer-encoding: chunked" in head:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readexactly(2)
    else:
        raise RuntimeError(f"a response with no length: {head[:200]!r}")
    start = head.find(b"\r\nx-guardrail-verdict:")
    verdict = "" if start < 0 else head[start + 22 : head.index(b"\r\n", start + 2)].strip().decode()
    return int(head[9:12]), verdict


async def _drive(
    port: int, requests: Sequence[bytes], clients: int
) -> tuple[list[float], list[str], float, int]:
    latencies = [0.0] * len(requests)
    verdicts = [""] * len(requests)
    errors = 0
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    indices = iter(range(len(requests)))  # shared: each client takes the next request when it is free

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        for i in indices:
            start = time.perf_counter()
            writer.write(requests[i])
            status, verdicts[i] = await _read_response(reader)
            latencies[i] = time.perf_counter() - start
            errors += status != 200

    start = time.perf_counter()
    await asyncio.gather(*(client(*connection) for connection in connections))
    wall = time.perf_counter() - start
    for _, writer in connections:
        writer.close()
    return latencies, verdicts, wall, errors


def run_load(port: int, requests: Sequence[bytes], clients: int, proxy: int = 0, stub: int = 0) -> Run:
    """Send ``requests`` over ``clients`` connections, reading the CPU of the proxy and stub pids."""
    threads, stub_cpu, client_cpu = thread_cpu(proxy), thread_cpu(stub), time.thread_time()
    latencies, verdicts, wall, errors = _run(_drive(port, requests, clients))
    cpu = {
        "client": time.thread_time() - client_cpu,
        "stub": sum(thread_cpu(stub).values()) - sum(stub_cpu.values()),
    }
    used = {tid: seconds - threads.get(tid, 0.0) for tid, seconds in thread_cpu(proxy).items()}
    cpu["proxy_loop"] = used.pop(proxy, 0.0)
    cpu["proxy_other"] = sum(used.values())
    cpu["proxy"] = cpu["proxy_loop"] + cpu["proxy_other"]
    return Run(clients, latencies, verdicts, wall, errors, cpu, sorted(used.values(), reverse=True))


def merged(runs: Sequence[Run]) -> Run:
    """Several runs as one: latencies and verdicts in order, wall time and CPU summed."""
    others = [
        sum(r.others[k] for r in runs if k < len(r.others)) for k in range(max(len(r.others) for r in runs))
    ]
    return Run(
        runs[0].clients,
        [x for r in runs for x in r.latencies],
        [v for r in runs for v in r.verdicts],
        sum(r.wall for r in runs),
        sum(r.errors for r in runs),
        {key: sum(r.cpu[key] for r in runs) for key in runs[0].cpu},
        sorted(others, reverse=True),
    )


def thread_cpu(pid: int) -> dict[int, float]:
    """User plus system CPU seconds of each live thread of a process, from /proc; none for pid 0."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir() if pid else ():
        with contextlib.suppress(OSError):  # a thread that just ended
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


# The encoder alone ---------------------------------------------------------------------------------


def encoder_latency(encoder, texts: list[str], calls: int, warm: int = 20) -> float:
    """Median milliseconds of one ``encode`` call on one message, after ``warm`` calls."""
    for text in texts[:warm]:
        encoder.encode([text])
    samples = []
    for text in texts[warm : warm + calls]:
        start = time.perf_counter()
        encoder.encode([text])
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e3


def encoder_throughput(encoders: dict, texts: list[str], seconds: float, best: dict) -> None:
    """Messages/s and CPU ms per message of each configuration; ``best`` keeps each one's fastest pass."""
    for name, (encoder, workers) in encoders.items():
        for batch in BATCHES:
            per_s, cpu = _encoder_throughput(encoder, texts, workers, batch, seconds)
            print(f"    {name}, batch {batch}: {per_s:.0f} messages/s, {cpu * 1e3:.2f} ms CPU/message")
            if per_s > best.get((name, batch), (0.0, 0.0))[0]:
                best[name, batch] = (per_s, cpu * 1e3)


def _encoder_throughput(
    encoder, texts: list[str], workers: int, batch: int, seconds: float
) -> tuple[float, float]:
    def work(first: int) -> int:
        done, i = 0, first
        while time.perf_counter() < deadline:
            encoder.encode(texts[i : i + batch])
            done += batch
            i = (i + workers * batch) % (len(texts) - batch)
        return done

    for worker in range(workers):  # warm-up, and the first ONNX run of this shape
        encoder.encode(texts[worker * batch : (worker + 1) * batch])
    cpu, start = time.process_time(), time.perf_counter()
    deadline = start + seconds
    with ThreadPoolExecutor(workers) as pool:
        done = sum(pool.map(work, [w * batch for w in range(workers)]))
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done


# The servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stub(stack: contextlib.ExitStack) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-stub"], stdout=subprocess.PIPE, text=True
    )
    stack.callback(stop, process)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def start_floor(
    stack: contextlib.ExitStack, upstream: int, cache_dir: Path | None
) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", str(upstream)]
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    stack.callback(stop, process)
    assert process.stdout is not None
    line = process.stdout.readline()  # printed once it serves
    if not line:
        raise SystemExit("the floor forwarder did not start")
    return process, int(line)


def start_proxy(
    stack: contextlib.ExitStack, upstream: int, workdir: Path, cache_dir: Path | None
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("guardrail")), "serve", "--scenario", SCENARIO,
               "--upstream", f"http://127.0.0.1:{upstream}", "--port", str(port),
               "--log-path", str(workdir / "interactions.jsonl")]  # fmt: skip
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    output = stack.enter_context((workdir / "proxy.out").open("w"))
    process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    stack.callback(stop, process)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"guardrail serve exited:\n{(workdir / 'proxy.out').read_text()}")
        url = f"http://127.0.0.1:{port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return process, port
        time.sleep(0.2)
    raise SystemExit("guardrail serve did not answer /healthz within 180 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Profiling -----------------------------------------------------------------------------------------

# Where the event-loop thread's samples go: each sample counts for the first of these found walking its
# stack from the innermost frame out, so a send inside aiohttp counts for aiohttp, not for the relay.
SUBSYSTEMS = (
    ("logging/", "logging (uvicorn's access log)"),
    ("prometheus_client/", "Prometheus metrics"),
    ("guardrail/interactions.py", "interaction log (serialise, queue)"),
    ("aiohttp/", "upstream client: aiohttp, yarl"),
    ("yarl/", "upstream client: aiohttp, yarl"),
    ("guardrail/upstream.py", "upstream client: aiohttp, yarl"),
    ("guardrail/protocols/", "request parsing, reply reading (guardrail/protocols)"),
    ("guardrail/batching.py", "micro-batcher hand-off"),
    ("concurrent/futures/", "micro-batcher hand-off"),
    ("guardrail/", "other guardrail code (proxy, relay, gate, asgi)"),
    ("starlette/", "Starlette (middleware, routing, Request)"),
    ("uvicorn/", "uvicorn (HTTP parsing, writes)"),
)


def profile(pid: int, port: int, requests: Sequence[bytes], out: Path) -> str:
    """Sample the proxy with py-spy during one run at 32 clients; where its event-loop thread is."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    # Not --gil: a thread preempted while holding the GIL (when a loopback send wakes the peer, say) would
    # count as busy there. Without it, samples are of threads not idle: on a core or waiting for one.
    command = [
        str(spy),
        "record",
        "--pid",
        str(pid),
        "--threads",
        "--rate",
        "200",
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        run = run_load(port, requests, 32, pid)
    finally:
        sampler.send_signal(signal.SIGINT)
        sampler.wait(30)
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        name = thread.split(": ", 1)[-1]
        threads[name] += int(count)
        if name == "MainThread" and frames:
            own[frames[-1]] += int(count)
            files = [frame.rsplit("(", 1)[-1] for frame in reversed(frames)]
            part = next(
                (label for file in files for pattern, label in SUBSYSTEMS if file.startswith(pattern)),
                "event loop (uvloop, asyncio)",
            )
            parts[part] += int(count)
    total, main = sum(threads.values()), threads["MainThread"]
    lines = [
        f"py-spy `record` during {len(requests)} more requests at 32 clients ({run.per_s:.1f} requests/s, event "
        f"loop {run.cpu['proxy_loop'] / len(requests) * 1e3:.2f} ms CPU per request): {total} samples of threads "
        "that were not idle (on a core, or waiting for a core or the GIL).",
        "",
        "Samples by thread: " + ", ".join(f"{name} {n / total:.0%}" for name, n in threads.most_common(5)),
        "",
        "| event-loop thread: part | share of its samples |",
        "|---|---|",
        *(f"| {part} | {n / main:.1%} |" for part, n in parts.most_common()),
        "",
        "| event-loop thread: innermost frame | share |",
        "|---|---|",
        *(f"| `{frame}` | {n / main:.1%} |" for frame, n in own.most_common(12)),
    ]
    return "\n".join(lines)


# The report ----------------------------------------------------------------------------------------


def thread_ranks(runs: list[Run]) -> list[float]:
    """CPU ms per request of the proxy's other threads, busiest first, each rank's median over the
    runs. Threads come and go (a thread pool's), so a run with fewer counts the missing ranks as 0."""
    width = max(len(r.others) for r in runs)
    return [
        median([(r.others[k] if k < len(r.others) else 0.0) / len(r.latencies) * 1e3 for r in runs])
        for k in range(width)
    ]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def per_request_ms(runs: list[Run], key: str) -> float:
    return median([r.cpu[key] / len(r.latencies) * 1e3 for r in runs])


@dataclass
class Round:
    """One 1-client round: the encoder call's p50, then the proxy's and the floor's added p50 (ms)."""

    encoder: float
    added: float
    floor: float


def report(
    rounds: list[list[Round]],
    paired: list[float],
    encoders: dict,
    direct: dict,
    proxied: dict,
    floored: dict,
    mixed: list[Run],
    repeats: int,
) -> tuple[str, dict]:
    """The Markdown tables and the numbers the verdicts are drawn from."""
    (best_name, best_batch), (best_rate, best_cpu) = max(encoders.items(), key=lambda item: item[1][0])
    rows, cpu_rows = [], []
    for c in CLIENTS:
        d, p = direct[c], proxied[c]
        added50 = median([q.ms(50) - r.ms(50) for q, r in zip(p, d, strict=True)])
        added99 = median([q.ms(99) - r.ms(99) for q, r in zip(p, d, strict=True)])
        rows.append(
            f"| {c} | {len(p[0].latencies)} / {len(d[0].latencies)} | {median([r.ms(50) for r in d]):.2f} ms | "
            f"{median([r.ms(99) for r in d]):.2f} ms | {median([r.per_s for r in d]):,.0f} | "
            f"{median([r.ms(50) for r in p]):.2f} ms | {median([r.ms(99) for r in p]):.2f} ms | "
            f"{median([r.per_s for r in p]):.1f} | **{added50:+.2f} ms** | {added99:+.2f} ms |"
        )
        # The proxy's other threads, busiest first, each as the median over the repeats.
        others = " + ".join(f"{x:.2f}" for x in thread_ranks(p) if x >= 0.05)
        cpu_rows.append(
            f"| {c} | {per_request_ms(p, 'proxy_loop'):.2f} | {per_request_ms(p, 'proxy_other'):.2f} ({others}) | "
            f"{per_request_ms(p, 'proxy'):.2f} | {median([r.cpu['proxy'] / r.wall for r in p]):.2f} | "
            f"{median([r.cpu['proxy_loop'] / r.wall for r in p]):.0%} | {per_request_ms(p, 'stub'):.3f} | "
            f"{per_request_ms(p, 'client'):.3f} |"
        )
    runs = [r for c in CLIENTS for r in proxied[c]]
    passed = sum(r.verdicts.count("passed") for r in runs)
    judged = sum(len(r.verdicts) for r in runs)
    errors = sum(r.errors for c in CLIENTS for r in direct[c] + proxied[c])
    p32 = proxied[32]
    busy = [x for x in thread_ranks(p32) if x >= 0.5]
    # Added p50 at 1 client beyond the encoder call timed just before, round by round.
    every = [r for repeat in rounds for r in repeat]
    ratios = [r.per_s / bare for r, bare in zip(p32, paired, strict=True)]
    floor_ratios = [r.per_s / bare for r, bare in zip(floored[32], paired, strict=True)]
    numbers = {
        "added_p50_1": median([r.added for r in every]),
        "over": median([r.added - r.encoder for r in every]),
        "floor_over": median([r.floor - r.encoder for r in every]),
        "latency": median([r.encoder for r in every]),
        "rounds": len(every),
        "floor_rate": median([r.per_s for r in floored[32]]),
        "rate": median([r.per_s for r in p32]),
        "paired": median(paired),
        "paired_ratio": median(ratios),
        "paired_ratios": ratios,
        "floor_paired_ratio": median(floor_ratios),
        "best_rate": best_rate,
        "best_cpu": best_cpu,
        "best": f"{best_name}, batch {best_batch}",
        "loop_busy": median([r.cpu["proxy_loop"] / r.wall for r in p32]),
        "loop_ms": per_request_ms(p32, "proxy_loop"),
        "other_ms": per_request_ms(p32, "proxy_other"),
        "proxy_ms": per_request_ms(p32, "proxy"),
        "side_ms": per_request_ms(p32, "stub") + per_request_ms(p32, "client"),
        "busy_threads": len(busy),
    }
    numbers["ratio"] = numbers["rate"] / best_rate
    numbers["floor_ratio"] = numbers["floor_rate"] / best_rate
    latency_rows = [
        f"| {i + 1} | {median([r.encoder for r in repeat]):.2f} ms | {median([r.added for r in repeat]):.2f} ms | "
        + ", ".join(f"{r.added - r.encoder:+.2f}" for r in repeat)
        + f" | **{median([r.added - r.encoder for r in repeat]):+.2f} ms** | "
        f"{median([r.floor - r.encoder for r in repeat]):+.2f} ms |"
        for i, repeat in enumerate(rounds)
    ]
    paired_rows = [
        f"| {i + 1} | {bare:.1f} | {p.per_s:.1f} | **{p.per_s / bare:.3f}x** | {p.per_s / best_rate:.3f}x | "
        f"{f.per_s:.1f} | {f.per_s / bare:.3f}x |"
        for i, (bare, p, f) in enumerate(zip(paired, p32, floored[32], strict=True))
    ]
    floor_rows = [
        f"| {c} | {median([r.ms(50) for r in floored[c]]):.2f} ms | {median([r.ms(99) for r in floored[c]]):.2f} ms | "
        f"{median([r.per_s for r in floored[c]]):.1f} | {per_request_ms(floored[c], 'proxy_loop'):.2f} | "
        f"{per_request_ms(floored[c], 'proxy'):.2f} |"
        for c in FLOOR_CLIENTS
    ]

    lines = [
        "**The encoder alone** (in the benchmark process, on the same messages; throughput measured before and "
        "after the HTTP runs, the faster pass kept)",
        "",
        f"- one `encode` call on one message, 1 intra-op thread: p50 {numbers['latency']:.2f} ms, the median "
        f"over {len(every)} rounds (from {min(r.encoder for r in every):.2f} to {max(r.encoder for r in every):.2f} "
        "ms; timed in each round, just before its 1-client runs)",
        "",
        "| messages/s (CPU ms per message) | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
        "|---|" + "---|" * len(BATCHES),
    ]
    for name in dict.fromkeys(name for name, _ in encoders):
        cells = [f"{encoders[name, b][0]:.0f} ({encoders[name, b][1]:.1f})" for b in BATCHES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Reference: the best, {best_rate:.0f} messages/s ({best_name}, batch {best_batch}).",
        "",
        f"**Direct to the stub and through the proxy** (medians of {repeats} repeat(s); requests per run through "
        "the proxy / direct; added = proxy minus direct within each repeat; requests/s = requests / wall time)",
        "",
        "| clients | requests | direct p50 | direct p99 | direct req/s | proxy p50 | proxy p99 | proxy req/s | added p50 | added p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Through the proxy {passed} of {judged} messages passed ({passed / judged:.1%}); the others were refused by "
        f"the proxy and never reached the stub. Responses other than 200: {errors}.",
        "",
        "**CPU per request through the proxy** (ms, from /proc; medians. Event loop: the proxy's main thread. "
        "Other threads: the batcher's encoder workers, the log writer and any native thread pools, each listed "
        "busiest first. Cores: proxy CPU seconds per wall second; loop busy: the same for the main thread.)",
        "",
        "| clients | proxy event loop | proxy other threads (each) | proxy total | proxy cores | loop busy | stub | load generator |",
        "|---|---|---|---|---|---|---|---|",
        *cpu_rows,
        "",
        f"Going straight to the stub at 32 clients, the stub costs {per_request_ms(direct[32], 'stub') * 1e3:.0f} us "
        f"and the load generator {per_request_ms(direct[32], 'client') * 1e3:.0f} us of CPU per request.",
        "",
        f"**Latency at 1 client, repeat by repeat** ({ROUNDS} rounds each of an encoder timing, then "
        f"{len(proxied[1][0].latencies) // ROUNDS} requests through the proxy, then as many through the floor; "
        "added p50 = through minus direct; beyond the encoder = that minus the round's encoder p50; medians over "
        f"the rounds; the target is the median over all {len(every)} rounds <= {LATENCY_BUDGET_MS:g} ms)",
        "",
        "| repeat | encoder call p50 | proxy added p50 | proxy beyond the encoder, round by round | median | floor beyond the encoder |",
        "|---|---|---|---|---|---|",
        *latency_rows,
        "",
        f"**Throughput at 32 clients, repeat by repeat** (the bare encoder in its best configuration, {best_name}, "
        f"batch {best_batch}, timed for {PAIRED_SECONDS:g} s just before the repeat's 32-client runs and just "
        "after them, the mean of the two; the target is the median ratio >= "
        f"{THROUGHPUT_TARGET}x)",
        "",
        "| repeat | bare encoder messages/s | proxy requests/s | ratio | ratio to the sweeps' best | floor requests/s | floor ratio |",
        "|---|---|---|---|---|---|---|",
        *paired_rows,
        "",
        "**The floor, for reference**: a minimal guarding forwarder in this script (`--serve-floor`): uvicorn, the "
        "same guard and micro-batcher, aiohttp, and nothing else (no log, metrics, header filtering, error "
        "handling or disconnect watch). It runs beside the proxy, after it in each repeat, on messages of its own.",
        "",
        "| clients | floor p50 | floor p99 | floor req/s | floor event loop CPU ms/request | floor total CPU ms/request |",
        "|---|---|---|---|---|---|",
        *floor_rows,
    ]
    if mixed:
        share = sum(r.verdicts.count("blocked") for r in mixed) / sum(len(r.verdicts) for r in mixed)
        lines += [
            "",
            f"**Extra: half on-topic, half off-topic messages** (one run each; the proxy refused {share:.0%} of them "
            "itself)",
            "",
            "| clients | requests | req/s | passed p50 | passed p99 | refused p50 | refused p99 |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.clients} | {len(r.latencies)} | {r.per_s:.1f} | {r.ms(50, 'passed'):.2f} ms | "
            f"{r.ms(99, 'passed'):.2f} ms | {r.ms(50, 'blocked'):.2f} ms | {r.ms(99, 'blocked'):.2f} ms |"
            for r in mixed
        ]
    return "\n".join(lines), numbers


def meaning(n: dict) -> str:
    """The verdicts on both targets, and where the CPU goes, in words."""
    latency_ok = n["over"] <= LATENCY_BUDGET_MS
    out = [
        f"**Latency: {verdict(latency_ok)}.** With 1 client the proxy adds {n['added_p50_1']:.2f} ms at p50, "
        f"{n['over']:.2f} ms beyond one encoder call ({n['latency']:.2f} ms; medians over {n['rounds']} rounds, each "
        f"round against the encoder timed in it); the budget is {LATENCY_BUDGET_MS:g} ms beyond the encoder"
        + ("." if latency_ok else f", exceeded by {n['over'] - LATENCY_BUDGET_MS:.2f} ms.")
        + f" The floor adds {n['floor_over']:.2f} ms beyond the encoder."
    ]
    throughput_ok = n["paired_ratio"] >= THROUGHPUT_TARGET
    out.append(
        f"**Throughput: {verdict(throughput_ok)}.** With 32 clients the proxy serves {n['rate']:.1f} requests/s. "
        f"Against the bare encoder's best configuration ({n['best']}) timed beside each repeat, that is "
        f"{n['paired_ratio']:.3f}x in the median (repeat by repeat "
        + ", ".join(f"{x:.3f}x" for x in n["paired_ratios"])
        + f"); the target is {THROUGHPUT_TARGET}x"
        + ("." if throughput_ok else f", missed by {THROUGHPUT_TARGET - n['paired_ratio']:.3f}x.")
        + f" The floor: {n['floor_paired_ratio']:.3f}x. Against the best of the sweeps before and after the HTTP "
        f"runs ({n['best_rate']:.1f} messages/s), the proxy's median is {n['ratio']:.3f}x and the floor's "
        f"{n['floor_ratio']:.3f}x."
    )
    total = n["proxy_ms"] + n["side_ms"]
    cores = os.cpu_count() or 1
    text = (
        f"**Where the CPU goes.** At 32 clients each request costs {n['proxy_ms']:.2f} ms of proxy "
        f"CPU: {n['loop_ms']:.2f} ms on the event loop (busy {n['loop_busy']:.0%} of the time) and "
        f"{n['other_ms']:.2f} ms on other threads, against {n['best_cpu']:.2f} ms per message for the bare encoder "
        f"at its best. With the stub and the load generator ({n['side_ms']:.2f} ms) that is {total:.2f} ms per "
        f"request, so {cores} fully used cores could serve at most {cores * 1e3 / total:.0f} requests/s; the "
        f"encoder alone at {n['best_cpu']:.2f} ms per message could do {cores * 1e3 / n['best_cpu']:.0f}. "
        f"For {THROUGHPUT_TARGET}x on CPU alone, with the encoder threads as frugal as the bare encoder, all "
        f"the rest (event loop, stub, load generator) can have {(1 / THROUGHPUT_TARGET - 1) * n['best_cpu']:.2f} "
        "ms per request."
    )
    if n["other_ms"] > 1.3 * n["best_cpu"]:
        text += (
            f" The proxy's other threads use {n['other_ms'] / n['best_cpu']:.1f}x the bare encoder's CPU per "
            f"message, and {n['busy_threads']} of them used 0.5 ms or more per request where the batcher runs 2 "
            "workers: an extra busy thread is a native pool (onnxruntime's intra-op threads, or a BLAS library's)."
        )
    out.append(text)
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests and one repeat, for a smoke test"
    )
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument(
        "--cache-dir", type=Path, help="model cache (default: GUARDRAIL_CACHE_DIR or ~/.cache)"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="RAW", help="also sample the proxy with py-spy into RAW"
    )
    parser.add_argument("--serve-stub", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=int, metavar="UPSTREAM_PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        serve_stub()
        return
    if args.serve_floor:
        serve_floor(args.serve_floor, args.cache_dir)
        return
    # A plain kill of this script still stops the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    repeats = 1 if args.quick else 5
    proxy_n = {1: 100, 8: 300, 32: 600} if args.quick else {1: 500, 8: 1000, 32: 2000}
    direct_n = 4000 if args.quick else 20000
    mixed_n = {1: 100, 32: 300} if args.quick else {1: 300, 32: 1000}
    seconds = 0.7 if args.quick else 1.5
    load_before = os.getloadavg()[0]

    profiled = 2000 if args.profile else 0
    on_topic = make_messages(
        ON_TOPIC,
        600
        + repeats * (sum(proxy_n.values()) + sum(proxy_n[c] for c in FLOOR_CLIENTS))
        + sum(mixed_n.values())
        + profiled,
        1,
    )
    off_topic = make_messages(OFF_TOPIC, sum(mixed_n.values()), seed=2)
    words = [len(t.split()) for t in on_topic]
    print(
        f"{len(on_topic)} distinct on-topic messages, {min(words)}-{max(words)} words; load {load_before:.2f}"
    )

    from guardrail.encoder import Encoder  # here, so that the stub process does not load it

    one = Encoder.load(threads=1, cache_dir=args.cache_dir)  # exports the model on first use
    encoders = {"2 threads sharing a 1-thread session": (one, 2), "1 thread, 2-thread session": (
        Encoder.load(threads=2, cache_dir=args.cache_dir), 1)}  # fmt: skip
    calls = 100 if args.quick else 300
    round_calls = 30 if args.quick else 60
    print(f"encoder alone: one call p50 {encoder_latency(one, on_topic, calls):.2f} ms (warm-up)")
    best: dict[tuple[str, int], tuple[float, float]] = {}
    encoder_throughput(encoders, on_topic, seconds, best)
    bare_name, bare_batch = max(best, key=lambda key: best[key][0])
    bare, bare_workers = encoders[bare_name]
    paired_seconds = seconds if args.quick else PAIRED_SECONDS

    def bare_rate() -> float:
        return _encoder_throughput(bare, on_topic, bare_workers, bare_batch, paired_seconds)[0]

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxy-speed-")))
        stub, stub_port = start_stub(stack)
        proxy, proxy_port = start_proxy(stack, stub_port, workdir, args.cache_dir)
        floor, floor_port = start_floor(stack, stub_port, args.cache_dir)
        print(
            f"stub on port {stub_port} (pid {stub.pid}), proxy on port {proxy_port} (pid {proxy.pid}), "
            f"floor on port {floor_port} (pid {floor.pid})"
        )
        fresh: Iterator[str] = iter(on_topic)  # each message goes through the proxy (or the floor) once

        def through_proxy(texts: Iterator[str] | list[str], n: int, port: int = proxy_port) -> list[bytes]:
            requests = [http_request(port, text) for text in itertools.islice(texts, n)]
            if len(requests) < n:
                raise RuntimeError("ran out of distinct messages")
            return requests

        direct_requests = [http_request(stub_port, on_topic[i % len(on_topic)]) for i in range(direct_n)]
        run_load(stub_port, direct_requests[:2000], 8)  # warm-up
        run_load(proxy_port, through_proxy(fresh, 300), 8)
        run_load(floor_port, through_proxy(fresh, 300, floor_port), 8)
        direct: dict[int, list[Run]] = {c: [] for c in CLIENTS}
        proxied: dict[int, list[Run]] = {c: [] for c in CLIENTS}
        floored: dict[int, list[Run]] = {c: [] for c in FLOOR_CLIENTS}
        rounds: list[list[Round]] = []  # each repeat's 1-client rounds
        paired: list[float] = []  # the bare encoder's best configuration beside each repeat's 32-client runs
        for repeat in range(repeats):
            for c in CLIENTS:
                d = run_load(stub_port, direct_requests, c, proxy.pid, stub.pid)
                direct[c].append(d)
                if c == 1:
                    # Each round holds 1-client runs against an encoder call timed just before them, so
                    # a change in the machine's speed moves both alike.
                    this: list[Round] = []
                    runs: dict[int, list[Run]] = {proxy_port: [], floor_port: []}
                    for k in range(ROUNDS):
                        start = (repeat * ROUNDS + k) * (round_calls + 5) % (len(on_topic) - round_calls - 5)
                        encoder = encoder_latency(one, on_topic[start:], round_calls, warm=5)
                        for port, pid in ((proxy_port, proxy.pid), (floor_port, floor.pid)):
                            runs[port].append(
                                run_load(
                                    port, through_proxy(fresh, proxy_n[1] // ROUNDS, port), 1, pid, stub.pid
                                )
                            )
                        this.append(Round(encoder, runs[proxy_port][-1].ms(50) - d.ms(50),
                                          runs[floor_port][-1].ms(50) - d.ms(50)))  # fmt: skip
                    rounds.append(this)
                    proxied[1].append(merged(runs[proxy_port]))
                    floored[1].append(merged(runs[floor_port]))
                    print(
                        f"[{repeat + 1}/{repeats}] encoder alone: one call p50 "
                        + ", ".join(f"{r.encoder:.2f}" for r in this)
                        + " ms; proxy beyond it "
                        + ", ".join(f"{r.added - r.encoder:+.2f}" for r in this)
                        + " ms; floor "
                        + ", ".join(f"{r.floor - r.encoder:+.2f}" for r in this)
                    )
                    p = proxied[1][-1]
                else:
                    before = bare_rate() if c == 32 else 0.0
                    p = run_load(proxy_port, through_proxy(fresh, proxy_n[c]), c, proxy.pid, stub.pid)
                    proxied[c].append(p)
                line = (
                    f"[{repeat + 1}/{repeats}] {c:2d} clients: direct p50 {d.ms(50):.2f} ms p99 {d.ms(99):.2f} ms "
                    f"{d.per_s:,.0f}/s | proxy p50 {p.ms(50):.2f} ms p99 {p.ms(99):.2f} ms {p.per_s:.1f}/s, "
                    f"CPU {p.cpu['proxy'] / len(p.latencies) * 1e3:.2f} ms/request "
                    f"(event loop {p.cpu['proxy_loop'] / len(p.latencies) * 1e3:.2f})"
                )
                if c in FLOOR_CLIENTS:
                    if c != 1:
                        floored[c].append(
                            run_load(
                                floor_port,
                                through_proxy(fresh, proxy_n[c], floor_port),
                                c,
                                floor.pid,
                                stub.pid,
                            )
                        )
                    f = floored[c][-1]
                    line += f" | floor p50 {f.ms(50):.2f} ms {f.per_s:.1f}/s"
                if c == 32:
                    paired.append((before + bare_rate()) / 2)
                    line += f" | bare encoder beside them {paired[-1]:.1f}/s ({p.per_s / paired[-1]:.3f}x)"
                print(line)

        mixed = []
        off = iter(off_topic)
        for c, n in mixed_n.items():
            texts = [next(off) if i % 2 else next(fresh) for i in range(n)]
            random.Random(c).shuffle(texts)
            run = run_load(proxy_port, through_proxy(texts, n), c, proxy.pid, stub.pid)
            mixed.append(run)
            print(f"mixed, {c} clients: {run.per_s:.1f}/s, {run.verdicts.count('blocked')} of {n} refused")

        hot = profile(proxy.pid, proxy_port, through_proxy(fresh, profiled), args.profile) if profiled else ""
        print(hot)

    print("encoder alone, again:")
    encoder_throughput(encoders, on_topic, seconds, best)
    body, numbers = report(rounds, paired, best, direct, proxied, floored, mixed, repeats)
    text = meaning(numbers)
    elapsed = time.perf_counter() - started
    intro = (
        f"Model {one.id}, scenario `{SCENARIO}`, `guardrail serve` with its defaults (interaction log on, log level "
        "info) in front of a stub upstream (a bare asyncio HTTP/1.1 server answering every request with one small "
        "fixed `chat.completion`). Load: closed-loop clients on keep-alive connections, each sending its next "
        "request when the previous one is answered, from a raw asyncio HTTP/1.1 client in the benchmark process. "
        f"Every user message is unique ({min(words)}-{max(words)} words, real-estate questions with their own house "
        "or reference numbers), so no decision comes from the guard's cache. 1-minute load average before the "
        f"run {load_before:.2f}, after {os.getloadavg()[0]:.2f}; the script took {elapsed:.0f} s.\n\n"
    )
    body = intro + body + "\n\n**What this means**\n\n" + text
    if hot:
        body += "\n\n**Where the proxy's event loop spends its time at 32 clients**\n\n" + hot
    print(body)
    if not args.no_record:
        from _results import record

        record("Proxy overhead", body)


if __name__ == "__main__":
    main()
