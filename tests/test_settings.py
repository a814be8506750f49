from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from guardrail.errors import ConfigError
from guardrail.models import DEFAULT_MODEL, default_cache_dir
from guardrail.prices import Price, PriceTable
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
        ("GUARDRAIL_PORT", "http", "int"),
        ("GUARDRAIL_READ_TIMEOUT", "1m", "float"),
    ],
)
def test_bad_environment_value_names_the_variable(variable: str, value: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={variable: value})
    name = variable.removeprefix("GUARDRAIL_").lower()
    assert str(info.value) == f"{variable}: {name}={value!r} is not a valid {kind}"


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


# --- the TOML file -------------------------------------------------------------------------------


def write_toml(directory: Path, text: str, name: str = "guardrail.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def toml_value(value: object) -> str:
    """A Python value as a TOML literal: JSON's string escapes are valid in TOML basic strings."""
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, PriceTable):
        entries = [(model, price) for model, price in value.models]
        entries += [("default", value.default)] if value.default else []
        rows = [f"{json.dumps(m)} = {{ input = {p.input!r}, output = {p.output!r} }}" for m, p in entries]
        return "{ " + ", ".join(rows) + " }"
    return repr(value)


def env_value(value: object) -> str:
    """A Python value as an environment variable holds it: prices as inline JSON."""
    if isinstance(value, PriceTable):
        table = {model: {"input": price.input, "output": price.output} for model, price in value.models}
        if value.default:
            table["default"] = {"input": value.default.input, "output": value.default.output}
        return json.dumps(table)
    return str(value)


def test_toml_values_load(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        """
        # The server, as a deployment would write it.
        scenario = "/srv/bots/estate.md"
        upstream = "http://127.0.0.1:8080/v1"
        host = "0.0.0.0"
        port = 9000
        mode = "shadow"
        refusal = "Sorry, I only talk about property."
        threads = 2
        threshold = -0.05
        target_pass = 0.9
        read_timeout = 60
        connect_timeout = 2.5
        max_body_bytes = 1_000_000
        max_batch = 8
        log_path = "/var/log/guardrail/interactions.jsonl"
        log_backups = 0
        log_max_bytes = 2048
        """,
    )
    settings = Settings.load(environ={}, config=config)
    assert settings == Settings(
        scenario=Path("/srv/bots/estate.md"),
        upstream="http://127.0.0.1:8080/v1",
        host="0.0.0.0",
        port=9000,
        mode="shadow",
        refusal="Sorry, I only talk about property.",
        threads=2,
        threshold=-0.05,
        target_pass=0.9,
        read_timeout=60.0,
        connect_timeout=2.5,
        max_body_bytes=1_000_000,
        max_batch=8,
        log_path=Path("/var/log/guardrail/interactions.jsonl"),
        log_backups=0,
        log_max_bytes=2048,
    )
    # A TOML integer for a float setting becomes a float.
    assert isinstance(settings.read_timeout, float)


# Three valid values of every setting: for the TOML file, the environment and a flag. ``mode`` has
# only two, so each value differs from the one it overrides rather than from all the others.
SOURCES: dict[str, tuple[object, object, object]] = {
    "scenario": (Path("/toml/a.md"), Path("/env/b.md"), Path("/flag/c.md")),
    "model": ("toml/model", "env/model", "flag/model"),
    "cache_dir": (Path("/toml/cache"), Path("/env/cache"), Path("/flag/cache")),
    "threads": (2, 3, 4),
    "target_pass": (0.9, 0.8, 0.7),
    "threshold": (0.1, -0.2, 0.3),
    "cache_size": (10, 20, 0),
    "upstream": ("http://toml:1", "https://env:2", "http://flag:3"),
    "host": ("10.0.0.1", "10.0.0.2", "10.0.0.3"),
    "port": (9001, 9002, 9003),
    "mode": ("shadow", "enforce", "shadow"),
    "refusal": ("No (toml).", "No (env).", "No (flag)."),
    "max_body_bytes": (1000, 2000, 3000),
    "connect_timeout": (1.5, 2.5, 3.5),
    "read_timeout": (10.0, 20.0, 30.0),
    "max_connections": (5, 6, 7),
    "encoder_workers": (3, 4, 5),
    "workers": (2, 3, 4),
    "max_batch": (8, 16, 1),
    "log_path": (Path("/toml/i.jsonl"), Path("/env/i.jsonl"), Path("/flag/i.jsonl")),
    "log_max_bytes": (1024, 4096, 8192),
    "log_backups": (0, 1, 9),
    "log_queue": (10, 20, 30),
    "classifier": (Path("/toml/m.onnx"), Path("/env/m.onnx"), Path("/flag/m.onnx")),
    "classifier_threshold": (0.3, 0.4, 0.6),
    "reload_interval": (1.0, 5.0, 0.0),
    "instruction": (False, True, False),
    "instruction_template": ("toml: {refusal}", "env: {refusal}", "flag {title}: {refusal}"),
    "admin_token": ("toml-token-0123456789", "env-token-0123456789", "flag-token-0123456789"),
    "prices": (
        PriceTable.of({"gpt-4o-mini": Price(0.15, 0.6)}),
        PriceTable.of({"gpt-4o": Price(2.5, 10.0)}, default=Price(1.0, 2.0)),
        PriceTable.of({}, default=Price(0.5, 1.5)),
    ),
}


