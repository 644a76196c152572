"""Declared patches warn when the installed library is outside the versions they were checked on."""

from __future__ import annotations

import logging

from distsft.compat import checked


def test_a_patch_warns_once_outside_its_checked_versions(caplog):
    from importlib.metadata import version

    caplog.set_level(logging.WARNING)
    installed = ".".join(version("torch").split(".")[:2])
    assert checked("torch", (installed,), "a patch on the installed torch")
    assert not caplog.records
    assert not checked("torch", ("0.1",), "a patch on an old torch")
    assert not checked("torch", ("0.1",), "a patch on an old torch")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "checked on 0.1" in warned[0] and "a patch on an old torch" in warned[0]
