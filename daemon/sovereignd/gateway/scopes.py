"""Keys limited to some models: the names a key may use, and what such a key sees of /v1/models.

A key's scope is a set of client-facing model names (`sovereignd keys add NAME --models A,B`);
no scope means every model. A request for another model is refused with 403 before it
reaches a server, and `GET /v1/models` lists only the key's models (OpenAI's list shape:
`{"object": "list", "data": [{"id": ...}, ...]}`), so a client never learns of models it
cannot use.
"""

from __future__ import annotations

import re

import orjson

# Served model names as vLLM and vllm-mlx accept them (`--served-model-name`): no spaces or
# commas (the list separator), at most 256 characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")


def parse_models(text: str) -> tuple[str, ...]:
    """`"A,B"` -> ("A", "B"); ValueError naming the first bad name or an empty list."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("--models needs at least one model name (A or A,B)")
    for name in names:
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"invalid model name {name!r}: use letters, digits and . _ : / @ "
                             "+ -, starting with a letter or digit")
    return tuple(dict.fromkeys(names))


def check_models(raw: object, where: str) -> tuple[str, ...] | None:
    """A keys-file `models` value (null or a list of names) checked; ValueError otherwise."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(
            isinstance(n, str) and MODEL_NAME.fullmatch(n) for n in raw):
        raise ValueError(f"{where}: models must be null or a non-empty list of model names")
    return tuple(raw)


def allows(models: frozenset[str] | None, model: str | None) -> bool:
    """True if a key with scope `models` (None: every model) may use `model`."""
    return models is None or model in models


def filter_listing(payload: bytes, models: frozenset[str]) -> bytes:
    """A /v1/models answer with only the scope's models; an answer of another shape becomes
    an empty list (what it names cannot be checked against the scope)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return orjson.dumps({"object": "list", "data": []})
    doc["data"] = [m for m in doc["data"] if isinstance(m, dict) and m.get("id") in models]
    return orjson.dumps(doc)
