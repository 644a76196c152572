"""The embedded default's first losses match the golden file (tests/golden.py says how to regenerate it)."""

from __future__ import annotations

import json

import pytest

from tests.golden import GOLDEN, OVERRIDES, measure


def test_embedded_default_matches_the_golden_losses():
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "the golden file was made with other settings: regenerate it"
    now = measure()
    assert len(now["train_loss"]) == len(golden["train_loss"]) == 12
    assert now["train_loss"] == pytest.approx(golden["train_loss"], rel=1e-4), \
        "the embedded default trains differently: if intended, run `python -m tests.golden --write`"
    assert now["eval_loss"] == pytest.approx(golden["eval_loss"], rel=1e-4)
