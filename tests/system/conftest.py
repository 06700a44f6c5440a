"""Fixtures of the system tests beyond the session's (tests/conftest.py)."""

from tests.system.rollout_kit import new_model  # noqa: F401  (session fixture: a second model, another version)
