"""Large JSON documents parsed and written a piece at a time.

``orjson`` holds the GIL for the whole of one call: 64 MiB of rows takes it seconds, and in
that time the event loop answers nothing, health checks included, even when the call runs in a
thread. ``loads`` gives what ``orjson.loads`` gives, and refuses what it refuses, but parses
each large array of a large document (a tensor's data: nearly all the bytes of a large request)
in pieces of about ``PIECE`` bytes, pausing between pieces; what is left (the small skeleton
around those arrays) is parsed whole. ``dumps`` does the same for large numpy arrays in a
document to write. Either runs in a thread for the pauses to matter.

How: numpy reads the body a window at a time and tells, for each byte, whether it lies in a
string (a quote counts unless an odd run of backslashes comes before it) and how deep in
brackets it is. That finds the large arrays (those holding no other large array) and, inside
one, the commas between its elements. Why it is exact: each piece is parsed as ``[`` + piece +
``]`` and must hold at least one element, so a cut anywhere but between two elements fails to
parse; and the array is replaced in the skeleton by a placeholder string, as valid there as
the array was.
"""

from __future__ import annotations

import gc
import math
import re
import secrets
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import orjson

from mserve.daemon.protocol.tensors import pause

PIECE = 64 * 1024  # bytes parsed per orjson call: one to two milliseconds
SMALL = 2**20  # documents up to this size are parsed in one call
MIN_ARRAY = 4 * PIECE  # smaller arrays stay in the skeleton
MAX_NESTING = 40  # big elements inside big elements, followed this deep
PIECE_ELEMENTS = 16384  # numbers written per orjson call
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_SPACE = re.compile(rb"[ \t\n\r]*")
_DEPTH = np.zeros(256, dtype=np.int8)
_DEPTH[list(b"[{")] = 1
_DEPTH[list(b"]}")] = -1
_COMMA, _OPEN, _QUOTE, _BACKSLASH = b",[\"\\"


class InvalidJSON(ValueError):
    """A piece of a large document is not valid JSON (the message says where)."""


class _Whole(Exception):
    """This array cannot be split here: leave it to the skeleton's parse."""


def loads(body: bytes):
    """``orjson.loads(body)``, in pieces when ``body`` is large (see the module's doc)."""
    if len(body) <= SMALL:
        return orjson.loads(body)
    arrays: list = []
    try:
        arrays.extend(_large_arrays(body))
        if not arrays:
            return orjson.loads(body)
        token = secrets.token_hex(8)
        parts, pos, values = [], 0, {}
        for index, (start, end, value) in enumerate(arrays):
            parts += (body[pos:start], b'"\\u0000%s:%d"' % (token.encode(), index))
            values[f"\x00{token}:{index}"] = value
            pos = end
        parts.append(body[pos:])
        doc = orjson.loads(b"".join(parts))
    except BaseException:  # a bad document: what was read of it is freed a slice at a time
        release([value for _, _, value in arrays])
        raise
    _put_back(doc, values)
    return doc


def _put_back(doc, values: dict) -> None:
    """Replace each placeholder string in ``doc`` by its array (a walk of the skeleton)."""
    stack = [doc]
    while stack and values:
        node = stack.pop()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, str):
                if value in values:
                    node[key] = values.pop(value)
            elif isinstance(value, (dict, list)):
                stack.append(value)


def _large_arrays(body: bytes):
    """(start, end, value) of each large array that holds no other large array."""
    for start, end in _leaf_spans(body):
        try:
            value, stop = _array(body, start, 0)
        except _Whole:
            continue  # it stays in the skeleton
        if stop != end:  # only in a document orjson refuses: let it say why
            release(value)
            continue
        yield start, end, value


