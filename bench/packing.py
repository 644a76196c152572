"""Packing benchmark: distsft best-fit decreasing vs. padded micro-batches vs. TRL's ``pack_dataset``.

Measures, on synthetic (lognormal) example-length distributions, how much of each row is real
tokens and how fast each method handles examples:

* ``distsft bfd``  -- ``distsft.data.packing.best_fit_decreasing``; real-token fraction
  ``sum(lengths) / (rows * max_seq_len)``; examples/s from the wall time of the call, best of 3.
* ``pad (mb=8)``   -- no packing: examples in random order, micro-batches of 8, each padded to its
  longest example; fraction ``sum(lengths) / sum(batch_size * longest_in_batch)``.
* ``trl bfd``      -- ``trl.data_utils.pack_dataset(ds, max_seq_len, strategy="bfd")`` on a
  ``datasets.Dataset`` whose ``input_ids`` have the same lengths, as ``SFTTrainer`` calls it
  (``Dataset.map`` default ``batch_size=1000``: bins are packed per 1000-example chunk).
* ``trl bfd (global)`` -- the same with ``map_kwargs={"batch_size": None}`` (one bin-packing pass).
  TRL's fraction is ``sum(packed row lengths) / (rows * max_seq_len)``. Its time also includes
  gathering the token ids into the packed rows, which distsft does later, per step.

Distributions: alpaca-like (median ~150, p95 ~430 tokens, clip [1, 2048], max_seq_len 2048) and
ultrachat-like (median ~1.2k, mean ~1.4k tokens, clip [1, 4096], max_seq_len 4096). Nothing is
downloaded. Targets (benchmark figures, not tests): distsft fraction >= 99.9% (alpaca-like),
>= 99.5% (ultrachat-like), and >= 20k examples/s.

    pip install -e ".[bench]"        # optional: TRL; without it the TRL rows say "not available"
    python bench/packing.py [--n-alpaca 200000] [--n-ultrachat 50000] [--seed 0]

Prints a markdown table; writes JSON to ``$OUT/packing.json`` if OUT is set, else
``bench/results/packing.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distsft.data.packing import best_fit_decreasing  # noqa: E402

MB = 8  # micro-batch size of the padding baseline
# name, n-arg, median, lognormal sigma, clip max = max_seq_len, target real-token fraction
# alpaca: p95/median = exp(1.645 sigma) = 430/150; ultrachat: mean/median = exp(sigma^2/2) = 1.4/1.2
DISTS = [
    ("alpaca-like", "n_alpaca", 150.0, math.log(430 / 150) / 1.6449, 2048, 0.999),
    ("ultrachat-like", "n_ultrachat", 1200.0, math.sqrt(2 * math.log(1400 / 1200)), 4096, 0.995),
]
TARGET_EPS = 20_000


def make_lengths(n, median, sigma, max_len, rng):
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), 1, max_len).astype(np.int64)


def best_of(fn, repeats, slow_s=20.0):
    """(best wall seconds, last result); stops repeating once one run takes longer than slow_s."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        if dt > slow_s:
            break
    return best, out


def pad_groups(lengths, seed):
    perm = np.random.default_rng(seed).permutation(len(lengths))
    x = lengths[perm]
    x = np.concatenate([x, np.zeros(-len(x) % MB, dtype=x.dtype)]).reshape(-1, MB)
    return x.max(axis=1), (x > 0).sum(axis=1)  # longest and size of each micro-batch


def load_trl():
    try:
        import datasets
        import pyarrow as pa
        import trl
        from trl.data_utils import pack_dataset

        pa.set_cpu_count(2)
        datasets.disable_progress_bars()
        return trl.__version__, pack_dataset, None
    except Exception as e:  # noqa: BLE001 -- any import failure means "not available"
        return None, None, f"{type(e).__name__}: {e}".splitlines()[0][:120]


def trl_dataset(lengths, rng):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = pa.array(rng.integers(1, 32000, int(offsets[-1]), dtype=np.int32))
    col = pa.LargeListArray.from_arrays(pa.array(offsets), ids)
    return Dataset(InMemoryTable(pa.Table.from_arrays([col], names=["input_ids"])))


