"""``accelerate launch -m tests.integration.comm_entry key=value ...``: distsft.train with torch's profiler recording
the collectives of the train_step calls DISTSFT_TEST_PROFILE="first,last" (default 3,4: after warm-up, DeepSpeed and
FSDP2 set up buffers in the first steps) into ``output_dir/comm/rank_<r>.json``: one [operation, dtype, input shapes]
per collective call, as the profiler sees it below every wrapper (gloo's own record of each call; DDP's C++ buckets
included). ``measured`` and ``predicted`` compare them with the plan's communication model (distsft.comm):

    reductions (all-reduce, reduce-scatter; gloo has no reduce-scatter, so DeepSpeed and FSDP2 all-reduce there)
        the model's tensor bytes (``Collective.size``): every rank hands in the whole tensor
    gathers (all-gather)
        the model's tensor bytes / group size: every rank hands in its shard

Held within 5% per kind by tests/integration/test_deepspeed.py (ddp, zero2, zero3, fsdp on 2 processes),
test_hybrid.py (HSDP and ZeRO-3 hpZ on 4, 2 groups x 2) and test_tensor_parallel.py (FSDP2 x tp=2 on 4: TP's
activation all-reduces, the head's logits all-gather and its input-gradient all-reduce besides FSDP2's own).
(Measured 2026-12-07 on the tiny model, fp32: the trainer's own scalar all-reduces are the only extra, < 0.01%;
2026-12-08, tp=2 x dp=2: 0.02% of the reduced bytes, 0.1% of the gathered.)"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

FIRST, LAST = (int(x) for x in os.environ.get("DISTSFT_TEST_PROFILE", "3,4").split(","))

DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
               "unsigned char": 1, "bool": 1}
REDUCTIONS = ("all_reduce", "reduce_scatter", "reduce", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced")


def measured(out: Path, steps: int = 2) -> dict[str, float]:
    """Bytes per optimizer step that rank 0 handed to reductions and to gathers."""
    per = {"reduce": 0.0, "gather": 0.0}
    for name, dtype, dims in json.loads((out / "comm" / "rank_0.json").read_text()):
        if not dtype:  # no tensor (a barrier)
            continue
        op = name.split(":", 1)[1]
        size = sum(math.prod(d) for d in dims or [] if d) * DTYPE_BYTES[dtype]
        kind = "reduce" if op in REDUCTIONS else "gather" if "gather" in op else None
        if kind:
            per[kind] += size / steps
    return per


def head_rows(out: Path) -> float:
    """Rows the output head computed per micro-batch in the profiled steps on rank 0 (its supervised positions)."""
    rows, batches = json.loads((out / "comm" / "head_rows_0.json").read_text())
    return rows / batches


def predicted(layout: str, world: int, shard: int = 0, micro: int = 4, tp: int = 1,
              rows: float | None = None) -> dict[str, float]:
    """The same bytes from distsft.comm's collectives for this layout (one node: every rank on it); under tensor
    parallelism ``rows``: the output head's rows per micro-batch (head_rows)."""
    from distsft.comm import dp_collectives, model_collectives
    from distsft.layouts import Layout, volumes
    from distsft.plan import model_shape
    from tests.conftest import typed_cfg

    cfg = typed_cfg()
    dp = world // tp
    accum = 8 // (micro * dp)
    share = rows / (micro * cfg.data.max_seq_len) if rows is not None else 1.0
    v = volumes(cfg, model_shape(cfg), Layout(layout, tp=tp, shard=shard), micro, accum, sup_share=share)
    per = {"reduce": 0.0, "gather": 0.0}
    for c in dp_collectives(layout, v, dp, dp, shard or dp) + model_collectives(v, tp, 1):
        if c.kind == "all_gather":
            per["gather"] += c.size / c.n
        else:
            per["reduce"] += c.size
    return per


def close_enough(got: dict, want: dict) -> bool:
    """Within 5% per kind; a kind the model expects none of may carry the trainer's own small collectives (a
    checkpoint's gathered checksums in the profiled steps: tens of bytes), under 4 KB."""
    return all(abs(got[k] - want[k]) <= max(0.05 * want[k], 4096.0) for k in want)


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
        if FIRST <= calls[0] <= LAST:  # the output head's rows (its supervised positions): what TP gathers
            rows = box.setdefault("rows", [0, 0])
            rows[0] += sum(int(mb["n_supervised"]) for mb in micro_batches)
            rows[1] += len(micro_batches)
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
            (out_dir / f"head_rows_{os.environ.get('RANK', '0')}.json").write_text(json.dumps(box["rows"]))
        return out

    loop.train_step = profiled
    main()
