"""Unit tests for cli/render.py: human units and the borderless table."""

from __future__ import annotations

import json
from calendar import timegm

import pytest

from mserve.cli.render import ago, duration, emit_json, human_size, table

ISO = "2026-11-29T16:50:00.123Z"
T0 = timegm((2026, 11, 29, 16, 50, 0, 0, 0, 0))


# ---- ago ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, expected", [
    (0, "just now"),
    (4, "just now"),
    (5, "5 seconds ago"),
    (59, "59 seconds ago"),
    (60, "1 minute ago"),
    (119, "1 minute ago"),
    (120, "2 minutes ago"),
    (3600, "1 hour ago"),
    (2 * 3600 + 59 * 60, "2 hours ago"),
    (86400, "1 day ago"),
    (3 * 86400 + 5, "3 days ago"),
])
def test_ago(offset, expected):
    assert ago(ISO, now=T0 + offset) == expected


def test_ago_reads_time_as_utc_and_ignores_milliseconds():
    assert ago("2026-11-29T15:50:00.999Z", now=T0) == "1 hour ago"


def test_ago_future_time_is_just_now():
    assert ago(ISO, now=T0 - 3600) == "just now"


@pytest.mark.parametrize("value", [None, ""])
def test_ago_missing(value):
    assert ago(value) == "-"


def test_ago_defaults_to_current_time():
    assert ago("2000-01-01T00:00:00.000Z").endswith("days ago")


# ---- human_size --------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [
    (None, "-"),
    (0, "0 B"),
    (999, "999 B"),
    (1000, "1.0 KB"),
    (1500, "1.5 KB"),
    (99_400, "99.4 KB"),
    (150_000, "150 KB"),
    (2_500_000, "2.5 MB"),
    (123_456_789, "123 MB"),
    (5_000_000_000, "5.0 GB"),
    (5_000_000_000_000, "5000 GB"),  # GB is the largest unit
])
def test_human_size(n, expected):
    assert human_size(n) == expected


def test_human_size_rounding_at_unit_boundary():
    assert human_size(999_999) == "1.0 MB"


# ---- duration ----------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, expected", [
    (0, "0 s"),
    (12.3, "12 s"),
    (59, "59 s"),
    (60, "1 min"),
    (600, "10 min"),
    (3540, "59 min"),
    (3600, "1.0 h"),
    (5400, "1.5 h"),
    (100 * 3600, "100.0 h"),
])
def test_duration(seconds, expected):
    assert duration(seconds) == expected


def test_duration_rounding_at_unit_boundary():
    assert duration(3599) == "1.0 h"


# ---- table -------------------------------------------------------------------------------

def test_table_uppercase_headers_and_aligned_columns(capsys):
    table(["name", "port", "status"],
          [["recs", 8001, "ready"], ["a-much-longer-name", None, "failed"]])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    header, first, second = lines
    assert header.split() == ["NAME", "PORT", "STATUS"]
    port_col, status_col = header.index("PORT"), header.index("STATUS")
    assert port_col == len("a-much-longer-name") + 3  # widest cell, then three spaces
    assert first.index("8001") == port_col and first.index("ready") == status_col
    assert second[port_col:status_col].rstrip() == "-"  # None shows as "-"
    assert second.index("failed") == status_col


def test_table_no_trailing_spaces(capsys):
    table(["name", "note"], [["x", ""], ["y", "z"]])
    for line in capsys.readouterr().out.splitlines():
        assert line == line.rstrip()


def test_table_header_wider_than_cells(capsys):
    table(["deployment", "v"], [["a", 1]])
    header, row = capsys.readouterr().out.splitlines()
    assert header == "DEPLOYMENT   V"
    assert row == "a            1"


def test_table_without_rows_prints_headers(capsys):
    table(["name", "port"], [])
    assert capsys.readouterr().out == "NAME   PORT\n"


def test_emit_json_is_one_document(capsys):
    emit_json({"b": [1, 2], "a": None})
    out = capsys.readouterr().out
    assert out.endswith("\n")
    assert json.loads(out) == {"b": [1, 2], "a": None}
