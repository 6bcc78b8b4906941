"""Safetensors header check: real files pass; truncated, padded and mangled ones are named."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from sovereignd.errors import WeightsError
from sovereignd.integrity import safetensors


def real_file(path: Path) -> Path:
    """A file written by the safetensors library itself, with metadata and mixed dtypes."""
    save_file({"a": np.zeros((2, 3), dtype=np.float32), "b": np.ones(5, dtype=np.int8),
               "c": np.zeros((4, 0), dtype=np.float16), "d": np.ones(3, dtype=np.bool_)},
              str(path), metadata={"format": "np"})
    return path


def crafted(path: Path, header: Any, data: bytes, pad: bytes = b"") -> Path:
    raw = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_file_written_by_safetensors_passes(tmp_path: Path) -> None:
    info = safetensors.check_safetensors(real_file(tmp_path / "m.safetensors"))
    assert info.tensors == 4
    assert info.data_bytes == 24 + 5 + 0 + 3
    assert info.unknown_dtypes == ()


def _reason(path: Path) -> str:
    with pytest.raises(WeightsError) as caught:
        safetensors.check_safetensors(path)
    assert str(path) in str(caught.value)
    return caught.value.reason


def test_truncated_file_says_where_data_should_end(tmp_path: Path) -> None:
    path = real_file(tmp_path / "m.safetensors")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    assert _reason(path) == (f"truncated: header says data ends at {size} bytes, file has "
                             f"{size - 10}")


def test_appended_bytes_are_reported(tmp_path: Path) -> None:
    path = real_file(tmp_path / "m.safetensors")
    with path.open("ab") as f:
        f.write(b"xx")
    assert "2 bytes after the last tensor" in _reason(path)


def test_header_cut_short(tmp_path: Path) -> None:
    path = real_file(tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    assert _reason(path).startswith("truncated: header says it ends at byte")


def test_file_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    assert "shorter than the 8-byte header length" in _reason(path)


def test_absurd_header_length(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert "exceeds the 100000000-byte limit" in _reason(path)


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    assert "not valid JSON" in _reason(path)


def test_header_that_is_not_an_object(tmp_path: Path) -> None:
    assert "not a JSON object" in _reason(crafted(tmp_path / "m.safetensors", [1, 2], b""))


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}
    assert "'b' overlaps the previous tensor" in _reason(
        crafted(tmp_path / "m.safetensors", header, b"\0" * 6))


def test_gap_between_tensors(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}
    assert "gap in the data area: bytes 2..4" in _reason(
        crafted(tmp_path / "m.safetensors", header, b"\0" * 6))


def test_dtype_and_shape_disagree_with_the_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    assert "F32 [2, 2] needs 16 bytes, data_offsets give 8" in _reason(
        crafted(tmp_path / "m.safetensors", header, b"\0" * 8))


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    raw = (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}')
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0")
    assert "appears twice" in _reason(path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"shape": [1], "data_offsets": [0, 1]}, "dtype missing"),
    ({"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}, "not a list of non-negative"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "is not [begin, end]"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}, "run backwards"),
    ("nonsense", "entry is not a JSON object"),
])
def test_malformed_tensor_entries(tmp_path: Path, entry: Any, message: str) -> None:
    reason = _reason(crafted(tmp_path / "m.safetensors", {"t": entry}, b"\0"))
    assert message in reason


def test_unknown_dtype_is_tolerated_but_offsets_still_checked(tmp_path: Path) -> None:
    header = {"t": {"dtype": "F3_FUTURE", "shape": [3], "data_offsets": [0, 2]},
              "__metadata__": {"k": "v"}}
    info = safetensors.check_safetensors(crafted(tmp_path / "m.safetensors", header, b"\0\0",
                                             pad=b"   "))
    assert info.unknown_dtypes == ("F3_FUTURE",)


def test_sub_byte_dtypes_are_sized_in_bits(tmp_path: Path) -> None:
    header = {"t": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}
    assert safetensors.check_safetensors(crafted(tmp_path / "m.safetensors", header, b"\0" * 3))


def test_check_safetensors_files_checks_only_safetensors(tmp_path: Path) -> None:
    good = real_file(tmp_path / "good.safetensors")
    bad = real_file(tmp_path / "bad.safetensors")
    bad.write_bytes(bad.read_bytes()[:-1])
    (tmp_path / "config.json").write_text("{")
    problems = safetensors.check_safetensors_files({"good.safetensors": good,
                                                    "bad.safetensors": bad,
                                                    "config.json": tmp_path / "config.json"})
    assert list(problems) == ["bad.safetensors"]
    assert problems["bad.safetensors"].reason.startswith("truncated")
