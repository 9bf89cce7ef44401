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


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_hyperparameter_table_matches_training_spec():
    """Every TrainingSpec field is documented with its real default (plus OpenAI's multiplier)."""
    import json

    from service.core.domain import TrainingSpec

    rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+) \|", _section("Hyperparameters"), flags=re.M)
    documented = {key: cell.strip() for key, cell in rows}
    assert set(documented) == set(TrainingSpec.model_fields) | {"learning_rate_multiplier"}
    for key, field in TrainingSpec.model_fields.items():
        cell = documented[key]
        assert cell.startswith("`") and cell.endswith("`"), (key, cell)
        assert json.loads(cell.strip("`")) == field.default, (key, cell, field.default)


def test_dataset_format_examples_are_valid_rows_of_their_format():
    import json

    from service.core.datasets import detect_format, row_problem
    from service.core.domain import DatasetFormat

    examples = re.findall(r"^\| [^|]+ \| `(\{.*\})` \|", _section("Datasets"), flags=re.M)
    formats = []
    for raw in examples:
        row = json.loads(raw)
        fmt = detect_format(row)
        assert fmt is not None and row_problem(row, fmt) is None, raw
        formats.append(fmt)
    assert sorted(formats) == sorted(DatasetFormat)
