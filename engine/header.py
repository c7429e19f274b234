"""A package file's header, read with the standard library (the QGIS plugin reads manifests without torch):
the common wrong files named (a pickle is never unpickled), and the manifest as stored."""
from __future__ import annotations

import io
import json
import os
import pickletools
import struct
from pathlib import Path

from geochange.engine.errors import PackageError

METADATA_KEY = "geochange"
# A package's header (its tensors' names and places, the manifest) is 35-45 kB for the zoo's models, about 110 kB for
# M2CD-ConvNeXt-B, and a router holds four such; past this bound it is a broken or hostile file, never parsed: Python's
# JSON takes some 25 times the text's size in memory, inside QGIS too (safetensors' own bound, 100 MB: 2.6 GB).
MAX_HEADER_BYTES = 8 * 2**20

# Bytes of a file parsed to tell a protocol 0/1 pickle: its opening opcodes are enough, and the bound
# keeps a declared length (2**63 bytes) from being read or allocated.
PICKLE_SNIFF_BYTES = 2**16


def _is_pickle(head: bytes, path: Path) -> bool:
    """Whether the file opens as a pickle (``pickletools`` parses it, never runs it): protocol 2 and above
    open with PROTO; protocols 0 and 1 parse to STOP, or cleanly past half of what is read."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    with open(path, "rb") as f:
        prefix = io.BytesIO(f.read(PICKLE_SNIFF_BYTES))
    position = 0
    try:
        for opcode, _, position in pickletools.genops(prefix):
            if opcode.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 (unknown opcodes, absurd lengths, cut short: all end the parse)
        pass
    return position > PICKLE_SNIFF_BYTES // 2


def check_header(path: Path) -> None:
    """Name the common wrong files before safetensors gives a terse error."""
    if not path.is_file():
        raise PackageError(f"{path}: no such model file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head, json_start = f.read(8), f.read(1)
        # torch.save writes a zip ("PK") or a bare pickle; a safetensors file's JSON header starts at byte 8.
        pickled = head[:2] == b"PK" or json_start != b"{" and _is_pickle(head, path)
    except OSError as e:
        raise PackageError(f"{path}: cannot be read ({e.strerror})") from None
    if pickled:
        raise PackageError(f"{path}: this is a PyTorch pickle checkpoint, not a GeoChange package; "
                           "it is never unpickled. Convert it with `geochange import-weights`.")
    if len(head) < 8:
        raise PackageError(f"{path}: not a model package (file of {size} bytes is too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise PackageError(f"{path}: truncated or not a safetensors file (header claims "
                           f"{header_len} bytes, file has {size})")


def read_metadata(path: str | os.PathLike):
    """The manifest in a package's header as stored, of any format and not validated."""
    path = Path(path)
    check_header(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise PackageError(f"{path}: not a model package; its header claims {length} bytes, past the "
                               f"{MAX_HEADER_BYTES // 2**20} MiB any package's takes")
        text = f.read(length)
    try:
        meta = json.loads(text).get("__metadata__") or {}
    except (ValueError, AttributeError, RecursionError) as e:  # RecursionError: JSON nested past Python's stack
        raise PackageError(f"{path}: not a valid safetensors file; it is corrupt or truncated ({e})") from None
    if METADATA_KEY not in meta:
        raise PackageError(f"{path}: a safetensors file without a GeoChange manifest "
                           f"(header metadata key {METADATA_KEY!r} is missing)")
    try:
        manifest = json.loads(meta[METADATA_KEY])
    except (json.JSONDecodeError, TypeError, RecursionError) as e:
        raise PackageError(f"{path}: the manifest is not valid JSON ({e})") from None
    return manifest
