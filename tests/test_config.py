"""Configuration comes from the environment; production refuses unsafe settings."""

from __future__ import annotations

import pytest

from whistle_web import create_app
from whistle_web.config import DEV_SECRET_KEY, ConfigError, load_config, normalize_database_url

PROD = {
    "WHISTLE_ENV": "production",
    "SECRET_KEY": "k" * 48,
    "DATABASE_URL": "postgres://u:p@db.internal:5432/whistle",
    "REDIS_URL": "redis://cache.internal:6379/0",
}


def test_development_defaults_are_usable():
    config = load_config({})
    assert config["WHISTLE_ENV"] == "development"
    assert config["SECRET_KEY"] == DEV_SECRET_KEY
    assert config["SESSION_COOKIE_SECURE"] is False
    assert config["SQLALCHEMY_DATABASE_URI"] == ""  # embedded PostgreSQL is used


def test_paas_database_urls_use_psycopg3():
    assert normalize_database_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_database_url("postgresql://h/db") == "postgresql+psycopg://h/db"
    assert normalize_database_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"


def test_production_config_is_strict_and_secure():
    config = load_config(PROD)
    assert config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql+psycopg://")
    assert config["SESSION_COOKIE_SECURE"] is True
    assert config["PREFERRED_URL_SCHEME"] == "https"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"SECRET_KEY": ""}, "SECRET_KEY must be set"),
        ({"SECRET_KEY": DEV_SECRET_KEY}, "SECRET_KEY must be set"),
        ({"SECRET_KEY": "short"}, "at least 32"),
        ({"DATABASE_URL": ""}, "DATABASE_URL must be set"),
        ({"REDIS_URL": ""}, "REDIS_URL must be set"),
        ({"WHISTLE_ENV": "staging"}, "WHISTLE_ENV must be one of"),
    ],
)
def test_production_refuses_to_start_unsafely(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**PROD, **override})


def test_create_app_refuses_production_without_a_secret(monkeypatch):
    for key, value in {**PROD, "SECRET_KEY": ""}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError):
        create_app()
