"""``plan_workers``: how training workers and scorer actors share a cluster's CPUs with the
read and decode tasks that feed them (pure arithmetic; no Ray started)."""

from __future__ import annotations

import math

import pytest

from pipelines.raycluster import DATA_CPU_RESERVE, plan_workers


def _placeable(share: float, nodes: list[float], workers: int) -> list[float]:
    """What each node has left after placing ``workers`` of ``share`` CPUs, fullest node
    first (Ray's default PACK), or raise when they do not fit."""
    left = sorted(nodes, reverse=True)
    for _ in range(workers):
        i = next(i for i, c in enumerate(left) if c + 1e-9 >= share)
        left[i] -= share
    return left


@pytest.mark.parametrize(
    ("nodes", "workers", "share"),
    [
        ([2.0], 1, 1.0),  # this machine: one worker, one CPU left for decoding
        ([2.0], 2, 0.5),
        ([16.0], 3, 5.0),
        ([2.0, 2.0], 2, 1.0),  # two small nodes: one worker on each
        ([16.0, 16.0], 2, 15.0),  # not (32 - 1) / 2 = 15.5, which left no node a whole CPU
        ([16.0, 16.0], 3, 7.5),
        ([8.0, 4.0], 2, 3.5),  # both on the big node: more each than 3 on both nodes
    ],
)
def test_every_node_keeps_a_cpu_for_reading_and_decoding(nodes, workers, share):
    plan = plan_workers(workers, False, nodes)
    assert plan.cpus_per_worker == pytest.approx(share)
    assert plan.threads_per_worker == max(1, int(share))
    left = _placeable(plan.cpus_per_worker, [c - DATA_CPU_RESERVE for c in nodes], workers)
    assert all(c >= -1e-9 for c in left)
    # and no larger share (in hundredths) would fit
    bigger = math.floor(share * 100 + 1) / 100
    with pytest.raises((StopIteration, ValueError)):
        _placeable(bigger, [c - DATA_CPU_RESERVE for c in nodes], workers)


def test_too_many_workers_is_one_clear_error():
    with pytest.raises(ValueError, match=r"do not fit .*\(1 per node\)"):
        plan_workers(1, False, [1.0])
    with pytest.raises(ValueError, match="use fewer workers"):
        plan_workers(20, False, [2.0])


def test_gpu_workers_take_a_gpu_and_a_cpu():
    plan = plan_workers(2, True, [8.0, 8.0])
    assert plan.use_gpu and plan.cpus_per_worker == 1.0 and plan.threads_per_worker == 7
