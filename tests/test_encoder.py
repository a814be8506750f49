from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from guardrail.encoder import Encoder
from guardrail.errors import ModelError
from guardrail.models import DEFAULT_MODEL, content_key, resolve_model

TEXTS = [
    "Can I book a viewing of the flat on Elm Street?",
    "hi",
    "What is the deposit for a two bedroom house?",
    "tell me a joke",
]


def test_vectors_have_the_model_dimension_and_unit_length(encoder: Encoder) -> None:
    vectors = encoder.encode(TEXTS)
    assert vectors.shape == (4, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 384


def test_similar_texts_are_closer_than_unrelated_ones(encoder: Encoder) -> None:
    a, b, c = encoder.encode(
        ["I want to book a house viewing", "Can I arrange to see the property?", "the recipe needs two eggs"]
    )
    assert a @ b > a @ c + 0.2


def test_batch_equals_one_by_one(encoder: Encoder) -> None:
    batch = encoder.encode(TEXTS)
    singles = np.vstack([encoder.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_many_texts_keep_their_order(encoder: Encoder) -> None:
    # More than one batch of 32, with lengths in no particular order, so the length sorting is exercised.
    texts = [f"message number {i} " + "about renting a flat " * (i * 7 % 11) for i in range(75)]
    together = encoder.encode(texts)
    singles = np.vstack([encoder.encode([t]) for t in texts])
    assert together.shape == (75, 384)
    np.testing.assert_allclose(together, singles, atol=1e-5)


def test_duplicate_texts_give_identical_rows(encoder: Encoder) -> None:
    vectors = encoder.encode(["same text", "other text", "same text"] * 15)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[-1], atol=1e-5)


def test_empty_list_gives_an_empty_array(encoder: Encoder) -> None:
    vectors = encoder.encode([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_empty_string_is_encoded(encoder: Encoder) -> None:
    vectors = encoder.encode([""])
    assert vectors.shape == (1, 384)
    assert np.isfinite(vectors).all()


def test_long_text_is_truncated_not_rejected(encoder: Encoder) -> None:
    long_text = " ".join(["The tenant says the boiler in the kitchen is noisy at night."] * 60)
    assert len(long_text.split()) > 600  # well over 256 tokens
    assert len(encoder.tokenizer.encode(long_text).ids) == encoder.meta["max_seq_length"] == 256
    vectors = encoder.encode([long_text, "short"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_tokenizer_pads_to_the_longest_in_the_batch(encoder: Encoder) -> None:
    encodings = encoder.tokenizer.encode_batch(["hi", "a somewhat longer sentence to pad against"])
    assert len(encodings[0].ids) == len(encodings[1].ids) < 20


def test_encoder_identity_and_meta(encoder: Encoder, model_cache: Path) -> None:
    # The export directory is named by the model's content key, and that key names the encoder.
    key = content_key(resolve_model(DEFAULT_MODEL), model_cache)
    assert encoder.path == model_cache / "models" / key
    assert encoder.id == f"{DEFAULT_MODEL}@{key}"
    assert encoder.meta["model"] == DEFAULT_MODEL
    assert encoder.meta["dim"] == 384
    assert encoder.meta["verified_min_cosine"] >= 0.999
    assert encoder.meta["origin"] == "package"
    assert set(encoder.inputs) == {"input_ids", "attention_mask", "token_type_ids"}


def test_load_twice_uses_the_same_export(encoder: Encoder, model_cache: Path) -> None:
    again = Encoder.load(DEFAULT_MODEL, cache_dir=model_cache, export=False, threads=2)
    assert again.id == encoder.id
    assert again.path == encoder.path
    np.testing.assert_allclose(again.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)


def test_the_cache_directory_may_be_a_string(encoder: Encoder, model_cache: Path) -> None:
    # As a user types it: Encoder.load(cache_dir="/tmp/cache") once failed with a TypeError.
    again = Encoder.load(DEFAULT_MODEL, cache_dir=str(model_cache), export=False)
    assert again.path == encoder.path


def test_load_without_export_on_an_empty_cache_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="guardrail export-model"):
        Encoder.load(DEFAULT_MODEL, cache_dir=tmp_path, export=False)
    assert not (tmp_path / "models").exists()


def test_from_dir_on_a_broken_export_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"model": "x", "dim": 384, "inputs": ["input_ids"]}))
    with pytest.raises(ModelError, match="cannot load the exported model"):
        Encoder.from_dir(tmp_path)


def test_from_dir_on_a_corrupt_onnx_file_is_a_model_error(tmp_path: Path, encoder: Encoder) -> None:
    assert encoder.path is not None
    for name in ("meta.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((encoder.path / name).read_bytes())
    (tmp_path / "model.onnx").write_bytes(b"this is not an onnx graph")
    with pytest.raises(ModelError, match="cannot load the exported model"):
        Encoder.from_dir(tmp_path)


SERVING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from guardrail import Guard
    guard = Guard.load(sys.argv[1], cache_dir=Path(sys.argv[2]))
    texts = ["can I book a viewing this Saturday?", "what is the weather in Rome?"]
    verdicts = [guard.check(text) for text in texts]
    heavy_roots = {"torch", "sentence_transformers", "transformers", "sklearn"}
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in heavy_roots)
    print(json.dumps({"allowed": [v.allowed for v in verdicts], "heavy": heavy}))
    """
)


def test_serving_never_imports_torch(
    model_cache: Path, encoder: Encoder, real_estate_path: Path, tmp_path: Path
) -> None:
    assert encoder.path is not None and (encoder.path / "meta.json").is_file()  # the cache is warm
    env = {**os.environ, "GUARDRAIL_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SERVING_SCRIPT, str(real_estate_path), str(model_cache)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["allowed"] == [True, False]
    assert out["heavy"] == []


def test_an_export_directory_is_served_as_it_is(encoder: Encoder, tmp_path: Path) -> None:
    # What `guardrail export-model --out DIR` writes: servers load it without torch or the source weights.
    assert encoder.path is not None
    out = tmp_path / "export"
    out.mkdir()
    for name in ("model.onnx", "tokenizer.json", "meta.json"):
        (out / name).symlink_to(encoder.path / name)
    source = resolve_model(str(out))
    assert source.origin == "export"
    copy = Encoder.load(str(out), cache_dir=tmp_path / "unused-cache")
    assert copy.id == encoder.id
    np.testing.assert_allclose(copy.encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)
    assert not (tmp_path / "unused-cache").exists()


def test_a_broken_export_directory_is_a_model_error(tmp_path: Path) -> None:
    for name in ("model.onnx", "tokenizer.json"):
        (tmp_path / name).write_text("not a model")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load the exported model"):
        Encoder.load(str(tmp_path))
