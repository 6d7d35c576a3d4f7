"""``plan_workers``: how training workers and scorer actors share a cluster's CPUs with the
read and decode tasks that feed them (pure arithmetic; no Ray started)."""

from __future__ import annotations

import math

import pytest

from pipelines.raycluster import DATA_CPU_RESERVE, plan_workers, start_with_retries


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


# --------------------------------------------------- starting the embedded Ray on a busy machine
_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)  # Ray 2.60's words (ray/_private/node.py), raised as a bare Exception


class _Starts:
    """A start that fails with the given errors first, then succeeds; counts the stops."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls, self.stops = list(errors), 0, 0

    def start(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)

    def stop(self) -> None:
        self.stops += 1


def test_a_startup_timeout_is_retried_after_a_shutdown(caplog):
    s = _Starts(Exception(_TIMEOUT), Exception(_TIMEOUT))
    start_with_retries(s.start, s.stop, attempts=3)
    assert (s.calls, s.stops) == (3, 2)
    assert "did not start in time (attempt 2 of 3" in caplog.text


def test_the_last_startup_timeout_and_any_other_error_are_raised_at_once():
    s = _Starts(*[Exception(_TIMEOUT)] * 3)
    with pytest.raises(Exception, match="timed out during startup"):
        start_with_retries(s.start, s.stop, attempts=3)
    assert (s.calls, s.stops) == (3, 2)
    other = _Starts(RuntimeError("port taken"), Exception("something else"))
    with pytest.raises(RuntimeError, match="port taken"):
        start_with_retries(other.start, other.stop, attempts=3)
    assert (other.calls, other.stops) == (1, 0)
    other = _Starts(Exception("something else"))
    with pytest.raises(Exception, match="something else"):
        start_with_retries(other.start, other.stop, attempts=3)
    assert other.calls == 1
