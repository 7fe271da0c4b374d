"""A fast, header-only GGUF metadata reader.

gguf.GGUFReader builds numpy views for every vocabulary entry, which takes seconds for a
150k-token vocabulary; launching must not. This reads the key/value section and the tensor
table straight from a memory map, keeps scalars, and keeps arrays only when asked for.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Iterable

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


def read_gguf_header(path: str | Path, keep_arrays: Iterable[str] = ()) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Return (metadata, tensor shapes). Arrays are kept only for keys in `keep_arrays`."""
    keep = set(keep_arrays)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{path} does not start with the GGUF magic bytes")
        version, = struct.unpack_from("<I", buf, 4)
        if version < 2:
            raise GGUFFormatError(f"GGUF version {version} is too old; reconvert the model")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        offset = 24

        def read_string(at: int) -> tuple[str, int]:
            length, = struct.unpack_from("<Q", buf, at)
            at += 8
            return bytes(buf[at:at + length]).decode("utf-8", errors="replace"), at + length

        def read_value(kind: int, at: int, want: bool) -> tuple[Any, int]:
            if kind in _SCALARS:
                fmt = _SCALARS[kind]
                return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)
            if kind == _STRING:
                return read_string(at)
            if kind == _ARRAY:
                item_kind, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item_kind in _SCALARS and not want:
                    return None, at + count * struct.calcsize(_SCALARS[item_kind])
                items = []
                for _ in range(count):
                    if item_kind == _STRING and not want:
                        length, = struct.unpack_from("<Q", buf, at)
                        at += 8 + length
                        continue
                    value, at = read_value(item_kind, at, want)
                    items.append(value)
                return (items if want else None), at
            raise GGUFFormatError(f"unknown GGUF value type {kind}")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, offset = read_string(offset)
            kind, = struct.unpack_from("<I", buf, offset)
            offset += 4
            value, offset = read_value(kind, offset, key in keep)
            if value is not None:
                metadata[key] = value
        tensors: dict[str, list[int]] = {}
        for _ in range(n_tensors):
            name, offset = read_string(offset)
            n_dims, = struct.unpack_from("<I", buf, offset)
            offset += 4
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, offset))
            offset += 8 * n_dims + 4 + 8  # dims, ggml type, data offset
            tensors[name] = dims
    return metadata, tensors
