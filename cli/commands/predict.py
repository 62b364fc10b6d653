from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import quote

import typer

from mserve.cli import autostart
from mserve.cli.client import check, request_url
from mserve.cli.render import JsonOption, response
from mserve.daemon.errors import BadRequest, MserveError


def predict(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    input: Annotated[Optional[str], typer.Argument(
        help="JSON file, or '-' / nothing for stdin.", show_default=False)] = None,
    version: Annotated[Optional[int], typer.Option(
        "--version", "-v", min=1, help="Ask this version instead of the active one.")] = None,
    token: Annotated[Optional[str], typer.Option(
        help="Bearer token of a deployment deployed with --token (or MSERVE_TOKEN).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Run one inference and print the Open Inference Protocol response.

    INPUT is a protocol request ({"inputs": [...]}), a plain mapping of input name to
    nested list ({"x": [[1, 2, 3, 4]]}, dtypes taken from the model), or a TF Serving
    style {"instances": [...]}.

    Example: mserve predict iris examples/iris/input.json
    """
    document = _read_input(input)
    d = autostart.client().deployment(name)
    token = token or os.environ.get("MSERVE_TOKEN")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = f"/v2/models/{quote(name, safe='')}" + (f"/versions/{version}" if version else "")
    if "instances" in document:
        path = base.replace("/v2/", "/v1/", 1) + ":predict"
        body = document
    else:
        path = base + "/infer"
        body = document if "inputs" in document else _from_mapping(d, base, document, headers)
    status, _, payload = request_url(d["url"], "POST", path, json.dumps(body).encode(), headers,
                                     cafile=d.get("tls_cert"))
    answer = check(status, payload)
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
    meta = check(status, payload)
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
    shape = []
    while isinstance(data, list):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    if isinstance(data, dict):
        raise MserveError(f"input '{name}': data must be numbers, strings or booleans in "
                          "nested lists")
    return shape
