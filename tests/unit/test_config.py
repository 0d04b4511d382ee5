"""Settings from the environment: defaults, every variable parsed, every bad value named."""

from __future__ import annotations

import pytest

from fila.bootstrap import build_container
from fila.config import ENVIRONMENT, ConfigError, Settings, load_settings

# one good and several bad values for each variable the README documents
GOOD = {
    "FILA_DATABASE_URL": ("postgresql://fila:pw@db.internal:5433/fila", "database_url",
                          "postgresql://fila:pw@db.internal:5433/fila"),
    "FILA_REDIS_URL": ("redis://127.0.0.1:6379/0", "redis_url", "redis://127.0.0.1:6379/0"),
    "FILA_UPSTREAM_BASE_URL": ("http://127.0.0.1:8081/v1/", "upstream_base_url", "http://127.0.0.1:8081/v1"),
    "OPENAI_API_KEY": (" sk-live ", "openai_api_key", "sk-live"),
    "FILA_DEFAULT_MODEL": ("gpt-4o", "default_model", "gpt-4o"),
    "FILA_FALLBACK_MODEL": ("gpt-4o-mini", "fallback_model", "gpt-4o-mini"),
    "FILA_FALLBACK_BASE_URL": ("https://backup.example/v1", "fallback_base_url", "https://backup.example/v1"),
    "FILA_ADMIN_TOKEN": ("s3cret", "admin_token", "s3cret"),
    "FILA_DEFAULT_PLAN": ("pro", "default_plan", "pro"),
    "FILA_HOST": ("0.0.0.0", "host", "0.0.0.0"),
    "FILA_PORT": ("9000", "port", 9000),
    "FILA_WORKERS": ("4", "workers", 4),
    "FILA_UPSTREAM_TIMEOUT_S": ("12.5", "upstream_timeout_s", 12.5),
    "FILA_UPSTREAM_CONNECT_TIMEOUT_S": ("2", "upstream_connect_timeout_s", 2.0),
    "FILA_MAX_BODY_BYTES": ("2048", "max_body_bytes", 2048),
    "FILA_BATCH_MAX_SIZE": ("50", "batch_max_size", 50),
    "FILA_BATCH_MAX_WAIT_MS": ("0", "batch_max_wait_ms", 0.0),
    "FILA_BATCH_EXPRESS": ("false", "batch_express", False),
    "FILA_BREAKER_FAILURE_THRESHOLD": ("3", "breaker_failure_threshold", 3),
    "FILA_BREAKER_ERROR_RATE": ("0.25", "breaker_error_rate", 0.25),
    "FILA_BREAKER_WINDOW_S": ("10", "breaker_window_s", 10.0),
    "FILA_BREAKER_MIN_CALLS": ("5", "breaker_min_calls", 5),
    "FILA_BREAKER_OPEN_S": ("0.5", "breaker_open_s", 0.5),
    "FILA_CACHE_MEMORY_MB": ("0", "cache_memory_mb", 0),
    "FILA_RATE_LIMIT_RESERVE": ("0", "rate_limit_reserve", 0),
    "FILA_LOG_FORMAT": ("JSON", "log_format", "json"),
    "FILA_LOG_LEVEL": ("Warning", "log_level", "warning"),
    "FILA_EMBEDDED_PROJECTOR": ("off", "embedded_projector", False),
}

BAD = {
    "FILA_DATABASE_URL": ["mysql://u@h/db", "postgresql://host", "sqlite:///", "fila.db",
                          "postgresql://u@host:99999/db", "postgresql://u@host:port/db"],
    "FILA_REDIS_URL": ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://127.0.0.1:port"],
    "FILA_UPSTREAM_BASE_URL": ["ftp://x/v1", "127.0.0.1:8081/v1", "http://", "http://127.0.0.1:port/v1"],
    "OPENAI_API_KEY": ["   "],
    "FILA_DEFAULT_MODEL": ["  "],
    "FILA_FALLBACK_MODEL": ["\t"],
    "FILA_FALLBACK_BASE_URL": ["backup.example", "http://backup.example:70000/v1"],
    "FILA_ADMIN_TOKEN": [" "],
    "FILA_DEFAULT_PLAN": [" "],
    "FILA_HOST": [" "],
    "FILA_PORT": ["http", "0", "-1", "80.5", "70000"],
    "FILA_WORKERS": ["0", "two"],
    "FILA_UPSTREAM_TIMEOUT_S": ["0", "soon", "nan", "inf"],
    "FILA_UPSTREAM_CONNECT_TIMEOUT_S": ["0.01", "-5", "inf"],
    "FILA_MAX_BODY_BYTES": ["1023", "1MB"],
    "FILA_BATCH_MAX_SIZE": ["0", "many"],
    "FILA_BATCH_MAX_WAIT_MS": ["-1", "fast", "nan", "inf"],
    "FILA_BATCH_EXPRESS": ["sometimes"],
    "FILA_BREAKER_FAILURE_THRESHOLD": ["0", "3.0"],
    "FILA_BREAKER_ERROR_RATE": ["1.5", "-0.1", "half", "nan"],
    "FILA_BREAKER_WINDOW_S": ["0.5", "x"],
    "FILA_BREAKER_MIN_CALLS": ["0", "ten"],
    "FILA_BREAKER_OPEN_S": ["0", "never", "inf"],
    "FILA_CACHE_MEMORY_MB": ["-1", "64MB"],
    "FILA_RATE_LIMIT_RESERVE": ["-1", "some", "10001"],
    "FILA_LOG_FORMAT": ["xml"],
    "FILA_LOG_LEVEL": ["verbose", "trace"],
    "FILA_EMBEDDED_PROJECTOR": ["maybe", "2"],
}


def test_every_variable_has_a_good_and_a_bad_example():
    assert set(GOOD) == set(BAD) == set(ENVIRONMENT)


def test_defaults_need_no_environment():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database_url.startswith("sqlite:///") and not settings.is_postgres
    assert settings.uses_fake_upstream


@pytest.mark.parametrize("variable", sorted(GOOD))
def test_each_variable_sets_its_field(variable):
    raw, field, expected = GOOD[variable]
    assert getattr(load_settings({variable: raw}), field) == expected


@pytest.mark.parametrize(("variable", "raw"), [(v, raw) for v, values in sorted(BAD.items()) for raw in values])
def test_a_bad_value_stops_start_up_and_names_its_variable(variable, raw):
    with pytest.raises(ConfigError) as raised:
        load_settings({variable: raw})
    assert variable in str(raised.value)


def test_an_empty_variable_means_unset():
    assert load_settings({"FILA_PORT": "", "FILA_DATABASE_URL": ""}) == Settings()


def test_overrides_win_over_the_environment_and_none_means_not_given():
    settings = load_settings({"FILA_PORT": "9000", "FILA_WORKERS": "3"}, port=9100, workers=None)
    assert (settings.port, settings.workers) == (9100, 3)


def test_postgres_urls_are_recognised():
    assert load_settings({"FILA_DATABASE_URL": "postgres://u@h:5432/db"}).is_postgres
    assert load_settings({"FILA_DATABASE_URL": "postgresql://u@h/db?schema=s"}).is_postgres


def test_sqlite_with_several_workers_is_refused_before_anything_is_opened(tmp_path):
    db = tmp_path / "fila.db"
    settings = load_settings({"FILA_DATABASE_URL": f"sqlite:///{db}", "FILA_WORKERS": "2"})
    with pytest.raises(ConfigError) as raised:
        build_container(settings)
    assert "FILA_WORKERS" in str(raised.value) and "FILA_DATABASE_URL" in str(raised.value)
    assert not db.exists()
