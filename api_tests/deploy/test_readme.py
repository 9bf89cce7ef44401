"""The README's promises that drift silently: its first section is the two commands, and its
settings table names every Settings field (and nothing that is not one)."""
from __future__ import annotations

import re
from pathlib import Path

from service.core.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_first_section_is_the_two_commands():
    first = README.split("\n## ", 2)[1]
    assert first.startswith("Two commands")
    assert "make run" in first and "make test" in first


def test_settings_table_matches_settings():
    section = README.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `TUNESERVE_([A-Z0-9_]+)` \|", section, flags=re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from the README table"
    assert documented - fields == set(), "README documents settings that do not exist"


def test_sections_the_lead_fills_exist():
    assert "\n## Benchmarks\n" in README and "\n## Architecture\n" in README
