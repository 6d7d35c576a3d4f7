"""TOML strings written for users (the demo's job spec) read back unchanged."""

from __future__ import annotations

import tomllib

import pytest

from jobs.tomlfile import toml_string


@pytest.mark.parametrize(
    "path",
    [
        '/srv/a "quoted" dir/archive',
        "C:\\Users\\me\\archive",
        "tab\there\nnewline",
        "del\x7f\x01é",
    ],
)
def test_a_path_with_quotes_backslashes_or_control_characters_reads_back(path):
    assert tomllib.loads(f"archive = {toml_string(path)}\n")["archive"] == path
