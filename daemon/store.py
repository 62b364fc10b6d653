"""The content-addressed model store: ``models/<sha256>/model.onnx`` (plus external data).

A model file is stored with the external-data files it references (kept at their paths
relative to it, since ONNX Runtime resolves them from the model's folder); a folder is
stored whole, its ``model.onnx`` (or its one ``*.onnx``, renamed) as the model.

A version deployed with a transformer (``--transformer script.py``) is one artifact holding
both: the model as above and the script's folder under ``.mserve-transformer/`` (transformer.py
says what is taken); its sha256 is a hash over the model's hash, the script's name and the
folder's tree hash, so the same model with another script is another artifact.

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
from pathlib import Path, PurePosixPath

from mserve.daemon import faults, onnxproto
from mserve.daemon.errors import BadRequest, MserveError
from mserve.daemon.pipelinefiles import pipeline_files

MODEL_FILE = "model.onnx"
TRANSFORMER_DIR = ".mserve-transformer"  # a version's transformer folder in its artifact
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
    transformer: Pipeline | None = None


@dataclass(frozen=True)
class Pipeline:
    """What a version's transformer is: its script's name in its folder, the folder's tree
    hash, its size and the hash of the model beside it (as ``versions.transformer``)."""

    script: str
    sha256: str
    size: int
    model_sha256: str

    def to_json(self) -> dict:
        return {"script": self.script, "sha256": self.sha256, "size": self.size,
                "model_sha256": self.model_sha256}


class Store:
    def __init__(self, root: Path):
        self.root = root

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256 / MODEL_FILE

    def script_of(self, version: dict) -> str | None:
        """The stored script of a version row that has a transformer, else None."""
        pipeline = version.get("transformer")
        if not pipeline:
            return None
        return str(self.root / version["sha256"] / TRANSFORMER_DIR / pipeline["script"])

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

    def ingest(self, source: Path, progress: Progress | None = None,
               transformer: Path | None = None) -> Artifact:
        """Copy a model file and its external data, or a folder holding ``model.onnx`` or
        one ``*.onnx``, into the store, with the folder of ``transformer`` (a script) when
        given; ``progress(done, total)`` is called as bytes are copied and hashed."""
        files = _source_files(source)
        if any(rel.split("/")[0] == TRANSFORMER_DIR for rel, _ in files):
            raise BadRequest(f"'{source}' holds '{TRANSFORMER_DIR}', a name mserve keeps for "
                             "transformers; rename it")
        script = None
        if transformer is not None:
            # The model (and a file's external data) is stored once, even beside the script;
            # a model folder's other files may be the script's own data, so they stay.
            model = {src for rel, src in files if not source.is_dir() or rel == MODEL_FILE}
            script, extra = pipeline_files(transformer, model)
            files += [(f"{TRANSFORMER_DIR}/{rel}", src) for rel, src in extra]
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
            sha = _artifact_hash(digests, source.is_dir(), script)
            fsync_path(tmp)
            final = self.root / sha
            if final.is_dir():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
                fsync_path(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _store_error(exc, source) from None
        return Artifact(sha256=sha, size=size, path=final / MODEL_FILE, source=str(source),
                        transformer=_pipeline(digests, source.is_dir(), script, files))


def model_in(folder: Path) -> Path | None:
    """The model file of a folder, one rule for ``deploy`` and ``mserve serve``: its
    model.onnx, else its one top-level ``*.onnx``; None when it has neither. Several
    ``*.onnx`` and no model.onnx is an error: which one was meant?"""
    if (folder / MODEL_FILE).is_file():
        return folder / MODEL_FILE
    found = sorted(p for p in folder.glob("*.onnx") if p.is_file() and p.name[0] != ".")
    if len(found) > 1:
        raise BadRequest(f"folder '{folder}' holds several .onnx files and no {MODEL_FILE} "
                         f"({_names(found)}); pass the path of the one to use")
    return found[0] if found else None


def _source_files(source: Path) -> list[tuple[str, Path]]:
    """(relative name in the store, file to read) for a model file or folder: the model
    becomes ``model.onnx``; its external data keeps its path relative to the model."""
    if not source.exists():
        raise BadRequest(f"model path '{source}' does not exist")
    if source.is_file():
        _check_readable(source)
        model, folder, files = source, source.parent, {MODEL_FILE: source}
    elif source.is_dir():
        model, folder = _folder_model(source), source
        files = _folder_files(source, model)
    else:
        raise BadRequest(f"model path '{source}' is not a file or folder")
    for rel, path in _external_files(model, folder):
        if files.setdefault(rel, path) != path:
            raise BadRequest(f"'{model.name}' references external data named {MODEL_FILE}, "
                             "the name the store gives the model itself; rename that file")
    return sorted(files.items())


def _folder_model(folder: Path) -> Path:
    if (model := model_in(folder)) is not None:
        return model
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise BadRequest(f"cannot read '{folder}': {exc.strerror or exc}") from None
    held = f"it holds {_names(entries)}" if entries else "it is empty"
    raise BadRequest(f"folder '{folder}' has no {MODEL_FILE} and no other .onnx file at its "
                     f"top level ({held}); pass the path of the .onnx file")


def _names(paths: list[Path], most: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:most]]
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(names) + more


def _folder_files(source: Path, model: Path) -> dict[str, Path]:
    """Every file under ``source`` by its relative name, ``model`` as model.onnx."""
    root = source.resolve()
    files = {}
    for folder, _, names in os.walk(source, onerror=_unreadable_folder):
        for name in names:
            path = Path(folder) / name
            if not path.resolve().is_relative_to(root):
                raise BadRequest(f"'{path}' links outside the model folder")
            if path.is_file():
                _check_readable(path)
                rel = MODEL_FILE if path == model else path.relative_to(source).as_posix()
                files[rel] = path
    return files


def _external_files(model: Path, folder: Path) -> list[tuple[str, Path]]:
    """The external-data files ``model`` references, each a readable file inside
    ``folder`` (the model file is untrusted input), by its path relative to it."""
    try:
        locations = onnxproto.external_data_locations(model)
    except ValueError:
        return []  # not a model: validation says so, in the words users know
    except OSError as exc:
        raise BadRequest(f"cannot read '{model}': {exc.strerror or exc}") from None
    return [_external_file(model, folder, location) for location in locations]


def _external_file(model: Path, folder: Path, location: str) -> tuple[str, Path]:
    rel = PurePosixPath(location)
    try:
        why = _leaves(folder, rel)
        found = why is None and (folder / rel).is_file()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long...
        why, found = f"by a name that is no usable path ({exc})", False
    if why:
        raise BadRequest(f"'{model.name}' references external data '{location}' {why}; a "
                         f"model may only use data files inside its own folder ('{folder}'): "
                         "save it again with a relative location")
    if not found:
        raise BadRequest(f"'{model.name}' references external data '{location}', which is "
                         f"not next to it in '{folder}'; keep the .onnx and its data files "
                         "together")
    _check_readable(folder / rel)
    return rel.as_posix(), folder / rel


def _leaves(folder: Path, rel: PurePosixPath) -> str | None:
    """How ``rel`` leads out of ``folder``, or None when it stays inside."""
    if rel.is_absolute():
        return "by an absolute path"
    if ".." in rel.parts:
        return "by a path that leaves its folder"
    if not (folder / rel).resolve().is_relative_to(folder.resolve()):
        return "through a link that leads outside its folder"
    return None


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


def _artifact_hash(digests: dict[str, str], is_folder: bool, script: str | None = None) -> str:
    """A lone file is named by its own sha256 (what ``sha256sum`` prints); a folder by the
    hash of its sorted manifest of names and file hashes; a model with a transformer by the
    hash of both (``pipeline_hash``)."""
    if script is not None:
        model, tree = _split_digests(digests)
        return pipeline_hash(_artifact_hash(model, is_folder), script, tree_hash(tree))
    if not is_folder and list(digests) == [MODEL_FILE]:
        return digests[MODEL_FILE]
    return tree_hash(digests)


def tree_hash(digests: dict[str, str]) -> str:
    """The hash of a sorted manifest of names and file hashes (``sha256sum`` lines)."""
    manifest = "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))
    return hashlib.sha256(manifest.encode()).hexdigest()


def pipeline_hash(model_sha: str, script: str, tree_sha: str) -> str:
    """A version's hash when it has a transformer: over the model's hash, which file of the
    transformer's folder is the script, and that folder's tree hash."""
    text = f"mserve pipeline\nmodel {model_sha}\ntransformer {script} {tree_sha}\n"
    return hashlib.sha256(text.encode()).hexdigest()


def _split_digests(digests: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    prefix = TRANSFORMER_DIR + "/"
    model = {rel: d for rel, d in digests.items() if not rel.startswith(prefix)}
    tree = {rel[len(prefix):]: d for rel, d in digests.items() if rel.startswith(prefix)}
    return model, tree


def _pipeline(digests: dict[str, str], is_folder: bool, script: str | None,
              files: list[tuple[str, Path]]) -> Pipeline | None:
    if script is None:
        return None
    model, tree = _split_digests(digests)
    size = sum(src.stat().st_size for rel, src in files
               if rel.startswith(TRANSFORMER_DIR + "/"))
    return Pipeline(script, tree_hash(tree), size, _artifact_hash(model, is_folder))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (so a rename in it is on disk)."""
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