def test_the_precedence_table_covers_every_setting() -> None:
    assert set(SOURCES) == {field.name for field in dataclasses.fields(Settings)}
    for name, (toml, env, flag) in SOURCES.items():
        # Each source must differ from the one it overrides, or a fall-through would go unseen.
        assert getattr(Settings(), name) != toml, name
        assert toml != env, name
        assert env != flag, name


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_flag_beats_environment_beats_toml_beats_default(tmp_path: Path, name: str) -> None:
    toml, env, flag = SOURCES[name]
    config = write_toml(tmp_path, f"{name} = {toml_value(toml)}\n")
    variable = {f"GUARDRAIL_{name.upper()}": env_value(env)}
    assert getattr(Settings.load(environ={}), name) == getattr(Settings(), name)
    assert getattr(Settings.load(environ={}, config=config), name) == toml
    assert getattr(Settings.load(environ=variable, config=config), name) == env
    assert getattr(Settings.load(environ=variable, config=config, **{name: flag}), name) == flag
    # A flag given as None is "not given", whatever lies below it.
    assert getattr(Settings.load(environ=variable, config=config, **{name: None}), name) == env


def test_guardrail_config_names_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'upstream = "http://from-file:8080"\nport = 9000\n')
    settings = Settings.load(environ={"GUARDRAIL_CONFIG": f" {config} ", "GUARDRAIL_PORT": "9001"})
    assert settings.upstream == "http://from-file:8080"
    assert settings.port == 9001


def test_config_argument_beats_guardrail_config(tmp_path: Path) -> None:
    chosen = write_toml(tmp_path, "port = 9000\n", name="chosen.toml")
    ignored = write_toml(tmp_path, "port = 9999\n", name="ignored.toml")
    assert Settings.load(environ={"GUARDRAIL_CONFIG": str(ignored)}, config=chosen).port == 9000


def test_empty_guardrail_config_means_no_file() -> None:
    assert Settings.load(environ={"GUARDRAIL_CONFIG": "  "}) == Settings()


def test_relative_paths_in_toml_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    config = write_toml(
        tmp_path / "etc",
        'scenario = "bots/estate.md"\nlog_path = "../logs/i.jsonl"\ncache_dir = "/abs/cache"\n',
    )
    # The process's working directory must not matter.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = Settings.load(environ={}, config=config)
    assert settings.scenario == tmp_path / "etc" / "bots" / "estate.md"
    assert settings.log_path == tmp_path / "etc" / ".." / "logs" / "i.jsonl"
    assert settings.cache_dir == Path("/abs/cache")


def test_relative_config_path_resolves_scenario_against_the_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write_toml(tmp_path / "etc", 'scenario = "estate.md"\n')
    monkeypatch.chdir(tmp_path)
    settings = Settings.load(environ={"GUARDRAIL_CONFIG": "etc/guardrail.toml"})
    assert settings.scenario == Path("etc") / "estate.md"


def test_relative_paths_from_the_environment_and_flags_are_left_alone(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'scenario = "estate.md"\nlog_path = "i.jsonl"\n')
    settings = Settings.load(
        environ={"GUARDRAIL_SCENARIO": "bots/estate.md"}, config=config, log_path="logs/i.jsonl"
    )
    assert settings.scenario == Path("bots/estate.md")
    assert settings.log_path == Path("logs/i.jsonl")


def test_unknown_toml_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "treshold = 0.3\nport = 9000\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={}, config=config)
    message = str(info.value)
    assert "treshold" in message
    assert str(config) in message
    assert "port" not in message


