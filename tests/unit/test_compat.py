"""Declared patches (distsft.compat): every patch in the registry is checked where it is applied, the versions
installed here are the ones it was checked on, and an installed version outside them warns once at start-up."""

from __future__ import annotations

import logging
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

import distsft.compat as compat

ROOT = Path(__file__).resolve().parents[2]


def test_every_declared_patch_is_checked_where_it_is_applied_and_nothing_else_is():
    calls = set()
    for path in (ROOT / "distsft").rglob("*.py"):
        calls |= set(re.findall(r'checked\("([\w.]+)"\)', path.read_text()))
    assert calls == set(compat.PATCHES)


@pytest.mark.parametrize("name", sorted(compat.PATCHES))
def test_the_installed_libraries_are_the_checked_ones(name):
    """A pin moved in pyproject.toml without the patch being checked again fails here (a package not installed
    here, liger-kernel on CPU, cannot be checked and is skipped by the check itself)."""
    patch = compat.PATCHES[name]
    try:
        installed = version(patch.package)
    except PackageNotFoundError:
        assert not compat.checked(name)
        return
    assert compat.checked(name), f"{patch.package} {installed} is not among {patch.versions} for {name}"


def test_an_installed_version_outside_the_checked_ones_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(compat, "version", lambda package: "99.0.1")
    monkeypatch.setattr(compat, "_warned", set())
    caplog.set_level(logging.WARNING, logger="distsft")
    assert not compat.checked("model.head")
    assert not compat.checked("model.head")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "model.head: distsft patches transformers" in warned[0]
    assert "checked on transformers 5.25; 99.0.1 is installed" in warned[0]


def test_a_run_with_an_unchecked_library_says_so_at_start_up(monkeypatch, caplog, tmp_path):
    """The embedded run installs the head patch: with transformers' version string out of range, its start-up
    says so."""
    from tests.conftest import run_tiny

    real = compat.version
    monkeypatch.setattr(compat, "version", lambda p: "4.0.0" if p == "transformers" else real(p))
    monkeypatch.setattr(compat, "_warned", set())
    caplog.set_level(logging.WARNING, logger="distsft")
    run_tiny(tmp_path, "trainer.max_steps=1", "trainer.eval_every=0", "logging.sample_every=0", "export.enabled=false")
    assert any("model.head: distsft patches transformers" in r.getMessage() for r in caplog.records)
