"""The shape of a JSON tensor's nested lists, read along the first elements only (as cheap
for a million rows as for one). Stdlib only: the CLI's ``predict`` and the worker's codecs
share it; whoever decodes the data checks that the rest is rectangular."""

from __future__ import annotations


def nested_shape(data) -> tuple[int, ...]:
    shape = []
    while isinstance(data, list):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    return tuple(shape)
