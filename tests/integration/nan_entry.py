"""``accelerate launch -m tests.integration.nan_entry key=value ...``: distsft.train, with the loss of the
micro-batches numbered in DISTSFT_TEST_NAN_CALLS (per process, from 1) made NaN, for the multi-process
guard tests (a monkeypatch cannot reach launched processes). ``nan_on_calls`` is the in-process form."""

from __future__ import annotations

import math
import os


def nan_on_calls(forward_losses, bad):
    """trainer.step.forward_losses whose n-th call (from 1) gives a NaN cross-entropy for every n in ``bad``
    ("all": every call)."""
    return scale_calls(forward_losses, lambda n: math.nan if n in bad or "all" in bad else 1.0)


def scale_calls(forward_losses, factor):
    """forward_losses whose n-th call (from 1) has its cross-entropy sum multiplied by factor(n)."""
    calls = {"n": 0}

    def scaled(model, batch):
        calls["n"] += 1
        ce, balance = forward_losses(model, batch)
        return ce * factor(calls["n"]), balance

    return scaled


if __name__ == "__main__":
    import distsft.trainer.step as step
    from distsft.train import main

    bad = {int(x) for x in os.environ["DISTSFT_TEST_NAN_CALLS"].split(",")}
    step.forward_losses = nan_on_calls(step.forward_losses, bad)
    main()
