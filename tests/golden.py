"""Golden losses of the embedded default: the first steps of `python -m distsft.train` (tiny Llama, bundled
data, seed 42) as a file, so that a change that moves the numbers without meaning to is caught.

    python -m tests.golden --write     # regenerate tests/assets/golden_tiny.json (after an intended change)

The test (tests/integration/test_golden.py) compares per-step losses with a tolerance of 1e-4 relative:
CPU kernels may round differently across machines, never by that much.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "assets" / "golden_tiny.json"
OVERRIDES = ["trainer.max_steps=12", "logging.log_every=1", "trainer.eval_every=6", "trainer.save_every=0",
             "logging.sample_every=0", "logging.plot=false", "export.enabled=false"]


def measure() -> dict:
    from tests.conftest import run_tiny

    with tempfile.TemporaryDirectory() as tmp:
        s = run_tiny(Path(tmp), *OVERRIDES).summary
    return {"overrides": OVERRIDES, "train_loss": [x for _, x in s["train_loss_history"]],
            "eval_loss": [x for _, x in s["eval_loss_history"]]}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.golden --write")
    GOLDEN.write_text(json.dumps(measure(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
