"""Fixtures shared by both tiers."""

from __future__ import annotations

import os

import pytest

# The tests never read the developer's own settings file or credentials.
for name in list(os.environ):
    if name.startswith("CIO_"):
        del os.environ[name]


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's settings to what the test itself sets."""
    for name in list(os.environ):
        if name.startswith("CIO_"):
            monkeypatch.delenv(name)
