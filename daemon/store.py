"""The content-addressed model store: ``models/<sha256>/model.onnx`` (plus external data).

An artifact is copied to a temporary folder, fsynced, then renamed into place, so a folder
named by a hash is always complete. Later edits to the user's file change nothing here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mserve.daemon import faults
from mserve.daemon.errors import BadRequest, MserveError

MODEL_FILE = "model.onnx"
TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20


Progress = Callable[[int, int], None]


class StoreError(MserveError):
    status = 507


@dataclass(frozen=True)
class Artifact:
    sha256: str
    size: int
    path: Path  # the model.onnx inside the store
    source: str


class Store:
    def __init__(self, root: Path):
        self.root = root

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256 / MODEL_FILE

    def has(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def clean_partial(self) -> list[str]:
        """Remove what an interrupted copy left behind (called once at daemon start)."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        return removed

    def ingest(self, source: Path, progress: Progress | None = None) -> Artifact:
        """Copy a model file, or a folder holding ``model.onnx``, into the store;
        ``progress(done, total)`` is called as bytes are copied and hashed."""
        files = _source_files(source)
        total = sum(src.stat().st_size for _, src in files)
        copied = [0]

        def advance(n: int) -> None:
            copied[0] += n
            if progress is not None:
                progress(copied[0], total)

        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            digests, size = {}, 0
            for rel, src in files:
                digests[rel], n = _copy_hashed(src, tmp / rel, advance)
                size += n
            sha = _artifact_hash(digests, source.is_dir())
            _fsync_dir(tmp)
            final = self.root / sha
            if final.is_dir():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
                _fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _store_error(exc, source) from None
        return Artifact(sha256=sha, size=size, path=final / MODEL_FILE, source=str(source))


def _source_files(source: Path) -> list[tuple[str, Path]]:
    """(relative name in the store, file to read) for a model file or folder."""
    if not source.exists():
        raise BadRequest(f"model path '{source}' does not exist")
    if source.is_file():
        _check_readable(source)
        return [(MODEL_FILE, source)]
    if not source.is_dir():
        raise BadRequest(f"model path '{source}' is not a file or folder")
    if not (source / MODEL_FILE).is_file():
        raise BadRequest(f"folder '{source}' has no {MODEL_FILE}")
    root = source.resolve()
    files = []
    for folder, _, names in os.walk(source, onerror=_unreadable_folder):
        for name in names:
            path = Path(folder) / name
            if not path.resolve().is_relative_to(root):
                raise BadRequest(f"'{path}' links outside the model folder")
            if path.is_file():
                _check_readable(path)
                files.append((path.relative_to(source).as_posix(), path))
    return sorted(files)


def _unreadable_folder(exc: OSError) -> None:
    raise BadRequest(f"cannot read '{exc.filename}': {exc.strerror or exc}")


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise BadRequest(f"cannot read '{path}': permission denied")


def _copy_hashed(src: Path, dst: Path, advance=lambda n: None) -> tuple[str, int]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            advance(len(chunk))
            faults.pause("during-copy")
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def _artifact_hash(digests: dict[str, str], is_folder: bool) -> str:
    """A lone file is named by its own sha256 (what ``sha256sum`` prints); a folder by the
    hash of its sorted manifest of names and file hashes."""
    if not is_folder and list(digests) == [MODEL_FILE]:
        return digests[MODEL_FILE]
    manifest = "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))
    return hashlib.sha256(manifest.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_error(exc: OSError, source: Path) -> MserveError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreError(f"no space left while storing '{source}' ({exc.strerror}); "
                          "nothing was changed")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write the model store ({exc.strerror}); nothing was changed")
    return StoreError(f"could not store '{source}': {exc.strerror or exc}")
