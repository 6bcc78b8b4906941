"""Fixtures: daemons under test are always stopped, and fail the test if they leak."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(overrides: dict[str, Any] | None = None, behaviour: dict[str, Any] | None = None,
             name: str = "d", **kw: Any) -> Daemon:
        d = Daemon(tmp_path / name, overrides, behaviour, **kw)
        made.append(d)
        return d

    yield make
    errors = []
    for d in made:
        try:
            d.close()
        except AssertionError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors))
