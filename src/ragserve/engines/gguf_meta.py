"""The one GGUF metadata reader: a fast, header-only parser and the facts every part needs.

gguf.GGUFReader builds numpy views for every vocabulary entry, which takes seconds for a
150k-token vocabulary; launching must not. This reads the key/value section and the tensor
table straight from a memory map, keeps scalars, and keeps arrays only when asked for.
`gguf_facts` turns a header into the facts the engines, the Qwen3 family detector and the
memory planner use. A file that cannot be read is a GGUFFormatError naming the file and the fix.
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
    """Return (metadata, tensor shapes). Arrays are kept only for keys in `keep_arrays` (an entry
    starting with "*" keeps every key ending with the rest)."""
    try:
        return _read_header(path, keep_arrays)
    except GGUFFormatError:
        raise
    except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise GGUFFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}): check the path, "
                              f"or pull the model again if the download was cut") from exc


def _read_header(path: str | Path, keep_arrays: Iterable[str]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    keep = {k for k in keep_arrays if not k.startswith("*")}
    suffixes = tuple(k[1:] for k in keep_arrays if k.startswith("*"))
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{path} does not start with the GGUF magic bytes: it is not a GGUF file "
                                  f"(or the download is damaged); point --model-path at a .gguf file")
        version, = struct.unpack_from("<I", buf, 4)
        if version < 2:
            raise GGUFFormatError(f"{path}: GGUF version {version} is too old; reconvert the model")
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
            raise GGUFFormatError(f"{path}: unknown GGUF value type {kind}; the file is damaged or from a newer "
                                  f"format: pull it again")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, offset = read_string(offset)
            kind, = struct.unpack_from("<I", buf, offset)
            offset += 4
            value, offset = read_value(kind, offset, key in keep or (bool(suffixes) and key.endswith(suffixes)))
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


def gguf_facts(path: str | Path, *, tokens: bool = False) -> dict[str, Any]:
    """What the engines, the family detector and the memory planner read from a GGUF header.

    `fields` keeps the raw scalars (architecture-specific keys such as `<arch>.block_count`);
    `tokens=True` also reads the vocabulary (slower on 150k-token models).
    """
    keep = ["*.classifier.output_labels"] + (["tokenizer.ggml.tokens"] if tokens else [])
    fields, tensors = read_gguf_header(path, keep_arrays=keep)
    arch = str(fields.get("general.architecture") or "")
    cls_shape = tensors.get("cls.output.weight")
    return {
        "path": str(path),
        "architecture": arch,
        "name": fields.get("general.name"),
        "basename": fields.get("general.basename"),
        "file_type": fields.get("general.file_type"),
        "context_length": fields.get(f"{arch}.context_length"),
        "embedding_length": fields.get(f"{arch}.embedding_length"),
        "pooling_type": fields.get(f"{arch}.pooling_type"),
        "has_classifier": any(name.split(".")[0] == "cls" for name in tensors),
        "classifier_outputs": (cls_shape[1] if len(cls_shape) > 1 else 1) if cls_shape else None,
        "classifier_labels": fields.get(f"{arch}.classifier.output_labels"),
        "has_chat_template": "tokenizer.chat_template" in fields,
        "chat_template": fields.get("tokenizer.chat_template"),
        "has_rerank_template": "tokenizer.chat_template.rerank" in fields,
        "tokens": fields.get("tokenizer.ggml.tokens") if tokens else None,
        "fields": fields,
        "tensors": tensors,
    }
