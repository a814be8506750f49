"""scripts/llm.py finds the small LLM that scripts/setup installs; no server is started here."""

from __future__ import annotations

from llm import GGUF_MAGIC, gguf_path


def test_smollm2_is_a_gguf_file() -> None:
    path = gguf_path("smollm2")
    assert path.is_file()
    with path.open("rb") as f:
        assert f.read(4) == GGUF_MAGIC
