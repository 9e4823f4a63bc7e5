"""The settings reference table, generated from the settings object itself.

``python -m worker.settings_doc`` prints the Markdown table the README carries
between its ``settings-table`` markers; a unit test fails when they differ, so
the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from worker.settings import SECTION_SECRET_KEYS, Settings

BEGIN_MARKER = "<!-- settings-table:begin -->"
END_MARKER = "<!-- settings-table:end -->"


def settings_rows() -> list[tuple[str, str, str, str]]:
    """(TOML key, environment variable, default, description) for every setting."""
    rows = []
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key, sub in annotation.model_fields.items():
                secret = key in SECTION_SECRET_KEYS.get(name, ())
                rows.append(
                    (
                        "(environment only)" if secret else f"[{name}] {key}",
                        f"CIO_{name.upper()}__{key.upper()}",
                        _default(sub.get_default(call_default_factory=True)),
                        sub.description or "",
                    )
                )
        else:
            rows.append(
                ("(environment only)", f"CIO_{name.upper()}", "none",
                 info.description or "")
            )  # fmt: skip
    return rows


def settings_table() -> str:
    """The Markdown table of every setting."""
    lines = [
        "| Setting (TOML) | Environment variable | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, env, default, description in settings_rows():
        lines.append(f"| `{key}` | `{env}` | {default} | {description} |")
    return "\n".join(lines)


def _default(value: Any) -> str:
    if value == "" or value is None:
        return '`""`' if value == "" else "none"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{json.dumps(value)}`"
    return f"`{value}`"


if __name__ == "__main__":
    print(settings_table())
