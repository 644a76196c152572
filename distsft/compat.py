"""Declared patches: where distsft changes or mends a third-party library's behaviour, the versions it was checked
on. ``checked(package, versions, what)`` is called where the patch is applied and logs a warning, once per patch,
when the installed version is outside them (the patch may then be wrong or unneeded: run the tests that name it).

    patch                                             package     checked on   tested by
    model.fp8: Float8Linear's forward replaced        torchao     0.17, 0.18   tests/unit/test_fp8.py (bit-equal)
    trainer.reshape: ZeRO-3 universal loader's        deepspeed   0.19         tests/integration/test_deepspeed.py
      shared `step` tensor and group hyperparameters
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger("distsft")
_warned: set[str] = set()


def checked(package: str, versions: tuple[str, ...], what: str) -> bool:
    """Whether the installed ``package`` is one of ``versions`` (major.minor prefixes); warns once if not."""
    try:
        installed = version(package)
    except PackageNotFoundError:
        return False
    if any(installed == v or installed.startswith(v + ".") for v in versions):
        return True
    if what not in _warned:
        _warned.add(what)
        log.warning("%s patches %s, checked on %s; %s is installed: the patch may be wrong or no longer needed "
                    "(see distsft/compat.py for the test that covers it)", what, package, ", ".join(versions),
                    installed)
    return False
