"""Cheap structural check of safetensors weight files, reading only their headers.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names
to dtype, shape and `data_offsets` (relative to the end of the header), then the tensor bytes.
Checking that the offsets tile the data area exactly and match each dtype and shape catches
truncated, appended-to and mangled shards in milliseconds, before a multi-GB hash or a
minute-long server start would.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereignd.errors import WeightsError

#: Largest header accepted; the safetensors library refuses larger ones too.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of each dtype safetensors knows (sub-byte types pack elements).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class SafetensorsInfo:
    """What a valid header says about its file."""

    path: Path
    header_bytes: int
    data_bytes: int
    tensors: int
    #: dtypes this check does not know (a newer format); their sizes were not checked.
    unknown_dtypes: tuple[str, ...] = ()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"tensor {key!r} appears twice")
        out[key] = value
    return out


def check_safetensors(path: Path) -> SafetensorsInfo:
    """Check one safetensors file's header against its size; raise WeightsError naming the file.

    Reads at most 8 bytes plus the header, never the tensor data.
    """

    def bad(why: str) -> WeightsError:
        return WeightsError(str(path), why, "the file is corrupt or incomplete: restore it from "
                            "the approved copy")

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"truncated: {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise bad(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit "
                          "(not a safetensors file, or its first bytes are damaged)")
            if 8 + header_len > size:
                raise bad(f"truncated: header says it ends at byte {8 + header_len}, file has "
                          f"{size}")
            raw = f.read(header_len)
    except OSError as exc:
        raise WeightsError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_bytes = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    unknown: set[str] = set()
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise bad("__metadata__ is not a JSON object")
            continue
        spans.append(_tensor_span(name, info, unknown, bad))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin > end:
            raise bad(f"gap in the data area: bytes {end}..{begin} belong to no tensor "
                      f"(before {name!r})")
        if begin < end:
            raise bad(f"tensor {name!r} overlaps the previous tensor (starts at {begin}, "
                      f"previous ends at {end})")
        end = stop
    if end > data_bytes:
        raise bad(f"truncated: header says data ends at {8 + header_len + end} bytes, file has "
                  f"{size}")
    if end < data_bytes:
        raise bad(f"{data_bytes - end} bytes after the last tensor: header says data ends at "
                  f"{8 + header_len + end} bytes, file has {size} (appended to?)")
    return SafetensorsInfo(path=path, header_bytes=header_len, data_bytes=data_bytes,
                           tensors=len(spans), unknown_dtypes=tuple(sorted(unknown)))


def _tensor_span(name: str, info: object, unknown: set[str],
                 bad: Callable[[str], WeightsError]) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor entry after checking its fields and byte length."""
    if not isinstance(info, dict):
        raise bad(f"tensor {name!r}: entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"tensor {name!r}: dtype missing or not a string")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}] run backwards")
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        unknown.add(dtype)
    else:
        nbits = math.prod(shape) * bits
        if nbits % 8 or nbits // 8 != end - begin:
            raise bad(f"tensor {name!r}: {dtype} {shape} needs {nbits / 8:g} bytes, "
                      f"data_offsets give {end - begin}")
    return begin, end, name


def check_safetensors_files(files: Mapping[str, Path]) -> dict[str, WeightsError]:
    """Check every `*.safetensors` among `files` (relative name → path to read).

    Returns the problems by relative name; an empty dict means every header is sound. Pass
    `manifest.list_model_files(model_dir).files` to check a model folder.
    """
    problems: dict[str, WeightsError] = {}
    for rel, path in sorted(files.items()):
        if rel.endswith(".safetensors"):
            try:
                check_safetensors(path)
            except WeightsError as exc:
                problems[rel] = exc
    return problems
