"""Unit tests for bigjson: large JSON read and written in pieces, exactly as orjson would.

The sizes that make a document "large" are lowered here, so that documents of a few kilobytes
take every path that a request of many megabytes takes in a worker.
"""

import gc

import numpy as np
import orjson
import pytest

from mserve.daemon.protocol import bigjson


class CountingOrjson:
    """orjson with its calls' sizes recorded (to see that a document went in pieces)."""

    JSONDecodeError = orjson.JSONDecodeError
    OPT_SERIALIZE_NUMPY = orjson.OPT_SERIALIZE_NUMPY

    def __init__(self):
        self.sizes = []

    def loads(self, text):
        self.sizes.append(len(text))
        return orjson.loads(text)

    def dumps(self, value, option=None):
        text = orjson.dumps(value, option=option)
        self.sizes.append(len(text))
        return text


@pytest.fixture
def small(monkeypatch) -> CountingOrjson:
    """Pieces of 64 bytes; documents over 256 bytes and arrays over 128 bytes are large."""
    monkeypatch.setattr(bigjson, "PIECE", 64)
    monkeypatch.setattr(bigjson, "SMALL", 256)
    monkeypatch.setattr(bigjson, "MIN_ARRAY", 128)
    monkeypatch.setattr(bigjson, "PIECE_ELEMENTS", 8)
    counting = CountingOrjson()
    monkeypatch.setattr(bigjson, "orjson", counting)
    return counting


def text(value) -> bytes:
    return orjson.dumps(value)


ROWS = [[i, -i, i * 0.5, 1e-3] for i in range(60)]
DOCUMENTS = {
    "flat": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [300],
                         "data": [i * 0.25 for i in range(300)]}]},
    "rows": {"instances": ROWS},
    "one big row": {"instances": [[list(range(200))]], "id": "r"},
    "rows of big rows": {"data": [[list(range(40)) for _ in range(3)] for _ in range(4)]},
    "two arrays and strings": {"a": list(range(100)), "s": "x\\\"y[1,2]", "b": [[1, 2]] * 50,
                               "t": ["[", "]", ","] * 3},
    "literals and objects": {"v": [True, False, None, {}, [], 1, -0.0, 2e10] * 20},
    "empty and nested empties": {"e": [], "n": [[]] * 80, "deep": [[[[1]]]] * 40},
    "escapes before": {"id": "a\\\\", "q": "\"", "data": list(range(150))},
}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_loads_equals_orjson_and_goes_in_pieces(small, name):
    body = text(DOCUMENTS[name])
    assert len(body) > 256
    assert bigjson.loads(body) == orjson.loads(body)
    assert max(small.sizes) < len(body) / 2  # no call parsed most of the document


def test_loads_keeps_whitespace_and_pretty_printing(small):
    doc = DOCUMENTS["rows"]
    pretty = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    spaced = pretty.replace(b",", b" ,\n\t ").replace(b"[", b"[ \r\n")
    for body in (pretty, spaced):
        assert bigjson.loads(body) == doc
        assert len(small.sizes) > 2


def test_loads_of_a_small_document_is_one_call(small):
    assert bigjson.loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert small.sizes == [13]


TRICKY = ["v", "[", "]", ",", "{", "}", '"', "\\", '\\"', "\\\\", 'a\\"b', "é", "\u2028",
          "x, y", '",', '"]', "\\]", "", " "]


