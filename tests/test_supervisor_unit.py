"""Unit tests for the pure restart backoff of daemon/supervisor.py."""

from __future__ import annotations

import pytest

from mserve.daemon.supervisor import BACKOFF_MAX_S, backoff


@pytest.mark.parametrize("crashes, expected", [(0, 0.25), (1, 0.25), (2, 0.5), (3, 1.0),
                                               (4, 2.0), (7, 16.0), (8, min(32.0, BACKOFF_MAX_S))])
def test_backoff_doubles(crashes, expected):
    assert backoff(crashes) == expected


def test_backoff_grows_then_stays_capped():
    waits = [backoff(n) for n in range(1, 60)]
    assert waits == sorted(waits)
    assert max(waits) == BACKOFF_MAX_S
    assert waits[-1] == BACKOFF_MAX_S
    assert waits.index(BACKOFF_MAX_S) < 10  # reached within a few restarts


def test_backoff_capped_for_very_many_crashes():
    assert backoff(2000) == BACKOFF_MAX_S
