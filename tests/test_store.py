"""Unit tests for daemon/store.py: the content-addressed model store."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mserve.daemon import store as store_mod
from mserve.daemon.errors import BadRequest
from mserve.daemon.store import MODEL_FILE, TMP_PREFIX, Store, StoreError

MODEL = b"\x08\x07fake-onnx-graph" * 100
WEIGHTS = bytes(range(256)) * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "src" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(MODEL)
    return path


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(MODEL)
    (folder / "data" / "weights.bin").write_bytes(WEIGHTS)
    return folder


def store_entries(store: Store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


# ---- ingest ------------------------------------------------------------------------------

def test_lone_file_is_named_by_its_sha256(store, model_file):
    art = store.ingest(model_file)
    assert art.sha256 == sha(MODEL)
    assert art.size == len(MODEL)
    assert art.path == store.root / sha(MODEL) / MODEL_FILE
    assert art.path.read_bytes() == MODEL
    assert art.source == str(model_file)
    assert store.has(art.sha256)
    assert store.path_of(art.sha256) == art.path


def test_folder_with_external_data_is_copied_whole(store, model_folder):
    art = store.ingest(model_folder)
    stored = store.root / art.sha256
    assert art.path == stored / MODEL_FILE
    assert (stored / MODEL_FILE).read_bytes() == MODEL
    assert (stored / "data" / "weights.bin").read_bytes() == WEIGHTS
    assert art.size == len(MODEL) + len(WEIGHTS)


def test_folder_hash_is_hash_of_sorted_manifest(store, model_folder):
    art = store.ingest(model_folder)
    manifest = f"{sha(WEIGHTS)}  data/weights.bin\n{sha(MODEL)}  {MODEL_FILE}\n"
    assert art.sha256 == sha(manifest.encode())
    assert art.sha256 != sha(MODEL)


def test_folder_hash_changes_with_external_data(store, model_folder):
    first = store.ingest(model_folder)
    (model_folder / "data" / "weights.bin").write_bytes(WEIGHTS + b"!")
    second = store.ingest(model_folder)
    assert first.sha256 != second.sha256
    assert (store.root / first.sha256 / "data" / "weights.bin").read_bytes() == WEIGHTS


def test_identical_content_dedupes_to_one_folder(store, tmp_path, model_file):
    other = tmp_path / "elsewhere" / "copy.onnx"
    other.parent.mkdir()
    other.write_bytes(MODEL)
    a = store.ingest(model_file)
    b = store.ingest(other)
    assert a.sha256 == b.sha256
    assert a.path == b.path
    assert b.source == str(other)
    assert store_entries(store) == [a.sha256]  # no second folder, no .tmp- leftover


def test_identical_folders_dedupe(store, tmp_path, model_folder):
    twin = tmp_path / "twin"
    (twin / "data").mkdir(parents=True)
    (twin / MODEL_FILE).write_bytes(MODEL)
    (twin / "data" / "weights.bin").write_bytes(WEIGHTS)
    assert store.ingest(model_folder).sha256 == store.ingest(twin).sha256
    assert len(store_entries(store)) == 1


def test_later_edits_of_source_do_not_change_stored_copy(store, model_file):
    art = store.ingest(model_file)
    model_file.write_bytes(b"edited")
    assert art.path.read_bytes() == MODEL
    assert sha(art.path.read_bytes()) == art.sha256


def test_empty_file_is_stored(store, tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    art = store.ingest(empty)
    assert (art.sha256, art.size) == (sha(b""), 0)
    assert art.path.read_bytes() == b""


def test_symlink_inside_folder_is_stored_as_plain_copy(store, model_folder):
    (model_folder / "alias.bin").symlink_to(model_folder / "data" / "weights.bin")
    art = store.ingest(model_folder)
    alias = store.root / art.sha256 / "alias.bin"
    assert not alias.is_symlink()
    assert alias.read_bytes() == WEIGHTS


# ---- errors ------------------------------------------------------------------------------

def test_missing_path(store, tmp_path):
    with pytest.raises(BadRequest, match="does not exist"):
        store.ingest(tmp_path / "nope.onnx")
    assert store_entries(store) == []


def test_folder_without_any_onnx_says_what_it_holds(store, tmp_path):
    folder = tmp_path / "nomodel"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(BadRequest, match=r"has no model.onnx and no other .onnx file at its "
                                         r"top level \(it holds notes.txt, sub/\); pass the "
                                         r"path of the .onnx file"):
        store.ingest(folder)
    (folder / "notes.txt").unlink()
    (folder / "sub").rmdir()
    with pytest.raises(BadRequest, match=r"has no model.onnx .*\(it is empty\)"):
        store.ingest(folder)
    assert store_entries(store) == []


def test_folder_with_several_onnx_and_no_model_onnx(store, tmp_path):
    folder = tmp_path / "several"
    folder.mkdir()
    for name in ("b.onnx", "a.onnx"):
        (folder / name).write_bytes(MODEL)
    with pytest.raises(BadRequest, match=r"holds several .onnx files and no model.onnx "
                                         r"\(a.onnx, b.onnx\); pass the path of the one"):
        store.ingest(folder)
    assert store_entries(store) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(store, model_file):
    model_file.chmod(0)
    try:
        with pytest.raises(BadRequest, match="permission denied"):
            store.ingest(model_file)
    finally:
        model_file.chmod(0o644)
    assert store_entries(store) == []


def test_unreadable_file_in_folder_simulated(store, model_folder, monkeypatch):
    """Same check as above, simulated so that it also runs as root."""
    blocked = model_folder / "data" / "weights.bin"
    real_access = os.access
    monkeypatch.setattr(store_mod.os, "access",
                        lambda p, mode: False if p == blocked else real_access(p, mode))
    with pytest.raises(BadRequest, match="cannot read .*weights.bin.*permission denied"):
        store.ingest(model_folder)
    assert store_entries(store) == []


def test_unlistable_subfolder_is_an_error_not_silently_skipped(store, model_folder, monkeypatch):
    """Simulates a subfolder without read permission (root could list it anyway)."""
    blocked = os.fspath(model_folder / "data")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(BadRequest):
        store.ingest(model_folder)
    assert store_entries(store) == []


def test_symlink_pointing_outside_folder(store, tmp_path, model_folder):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not part of the model")
    (model_folder / "ext.bin").symlink_to(outside)
    with pytest.raises(BadRequest, match="links outside the model folder"):
        store.ingest(model_folder)
    assert store_entries(store) == []


def test_model_onnx_symlink_pointing_outside_folder(store, tmp_path, model_file):
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / MODEL_FILE).symlink_to(model_file)
    with pytest.raises(BadRequest, match="links outside"):
        store.ingest(folder)


def test_no_space_left_during_copy(store, model_folder, monkeypatch):
    real_copy = store_mod._copy_hashed
    calls = []

    def copy_then_fill_disk(src, dst, advance):
        calls.append(dst)
        if len(calls) == 1:
            return real_copy(src, dst, advance)  # the first file goes through
        dst.write_bytes(b"partial")    # the second one runs out of space midway
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod, "_copy_hashed", copy_then_fill_disk)
    with pytest.raises(StoreError, match="no space left") as info:
        store.ingest(model_folder)
    assert info.value.status == 507
    assert len(calls) == 2
    assert store_entries(store) == []  # neither a .tmp- folder nor a final one


def test_unwritable_store_maps_to_store_error(store, model_file, monkeypatch):
    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_mod.os, "rename", denied)
    with pytest.raises(StoreError, match="cannot write the model store"):
        store.ingest(model_file)
    assert store_entries(store) == []


# ---- clean_partial ---------------------------------------------------------------------

def test_clean_partial_removes_only_tmp_folders(store, model_file):
    art = store.ingest(model_file)
    leftover = store.root / f"{TMP_PREFIX}deadbeef"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "model.onnx").write_bytes(b"half")
    removed = store.clean_partial()
    assert removed == [leftover.name]
    assert not leftover.exists()
    assert store_entries(store) == [art.sha256]
    assert art.path.read_bytes() == MODEL


def test_clean_partial_without_store_folder(store):
    assert store.clean_partial() == []


# ---- real exporters' files: external data ------------------------------------------------

ROWS = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]], dtype=np.float32)


def exported(path: Path, location: str | None = "cnn.onnx.data", one_file: bool = True,
             scale: float = 1.0) -> Path:
    """A small real model, y = x @ W + b (x: FP32 [N, 4]), saved as exporters save it: its
    weights in the external-data file ``location`` next to it (None: inline; ``one_file``
    False: one file per tensor, named by the tensor, as onnx does)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    weights = np.arange(16, dtype=np.float32).reshape(4, 4) * scale / 8
    inits = [numpy_helper.from_array(weights, "W"),
             numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "cnn", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    if location is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0,
                        all_tensors_to_one_file=one_file, location=location)
    return path


