"""Settings: env prefix, validation, redaction, and the README's table agrees with the code."""

from __future__ import annotations

import re

import pytest
from pydantic import SecretStr, ValidationError

from models.errors import ConfigError
from streams.settings import Settings, load_settings, redact_url
from tests.conftest import REPO


def test_env_prefix_and_types(monkeypatch) -> None:
    monkeypatch.setenv("INTEREST_MAX_BATCH", "123")
    monkeypatch.setenv("INTEREST_REDIS_PREFIX", "x:")
    s = Settings()
    assert s.max_batch == 123 and s.redis_prefix == "x:"


def test_bad_setting_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setenv("INTEREST_MAX_BATCH", "zero")
    with pytest.raises(ConfigError, match="INTEREST_MAX_BATCH"):
        load_settings()
    with pytest.raises(ValidationError):
        Settings(redis_prefix="a*b")
    monkeypatch.setenv("INTEREST_MAX_BATCH", "10")
    monkeypatch.setenv("INTEREST_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="needs INTEREST_KAFKA_SASL_USERNAME and INTEREST_KAFKA_SASL_PASSWORD"):
        load_settings()
    monkeypatch.setenv("INTEREST_DEDUP_WINDOW", "0")  # re-keyed events rely on it
    monkeypatch.setenv("INTEREST_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("INTEREST_KAFKA_SASL_PASSWORD", "p")
    with pytest.raises(ConfigError, match="INTEREST_DEDUP_WINDOW"):
        load_settings()


def test_redacted_masks_secrets() -> None:
    s = Settings(redis_url="redis://app:hunter2@db:6379/0", kafka_sasl_password=SecretStr("s3cret"))
    text = str(s.redacted())
    assert "hunter2" not in text and "s3cret" not in text
    assert "redis://app:***@db:6379/0" in text
    assert redact_url("redis://db:6379") == "redis://db:6379"


def _table(path) -> dict[str, str]:
    return dict(re.findall(r"^\| `(INTEREST_[A-Z0-9_]+)` \|\s*`?([^|`]*?)`?\s*\|", path.read_text(), flags=re.M))


def test_the_settings_tables_list_every_setting_with_its_default() -> None:
    """docs/settings.md lists every setting; the README's shorter table only real ones; both with the code's
    defaults."""
    full, readme = _table(REPO / "docs" / "settings.md"), _table(REPO / "README.md")
    assert readme and set(readme) <= set(full)
    for name, field in Settings.model_fields.items():
        var = f"INTEREST_{name.upper()}"
        assert var in full, f"{var} missing from docs/settings.md"
        default = field.default
        shown = "" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        for where, rows in (("docs/settings.md", full), ("README.md", readme)):
            if var in rows:
                assert rows[var].strip() == shown, f"{var}: {where} says {rows[var]!r}, code says {shown!r}"
