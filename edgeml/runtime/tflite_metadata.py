"""The text metadata of a TFLite file (``Model.metadata``), read without LiteRT's schema.

The interpreter does not expose a model's metadata, and ``tflite_runtime`` ships no
flatbuffer schema, so the few tables needed are read here with :mod:`struct`: the
``Model`` root (field 4 ``buffers``, field 6 ``metadata``), ``Metadata`` (``name``,
``buffer``) and ``Buffer`` (``data``, or ``offset``/``size`` past the flatbuffer in
files over 2 GB). Entries whose buffer is not printable UTF-8 text (``min_runtime_version``,
TFLite Support's binary ``TFLITE_METADATA``) are skipped: the agent reads text entries
(``edgeml.name``, ``edgeml.version``, ``edgeml.samples``) as ONNX files carry them.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_U16, _U32, _I32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<i"), struct.Struct("<Q")
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_LAYOUT = str.maketrans("", "", "\n\r\t")


class _Reader:
    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf = buf

    def at(self, fmt: struct.Struct, pos: int) -> int:
        # unpack_from counts a negative offset from the end: a corrupt offset must not
        if not 0 <= pos <= len(self.buf) - fmt.size:
            raise IndexError(f"offset {pos} outside the file")
        return fmt.unpack_from(self.buf, pos)[0]

    def u32(self, pos: int) -> int:
        return self.at(_U32, pos)

    def field(self, table: int, index: int) -> int | None:
        """Position of a table's field, or None when the field is absent."""
        vtable = table - self.at(_I32, table)
        if 4 + 2 * index >= self.at(_U16, vtable):
            return None
        offset = self.at(_U16, vtable + 4 + 2 * index)
        return table + offset if offset else None

    def deref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(position of the first element, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, index)
        if pos is None:
            return 0, 0
        start = self.deref(pos)
        return start + 4, self.u32(start)

    def bytes_at(self, start: int, length: int) -> bytes:
        if start < 0 or start + length > len(self.buf):
            raise IndexError("past the end of the file")
        return bytes(self.buf[start : start + length])


def read_tflite_metadata(path: str | Path) -> dict[str, str]:
    """``{name: text}`` of a TFLite file's text metadata entries; ``{}`` when it has none.

    Raises ``ValueError`` when the file is not a readable TFLite flatbuffer."""
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file
            raise ValueError(f"{path}: empty file") from exc
        try:
            return _read(_Reader(buf))
        except (struct.error, IndexError) as exc:
            raise ValueError(f"{path}: not a readable TFLite flatbuffer ({exc})") from exc
        finally:
            buf.close()


def read_tflite_metadata_bytes(buf: bytes) -> dict[str, str]:
    """:func:`read_tflite_metadata` of a file already in memory."""
    try:
        return _read(_Reader(buf))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"not a readable TFLite flatbuffer ({exc})") from exc


def _read(r: _Reader) -> dict[str, str]:
    model = r.deref(0)
    buffers, n_buffers = r.vector(model, _MODEL_BUFFERS)
    entries, n_entries = r.vector(model, _MODEL_METADATA)
    out: dict[str, str] = {}
    for i in range(n_entries):
        entry = r.deref(entries + 4 * i)
        name_pos = r.field(entry, _METADATA_NAME)
        if name_pos is None:
            continue
        name_at = r.deref(name_pos)
        name = r.bytes_at(name_at + 4, r.u32(name_at)).decode("utf-8", "replace")
        index_pos = r.field(entry, _METADATA_BUFFER)
        index = r.u32(index_pos) if index_pos is not None else 0
        if not 0 < index < n_buffers:
            continue
        raw = _buffer_bytes(r, r.deref(buffers + 4 * index))
        try:
            text = raw.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.translate(_LAYOUT).isprintable():  # JSON may be indented: newlines and tabs are text
            out[name] = text
    return out


def _buffer_bytes(r: _Reader, buffer: int) -> bytes:
    start, length = r.vector(buffer, _BUFFER_DATA)
    if length:
        return r.bytes_at(start, length)
    offset_pos, size_pos = r.field(buffer, _BUFFER_OFFSET), r.field(buffer, _BUFFER_SIZE)
    if offset_pos is None or size_pos is None:
        return b""
    offset, size = r.at(_U64, offset_pos), r.at(_U64, size_pos)
    return r.bytes_at(offset, size) if offset > 1 else b""  # 0 and 1 mean "no data" in TFLite's schema
