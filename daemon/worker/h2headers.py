"""HTTP/2 header blocks (HPACK, RFC 7541) for the worker's own gRPC front end (h2.py).

Requests are decoded with the ``hpack`` package behind a cache keyed by the block's bytes:
gRPC clients send the same request headers on every call, as references into the dynamic
table once they were seen, so the cache answers nearly every call. An entry is used only
while the decoder's dynamic table is the one it was decoded with (``CountedTable`` counts its
changes). Answers are encoded without the dynamic table (static references and plain
literals), so the encoder keeps no state.
"""

from __future__ import annotations

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.table import HeaderTable

MAX_HEADER_BLOCK = 64 * 1024  # the largest header list we take (advertised)
CACHE_ENTRIES = 256


class BadHeaderBlock(Exception):
    """A block HPACK cannot decode: the connection's COMPRESSION_ERROR."""


class CountedTable(HeaderTable):
    """hpack's dynamic table, counting its changes (entries added, size changed), so that a
    cached header block is used only with the table it was decoded with."""

    def __init__(self):
        self.version = 0
        super().__init__()

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    def _set_maxsize(self, value: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, value)

    maxsize = property(HeaderTable.maxsize.fget, _set_maxsize)


class HeaderDecoder:
    """One connection's request header decoding: its HPACK state and the cache."""

    __slots__ = ("decoder", "table", "cache")

    def __init__(self):
        self.decoder = Decoder()
        self.decoder.header_table = self.table = CountedTable()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        self.cache: dict[bytes, tuple[int, list]] = {}

    def decode(self, block: bytes) -> list:
        """The block's (name, value) byte pairs; BadHeaderBlock when it is not HPACK."""
        cached = self.cache.get(block)
        if cached is not None and cached[0] == self.table.version:
            return cached[1]
        version = self.table.version
        try:
            headers = self.decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise BadHeaderBlock(str(exc)) from None
        if self.table.version == version:  # the block left the table as it was
            if len(self.cache) >= CACHE_ENTRIES:
                self.cache.clear()
            self.cache[block] = (version, headers)
        return headers


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with a ``prefix_bits`` prefix, ``first`` holding the high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, with a literal name (no table use)."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


def headers_block(status: int, fields: list[tuple[bytes, bytes]]) -> bytes:
    """``:status`` (a static table reference for 200) and ``fields`` as literals."""
    head = b"\x88" if status == 200 else b"\x08" + _integer(3, 7, 0) + str(status).encode()
    return head + b"".join(literal(name, value) for name, value in fields)
