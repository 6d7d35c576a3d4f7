"""pipelines.tracking against real MLflow stores: the embedded SQLite one and a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import pipelines.paths as paths
from pipelines import tracking as tr
from pipelines.tracking import ModelResolutionError, TrackingError

REPO = Path(__file__).resolve().parents[1]


def _bundle_dir(root: Path, marker: str) -> tuple[Path, dict]:
    """A fake bundle: any JSON and a small safetensors file (only files matter here)."""
    d = root / f"bundle-{marker}"
    d.mkdir(parents=True)
    meta = {"format": "flowscore-bundle", "format_version": 1, "marker": marker}
    (d / "flowscore.json").write_text(json.dumps(meta))
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(d / "weights.safetensors"))
    return d, meta


def _logged_run(c, exp_id: str, bundle: Path) -> str:
    run = c.create_run(exp_id)
    c.log_artifacts(run.info.run_id, str(bundle), "bundle")
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def _register_two(c, tmp_path: Path, name: str) -> tuple[list[str], list[dict], list[str]]:
    """Register two bundle versions of ``name``; promote both; return versions, metas, runs."""
    exp_id = tr.ensure_experiment(c, f"exp-{name}")
    versions, metas, runs = [], [], []
    for marker in ("one", "two"):
        bundle, meta = _bundle_dir(tmp_path / name, marker)
        run_id = _logged_run(c, exp_id, bundle)
        versions.append(tr.register_bundle(c, run_id, "bundle", name, promote=True))
        metas.append(meta)
        runs.append(run_id)
    return versions, metas, runs


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- paths / URIs


def test_flowscore_home_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "a" / "b"))
    home = paths.flowscore_home()
    assert home == tmp_path / "a" / "b" and home.is_dir() and home.is_absolute()
    monkeypatch.delenv("FLOWSCORE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert paths.flowscore_home() == tmp_path / "user" / ".flowscore"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWSCORE_HOME", "rel")
    assert paths.flowscore_home() == tmp_path / "rel"


def test_importing_paths_and_tracking_imports_neither_mlflow_nor_torch():
    code = textwrap.dedent(
        """
        import sys
        import pipelines.paths, pipelines.tracking
        heavy = [m for m in ("mlflow", "torch") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_default_uri_and_absolute_artifact_location(flowscore_home, monkeypatch):
    uri = tr.tracking_uri()
    assert uri == f"sqlite:///{flowscore_home}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tr.tracking_uri() == "http://example.invalid:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    c = tr.client()
    assert c.tracking_uri == uri
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3
    assert int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    tr.check_reachable(c, uri)

    exp_id = tr.ensure_experiment(c, "harvest")
    assert tr.ensure_experiment(c, "harvest") == exp_id  # idempotent
    loc = c.get_experiment(exp_id).artifact_location
    assert loc == (flowscore_home / "mlartifacts" / "harvest").as_uri()
    assert loc.startswith("file:///")

    run = c.create_run(exp_id)
    assert run.info.artifact_uri.startswith(loc)
    nested = c.get_experiment(tr.ensure_experiment(c, "flowscore-train/grain"))
    assert (
        nested.artifact_location
        == (flowscore_home / "mlartifacts" / "flowscore-train" / "grain").as_uri()
    )
    odd = c.get_experiment(tr.ensure_experiment(c, "../x y"))
    assert odd.artifact_location.startswith((flowscore_home / "mlartifacts").as_uri() + "/")
    assert ".." not in odd.artifact_location.split("/")
    c.delete_experiment(exp_id)
    assert tr.ensure_experiment(c, "harvest") == exp_id  # restored, not duplicated
    assert c.get_experiment(exp_id).lifecycle_stage == "active"


# --------------------------------------------------------------------------- params


def test_safe_params_flattens_drops_credentials_and_scrubs_uris():
    cfg = {
        "flow": {"type": "maf", "blocks": 5, "sizes": [100, 100], "opts": {}},
        "archive": "s3://AKIAXX:sup3r/s3cret@farm-archive/harvest",
        "tracking": "https://alice:pw@mlflow.example.com/api",
        "signed": "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&x=1",
        "storage": {
            "aws_secret_access_key": "SECRETVALUE",
            "AccessKeyId": "SECRETVALUE",
            "region": "us-east-1",
            "credentials": {"user": "SECRETVALUE"},
        },
        "db_password": "SECRETVALUE",
        "apiToken": "SECRETVALUE",
        "endpoints": [{"url": "s3://u:p@b/x", "token": "SECRETVALUE"}],
        "long": "x" * 7000,
        "flag": True,
        "nothing": None,
    }
    p = tr.safe_params(cfg, prefix="train")
    assert p["train.flow.type"] == "maf"
    assert p["train.flow.blocks"] == "5"
    assert json.loads(p["train.flow.sizes"]) == [100, 100]
    assert p["train.flow.opts"] == "{}"
    assert p["train.archive"] == "s3://***@farm-archive/harvest"
    assert p["train.tracking"] == "https://***@mlflow.example.com/api"
    assert p["train.signed"] == "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1"
    assert p["train.storage.region"] == "us-east-1"
    assert json.loads(p["train.endpoints"]) == [{"url": "s3://***@b/x"}]
    assert len(p["train.long"]) == 6000
    assert p["train.flag"] == "True" and p["train.nothing"] == "None"
    for key, value in p.items():
        assert "SECRET" not in value and "pw@" not in value and "p@b" not in value, key
        for word in ("secret", "password", "token", "credential", "accesskey"):
            assert word not in key.lower().replace("_", ""), key
    assert all(isinstance(v, str) for v in p.values())


def test_log_params_and_metrics_in_batches(flowscore_home):
    c = tr.client()
    exp_id = tr.ensure_experiment(c, "batches")
    run_id = c.create_run(exp_id).info.run_id
    params = tr.safe_params({f"k{i:03d}": i for i in range(250)} | {"token": "SECRET"})
    tr.log_params(c, run_id, params)
    tr.log_params(c, run_id, {"api_key": "SECRET", "uri": "s3://u:p@b/k"})  # re-scrubbed
    rows = ((f"m{i % 3}", float(i), i, 1_700_000_000_000 + i) for i in range(2500))
    tr.log_metrics(c, run_id, rows)
    data = c.get_run(run_id).data
    assert len(data.params) == 251 and data.params["k249"] == "249"
    assert data.params["uri"] == "s3://***@b/k" and "api_key" not in data.params
    hist = c.get_metric_history(run_id, "m0")
    assert len(hist) == 834 and sorted(m.step for m in hist)[:2] == [0, 3]


# --------------------------------------------------------------------------- registry


def _check_register_and_resolve(c, tmp_path: Path, name: str, cache: Path) -> None:
    versions, metas, runs = _register_two(c, tmp_path, name)
    assert versions == ["1", "2"]
    assert str(c.get_model_version_by_alias(name, "champion").version) == "2"
    mv = c.get_model_version(name, "2")
    assert mv.tags[tr.RUN_ID_TAG] == runs[1] and mv.run_id == runs[1]

    r = tr.resolve_model(f"models:/{name}@champion", c=c, cache_dir=cache)
    assert (r.name, r.version) == (name, "2") and r.pinned_uri == f"models:/{name}/2"
    assert r.path == cache / name / "2"
    assert json.loads((r.path / "flowscore.json").read_text()) == metas[1]
    assert (r.path / "weights.safetensors").is_file()
    assert not [p for p in r.path.parent.iterdir() if p.name.endswith(".partial")]

    r1 = tr.resolve_model(f"models:/{name}/1", c=c, cache_dir=cache)
    assert r1.version == "1" and json.loads((r1.path / "flowscore.json").read_text()) == metas[0]

    # a cached version is reused, not downloaded again
    before = (r.path / "flowscore.json").stat().st_mtime_ns
    time.sleep(0.01)
    again = tr.resolve_model(f"models:/{name}@champion", c=c, cache_dir=cache)
    assert again.path == r.path and (r.path / "flowscore.json").stat().st_mtime_ns == before

    # promote=False leaves the alias alone
    bundle, _ = _bundle_dir(tmp_path / name, "three")
    run_id = _logged_run(c, tr.ensure_experiment(c, f"exp-{name}"), bundle)
    assert tr.register_bundle(c, run_id, "bundle", name, promote=False) == "3"
    assert str(c.get_model_version_by_alias(name, "champion").version) == "2"
    assert tr.resolve_model(f"models:/{name}@champion", c=c, cache_dir=cache).version == "2"

    with pytest.raises(ModelResolutionError, match=r"no registered model 'nope'.*flowscore train"):
        tr.resolve_model("models:/nope@champion", c=c, cache_dir=cache)
    with pytest.raises(ModelResolutionError, match=r"no alias 'staging' \(aliases: champion\)"):
        tr.resolve_model(f"models:/{name}@staging", c=c, cache_dir=cache)
    with pytest.raises(ModelResolutionError, match=r"no version 9 \(versions: 1, 2, 3\)"):
        tr.resolve_model(f"models:/{name}/9", c=c, cache_dir=cache)
    with pytest.raises(TrackingError, match="no flowscore bundle"):
        tr.register_bundle(c, run_id, "missing", name, promote=True)


def test_register_and_resolve_sqlite(flowscore_home, tmp_path):
    c = tr.client()
    _check_register_and_resolve(c, tmp_path, "grain", tmp_path / "cache")
    # default cache under FLOWSCORE_HOME/models, with the default client
    r = tr.resolve_model("models:/grain@champion")
    assert r.path == flowscore_home / "models" / "grain" / "2"
    assert (r.path / "flowscore.json").is_file()


def test_stale_or_partial_cache_is_replaced(flowscore_home, tmp_path):
    c = tr.client()
    _, metas, _ = _register_two(c, tmp_path, "stale")
    target = flowscore_home / "models" / "stale" / "2"
    target.mkdir(parents=True)
    (target / "weights.safetensors").write_bytes(b"half")  # interrupted copy, no flowscore.json
    r = tr.resolve_model("models:/stale/2")
    assert json.loads((r.path / "flowscore.json").read_text()) == metas[1]
    # a complete-looking bundle from another registry (different source) is not trusted
    (r.path / "flowscore.json").write_text(json.dumps({"other": True}))
    (r.path / tr.CACHE_MARKER_FILE).write_text(json.dumps({"source": "x", "run_id": "y"}))
    r = tr.resolve_model("models:/stale/2")
    assert json.loads((r.path / "flowscore.json").read_text()) == metas[1]


def test_resolve_model_does_not_import_torch(flowscore_home, tmp_path):
    c = tr.client()
    _register_two(c, tmp_path, "light")
    code = textwrap.dedent(
        """
        import sys
        from pipelines.tracking import resolve_model
        r = resolve_model("models:/light@champion")
        assert r.version == "2" and (r.path / "flowscore.json").is_file(), r
        assert "torch" not in sys.modules
        """
    )
    env = dict(os.environ, FLOWSCORE_HOME=str(flowscore_home))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize(
    "uri",
    [
        "models:",
        "models:/",
        "models://grain/1",
        "models:/grain",
        "models:/grain/",
        "models:/grain/Production",
        "models:/grain/0",
        "models:/grain/1/extra",
        "models:/grain@",
        "models:/@champion",
        "runs:/abc/bundle",
        "s3://bucket/model",
        "",
    ],
)
def test_bad_model_uri_syntax(uri, flowscore_home):
    with pytest.raises(ModelResolutionError, match="bad model URI") as info:
        tr.resolve_model(uri)
    assert "\n" not in str(info.value)


def test_resolve_local_directory(tmp_path):
    bundle, _ = _bundle_dir(tmp_path, "local")
    r = tr.resolve_model(str(bundle))
    assert (r.name, r.version, r.path, r.uri) == (None, None, bundle, str(bundle))
    assert tr.resolve_model(bundle.as_uri()).path == bundle
    with pytest.raises(ModelResolutionError, match="does not exist"):
        tr.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="no flowscore.json"):
        tr.resolve_model(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- server


@pytest.mark.mlflow_server
def test_register_and_resolve_on_server(mlflow_server, flowscore_home, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert tr.tracking_uri() == mlflow_server
    c = tr.client()
    tr.check_reachable(c, mlflow_server)
    exp_id = tr.ensure_experiment(c, "server-exp")
    assert c.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    _check_register_and_resolve(c, tmp_path, "server-grain", tmp_path / "cache")
    r = tr.resolve_model("models:/server-grain@champion")
    assert r.path == flowscore_home / "models" / "server-grain" / "2"


@pytest.mark.faults
def test_unreachable_server_fails_fast_with_uri(monkeypatch, tmp_path, capsys):
    from jobs.cli import main

    uri = _dead_uri()
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    # the CLI sets MLflow's limits (read only from MLflow's own variables) before a command
    assert main(["query", "select 1 as one", "--format", "csv"]) == 0
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(tr.HTTP_MAX_RETRIES)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(tr.HTTP_TIMEOUT_S)
    c = tr.client(uri)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable") as info:
        tr.check_reachable(c, uri)
    assert time.monotonic() - start < 30
    assert uri in str(info.value)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # explicit setting wins
    assert main(["query", "select 1 as one", "--format", "csv"]) == 0
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    c = tr.client(uri)
    with pytest.raises(TrackingError, match=f"{uri} is not reachable while resolving"):
        tr.resolve_model("models:/grain@champion", c=c)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "soon")  # one line, exit code 2
    capsys.readouterr()
    assert main(["query", "select 1 as one"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MLFLOW_HTTP_REQUEST_TIMEOUT" in err


def test_http_request_budget_follows_the_settings(monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    # flowscore defaults: 3 attempts of 10 s; no sleep before retry 1, 2·2 + 1 before retry 2
    assert tr.http_request_budget_s() == 3 * tr.HTTP_TIMEOUT_S + 5
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "4")
    assert tr.http_request_budget_s() == 4
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    assert tr.http_request_budget_s() == 4 * 4 + 2 + 4


def test_a_new_sqlite_store_is_created_without_mlflow_info_lines(tmp_path, monkeypatch, capfd):
    """The first command of a new home creates MLflow's tables without MLflow's two INFO
    lines ("Creating initial MLflow database tables..."): flowscore says what it does."""
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr.ensure_experiment(tr.client(), "quiet")
    assert (tmp_path / "home" / "mlflow.db").is_file()
    err = capfd.readouterr().err
    assert "MLflow database tables" not in err and "Updating database tables" not in err
