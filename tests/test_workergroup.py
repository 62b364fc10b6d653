"""WorkerGroup's view of a deployment's processes (daemon/workergroup.py), without processes."""

from __future__ import annotations

from types import SimpleNamespace

from mserve.daemon.workergroup import LOADING, READY, WorkerGroup


def group(*replicas) -> WorkerGroup:
    g = WorkerGroup("g")
    g.replicas = [SimpleNamespace(pid=pid, status=status) for pid, status in replicas]
    return g


def test_pid_is_one_of_the_serving_pids():
    """While the first process restarts, `list` showed pid 6697 (the one starting) and pids
    [null, 20895]: pid is the first serving one."""
    g = group((6697, LOADING), (20895, READY))
    assert g.pids == [None, 20895] and g.pid == 20895
    assert group((11, READY), (12, READY)).pid == 11
    assert group((6697, LOADING), (None, LOADING)).pid == 6697  # none serves: any process
    assert group((None, LOADING)).pid is None
