"""Fixtures shared by the unit tests."""

from __future__ import annotations

import textwrap

import pytest

from tests.unit.helpers import DevPKI, make_pki


@pytest.fixture
def dev_pki(tmp_path) -> DevPKI:
    """A CA in C{tmp_path/pki} that issues certificates next to it."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path) -> DevPKI:
    """Another CA, which nobody trusts."""
    return make_pki(tmp_path / "other-pki", "other CA")


@pytest.fixture
def write_config(tmp_path):
    """Write a TOML configuration into C{tmp_path/etc} and return its path."""

    def write(text: str, name: str = "fedserver.toml") -> str:
        folder = tmp_path / "etc"
        folder.mkdir(exist_ok=True)
        path = folder / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write
