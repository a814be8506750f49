from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from guardrail.encoder import Encoder
from guardrail.errors import MissingExtraError, ModelError
from guardrail.export import MIN_COSINE, export_onnx
from guardrail.models import DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="module")
def export_dir(encoder: Encoder) -> Path:
    assert encoder.path is not None
    return encoder.path


def test_export_writes_model_tokenizer_and_meta(export_dir: Path) -> None:
    for name in ("model.onnx", "tokenizer.json", "meta.json"):
        assert (export_dir / name).is_file()
    assert (export_dir / "model.onnx").stat().st_size > 10_000_000
    # The work directory was renamed into place, not left behind.
    assert not list(export_dir.parent.glob(".export-*"))


def test_export_meta_records_the_verification(export_dir: Path) -> None:
    meta = json.loads((export_dir / "meta.json").read_text())
    assert meta["model"] == DEFAULT_MODEL
    assert meta["origin"] == "package"
    assert meta["dim"] == 384
    assert meta["max_seq_length"] == 256
    assert set(meta["inputs"]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert meta["verified_min_cosine"] >= MIN_COSINE >= 0.999
    assert meta["verified_min_cosine"] <= 1.0 + 1e-6


def test_exported_tokenizer_truncates_at_max_length_and_pads_to_the_longest(export_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    assert tokenizer.truncation is not None
    assert tokenizer.truncation["max_length"] == 256
    assert tokenizer.padding is not None
    assert tokenizer.padding["length"] is None  # not padded to a fixed 128 tokens
    short, longer = tokenizer.encode_batch(["hi", "a sentence of eight words or so here"])
    assert len(short.ids) == len(longer.ids) < 16
    assert sum(short.attention_mask) == 3  # [CLS] hi [SEP]


def test_export_without_the_export_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if it were not installed
    with pytest.raises(MissingExtraError) as info:
        export_onnx(resolve_model(DEFAULT_MODEL), tmp_path / "out", "key")
    assert isinstance(info.value, ModelError)
    assert "pip install" in str(info.value)
    assert "guardrail[export]" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_encoder_load_on_a_cold_cache_without_torch_is_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match="pip install"):
        Encoder.load(DEFAULT_MODEL, cache_dir=tmp_path)
    assert not any(tmp_path.glob("models/*/meta.json"))


def test_export_directory_respects_the_umask(export_dir: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(export_dir.stat().st_mode) == 0o777 & ~umask


def test_export_without_onnx_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # torch's exporter only notices a missing onnx package at the very end, with its own error type.
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtraError, match=r"guardrail\[export\].*missing: onnx"):
        export_onnx(resolve_model(DEFAULT_MODEL), tmp_path / "out", "key")
    assert not (tmp_path / "out").exists()


def test_meta_names_the_content_key(export_dir: Path) -> None:
    meta = json.loads((export_dir / "meta.json").read_text())
    assert meta["key"] == export_dir.name
