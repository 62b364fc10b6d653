"""Triton's model configuration and repository index, derived from what mserve really does.

``model_config`` answers ``GET /v2/models/NAME[/versions/V]/config`` and gRPC ``ModelConfig``
in the shape of Triton's ``model_config.proto`` (field names as in the proto, enums as their
names, int64 as JSON numbers, as Triton's HTTP endpoint writes them), so tritonclient's
``get_model_config`` and perf_analyzer read it as they read Triton's:

- ``max_batch_size`` is the batcher's real limit when the version was proven batchable at
  load (batchcheck.py), else 0, and ``dims`` then leave out the batch dim (Triton's rule);
- ``dynamic_batching`` appears only for a batched version, with the real queue delay and
  queue bound (perf_analyzer reads its presence as "dynamic scheduler");
- ``instance_group`` counts the ONNX Runtime sessions, on the device really used.

No ``sequence_batching`` or ``ensemble_scheduling``: mserve does neither, and perf_analyzer
changes its behaviour when they are present.
"""

from __future__ import annotations

import posixpath

DEFAULT_MAX_BATCH = 64  # as batcher.DEFAULT_MAX_BATCH (this package imports no worker code)
DEFAULT_MAX_QUEUE = 1024  # as batcher.DEFAULT_MAX_QUEUE
READY, UNAVAILABLE = "READY", "UNAVAILABLE"
TRITON_STATES = frozenset({"UNKNOWN", READY, UNAVAILABLE, "LOADING", "UNLOADING"})
# mserve's version states (versions, status) as Triton's repository states.
_STATES = {"active": READY, "standby": READY, "canary": READY, "loaded": READY,
           "ready": READY, "failed": UNAVAILABLE, "retired": UNAVAILABLE,
           "loading": "LOADING", "unloading": "UNLOADING"}


def data_type(datatype: str) -> str:
    """An Open Inference Protocol datatype as Triton's config enum: FP32 -> TYPE_FP32,
    BYTES -> TYPE_STRING (Triton's name for it)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(name: str, model, options: dict, *, versions: list[int] | None = None) -> dict:
    """The configuration of one loaded version (``runtime.LoadedModel``) of deployment
    ``name`` with deployment ``options``; ``versions``, when given, are the version numbers
    loaded now (the policy then lists them, as Triton's ``specific`` policy does)."""
    batched = bool(model.batchable)
    max_batch = max(1, int(options.get("max_batch_size") or DEFAULT_MAX_BATCH)) if batched else 0
    config = {
        "name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "runtime": "", "version_policy": _version_policy(versions),
        "max_batch_size": max_batch,
        "input": [_input(spec, batched) for spec in model.inputs],
        "output": [_output(spec, batched) for spec in model.outputs],
        "batch_input": [], "batch_output": [],
        "optimization": {"priority": "PRIORITY_DEFAULT",
                         "input_pinned_memory": {"enable": False},
                         "output_pinned_memory": {"enable": False},
                         "gather_kernel_buffer_threshold": 0, "eager_batching": False},
        "instance_group": [_instance_group(name, model)],
        "default_model_filename": posixpath.basename(str(model.path).replace("\\", "/")),
        "cc_model_filenames": {}, "metric_tags": {}, "parameters": _parameters(options),
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": False},
        "response_cache": {"enable": False},
    }
    if batched:
        config["dynamic_batching"] = _dynamic_batching(options)
    return config


def _parameters(options: dict) -> dict:
    """The ONNX Runtime thread count as Triton's ONNX Runtime backend takes it (absent: the
    runtime's default, one thread per physical core)."""
    threads = options.get("threads")
    return {"intra_op_thread_count": {"string_value": str(int(threads))}} if threads else {}


def _version_policy(versions: list[int] | None) -> dict:
    if versions:
        return {"specific": {"versions": sorted(int(v) for v in versions)}}
    return {"latest": {"num_versions": 1}}


def _dims(shape: tuple[int, ...], batched: bool) -> tuple[list[int], dict | None]:
    """Triton's dims (without the batch dim when batched) and, for a tensor left with no
    dims (a scalar, or only a batch dim), dims [1] with an empty reshape, as Triton asks."""
    dims = [int(d) if d >= 0 else -1 for d in (shape[1:] if batched and shape else shape)]
    return (dims, None) if dims else ([1], {"shape": []})


def _input(spec, batched: bool) -> dict:
    dims, reshape = _dims(spec.shape, batched)
    entry = {"name": spec.name, "data_type": data_type(spec.datatype), "format": "FORMAT_NONE",
             "dims": dims, "is_shape_tensor": False, "allow_ragged_batch": False,
             "optional": False, "is_non_linear_format_io": False}
    if reshape is not None:
        entry["reshape"] = reshape
    return entry


def _output(spec, batched: bool) -> dict:
    dims, reshape = _dims(spec.shape, batched)
    entry = {"name": spec.name, "data_type": data_type(spec.datatype), "dims": dims,
             "label_filename": "", "is_shape_tensor": False,
             "is_non_linear_format_io": False}
    if reshape is not None:
        entry["reshape"] = reshape
    return entry


def _instance_group(name: str, model) -> dict:
    gpu = model.device == "cuda"
    return {"name": f"{name}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU",
            "count": len(model.sessions), "gpus": [0] if gpu else [],
            "secondary_devices": [], "profile": [], "passive": False, "host_policy": ""}


def _dynamic_batching(options: dict) -> dict:
    """The batcher's real settings: its delay, and its queue bound (503 past it: REJECT)."""
    delay_us = int(round(float(options.get("batch_delay_ms") or 0) * 1000))
    return {"preferred_batch_size": [], "max_queue_delay_microseconds": delay_us,
            "preserve_ordering": False, "priority_levels": 0, "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT", "default_timeout_microseconds": 0,
                "allow_timeout_override": False,
                "max_queue_size": int(options.get("max_queue") or DEFAULT_MAX_QUEUE)},
            "priority_queue_policy": {}}


def repository_index(name: str, versions: list[tuple[int, str]]) -> list[dict]:
    """Triton's repository index for deployment ``name``: one entry per (number, state), in
    version order. ``state`` is a Triton state (READY, UNAVAILABLE, ...) or an mserve version
    state (active, standby, failed, retired, ...); the latter says itself in ``reason`` when
    the version is not READY."""
    entries = []
    for number, state in sorted(versions, key=lambda item: int(item[0])):
        if state.upper() in TRITON_STATES:
            triton, reason = state.upper(), ""
        else:
            triton = _STATES.get(state.lower(), "UNKNOWN")
            reason = "" if triton == READY else f"version is {state}"
        entries.append({"name": name, "version": str(number), "state": triton,
                        "reason": reason})
    return entries
