"""Unit tests of worker.settings_doc: the README's settings table stays current."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings
from worker.settings_doc import BEGIN_MARKER, END_MARKER, settings_rows, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN_MARKER) == 1
    assert text.count(END_MARKER) == 1
    start = text.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    return text[start : text.index(END_MARKER)].strip("\n")


def test_readme_settings_table_equals_generated_table() -> None:
    """The README's table between the markers is exactly settings_table()."""
    documented = readme_table()

    generated = settings_table()

    assert documented == generated, (
        "README.md settings table is stale: regenerate it with "
        "`python -m worker.settings_doc`"
    )


def test_settings_rows_cover_every_setting() -> None:
    """Every section field and both credentials have one row."""
    expected = 2 + sum(
        len(info.annotation.model_fields)  # type: ignore[union-attr]
        for name, info in Settings.model_fields.items()
        if name not in ("site_id", "api_key")
    )

    rows = settings_rows()

    assert len(rows) == expected
    assert len({env for _, env, _, _ in rows}) == expected
    assert ("(environment only)", "CIO_API_KEY") in {(k, e) for k, e, _, _ in rows}


def test_settings_table_rows_name_toml_key_and_variable() -> None:
    """Each row pairs a [section] key with its CIO_SECTION__KEY variable."""
    lines = settings_table().splitlines()

    rows = [line for line in lines[2:] if "(environment only)" not in line]

    assert lines[0].startswith("| Setting (TOML) |")
    for line in rows:
        key_cell, env_cell = line.split(" | ")[:2]
        section, key = key_cell.strip("| `[").split("] ")
        assert env_cell == f"`CIO_{section.upper()}__{key.upper()}`"