def run_trl(pack_dataset, ds, max_len, map_kwargs):
    import pyarrow.compute as pc

    t, packed = best_of(lambda: pack_dataset(ds, max_len, strategy="bfd", map_kwargs=dict(map_kwargs)), 3)
    row_len = pc.list_value_length(packed.with_format("arrow")[:]["input_ids"]).to_numpy()
    return t, len(packed), int(row_len.sum()), int(row_len.max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-alpaca", type=int, default=200_000)
    ap.add_argument("--n-ultrachat", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    trl_version, pack_dataset, trl_err = load_trl()
    results = {"numpy": np.__version__, "trl": trl_version or f"not available ({trl_err})",
               "cpu_count": os.cpu_count(), "seed": args.seed, "distributions": []}
    lines = ["| distribution | method | rows | real-token fraction | examples/s | target |",
             "|---|---|---:|---:|---:|---|"]

    for name, n_arg, median, sigma, max_len, target in DISTS:
        n = getattr(args, n_arg)
        lengths = make_lengths(n, median, sigma, max_len, np.random.default_rng(args.seed))
        total = int(lengths.sum())
        stats = {"n": n, "max_seq_len": max_len, "total_tokens": total, "median": float(np.median(lengths)),
                 "p95": float(np.percentile(lengths, 95)), "mean": float(lengths.mean()),
                 "clipped_at_max": int((lengths == max_len).sum()), "min_rows": math.ceil(total / max_len)}
        print(f"{name}: n={n} median={stats['median']:.0f} p95={stats['p95']:.0f} mean={stats['mean']:.0f} "
              f"(lognormal median={median:.0f} sigma={sigma:.4f}), clipped at {max_len}: "
              f"{stats['clipped_at_max']}, lower bound on rows: {stats['min_rows']}", flush=True)
        methods = {}

        t, rows = best_of(lambda: best_fit_decreasing(lengths, max_len, args.seed), 3)
        assert sorted(i for r in rows for i in r) == list(range(n))
        assert max(int(lengths[r].sum()) for r in rows) <= max_len
        frac, eps = total / (len(rows) * max_len), n / t
        ok = frac >= target and eps >= TARGET_EPS
        methods["distsft bfd"] = {"rows": len(rows), "real_token_fraction": frac, "examples_per_s": eps,
                                  "seconds": t, "target": f">= {target:.1%} and >= {TARGET_EPS} ex/s",
                                  "pass": ok}

        t, (longest, size) = best_of(lambda: pad_groups(lengths, args.seed), 3)
        methods[f"pad (mb={MB})"] = {"rows": len(longest), "real_token_fraction": total / int((longest * size).sum()),
                                     "examples_per_s": n / t, "seconds": t}

        if pack_dataset is None:
            methods["trl bfd"] = {"error": f"trl: not available ({trl_err})"}
        else:
            ds = trl_dataset(lengths, np.random.default_rng(args.seed + 1))
            for label, kw in (("trl bfd", {}), ("trl bfd (global)", {"batch_size": None})):
                try:
                    t, nrows, tokens, longest_row = run_trl(pack_dataset, ds, max_len, kw)
                    methods[label] = {"rows": nrows, "real_token_fraction": tokens / (nrows * max_len),
                                      "examples_per_s": n / t, "seconds": t, "tokens_kept": tokens,
                                      "tokens_lost": total - tokens, "longest_row": longest_row}
                except Exception as e:  # noqa: BLE001 -- report, keep the other rows
                    methods[label] = {"error": f"trl: failed ({type(e).__name__}: {e})"[:160]}
            del ds

        for label, m in methods.items():
            if "error" in m:
                lines.append(f"| {name} | {label} | - | - | - | {m['error']} |")
                continue
            verdict = ("PASS" if m["pass"] else "FAIL") + f" ({m['target']})" if "pass" in m else ""
            lines.append(f"| {name} | {label} | {m['rows']:,} | {m['real_token_fraction']:.4%} "
                         f"| {m['examples_per_s']:,.0f} | {verdict} |")
        results["distributions"].append({"name": name, **stats, "methods": methods})

    print("\n" + "\n".join(lines))
    print(f"\nnumpy {np.__version__}, trl {results['trl']}, {os.cpu_count()} CPUs")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "packing.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_dir / 'packing.json'}")


if __name__ == "__main__":
    main()
