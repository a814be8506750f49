"""Export a sentence-transformers model to ONNX, once, and check it against the original.

This is the only module that imports torch and sentence-transformers (the ``export`` extra).
The exported graph takes the tokenizer's outputs and returns the pooled, L2-normalised sentence
embedding, so serving needs nothing but onnxruntime and tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from guardrail.errors import MissingExtraError, ModelError
from guardrail.models import ModelSource

EXPORT_HINT = (
    "exporting a model to ONNX needs torch and sentence-transformers: "
    "pip install torch==2.13.0 && pip install 'guardrail[export]'"
)
MIN_COSINE = 0.999

# Varied lengths, including one longer than 128 tokens, so truncation is checked too.
VERIFY_SENTENCES = [
    "hi",
    "Can I book a viewing of the flat on Elm Street this Saturday?",
    "what's the weather like in paris tomorrow",
    "My router keeps dropping the connection every evening, what should I do?",
    "¿Dónde está la estación de tren más cercana?",
    "Summarise the plot of Hamlet in two sentences.",
    " ".join(["The tenant reported that the boiler in the kitchen makes a loud noise at night."] * 12),
]


def export_onnx(source: ModelSource, out_dir: Path, key: str, opset: int = 17) -> dict[str, Any]:
    """Export ``source`` (content hash ``key``) into ``out_dir``: model.onnx, tokenizer.json, meta.json."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it, and fails late without it)
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingExtraError(f"{EXPORT_HINT} (missing: {exc.name})") from exc

    try:
        model = SentenceTransformer(str(source.path), device="cpu")
    except (OSError, ValueError) as exc:
        raise ModelError(f"sentence-transformers cannot load {source.name!r}: {exc}") from exc
    model.eval()
    max_seq_length = int(model.max_seq_length or 512)
    tokenize = getattr(model, "preprocess", model.tokenize)
    input_names = [k for k, v in tokenize(["x"]).items() if isinstance(v, torch.Tensor)]

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            features = dict(zip(input_names, inputs, strict=True))
            embedding = self.model(features)["sentence_embedding"]
            return torch.nn.functional.normalize(embedding, p=2.0, dim=1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    # mkdtemp makes the folder private (0700); a cache exported at build time as one user is
    # read by a server running as another.
    work.chmod(0o755)
    try:
        sample = tokenize(["a sample sentence", "and a second, longer sample sentence"])
        args = tuple(sample[name] for name in input_names)
        axes = {name: {0: "batch", 1: "tokens"} for name in input_names}
        axes["embedding"] = {0: "batch"}
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape checks that are constant for this graph; the
            # comparison with sentence-transformers below is what proves the export right.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    Pooled(),
                    args,
                    str(work / "model.onnx"),
                    input_names=input_names,
                    output_names=["embedding"],
                    dynamic_axes=axes,
                    opset_version=opset,
                    dynamo=False,
                )
            except Exception as exc:  # torch's exporter raises many unrelated types
                raise ModelError(f"torch could not export {source.name!r} to ONNX: {exc}") from exc
        _write_tokenizer(source.path, work / "tokenizer.json", max_seq_length)

        expected = model.encode(VERIFY_SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
        meta = {
            "model": source.name,
            "key": key,
            "origin": source.origin,
            "dim": int(expected.shape[1]),
            "max_seq_length": max_seq_length,
            "inputs": input_names,
            "opset": opset,
            "torch": torch.__version__,
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2))

        from guardrail.encoder import Encoder

        got = Encoder.from_dir(work).encode(VERIFY_SENTENCES)
        cosine = float(np.min(np.sum(got * expected, axis=1)))
        if cosine < MIN_COSINE:
            raise ModelError(
                f"ONNX export of {source.name!r} does not match sentence-transformers: "
                f"min cosine {cosine:.5f} < {MIN_COSINE}"
            )
        meta["verified_min_cosine"] = round(cosine, 6)
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _publish(work: Path, out_dir: Path) -> None:
    # A complete export appears under its final name in one rename, so a reader never sees half of one.
    if out_dir.exists() and not (out_dir / "meta.json").is_file():
        shutil.rmtree(out_dir)
    try:
        os.replace(work, out_dir)
    except OSError:
        if not (out_dir / "meta.json").is_file():
            raise
        # Another process finished the same export first; its copy is as good as ours.


def _write_tokenizer(model_dir: Path, dest: Path, max_seq_length: int) -> None:
    # The shipped tokenizer.json may pad every input to 128 tokens and truncate there, which is
    # five times slower than needed and not what sentence-transformers does. Store the settings
    # sentence-transformers uses: truncate at max_seq_length, pad to the longest in the batch.
    from tokenizers import Tokenizer

    source = model_dir / "tokenizer.json"
    if not source.is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
    tokenizer = Tokenizer.from_file(str(source))
    tokenizer.enable_truncation(max_length=max_seq_length)
    padding = tokenizer.padding or {}
    tokenizer.enable_padding(pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]"))
    tokenizer.save(str(dest))