def test_toml_tables_are_unknown_settings(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[server]\nupstream = "http://x:1"\n')
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): server"):
        Settings.load(environ={}, config=config)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('port = "eight thousand"', "port must be a whole number, got 'eight thousand'"),
        ("threads = true", "threads must be a whole number, got True"),
        ("port = 1.5", "port must be a whole number, got 1.5"),
        ("max_batch = 2.5", "max_batch must be a whole number, got 2.5"),
        ("read_timeout = inf", "read_timeout must be a finite number, got inf"),
        ("threshold = nan", "threshold must be a finite number"),
        ("target_pass = false", "target_pass must be a number, got False"),
        ("mode = 1", "mode must be a string, got 1"),
        ('upstream = ["http://a:1"]', "upstream must be a string"),
        ("scenario = 3", "scenario must be a path, got 3"),
        ("log_path = false", "log_path must be a path, got False"),
        ("read_timeout = [1, 2]", "read_timeout=[1, 2] is not a valid float"),
        ("prices = 3", "prices must be a table of models"),
        ('[prices.m]\ninput = "0.15"\noutput = 1', "prices.m.input must be USD per million tokens"),
        ("[prices.m]\ninput = 1\noutput = 1\ncurrency = 1", "unknown key(s) currency"),
        ("[prices]\nm = 0.15", "prices.m must be a table with input and output"),
    ],
)
def test_wrong_toml_types_are_config_errors_naming_the_file(tmp_path: Path, line: str, words: str) -> None:
    config = write_toml(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={}, config=config)
    assert str(info.value).startswith(f"{config}: ")
    assert words in str(info.value)


def test_quoted_number_in_toml_is_a_wrong_type(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'port = "8000"\n')
    with pytest.raises(ConfigError, match="port"):
        Settings.load(environ={}, config=config)


def test_invalid_toml_syntax_is_a_config_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'upstream = "http://x:1"\nport = \n')
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={}, config=config)
    assert str(info.value).startswith(f"{config}: not valid TOML")
    assert "line 2" in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path / 'nope.toml'} does not exist")):
        Settings.load(environ={}, config=tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        Settings.load(environ={"GUARDRAIL_CONFIG": str(tmp_path / "nope.toml")})


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {tmp_path}")):
        Settings.load(environ={}, config=tmp_path)


def test_bad_toml_value_is_an_error_even_when_a_flag_overrides_it(tmp_path: Path) -> None:
    # The file is checked as a whole: a typo must not hide until the flag is dropped.
    config = write_toml(tmp_path, 'port = "eight"\n')
    with pytest.raises(ConfigError, match="port"):
        Settings.load(environ={}, config=config, port=9000)


# --- validation of the server's settings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"mode": "block"}, "mode must be one of enforce, shadow, got 'block'"),
        ({"mode": "Enforce"}, "mode must be one of enforce, shadow"),
        ({"refusal": ""}, "refusal must not be empty"),
        ({"refusal": " \n\t"}, "refusal must not be empty"),
        ({"port": 0}, "port must be in 1..65535, got 0"),
        ({"port": 70000}, "port must be in 1..65535, got 70000"),
        ({"port": -1}, "port must be in 1..65535"),
        ({"connect_timeout": 0}, "connect_timeout must be a positive number of seconds, got 0"),
        ({"connect_timeout": -1.0}, "connect_timeout must be a positive number of seconds"),
        ({"read_timeout": 0.0}, "read_timeout must be a positive number of seconds"),
        ({"read_timeout": float("inf")}, "read_timeout must be a finite number"),
        ({"max_body_bytes": 0}, "max_body_bytes must be at least 1, got 0"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"encoder_workers": 0}, "encoder_workers must be at least 1"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"max_batch": 0}, "max_batch must be at least 1"),
        ({"log_queue": 0}, "log_queue must be at least 1"),
        ({"log_backups": -1}, "log_backups must be 0 or more, got -1"),
        ({"log_max_bytes": 1023}, "log_max_bytes must be at least 1024, got 1023"),
        ({"upstream": "localhost:8080"}, "upstream must be an http:// or https:// URL, got 'localhost:8080'"),
        ({"upstream": "ftp://files.example.com"}, "upstream must be an http:// or https:// URL"),
        ({"upstream": "HTTP//x"}, "upstream must be an http:// or https:// URL"),
    ],
)
def test_invalid_server_settings_are_config_errors(flags: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Settings.load(environ={}, **flags)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("GUARDRAIL_MODE", "off", "mode must be one of enforce, shadow"),
        ("GUARDRAIL_PORT", "0", "port must be in 1..65535"),
        ("GUARDRAIL_READ_TIMEOUT", "-5", "read_timeout must be a positive number of seconds"),
        ("GUARDRAIL_UPSTREAM", "api.openai.com", "upstream must be an http:// or https:// URL"),
    ],
)
def test_invalid_server_settings_from_the_environment(variable: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Settings.load(environ={variable: value})


def test_boundary_values_are_valid() -> None:
    settings = Settings.load(
        environ={},
        port=65535,
        log_backups=0,
        log_max_bytes=1024,
        max_body_bytes=1,
        connect_timeout=0.001,
        upstream="https://api.openai.com/v1",
    )
    assert (settings.port, settings.log_backups, settings.log_max_bytes) == (65535, 0, 1024)
    assert Settings.load(environ={}, port=1, upstream="http://127.0.0.1:8080").port == 1


def test_server_defaults() -> None:
    settings = Settings.load(environ={})
    assert settings.upstream is None
    assert (settings.host, settings.port, settings.mode) == ("127.0.0.1", 8000, "enforce")
    assert settings.log_path == Path("interactions.jsonl")
    # Timeouts and limits are on by default.
    assert settings.connect_timeout > 0
    assert settings.read_timeout > 0
    assert settings.max_body_bytes > 0


def test_empty_log_path_flag_turns_the_log_off() -> None:
    assert Settings.load(environ={}, log_path="").log_path is None


def test_empty_log_path_in_toml_turns_the_log_off(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'log_path = ""\n')
    assert Settings.load(environ={}, config=config).log_path is None


def test_empty_log_path_flag_beats_a_toml_log_path(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'log_path = "i.jsonl"\n')
    assert Settings.load(environ={}, config=config, log_path="").log_path is None


def test_empty_scenario_in_toml_means_unset(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'scenario = ""\n')
    assert Settings.load(environ={}, config=config).scenario is None


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("On", True), ("1", True), ("no", False), ("0", False)]
)
def test_booleans_from_the_environment(text: str, value: bool) -> None:
    assert Settings.load(environ={"GUARDRAIL_INSTRUCTION": text}).instruction is value


