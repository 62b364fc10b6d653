from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import quote

import typer

from mserve.cli import autostart, tokens
from mserve.cli.client import check, request_url
from mserve.cli.render import JsonOption, response
from mserve.cli.tokens import ClientTokenOption, TokenFileOption
from mserve.daemon.errors import BadRequest, MserveError, error_for_status
from mserve.daemon.protocol.shapes import nested_shape


def predict(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    input: Annotated[Optional[str], typer.Argument(
        help="JSON file, or '-' / nothing for stdin.", show_default=False)] = None,
    version: Annotated[Optional[int], typer.Option(
        "--version", "-v", min=1, help="Ask this version instead of the active one.")] = None,
    token: ClientTokenOption = None,
    token_file: TokenFileOption = None,
    grpc: Annotated[bool, typer.Option(
        "--grpc", help="Send it to the deployment's gRPC port (Open Inference Protocol "
                       "gRPC) instead of HTTP.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Run one inference and print the Open Inference Protocol response.

    INPUT is a protocol request ({"inputs": [...]}), a plain mapping of input name to
    nested list ({"x": [[1, 2, 3, 4]]}, dtypes taken from the model), or a TF Serving
    style {"instances": [...]}.

    Example: mserve predict iris examples/iris/input.json
    """
    token = tokens.resolve(token, token_file, stdin_free=input not in (None, "-"))
    document = _read_input(input)
    d = autostart.client().deployment(name)
    if grpc:
        _print(predict_grpc(d, version, document, token), json_out)
        return
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = f"/v2/models/{quote(name, safe='')}" + (f"/versions/{version}" if version else "")
    if "instances" in document:
        path = base.replace("/v2/", "/v1/", 1) + ":predict"
        body = document
    else:
        path = base + "/infer"
        body = document if _is_oip(document) else _from_mapping(d, base, document, headers)
    status, _, payload = request_url(d["url"], "POST", path, json.dumps(body).encode(), headers,
                                     cafile=d.get("tls_cert"))
    _print(check(status, payload), json_out)


def _print(answer: dict, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(answer) + "\n")
    else:
        response(answer)


def _read_input(source: str | None) -> dict:
    if source in (None, "-"):
        if source is None and sys.stdin.isatty():
            raise BadRequest("no input: give a JSON file, or pipe one on stdin")
        text, where = sys.stdin.read(), "stdin"
    else:
        try:
            text, where = Path(source).read_text(), f"'{source}'"
        except OSError as exc:
            raise BadRequest(f"cannot read input file '{source}': {exc.strerror}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"input from {where} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not document:
        raise BadRequest(f"input from {where} must be a JSON object: {{\"inputs\": [...]}} or "
                         "a mapping of input name to data")
    return document


def _from_mapping(d: dict, base: str, mapping: dict, headers: dict) -> dict:
    """Turn {"x": [[1, 2]]} into a protocol request, with dtypes from the model's metadata."""
    status, _, payload = request_url(d["url"], "GET", base, headers=headers,
                                     cafile=d.get("tls_cert"))
    return _mapping_request(check(status, payload), mapping)


def _is_oip(document: dict) -> bool:
    """An Open Inference Protocol request ({"inputs": [{...}, ...]}), not a plain mapping
    (which may name an input "inputs", as Keras and tf2onnx models often do)."""
    inputs = document.get("inputs")
    return isinstance(inputs, list) and all(isinstance(item, dict) for item in inputs)


def _mapping_request(meta: dict, mapping: dict) -> dict:
    declared = {i["name"]: i for i in meta["inputs"]}
    inputs = []
    for key, data in mapping.items():
        if key not in declared:
            raise BadRequest(f"unknown input '{key}'; the model's inputs are: "
                             f"{', '.join(declared)}")
        inputs.append({"name": key, "datatype": declared[key]["datatype"],
                       "shape": shape_of(data, key), "data": data})
    return {"inputs": inputs}


def shape_of(data, name: str) -> list[int]:
    """The shape of a nested list, from its first elements (the server checks the rest)."""
    shape = list(nested_shape(data))
    for _ in shape:
        data = data[0] if data else data
    if isinstance(data, dict):
        raise MserveError(f"input '{name}': data must be numbers, strings or booleans in "
                          "nested lists")
    return shape


# ---------------------------------------------------------------- --grpc
# grpc, numpy and the stubs are imported here only: `mserve predict` over HTTP and every
# other command start without them.
GRPC_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 413, "UNAVAILABLE": 503}


def predict_grpc(d: dict, version: int | None, document: dict, token: str | None) -> dict:
    """One ModelInfer on the deployment's gRPC port; the answer as the HTTP route gives it."""
    from mserve.daemon.protocol import codecs
    from mserve.daemon.protocol.proto import grpc_service_pb2 as pb
    from mserve.daemon.protocol.proto import grpc_service_pb2_grpc as pb_grpc

    if "instances" in document:
        raise BadRequest("--grpc takes an Open Inference Protocol request or a mapping of "
                         "input name to data, not TF Serving 'instances'")
    if not d.get("grpc_url"):
        raise MserveError(f"deployment '{d['name']}' has no gRPC port")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    pinned = str(version) if version else ""
    with _grpc_channel(d) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if not _is_oip(document):
            from google.protobuf import json_format

            meta = _grpc_call(d, stub.ModelMetadata, pb.ModelMetadataRequest(
                name=d["name"], version=pinned), metadata)
            document = _mapping_request(json_format.MessageToDict(
                meta, preserving_proto_field_name=True), document)
        request = codecs.parse_request(json.dumps(document).encode(), None)
        message = pb.ModelInferRequest(model_name=d["name"], model_version=pinned,
                                       id=request.id or "")
        for item in request.inputs:
            message.inputs.add(name=item.name, datatype=item.datatype, shape=item.shape)
            message.raw_input_contents.append(codecs.binary_bytes(item.array))
        for output in request.outputs or ():
            message.outputs.add(name=output.name)
        answer = _grpc_call(d, stub.ModelInfer, message, metadata)
    return _grpc_answer(codecs, answer)


def _grpc_channel(d: dict):
    import grpc

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    if not d.get("tls_cert"):
        return grpc.insecure_channel(d["grpc_url"], options=options)
    try:
        pem = Path(d["tls_cert"]).read_bytes()
    except OSError as exc:
        raise MserveError(f"cannot read the deployment's certificate: {exc.strerror}") from None
    if name := _certificate_name(d["tls_cert"]):
        # the URL names an address; check the certificate against the name it holds
        options.append(("grpc.ssl_target_name_override", name))
    credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    return grpc.secure_channel(d["grpc_url"], credentials, options=options)


def _certificate_name(path: str) -> str | None:
    """The first DNS name (else the common name) of a PEM certificate, or None."""
    import ssl

    try:  # the stdlib's only PEM decoder; private but present since Python 3.3
        info = ssl._ssl._test_decode_cert(path)
    except (AttributeError, OSError, ValueError):  # ssl.SSLError is an OSError
        return None
    for kind, value in info.get("subjectAltName", ()):
        if kind == "DNS":
            return value
    for rdn in info.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _grpc_call(d: dict, method, message, metadata):
    import grpc

    try:
        return method(message, metadata=metadata, timeout=60)
    except grpc.RpcError as exc:
        code = exc.code()
        status = GRPC_STATUS.get(code.name, 500)
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or ""):
            raise MserveError(f"cannot reach {d['grpc_url']}: {exc.details()}") from None
        raise error_for_status(status, exc.details() or code.name) from None


def _grpc_answer(codecs, response) -> dict:
    """The ModelInferResponse as the HTTP route's JSON (same encoder, same numbers)."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise MserveError("the gRPC answer has no raw_output_contents for its outputs")
    results = []
    for output, raw in zip(response.outputs, response.raw_output_contents):
        array = codecs.array_from_binary(f"output '{output.name}'", output.datatype,
                                         tuple(output.shape), raw)
        results.append((codecs.RequestedOutput(output.name, False), array))
    body, _ = codecs.encode_response(response.model_name, response.model_version,
                                     response.id or None, results)
    return json.loads(body)