def _leaf_spans(body: bytes) -> list[tuple[int, int]]:
    """The spans of the arrays of at least MIN_ARRAY bytes that hold no other such array, in
    one pass over the body a window at a time, carrying the brackets still open from one
    window to the next (few: the rows of a tensor open and close inside one window)."""
    spans: list[tuple[int, int]] = []
    open_at: list[tuple[int, bool]] = []  # (position, is an array) of each bracket still open
    in_string, run = False, 0
    for pos in range(0, len(body), PIECE):
        window = np.frombuffer(body, dtype=np.uint8, count=min(PIECE, len(body) - pos),
                               offset=pos)
        outside, in_string, run = _strings(window, in_string, run)
        delta = _DEPTH[window] if outside is None else _DEPTH[window] * outside
        depth = np.cumsum(delta, dtype=np.int32)
        for level in range(-1, int(depth.min()) - 1, -1):  # brackets opened in earlier windows
            if not open_at:
                return spans  # more closing brackets than opening ones: orjson will say so
            start, is_array = open_at.pop()
            end = pos + int(np.argmax(depth == level)) + 1
            if is_array and end - start >= MIN_ARRAY and not (spans and spans[-1][0] > start):
                spans.append((start, end))
        still_open = np.minimum.accumulate(depth[::-1])[::-1] >= depth
        for index in np.flatnonzero((delta > 0) & still_open).tolist():
            open_at.append((pos + index, window[index] == _OPEN))
        pause()
    return spans


def _strings(window: np.ndarray, in_string: bool, run: int):
    """Which bytes of ``window`` lie outside strings (None: all of them), whether it ends
    inside a string, and the run of backslashes it ends with, given the same of the bytes
    before it. A quote counts unless an odd run of backslashes comes just before it."""
    quotes = window == _QUOTE
    backslashes = window == _BACKSLASH
    if not in_string and not run and not quotes.any():
        return None, False, 0
    index = np.arange(window.size)
    if run or backslashes.any():
        last_other = np.maximum.accumulate(np.where(backslashes, -1 - run, index))
        ending = index - last_other  # the run of backslashes ending at each byte
        before = np.concatenate(([run], ending[:-1]))
        quotes &= before % 2 == 0
        run = int(ending[-1])
    toggles = np.cumsum(quotes, dtype=np.int32) + in_string
    return toggles % 2 == 0, bool(toggles[-1] % 2), run


def _array(body: bytes, start: int, nesting: int) -> tuple[list, int]:
    """The array opening at ``body[start]``: its value and the index just past its closing
    bracket."""
    if nesting > MAX_NESTING:
        raise _Whole
    items: list = []
    try:
        return _elements_of(body, start + 1, nesting, items)
    except BaseException:
        release(items)
        raise


def _elements_of(body: bytes, pos: int, nesting: int, items: list):
    """Read elements from ``pos`` onto ``items``, up to the array's closing bracket."""
    while True:
        size = min(PIECE, len(body) - pos)
        if size <= 0:
            raise _Whole  # the array never closes: orjson will say so
        window = np.frombuffer(body, dtype=np.uint8, count=size, offset=pos)
        outside, _, _ = _strings(window, False, 0)  # pos is between elements
        delta = _DEPTH[window] if outside is None else _DEPTH[window] * outside
        depth = np.cumsum(delta, dtype=np.int32)
        level = depth == 0 if outside is None else (depth == 0) & outside
        closed = np.flatnonzero(depth < 0)
        if closed.size:
            cut = pos + int(closed[0])
        elif (commas := np.flatnonzero((window == _COMMA) & level)).size:
            cut = pos + int(commas[-1])
        else:  # one element longer than the window: read it on its own
            pos = _big_element(body, pos, nesting, items)
            if body[pos - 1] == ord("]"):
                return items, pos
            continue
        _piece(body, pos, cut, items, last=bool(closed.size))
        pos = cut + 1
        if closed.size:
            return items, pos
        pause()


def _piece(body: bytes, pos: int, cut: int, items: list, last: bool) -> None:
    """Parse the elements in ``body[pos:cut]`` onto ``items``; only a whole empty array
    (``[]``) may have a piece without an element."""
    try:
        parsed = orjson.loads(b"[" + body[pos:cut] + b"]")
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"{exc.msg} near byte {pos - 1 + exc.pos}") from None
    if not parsed and (items or not last):
        raise InvalidJSON(f"expected a value at byte {cut}")
    items += parsed


def _big_element(body: bytes, pos: int, nesting: int, items: list) -> int:
    """Read one array element larger than a window (an array: any other is left to orjson)
    onto ``items``: the index just past the comma or bracket that follows it."""
    first = _SPACE.match(body, pos).end()
    if body[first:first + 1] != b"[":
        raise _Whole
    value, end = _array(body, first, nesting + 1)
    items.append(value)
    after = _SPACE.match(body, end).end()
    if body[after:after + 1] not in (b",", b"]"):
        raise _Whole  # let orjson say what is wrong there
    return after + 1


