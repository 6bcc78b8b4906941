"""Pytest plugin: the session's real venv, built once and copied by each test that changes it.

Test modules load it with `pytest_plugins = ("tests.pyenvs",)`, so that every module shares one
session fixture (importing the fixture into each module would build one venv per module).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.venvtools import PyEnv, build_base_venv


@pytest.fixture(scope="session")
def pyenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PyEnv]:
    """The base venv: pip + setuptools, two packages by name, one by file, one editable."""
    root = tmp_path_factory.mktemp("pyenv")
    yield build_base_venv(root)
    shutil.rmtree(root, ignore_errors=True)
