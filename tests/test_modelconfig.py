"""Triton's model configuration and repository index (daemon/protocol/modelconfig.py), checked
against Triton's own schema: every config must parse as tritonclient's ModelConfig protobuf."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from mserve.daemon.protocol.modelconfig import data_type, model_config, repository_index
from mserve.daemon.worker.batchcheck import Decision
from mserve.daemon.protocol.codecs import TensorSpec
from mserve.daemon.worker.runtime import LoadedModel


def loaded(inputs, outputs, *, batched: bool, device="cpu", sessions=1) -> LoadedModel:
    return LoadedModel(number=3, path="/store/ab12/model.onnx", sessions=[object()] * sessions,
                       inputs=[TensorSpec(*spec) for spec in inputs],
                       outputs=[TensorSpec(*spec) for spec in outputs], device=device,
                       providers=[], load_ms=1.0, batching=Decision(batched, "test"))


MLP = ([("x", "FP32", (-1, 8))], [("y", "FP32", (-1, 4))])
GRU = ([("input", "FP32", (-1, -1, 8))], [("output", "FP32", (-1, 1, -1, 4))])


def as_proto(config: dict) -> model_config_pb2.ModelConfig:
    """Triton's schema: an unknown field name or enum value raises ParseError."""
    return json_format.ParseDict(config, model_config_pb2.ModelConfig())


def test_a_batched_version_has_its_batcher_limits_and_dims_without_the_batch_dim():
    config = model_config("recs", loaded(*MLP, batched=True), {})
    assert config["name"] == "recs" and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 64
    assert config["input"][0] == {
        "name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [8],
        "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False,
        "is_non_linear_format_io": False}
    assert config["output"][0]["dims"] == [4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert config["dynamic_batching"]["preferred_batch_size"] == []
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    assert config["instance_group"] == [{
        "name": "recs_0", "kind": "KIND_CPU", "count": 1, "gpus": [], "secondary_devices": [],
        "profile": [], "passive": False, "host_policy": ""}]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["default_model_filename"] == "model.onnx"
    proto = as_proto(config)
    assert proto.max_batch_size == 64 and list(proto.input[0].dims) == [8]
    assert proto.input[0].data_type == model_config_pb2.TYPE_FP32


def test_the_deployment_options_are_the_ones_reported():
    options = {"max_batch_size": 16, "batch_delay_ms": 2.5, "max_queue": 50}
    config = model_config("recs", loaded(*MLP, batched=True, device="cuda", sessions=2), options)
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 50
    group = config["instance_group"][0]
    assert (group["kind"], group["count"], group["gpus"]) == ("KIND_GPU", 2, [0])
    as_proto(config)


def test_a_version_that_is_not_batched_has_max_batch_size_0_and_full_dims():
    config = model_config("rnn", loaded(*GRU, batched=False), {"max_batch_size": 32})
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [-1, -1, 8]
    assert config["output"][0]["dims"] == [-1, 1, -1, 4]
    # perf_analyzer reads these keys' presence as the scheduler in use
    assert "dynamic_batching" not in config and "sequence_batching" not in config
    assert config["model_transaction_policy"] == {"decoupled": False}
    assert as_proto(config).max_batch_size == 0


@pytest.mark.parametrize("datatype, expected", [
    ("BYTES", "TYPE_STRING"), ("BOOL", "TYPE_BOOL"), ("FP16", "TYPE_FP16"),
    ("BF16", "TYPE_BF16"), ("INT64", "TYPE_INT64"), ("UINT8", "TYPE_UINT8"),
    ("FP64", "TYPE_FP64")])
def test_datatypes_map_to_triton_enum_names(datatype, expected):
    assert data_type(datatype) == expected
    assert expected in model_config_pb2.DataType.keys()


def test_a_tensor_left_without_dims_gets_dims_1_and_an_empty_reshape():
    model = loaded([("ids", "BYTES", (-1,)), ("k", "INT64", ())], [("n", "BOOL", (-1, 2))],
                   batched=True)
    config = model_config("t", model, {})
    ids, k = config["input"]
    assert ids["dims"] == [1] and ids["reshape"] == {"shape": []}
    assert ids["data_type"] == "TYPE_STRING"
    assert k["dims"] == [1] and k["reshape"] == {"shape": []}
    assert config["output"][0]["dims"] == [2] and "reshape" not in config["output"][0]
    as_proto(config)


def test_loaded_versions_give_a_specific_version_policy():
    config = model_config("recs", loaded(*MLP, batched=True), {}, versions=[4, 2])
    assert config["version_policy"] == {"specific": {"versions": [2, 4]}}
    assert list(as_proto(config).version_policy.specific.versions) == [2, 4]


def test_repository_index_lists_each_version_with_its_state():
    index = repository_index("recs", [(2, "READY"), (1, "UNAVAILABLE")])
    assert index == [{"name": "recs", "version": "1", "state": "UNAVAILABLE", "reason": ""},
                     {"name": "recs", "version": "2", "state": "READY", "reason": ""}]


def test_repository_index_maps_mserve_version_states():
    index = repository_index("recs", [(1, "retired"), (2, "standby"), (3, "active"),
                                      (4, "failed")])
    assert [(e["state"], e["reason"]) for e in index] == [
        ("UNAVAILABLE", "version is retired"), ("READY", ""), ("READY", ""),
        ("UNAVAILABLE", "version is failed")]
    assert repository_index("recs", []) == []
