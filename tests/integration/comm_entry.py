"""``accelerate launch -m tests.integration.comm_entry key=value ...``: distsft.train with torch's profiler recording
the collectives of optimizer steps 3 and 4 (after warm-up: DeepSpeed and FSDP2 set up buffers in the first steps)
into ``output_dir/comm/rank_<r>.json``: one [operation, dtype, input shapes] per collective call, as the profiler
sees it below every wrapper (gloo's own record of each call; DDP's C++ buckets included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

FIRST, LAST = 3, 4

if __name__ == "__main__":
    from torch.profiler import ProfilerActivity, profile

    import distsft.trainer.loop as loop
    from distsft.train import main

    step, calls, box = loop.train_step, [0], {}

    def profiled(model, micro_batches, accelerator, *args, **kwargs):
        calls[0] += 1
        if calls[0] == FIRST:
            box["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            box["prof"].__enter__()
        out = step(model, micro_batches, accelerator, *args, **kwargs)
        if calls[0] == LAST:
            prof = box.pop("prof")
            prof.__exit__(None, None, None)
            out_dir = Path(next(a.split("=", 1)[1] for a in os.sys.argv if a.startswith("output_dir="))) / "comm"
            out_dir.mkdir(parents=True, exist_ok=True)
            trace = out_dir / f"trace_{os.environ.get('RANK', '0')}.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
            trace.unlink()
            ops = [[e["name"], (e.get("args", {}).get("Input type") or [""])[0], e.get("args", {}).get("Input Dims")]
                   for e in events if str(e.get("name", "")).startswith("gloo:")]
            (out_dir / f"rank_{os.environ.get('RANK', '0')}.json").write_text(json.dumps(ops))
        return out

    loop.train_step = profiled
    main()
