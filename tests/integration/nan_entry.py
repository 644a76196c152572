"""``accelerate launch -m tests.integration.nan_entry key=value ...``: distsft.train, with the loss of the
micro-batches numbered in DISTSFT_TEST_NAN_CALLS (per process, from 1) made NaN, for the multi-process
guard tests (a monkeypatch cannot reach launched processes). ``nan_on_calls`` is the in-process form.
DISTSFT_TEST_NAN_RANK poisons one rank only; DISTSFT_TEST_NAN_KIND=inf gives an infinite loss with finite
gradients instead of NaN."""

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


def infinite_on_calls(forward_losses, bad):
    """forward_losses whose n-th call gives an infinite cross-entropy with finite gradients (a constant added),
    as a -inf logit on a target does: only the loss says something is wrong."""
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        ce, balance = forward_losses(model, batch)
        return (ce + math.inf if calls["n"] in bad else ce), balance

    return poisoned


if __name__ == "__main__":
    import distsft.trainer.step as step
    from distsft.train import main

    bad = {int(x) for x in os.environ["DISTSFT_TEST_NAN_CALLS"].split(",")}
    rank = os.environ.get("DISTSFT_TEST_NAN_RANK")  # only this rank's loss, if given
    if rank is None or rank == os.environ.get("RANK"):
        poison = infinite_on_calls if os.environ.get("DISTSFT_TEST_NAN_KIND") == "inf" else nan_on_calls
        step.forward_losses = poison(step.forward_losses, bad)
    main()