def relocate(path: Path, location: str) -> None:
    """Point every external tensor of ``path`` at ``location`` (untrusted files do)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def answer(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": ROWS})[0]


def manifest_hash(entries: dict[str, bytes]) -> str:
    return sha("".join(f"{sha(data)}  {rel}\n" for rel, data in sorted(entries.items()))
               .encode())


def test_file_is_stored_with_its_external_data(store, tmp_path):
    src = exported(tmp_path / "src" / "cnn.onnx")
    expected = answer(src)
    model, data = src.read_bytes(), (src.parent / "cnn.onnx.data").read_bytes()
    art = store.ingest(src)
    stored = store.root / art.sha256
    assert sorted(p.name for p in stored.iterdir()) == ["cnn.onnx.data", MODEL_FILE]
    assert (stored / MODEL_FILE).read_bytes() == model
    assert (stored / "cnn.onnx.data").read_bytes() == data
    assert art.sha256 == manifest_hash({MODEL_FILE: model, "cnn.onnx.data": data})
    assert art.size == len(model) + len(data)
    shutil.rmtree(src.parent)  # the store holds its own copy
    np.testing.assert_allclose(answer(art.path), expected)
    inline = exported(tmp_path / "inline" / "cnn.onnx", location=None)
    assert store.ingest(inline).sha256 == sha(inline.read_bytes())  # lone file: own sha256


def test_file_and_its_folder_store_as_one_artifact(store, tmp_path):
    src = exported(tmp_path / "src" / "cnn.onnx")
    by_file, by_folder = store.ingest(src), store.ingest(src.parent)
    assert by_file.sha256 == by_folder.sha256
    assert len(store_entries(store)) == 1


def test_several_data_files_and_subfolders_keep_their_paths(store, tmp_path):
    per_tensor = exported(tmp_path / "a" / "m.onnx", one_file=False)
    art = store.ingest(per_tensor)
    assert sorted(p.name for p in (store.root / art.sha256).iterdir()) == ["W", "b", MODEL_FILE]
    np.testing.assert_allclose(answer(art.path), answer(per_tensor))
    nested = exported(tmp_path / "b" / "m.onnx", location="m.onnx.data")
    (nested.parent / "weights").mkdir()
    (nested.parent / "m.onnx.data").rename(nested.parent / "weights" / "m.bin")
    relocate(nested, "./weights/m.bin")
    art = store.ingest(nested)
    assert (store.root / art.sha256 / "weights" / "m.bin").is_file()
    assert not (store.root / art.sha256 / "m.onnx.data").exists()  # only what it references
    np.testing.assert_allclose(answer(art.path), answer(nested))


def test_folder_with_one_onnx_that_is_not_model_onnx(store, tmp_path):
    src = exported(tmp_path / "cnn" / "cnn.onnx")
    (src.parent / "README.txt").write_text("exported by torch")
    art = store.ingest(src.parent)
    stored = store.root / art.sha256
    assert sorted(p.name for p in stored.iterdir()) == ["README.txt", "cnn.onnx.data",
                                                        MODEL_FILE]
    assert (stored / MODEL_FILE).read_bytes() == src.read_bytes()
    np.testing.assert_allclose(answer(art.path), answer(src))


def test_missing_external_data_is_refused(store, tmp_path):
    src = exported(tmp_path / "dir" / "cnn.onnx")
    (src.parent / "cnn.onnx.data").unlink()
    message = (f"'cnn.onnx' references external data 'cnn.onnx.data', which is not next to "
               f"it in '{src.parent}'; keep the .onnx and its data files together")
    for path in (src, src.parent):
        with pytest.raises(BadRequest) as info:
            store.ingest(path)
        assert str(info.value) == message
    assert store_entries(store) == []


@pytest.mark.parametrize("where, why", [
    ("absolute", "by an absolute path"),
    ("parent", "by a path that leaves its folder"),
    ("link", "through a link that leads outside its folder"),
])
def test_external_data_outside_the_models_folder_is_refused(store, tmp_path, where, why):
    src = exported(tmp_path / "dir" / "cnn.onnx")
    outside = tmp_path / "elsewhere" / "secret.bin"
    outside.parent.mkdir()
    (src.parent / "cnn.onnx.data").rename(outside)  # it exists: still not to be read
    (src.parent / "sub").symlink_to(outside.parent)  # a folder walk does not enter it
    location = {"absolute": str(outside), "parent": "../elsewhere/secret.bin",
                "link": "sub/secret.bin"}[where]
    relocate(src, location)
    for path in (src, src.parent):
        with pytest.raises(BadRequest, match=re.escape(
                f"'cnn.onnx' references external data '{location}' {why}; a model may "
                f"only use data files inside its own folder ('{src.parent}')")):
            store.ingest(path)
    assert store_entries(store) == []


def test_external_data_named_like_the_stored_model_is_refused(store, tmp_path):
    src = exported(tmp_path / "dir" / "cnn.onnx", location="model.onnx")
    with pytest.raises(BadRequest, match="external data named model.onnx"):
        store.ingest(src)
    assert store_entries(store) == []


@pytest.mark.parametrize("location", ["nul\x00byte.bin", "x" * 300])
def test_external_data_names_that_are_no_path_are_refused(store, tmp_path, location):
    src = exported(tmp_path / "dir" / "cnn.onnx")
    relocate(src, location)
    with pytest.raises(BadRequest, match="by a name that is no usable path"):
        store.ingest(src)
    assert store_entries(store) == []
