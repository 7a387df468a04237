"""Protocol buffers wire format, by hand: enough to write a gnostic OpenAPI v2 document and read the
`k8s\\x00`-enveloped bodies kubectl's typed clients send."""

from __future__ import annotations

from collections.abc import Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """Bytes that are not valid protobuf."""


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(num: int, wire: int) -> bytes:
    return varint(num << 3 | wire)


def field_bytes(num: int, data: bytes) -> bytes:
    return tag(num, LEN) + varint(len(data)) + data


def field_str(num: int, text: str) -> bytes:
    return field_bytes(num, text.encode())


def field_varint(num: int, n: int) -> bytes:
    return tag(num, VARINT) + varint(n)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtoError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtoError("varint too long")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value): ints for VARINT/I32/I64, bytes for LEN."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        num, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
            yield num, wire, value
        elif wire == LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ProtoError("truncated length-delimited field")
            yield num, wire, data[pos:pos + size]
            pos += size
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if pos + width > len(data):
                raise ProtoError("truncated fixed-width field")
            yield num, wire, int.from_bytes(data[pos:pos + width], "little")
            pos += width
        else:
            raise ProtoError(f"unsupported wire type {wire}")


def signed(n: int, bits: int = 64) -> int:
    """A varint read back as a signed two's complement integer."""
    n &= (1 << bits) - 1
    return n - (1 << bits) if n >> (bits - 1) else n
