"""The sentence encoder on the serving path: onnxruntime and tokenizers, nothing heavier."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Tokenizer

from guardrail.errors import ModelError
from guardrail.models import DEFAULT_MODEL, content_key, default_cache_dir, resolve_model

Vectors = NDArray[np.float32]

_BATCH = 32


class Encoder:
    """Turns texts into L2-normalised sentence embeddings with an exported ONNX model."""

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        meta: dict[str, Any],
        path: Path | None = None,
    ) -> None:
        self.session = session
        self.path = path
        self.tokenizer = tokenizer
        self.meta = meta
        self.dim = int(meta["dim"])
        self.inputs: list[str] = list(meta["inputs"])
        # The model's content hash names this exact encoder, wherever its export was copied to.
        self.id = f"{meta['model']}@{meta.get('key') or (path.name if path else 'memory')}"

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        threads: int = 1,
        export: bool = True,
    ) -> Encoder:
        """Resolve ``model``, export it to ONNX if the cache has no export yet, and load it."""
        source = resolve_model(model)
        if source.origin == "export":
            return cls.from_dir(source.path, threads=threads)
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        key = content_key(source, cache_dir)
        export_dir = cache_dir / "models" / key
        if not (export_dir / "meta.json").is_file():
            if not export:
                raise ModelError(f"model {model!r} has not been exported yet: run `guardrail export-model`")
            from guardrail.export import export_onnx

            export_onnx(source, export_dir, key)
        return cls.from_dir(export_dir, threads=threads)

    @classmethod
    def from_dir(cls, path: Path, threads: int = 1) -> Encoder:
        """Load an exported model directory (model.onnx, tokenizer.json, meta.json)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            if not isinstance(meta, dict) or not {"model", "dim", "inputs"} <= meta.keys():
                raise ValueError("meta.json lacks model, dim or inputs")
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            options = ort.SessionOptions()
            # One thread per process: on two vCPUs, two intra-op threads spin and double the CPU per query.
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(
                str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime and tokenizers raise their own exception types
            raise ModelError(f"cannot load the exported model in {path}: {exc}") from exc
        return cls(session, tokenizer, meta, path)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``; returns an array of shape (len(texts), dim), each row of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= _BATCH:
            return self._run(texts)
        # Batches of similar length waste less time on padding.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), _BATCH):
            idx = order[start : start + _BATCH]
            out[idx] = self._run([texts[i] for i in idx])
        return out

    def _run(self, texts: Sequence[str]) -> Vectors:
        encodings = self.tokenizer.encode_batch(list(texts))
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        feeds = {name: arrays[name] for name in self.inputs}
        try:
            (vectors,) = self.session.run(["embedding"], feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"encoder failed: {exc}") from exc
        return np.asarray(vectors, dtype=np.float32)
