"""The settings' documentation cannot drift from `Settings`: the README's table is generated from the fields and
their docstrings, and docker/example.env names every setting with its default."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings, readme_with_table, settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_is_generated_from_settings():
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme) == readme, (
        "README.md's settings table differs from app/settings.py: run `.venv/bin/python -m app.settings --readme`"
    )
    table = settings_table()
    for name in ("PREDICT_MAX_K", "PROGRESS_INTERVAL_S", "PREDICT_MAX_INSTANCES", "SHUTDOWN_GRACE_S", "API_KEY"):
        assert f"`SLIDE_{name}`" in table
    assert table.count("\n| `SLIDE_") == len(Settings.model_fields)
    assert all(field.description for field in Settings.model_fields.values()), "a setting without a docstring"


def test_example_env_names_every_setting_with_its_default(clean_env):
    text = (ROOT / "docker" / "example.env").read_text()
    lines = dict(re.findall(r"^#? ?(SLIDE_[A-Z_]+)=(.*)$", text, flags=re.M))
    defaults = Settings(_env_file=None)
    for name in Settings.model_fields:
        env = f"SLIDE_{name.upper()}"
        assert env in lines, f"docker/example.env does not mention {env}"
        if f"# {env}=" in text and name != "api_key":  # commented out = the default, so it must be the default
            value = Settings(_env_file=None, **{name: lines[env]})
            assert getattr(value, name) == getattr(defaults, name), (env, lines[env], getattr(defaults, name))
    assert "/docs" in text and "/ui" in text  # what the key does not guard, as the README says
