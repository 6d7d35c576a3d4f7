"""A real Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``: a head and
a second raylet, each with its own CPUs, both on loopback with token auth). ``flowscore
train --workers 2`` and ``flowscore score --actors 2`` join it with ``--ray-address``; Ray's
state API then says on which nodes their workers and actors ran, and the tables are
complete and exactly-once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import check_exactly_once

from pipelines.synth import write_archive

pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.timeout(1200)]

TINY = """
windows_per_image = 128
basis_rows = 1000
val_fraction = 0.25
[featurizer]
type = "windows"
window = 5
stride = 2
scale = 0.5
[flow]
type = "maf"
blocks = 2
hidden = 32
[fit]
max_epochs = 2
batch_size = 256
lr = 0.005
"""


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, Any]]:
    """(GCS address, the cluster) of a two-node cluster, 2 CPUs per node: each node keeps a
    CPU for reading and decoding, so two workers or actors get 1 CPU each."""
    from ray.cluster_utils import Cluster

    from pipelines.raycluster import LOOPBACK, _cluster_mode_off, _enable_local_token_auth

    _enable_local_token_auth()  # the children inherit RAY_AUTH_TOKEN
    with _cluster_mode_off():
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={"num_cpus": 2, "node_ip_address": LOOPBACK},
        )
        cluster.add_node(num_cpus=2, node_ip_address=LOOPBACK)
        cluster.wait_for_nodes(timeout=120)
    try:
        yield cluster.address, cluster
    finally:
        cluster.shutdown()


def _flowscore(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLOWSCORE_HOME=str(home), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    for k in ("FLOWSCORE_CATALOG_URI", "FLOWSCORE_WAREHOUSE", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _nodes_of(cluster: Any, class_part: str) -> set[str]:
    """The nodes on which actors whose class name contains ``class_part`` ran (alive or
    dead), from the GCS's actor table (the state API would need Ray's dashboard)."""
    table = cluster.global_state.actor_table(None)
    return {
        a["Address"]["NodeID"]
        for a in table.values()
        if class_part in (a.get("ActorClassName") or "")
    }


def test_train_and_score_on_two_nodes(two_nodes, tmp_path):
    address, cluster = two_nodes
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=24, seed=3, height=96, width=128)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    home = tmp_path / "home"
    shared = tmp_path / "shared-checkpoints"  # one machine: a folder every node reaches

    train = _flowscore(
        home,
        "train",
        "--archive", str(archive),
        "--name", "two-nodes",
        "--preset", "grain-quarter",
        "--config", str(cfg),
        "--workers", "2",
        "--ray-address", address,
        "--storage-path", str(shared),
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    assert "2 worker(s) × (1 CPU" in train.stderr, train.stderr[-3000:]
    assert len(_nodes_of(cluster, "RayTrainWorker")) == 2
    assert any(p.name.startswith("checkpoint_") for p in shared.rglob("*"))

    score = _flowscore(
        home,
        "score",
        "--archive", str(archive),
        "--model", "models:/two-nodes@champion",
        "--actors", "2",
        "--commit-every", "6",
        "--ray-address", address,
    )  # fmt: skip
    assert score.returncode == 0, score.stderr[-4000:]
    assert len(_nodes_of(cluster, "ScorerActor")) == 2
    os.environ["FLOWSCORE_HOME"] = str(home)
    try:
        check_exactly_once(archive)
    finally:
        os.environ.pop("FLOWSCORE_HOME", None)
