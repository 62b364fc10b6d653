"""StringNormalizer's locale on machines without en_US.UTF-8.

scikit-learn text pipelines (skl2onnx's TfidfVectorizer, CountVectorizer) lower-case with
ONNX's StringNormalizer, whose ``locale`` defaults to ``en_US.UTF-8`` in ONNX Runtime; a
machine or container without that locale fails the load ("Failed to construct locale").
glibc's ``C.UTF-8`` (always present) has the same Unicode case mapping, so when en_US is
missing the model is loaded from an in-memory copy whose StringNormalizer nodes name
``C.UTF-8`` instead. The stored file is never changed. Other locales (``tr_TR`` lower-cases
'I' differently) are not substituted: the error then says which locale to install.
"""

from __future__ import annotations

import re
from pathlib import Path

from mserve.daemon.onnxproto import (GRAPH_NODE, MODEL_GRAPH, NODE_ATTRIBUTE, NODE_OP_TYPE,
                                     encode_varint, length_delimited, text, walk)

FALLBACK = "C.UTF-8"
SUBSTITUTABLE = {"", "en_US", "en_US.UTF-8", "en_US.utf8"}
# AttributeProto: name, s, type; AttributeType STRING
ATTR_NAME, ATTR_S, ATTR_TYPE, STRING = 1, 4, 20, 3
_LOCALE_ERROR = re.compile(r"Failed to construct locale with name:\s*([^:\s]+)")


def missing_locale(message: str) -> str | None:
    """The locale ONNX Runtime could not construct, from its error message, or None."""
    match = _LOCALE_ERROR.search(message)
    return match.group(1) if match else None


def can_substitute(locale: str) -> bool:
    return locale in SUBSTITUTABLE


def hint(locale: str) -> str:
    return (f"this model's StringNormalizer needs the '{locale}' locale, which this machine "
            f"lacks: install it (Debian/Ubuntu: apt-get install locales-all, or add it to "
            f"/etc/locale.gen and run locale-gen) and deploy again")


def with_fallback_locale(path: str | Path) -> bytes:
    """The model's bytes with every top-level StringNormalizer set to C.UTF-8."""
    data = Path(path).read_bytes()
    return bytes(_rewrite(data, 0, len(data), _model_field))


def _rewrite(buf, start: int, end: int, edit) -> bytearray:
    """Copy buf[start:end] field by field; ``edit(number, payload)`` may replace a
    length-delimited field's payload (return None to keep it)."""
    out = bytearray()
    for number, wire, begin, payload, finish in walk(buf, start, end):
        replaced = edit(number, buf, payload, finish) if wire == 2 else None
        out += buf[begin:finish] if replaced is None else length_delimited(number, replaced)
    return out


def _model_field(number: int, buf, start: int, end: int) -> bytes | None:
    return bytes(_rewrite(buf, start, end, _graph_field)) if number == MODEL_GRAPH else None


def _graph_field(number: int, buf, start: int, end: int) -> bytes | None:
    if number != GRAPH_NODE or not _is_string_normalizer(buf, start, end):
        return None
    out = bytearray()
    found = False
    for field, wire, begin, payload, finish in walk(buf, start, end):
        if field == NODE_ATTRIBUTE and wire == 2 and _attr_name(buf, payload, finish) == "locale":
            found = True
            value = _attr_string(buf, payload, finish)
            if can_substitute(value):
                out += length_delimited(NODE_ATTRIBUTE, _locale_attribute(FALLBACK))
                continue
        out += buf[begin:finish]
    if not found:
        out += length_delimited(NODE_ATTRIBUTE, _locale_attribute(FALLBACK))
    return bytes(out)


def _is_string_normalizer(buf, start: int, end: int) -> bool:
    return any(field == NODE_OP_TYPE and wire == 2 and text(buf, a, b) == "StringNormalizer"
               for field, wire, _, a, b in walk(buf, start, end))


def _attr_name(buf, start: int, end: int) -> str | None:
    return next((text(buf, a, b) for field, wire, _, a, b in walk(buf, start, end)
                 if field == ATTR_NAME and wire == 2), None)


def _attr_string(buf, start: int, end: int) -> str:
    return next((text(buf, a, b) for field, wire, _, a, b in walk(buf, start, end)
                 if field == ATTR_S and wire == 2), "")


def _locale_attribute(value: str) -> bytes:
    return (length_delimited(ATTR_NAME, b"locale") + length_delimited(ATTR_S, value.encode())
            + encode_varint(ATTR_TYPE << 3 | 0) + encode_varint(STRING))
