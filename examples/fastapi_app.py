"""A FastAPI chatbot guarded by guardrail, in both wire formats.

    pip install guardrail fastapi uvicorn
    uvicorn examples.fastapi_app:app --port 8000

- ``POST /v1/chat/completions`` speaks the OpenAI format (point the ``openai`` SDK at
  ``http://127.0.0.1:8000/v1``);
- ``POST /chat`` is a custom API, ``{"message": "..."}`` -> ``{"reply": "..."}``, guarded through
  ``JSONFields``: a blocked message is answered ``{"reply": "<refusal>"}`` by the middleware.

The bot itself is a stand-in that echoes; put your LLM call there. Off-topic messages never reach it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from guardrail.middleware import GuardrailMiddleware
from guardrail.protocols import JSONFields, OpenAIChat

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "real_estate.md"


class ChatIn(BaseModel):
    message: str


def create_app(scenario: Path = SCENARIO) -> FastAPI:
    """The example app; tests build it with their own scenario and settings."""
    app = FastAPI(title="Real-estate assistant")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: dict) -> dict | StreamingResponse:  # type: ignore[type-arg]
        question = body["messages"][-1]["content"]
        answer = f"Happy to help with: {question}"
        base = {"id": "chatcmpl-example", "created": int(time.time()), "model": body.get("model", "example")}
        if body.get("stream"):
            # Streamed as the SDKs expect: chat.completion.chunk events, then [DONE].
            def events() -> Iterator[str]:
                for delta, finish in (({"role": "assistant", "content": answer}, None), ({}, "stop")):
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                    chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        message = {"role": "assistant", "content": answer}
        return {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }

    @app.post("/chat")
    async def chat(body: ChatIn) -> dict[str, str]:
        return {"reply": f"Happy to help with: {body.message}"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # One guard for both endpoints, each path with its wire format; /health and the rest pass untouched.
    app.add_middleware(
        GuardrailMiddleware,
        scenario=scenario,
        paths={"/v1/chat/completions": OpenAIChat(), "/chat": JSONFields("message", "reply")},
    )
    return app


app = create_app()