def test_a_bad_boolean_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GUARDRAIL_INSTRUCTION: instruction must be true or false"):
        Settings.load(environ={"GUARDRAIL_INSTRUCTION": "maybe"})
    config = write_toml(tmp_path, 'instruction = "yes"\n')
    with pytest.raises(ConfigError, match="instruction must be true or false"):
        Settings.load(environ={}, config=config)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Stay on topic. {refusal} {colour}", "unknown placeholder"),
        ("Stay on {title", "literal brace"),
        ("You are {title}.", "must contain {refusal}"),
    ],
)
def test_instruction_templates_are_checked_at_load(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.load(environ={}, instruction_template=template)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("classifier_threshold", 1.5, "classifier_threshold must be in [0, 1]"),
        ("reload_interval", -1.0, "reload_interval must be 0 or more"),
        ("admin_token", "short", "admin_token must be at least 16"),
    ],
)
def test_layer_settings_out_of_range(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.load(environ={}, **{name: value})


# --- prices ----------------------------------------------------------------------------------------


def test_prices_in_toml_are_tables_per_model(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        """
        port = 9000
        [prices."gpt-4o-mini"]
        input = 0.15
        output = 0.6
        [prices.default]
        input = 1
        output = 4
        """,
    )
    settings = Settings.load(environ={}, config=config)
    assert settings.prices == PriceTable.of({"gpt-4o-mini": Price(0.15, 0.6)}, default=Price(1.0, 4.0))
    assert settings.port == 9000
    assert settings.prices.cost("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)


def test_a_prices_file_in_toml_is_relative_to_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "prices.json").write_text('{"m": {"input": 1, "output": 2}}')
    config = write_toml(tmp_path / "etc", 'prices = "prices.json"\n')
    monkeypatch.chdir(tmp_path)
    assert Settings.load(environ={}, config=config).prices == PriceTable.of({"m": Price(1.0, 2.0)})


def test_prices_from_the_environment_or_a_flag_may_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "prices.toml").write_text("[m]\ninput = 1\noutput = 2\n")
    expected = PriceTable.of({"m": Price(1.0, 2.0)})
    assert Settings.load(environ={"GUARDRAIL_PRICES": str(tmp_path / "prices.toml")}).prices == expected
    assert Settings.load(environ={}, prices=str(tmp_path / "prices.toml")).prices == expected
    assert Settings.load(environ={}, prices={"m": {"input": 1, "output": 2}}).prices == expected


def test_no_prices_by_default() -> None:
    prices = Settings.load(environ={}).prices
    assert prices == PriceTable()
    assert prices.cost("gpt-4o-mini", 1000, 1000) is None


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        (
            {"GUARDRAIL_PRICES": '{"m": {"input": -1, "output": 1}}'},
            "GUARDRAIL_PRICES: prices.m.input must be 0",
        ),
        ({"GUARDRAIL_PRICES": "{oops"}, "GUARDRAIL_PRICES: prices is not valid JSON"),
        ({"GUARDRAIL_PRICES": "/nonexistent/prices.json"}, "GUARDRAIL_PRICES: cannot read prices file"),
        ({"GUARDRAIL_PRICES": "prices.csv"}, "must end in .json or .toml"),
    ],
)
def test_bad_prices_from_the_environment_name_the_variable(environ: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Settings.load(environ=environ)
