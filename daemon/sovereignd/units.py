"""Parse durations ("500ms", "5s", "10m") and sizes ("64MiB") as the configuration writes them."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_duration(value: object) -> float:
    """Return seconds for a number of seconds or a string such as "500ms", "5s", "10m", "1d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s, 500ms or 10m, not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 5s, 500ms or 10m, got {value!r}")


def parse_size(value: object) -> int:
    """Return bytes for an integer or a string such as "64MiB", "1GB", "512KiB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB or 1048576, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "b").lower()
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size such as 64MiB, 1GB or a number of bytes, got {value!r}")


def format_duration(seconds: float) -> str:
    """Render seconds the way the configuration would write them."""
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= scale and seconds % scale == 0:
            return f"{int(seconds // scale)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """Render bytes with a binary unit where it divides exactly."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def human_size(size: float) -> str:
    """Render bytes for people, e.g. "1.5 GiB", "640 KiB", "12 B"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def human_rate(size: float, seconds: float) -> str:
    """Throughput in decimal GB/s, the unit hashing benchmarks are quoted in."""
    return f"{size / seconds / 1e9:.2f} GB/s" if seconds > 0 else "n/a"
