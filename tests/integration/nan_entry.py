"""``accelerate launch -m tests.integration.nan_entry key=value ...``: distsft.train, with the loss of the
micro-batches numbered in DISTSFT_TEST_NAN_CALLS (per process, from 1) made NaN, for the multi-process
guard tests (a monkeypatch cannot reach launched processes)."""

from __future__ import annotations

import math
import os

import distsft.trainer.loop as loop
from distsft.train import main

BAD = {int(x) for x in os.environ.get("DISTSFT_TEST_NAN_CALLS", "").split(",") if x}
_real, _calls = loop.forward_loss_sum, {"n": 0}


def _maybe_nan(model, batch):
    _calls["n"] += 1
    out = _real(model, batch)
    return out * math.nan if _calls["n"] in BAD else out


loop.forward_loss_sum = _maybe_nan

if __name__ == "__main__":
    main()
