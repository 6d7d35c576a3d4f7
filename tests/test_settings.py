"""One Settings object: the environment read and checked once, at the edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import main
from pipelines.settings import SettingError, Settings


def test_defaults_live_under_home_and_flags_win(tmp_path):
    s = Settings.from_env({"FLOWSCORE_HOME": str(tmp_path / "h"), "RAY_ADDRESS": "ray://a:1"})
    home = tmp_path / "h"
    assert s.home == home
    assert s.catalog_uri == f"sqlite:///{home}/catalog.db"
    assert s.warehouse == f"file://{home}/warehouse"
    assert s.mlflow_uri == f"sqlite:///{home.as_posix()}/mlflow.db"
    assert s.ray_address == "ray://a:1"
    assert Settings.from_env({}, ray_address="ray://b:2").ray_address == "ray://b:2"
    assert s.lock_lease_s == 120.0 and s.max_file_bytes == 256 * 2**20


def test_values_are_read_and_normalised(tmp_path):
    s = Settings.from_env(
        {
            "FLOWSCORE_WAREHOUSE": "relative/wh",
            "FLOWSCORE_CATALOG_URI": "postgresql://db/cat",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "FLOWSCORE_S3_RETRIES": "5",
            "FLOWSCORE_STREAM_BUFFER_MB": "64",
            "FLOWSCORE_FOLLOW_SYMLINKS": "yes",
        }
    )
    assert s.warehouse == f"file://{Path('relative/wh').absolute()}"
    assert s.catalog_uri == "postgresql://db/cat"
    assert (s.s3_endpoint, s.s3_region, s.s3.retries) == ("http://127.0.0.1:9000", "eu-west-1", 5)
    assert s.stream_buffer_bytes == 64 * 2**20 and s.follow_links


@pytest.mark.parametrize(
    "name",
    [
        "FLOWSCORE_LOCK_LEASE_S",
        "FLOWSCORE_MAX_FILE_MB",
        "FLOWSCORE_STREAM_BUFFER_MB",
        "FLOWSCORE_S3_RETRIES",
        "FLOWSCORE_S3_READ_TIMEOUT_S",
    ],
)
def test_a_bad_variable_stops_any_command_before_it_runs(name, tmp_path, monkeypatch, capsys):
    with pytest.raises(SettingError, match=name):
        Settings.from_env({name: "-1"})
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(name, "-1")
    # even a command that never touches S3 or the lock refuses to start
    assert main(["query", "select 1"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not (tmp_path / "home").exists()  # nothing ran


def test_a_scratch_copy_moves_every_store_and_keeps_the_rest(tmp_path, monkeypatch):
    """A bench's throw-away space: its catalog, warehouse and MLflow store are under the
    scratch home even where the user's environment names other stores; S3 and limits stay."""
    user = Settings.from_env(
        {
            "FLOWSCORE_HOME": str(tmp_path / "user"),
            "FLOWSCORE_CATALOG_URI": "postgresql://db/cat",
            "FLOWSCORE_WAREHOUSE": "s3://bucket/wh",
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "FLOWSCORE_LOCK_LEASE_S": "30",
        }
    )
    s = user.scratch(tmp_path / "scratch")
    home = tmp_path / "scratch"
    assert s.home == home
    assert s.catalog_uri == f"sqlite:///{home}/catalog.db"
    assert s.warehouse == f"file://{home}/warehouse"
    assert s.mlflow_uri == f"sqlite:///{home.as_posix()}/mlflow.db"
    assert (s.s3_endpoint, s.lock_lease_s) == ("http://127.0.0.1:9000", 30.0)

    from pipelines.settings import scratch_env

    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://bucket/wh")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("RAY_ADDRESS", "ray://a:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = scratch_env(home, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    assert Settings.from_env(env).warehouse == f"file://{home}/warehouse"
    assert Settings.from_env(env).mlflow_uri == s.mlflow_uri
    assert "RAY_ADDRESS" not in env and env["AWS_REGION"] == "eu-west-1"
    assert env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
