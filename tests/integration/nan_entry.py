"""``accelerate launch -m tests.integration.nan_entry key=value ...``: distsft.train, with the loss of the
micro-batches numbered in DISTSFT_TEST_NAN_CALLS (per process, from 1) made NaN, for the multi-process
guard tests (a monkeypatch cannot reach launched processes). ``nan_on_calls`` is the in-process form."""

from __future__ import annotations

import math
import os


def nan_on_calls(forward_loss_sum, bad):
    """forward_loss_sum whose n-th call (from 1) returns NaN for every n in ``bad`` ("all": every call)."""
    calls = {"n": 0}

    def maybe_nan(model, batch):
        calls["n"] += 1
        out = forward_loss_sum(model, batch)
        return out * math.nan if calls["n"] in bad or "all" in bad else out

    return maybe_nan


if __name__ == "__main__":
    import distsft.trainer.loop as loop
    from distsft.train import main

    bad = {int(x) for x in os.environ["DISTSFT_TEST_NAN_CALLS"].split(",")}
    loop.forward_loss_sum = nan_on_calls(loop.forward_loss_sum, bad)
    main()
