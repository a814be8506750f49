from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from guardrail.errors import ConfigError
from guardrail.models import DEFAULT_MODEL, default_cache_dir
from guardrail.settings import Settings


def test_defaults() -> None:
    settings = Settings.load(environ={})
    assert settings == Settings()
    assert settings.model == DEFAULT_MODEL
    assert settings.cache_dir is None
    assert settings.threads == 1
    assert settings.target_pass == 0.95
    assert settings.threshold is None
    assert settings.cache_size == 4096


def test_environment_beats_defaults(tmp_path: Path) -> None:
    environ = {
        "GUARDRAIL_MODEL": "my-org/my-model",
        "GUARDRAIL_CACHE_DIR": str(tmp_path),
        "GUARDRAIL_THREADS": "3",
        "GUARDRAIL_TARGET_PASS": "0.9",
        "GUARDRAIL_THRESHOLD": "0.25",
        "GUARDRAIL_CACHE_SIZE": "0",
        "OTHER_VARIABLE": "ignored",
    }
    settings = Settings.load(environ=environ)
    assert settings == Settings(
        model="my-org/my-model", cache_dir=tmp_path, threads=3, target_pass=0.9, threshold=0.25, cache_size=0
    )
    assert settings.cache_path == tmp_path


def test_flags_beat_environment(tmp_path: Path) -> None:
    environ = {"GUARDRAIL_THREADS": "3", "GUARDRAIL_THRESHOLD": "0.25", "GUARDRAIL_CACHE_DIR": "/env/cache"}
    settings = Settings.load(environ=environ, threads=2, threshold=-0.1, cache_dir=tmp_path)
    assert settings.threads == 2
    assert settings.threshold == -0.1
    assert settings.cache_dir == tmp_path


def test_flags_given_as_none_fall_through_to_environment() -> None:
    settings = Settings.load(environ={"GUARDRAIL_THREADS": "4"}, threads=None, model=None)
    assert settings.threads == 4
    assert settings.model == DEFAULT_MODEL


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAIL_TARGET_PASS", "0.8")
    assert Settings.load().target_pass == 0.8


def test_cache_path_defaults_to_the_default_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path))
    assert Settings().cache_path == default_cache_dir() == tmp_path


@pytest.mark.parametrize(
    ("variable", "value", "kind"),
    [
        ("GUARDRAIL_THREADS", "two", "int"),
        ("GUARDRAIL_THREADS", "1.5", "int"),
        ("GUARDRAIL_TARGET_PASS", "high", "float"),
        ("GUARDRAIL_THRESHOLD", "0,3", "float"),
        ("GUARDRAIL_CACHE_SIZE", "lots", "int"),
    ],
)
def test_bad_environment_value_names_the_variable(variable: str, value: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={variable: value})
    assert str(info.value) == f"{variable}={value!r} is not a valid {kind}"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"threads": 0}, "threads must be at least 1"),
        ({"threads": -2}, "threads must be at least 1"),
        ({"target_pass": 0.3}, "target_pass must be in [0.5, 1)"),
        ({"target_pass": 1.0}, "target_pass must be in [0.5, 1)"),
        ({"cache_size": -1}, "cache_size must be 0 or more"),
    ],
)
def test_invalid_values_are_config_errors(flags: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Settings.load(environ={}, **flags)


def test_invalid_threads_from_the_environment_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="threads must be at least 1, got 0"):
        Settings.load(environ={"GUARDRAIL_THREADS": "0"})


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().threads = 4  # type: ignore[misc]


def test_empty_cache_dir_variable_means_unset() -> None:
    assert Settings.load(environ={"GUARDRAIL_CACHE_DIR": ""}).cache_dir is None


def test_nan_threshold_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Settings.load(environ={"GUARDRAIL_THRESHOLD": "nan"})


def test_empty_variables_mean_unset() -> None:
    environ = {"GUARDRAIL_THREADS": "", "GUARDRAIL_THRESHOLD": "  ", "GUARDRAIL_MODEL": ""}
    assert Settings.load(environ=environ) == Settings()


def test_unknown_flag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="treshold"):
        Settings.load(environ={}, treshold=0.3)
