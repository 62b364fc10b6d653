"""Several processes appending to one request log and rotating it (``--workers N``): every
line lands whole and exactly once, and the file is rotated, not lost."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

from mserve.daemon.worker import sharedlog
from mserve.daemon.worker.requestlog import Call, RequestLog

LINES = 3000


def _writer(path: str, tag: int, max_bytes: int) -> None:
    log = RequestLog(path, max_bytes=max_bytes, backups=200)
    for n in range(LINES):
        call = Call(started=time.perf_counter(), request_id=f"{tag}-{n}" + "x" * (n % 97),
                    status=200)
        log.write(call, 0.001)
        if n % 50 == 0:
            log.flush()
    log.flush()


def test_processes_share_one_log_and_its_rotation(tmp_path):
    path = str(tmp_path / "d.requests.jsonl")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(path, tag, 64 * 1024)) for tag in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    files = [p for p in tmp_path.iterdir() if p.name.startswith("d.requests.jsonl")
             and not p.name.endswith(".lock")]
    assert len(files) > 3  # it rotated, more than once
    ids = []
    for file in files:
        for line in file.read_text().splitlines():
            ids.append(json.loads(line)["id"])  # every line whole
    expected = [f"{tag}-{n}" + "x" * (n % 97) for tag in range(3) for n in range(LINES)]
    assert sorted(ids) == sorted(expected)  # each exactly once


def test_rotate_is_done_once_when_two_see_the_file_too_big(tmp_path):
    path = str(tmp_path / "w.log")
    fd = sharedlog.open_append(path)
    sharedlog.write_all(fd, b"a" * 100 + b"\n")
    assert sharedlog.rotate(path, 50, 3) is True
    assert sharedlog.rotate(path, 50, 3) is False  # the new file is small: nothing to do
    assert sharedlog.moved(fd, path)  # the first writer sees it and reopens
    assert os.path.getsize(path + ".1") == 101 and os.path.getsize(path) == 0
    os.close(fd)
