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

import time
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from guardrail.middleware import GuardrailMiddleware
from guardrail.protocols import JSONFields, OpenAIChat

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "real_estate.md"


class ChatIn(BaseModel):
    message: str


def create_app(scenario: Path = SCENARIO) -> FastAPI:
    """The example app; tests build it with their own scenario and settings."""
    app = FastAPI(title="Real-estate assistant")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: dict) -> dict:  # type: ignore[type-arg]
        question = body["messages"][-1]["content"]
        return {
            "id": "chatcmpl-example",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "example"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"Happy to help with: {question}"},
                    "finish_reason": "stop",
                }
            ],
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