@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_strings_with_brackets_commas_quotes_and_escapes(small, ensure_ascii):
    import json
    strings = {"data": [TRICKY[i % len(TRICKY)] + str(i) for i in range(300)],
               "rows": [[TRICKY[i % len(TRICKY)], i] for i in range(100)], "id": '\\"['}
    body = json.dumps(strings, ensure_ascii=ensure_ascii).encode()
    assert bigjson.loads(body) == strings
    assert max(small.sizes) < len(body) / 2
    for cut in (len(body) // 3, len(body) // 2):  # damaged inside the arrays
        for damage in (b'"', b"\\", b",", b"]"):
            bad = body[:cut] + damage + body[cut:]
            try:
                expected = orjson.loads(bad)
            except orjson.JSONDecodeError:
                with pytest.raises((orjson.JSONDecodeError, bigjson.InvalidJSON)):
                    bigjson.loads(bad)
            else:
                assert bigjson.loads(bad) == expected


GOOD = (b'{"id": "x", "v": [' + b", ".join([b"[1, 2], [3, 4]"] * 30)
        + b", 1, 2, 3, 5, 6, 8, 9, 7]}")


@pytest.mark.parametrize("old, new", [
    (b"1, 2, 3", b"1, 2,, 3"),  # an empty element
    (b"7]}", b"7,]}"),  # a trailing comma
    (b"[1, 2], [3", b"[1, 2] [3"),  # a missing comma
    (b"5, 6", b"5, x6"),  # garbage
    (b"8, 9", b"8, 9."),  # a bad number
    (b"7]}", b"7}"),  # the array never closes
    (b"7]}", b"7]"),  # the document never closes
    (b"[1, 2], [3", b"[1, 2]], [3"),  # a bracket too many
])
def test_loads_refuses_what_orjson_refuses(small, old, new):
    assert bigjson.loads(GOOD) == orjson.loads(GOOD)
    assert old in GOOD
    bad = GOOD.replace(old, new, 1)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(bad)
    with pytest.raises((orjson.JSONDecodeError, bigjson.InvalidJSON)):
        bigjson.loads(bad)


def test_a_bad_piece_says_where(small):
    body = b'{"v": [' + b"1, " * 100 + b"nope, 2]}"
    with pytest.raises(bigjson.InvalidJSON, match="near byte"):
        bigjson.loads(body)


def test_a_placeholder_a_client_sends_stays_a_string(small):
    doc = {"s": "\x00deadbeef:0", "v": list(range(100))}
    assert bigjson.loads(text(doc)) == doc


def test_dumps_equals_orjson_in_pieces(small):
    arrays = {"flat": np.arange(100, dtype=np.float32), "rows": np.ones((30, 3), np.int64),
              "big rows": np.arange(60, dtype=np.float64).reshape(2, 3, 10),
              "small": np.arange(3), "empty": np.zeros((0, 4)), "scalar": np.float32(2)}
    doc = {"outputs": [{"name": name, "data": array} for name, array in arrays.items()],
           "meta": {"deep": arrays["rows"]}}
    expected = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    assert bigjson.dumps(doc) == expected
    assert max(small.sizes) < len(expected) / 2


def test_dumps_rows_are_built_a_slice_at_a_time(small):
    made = []

    def make(start, stop):
        made.append((start, stop))
        return [{"i": i, "v": [i, i]} for i in range(start, stop)]

    rows = bigjson.Rows(50, make, per_item=3)
    assert orjson.loads(bigjson.dumps({"predictions": rows})) == {"predictions": make(0, 50)}
    assert len(made) > 3 and made[-2] == (48, 50)


def test_release_empties_lists_in_place(small):
    inner = [list(range(100))]
    doc = {"a": [[1, 2]] * 40, "b": {"c": inner}, "d": inner[0], "s": "x"}
    bigjson.release(doc)
    assert doc == {"a": [], "b": {"c": []}, "d": [], "s": "x"}


def test_collector_paused_nests_and_restores():
    assert gc.isenabled()
    with bigjson.collector_paused():
        with bigjson.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with bigjson.collector_paused():
            pass
        assert not gc.isenabled()  # someone else turned it off: it stays off
    finally:
        gc.enable()


def random_value(rng, depth=0):
    kind = rng.random()
    if depth > 2 or kind < 0.35:
        return rng.choice([rng.randint(-9, 99), rng.random(), True, None,
                           "".join(rng.choice('a,[]{}"\\ :é') for _ in range(rng.randint(0, 4)))])
    if kind < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 12))]
    return {f"k{i}\\\"": random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_random_documents_and_damage_agree_with_orjson(small):
    import json
    import random
    rng = random.Random(13)
    for _ in range(150):
        doc = {"v": [random_value(rng) for _ in range(rng.randint(5, 20))]}
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        assert bigjson.loads(body) == orjson.loads(body)
        cut = rng.randrange(len(body))
        bad = body[:cut] + rng.choice([b"", b'"', b"\\", b",", b"[", b"]", b"x"]) + \
            body[cut + rng.randint(0, 2):]
        try:
            expected = orjson.loads(bad)
        except orjson.JSONDecodeError:
            with pytest.raises((orjson.JSONDecodeError, bigjson.InvalidJSON)):
                bigjson.loads(bad)
        else:
            assert bigjson.loads(bad) == expected