# ---------------------------------------------------------------- freeing


def release(value) -> None:
    """Empty the lists in a parsed document a slice at a time, pausing between slices:
    freeing millions of objects in one go holds the GIL about as long as creating them did.
    Lists (their elements too, when large) are emptied in place, wherever else they are held."""
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, (dict, list)):
                release(item)
        return
    if not isinstance(value, list) or not value:
        return
    per_item = _elements(value[0])
    if per_item > PIECE_ELEMENTS:
        for item in value:
            release(item)
    step = max(1, PIECE_ELEMENTS // per_item)
    while value:
        del value[-step:]
        pause()


def _elements(value) -> int:
    """About how many objects freeing ``value`` frees (read along first elements)."""
    if isinstance(value, dict):
        return 1 + sum(_elements(item) for item in value.values())
    count = 1
    while isinstance(value, list) and value:
        count *= len(value)
        value = value[0]
    return count


_gc_lock = threading.Lock()
_gc_users = 0


@contextmanager
def collector_paused():
    """The cyclic garbage collector off while a large document is read or written: as the
    document's lists pile up, each full collection walks all of them at once, holding the GIL
    for up to a second. Nested and concurrent uses share one pause."""
    global _gc_users
    with _gc_lock:
        ours = _gc_users > 0 or gc.isenabled()  # else someone else turned it off: leave it so
        if ours:
            _gc_users += 1
            gc.disable()
    try:
        yield
    finally:
        if ours:
            with _gc_lock:
                _gc_users -= 1
                if _gc_users == 0:
                    gc.enable()


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class Rows:
    """A JSON array of ``count`` items that ``make(start, stop)`` builds a slice at a time
    (``per_item``: numbers in one item, to size the slices)."""

    count: int
    make: Callable[[int, int], list]
    per_item: int = 1


def dumps(doc: dict) -> bytes:
    """``orjson.dumps(doc, option=OPT_SERIALIZE_NUMPY)``, with each large numpy array and each
    ``Rows`` among the values of ``doc``'s objects (and of lists of a few items) written a
    piece at a time and spliced in. ``doc`` is changed (its large values become placeholders)."""
    token, large = secrets.token_hex(8), []
    stack = [doc]
    while stack:
        node = stack.pop()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, Rows) or (isinstance(value, np.ndarray)
                                           and value.ndim and value.size > PIECE_ELEMENTS):
                node[key] = f"@{token}:{len(large)}@"
                large.append(value)
            elif isinstance(value, dict) or (isinstance(value, list) and len(value) <= 64):
                stack.append(value)
    text = orjson.dumps(doc, option=_NUMPY)
    if not large:
        return text
    pieces = re.split(b'"@%s:([0-9]+)@"' % token.encode(), text)
    parts = [pieces[0]]
    for index, after in zip(pieces[1::2], pieces[2::2], strict=True):
        value = large[int(index)]
        if isinstance(value, Rows):
            _rows_parts(value, parts)
        else:
            _array_parts(value, parts)
        parts.append(after)
    return b"".join(parts)  # of bytes only: CPython then lets go of the GIL while it joins


def _array_parts(array: np.ndarray, parts: list) -> None:
    """The JSON text of ``array`` (at least 1-D), a slice of rows per orjson call."""
    per_row = math.prod(array.shape[1:])
    parts.append(b"[")
    if array.ndim > 1 and per_row > PIECE_ELEMENTS:
        for index in range(len(array)):
            if index:
                parts.append(b",")
            _array_parts(array[index], parts)
    else:
        step = max(1, PIECE_ELEMENTS // max(per_row, 1))
        for start in range(0, len(array), step):
            if start:
                parts.append(b",")
            parts.append(orjson.dumps(array[start:start + step], option=_NUMPY)[1:-1])
            pause()
    parts.append(b"]")


def _rows_parts(rows: Rows, parts: list) -> None:
    step = max(1, PIECE_ELEMENTS // max(rows.per_item, 1))
    parts.append(b"[")
    for start in range(0, rows.count, step):
        if start:
            parts.append(b",")
        items = rows.make(start, min(start + step, rows.count))
        parts.append(orjson.dumps(items, option=_NUMPY)[1:-1])
        pause()
    parts.append(b"]")
