"""Data-preparation benchmark: distsft's streamed token cache vs the bare tokenizer vs TRL's SFTTrainer.

Synthetic conversations of one shape (a system turn plus 3 user/assistant pairs, about 1,500 tokens
each with the embedded tokenizer), written as .jsonl, at several sizes (default 20k, 100k, 200k).
For each size, every measurement runs in a fresh process (so peak memory is its own):

* ``distsft``      -- ``distsft.data.prepare.prepare`` from the .jsonl to a complete token cache entry
  (load, normalise, split, render, tokenize, mask, filter, write shards, pack), ``data.num_proc`` workers.
* ``distsft (cached)`` -- the same call again: the restart path (map the entry).
* ``bare tokenizer`` -- ``tokenizer(texts, add_special_tokens=False)`` in batches of 1,000 on the texts
  rendered beforehand (the rendering is not timed): the practical limit of any preparation.
* ``trl``          -- ``SFTTrainer._prepare_dataset`` (the preparation ``SFTTrainer.__init__`` runs) on the
  same rows and tokenizer, ``assistant_only_loss=True`` with the same ChatML template plus
  ``{% generation %}`` markers (TRL needs them to mask), ``dataset_num_proc`` = the same process count.
* ``train rank``   -- ``python -m distsft.train`` for 2 optimizer steps on the cached entry: its peak RSS
  and ``prepare_seconds`` from summary.json (a training rank maps the cache; its memory should not grow
  with the data).

Memory: ``peak RSS`` of the main process, and ``peak PSS`` of the main process plus its workers
(proportional set size: shared pages counted once), sampled every 50 ms with psutil.

    pip install -e ".[bench]"                       # TRL, optional: without it the TRL rows say so
    python bench/data.py                            # 20k, 100k, 200k conversations
    python bench/data.py --sizes 20000 --num-proc 2 # quicker

Prints a markdown table; writes JSON to ``$OUT/data.json`` when OUT is set, else ``bench/results/data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "distsft" / "assets" / "tiny-llama"
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under capital river mountain ocean planet garden window engine problem "
         "answer question reason example").split()
# the embedded ChatML template with TRL's generation markers around each assistant reply (renders the same text)
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_conversations(path: Path, n: int, seed: int = 0, words: int = 130) -> None:
    """n conversations: system (words/10), then 3 x (user words/5, assistant words) -> ~1,500 tokens."""
    rng = random.Random(seed)

    def para(k):
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    with path.open("w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": para(words // 10)}]
            for _ in range(3):
                msgs += [{"role": "user", "content": para(words // 5)}, {"role": "assistant", "content": para(words)}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def _rss_anon() -> int:
    """RssAnon of this process in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak RSS of this process, its peak anonymous RSS (RssAnon: heap and buffers, without the pages of
    memory-mapped files, which the kernel can drop and re-read), and peak PSS of it plus its children,
    sampled in a thread."""

    def __init__(self, every: float = 0.05):
        import psutil

        self.proc, self.every, self.rss, self.pss, self.anon = psutil.Process(), every, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        self.rss = max(self.rss, self.proc.memory_info().rss)
        self.anon = max(self.anon, _rss_anon())
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that just exited
                pass
        self.pss = max(self.pss, total)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def child_distsft(a) -> dict:
    from distsft.config import DataConfig
    from distsft.data.prepare import prepare

    tok = _tokenizer()
    cfg = DataConfig(train_files=[a.file], val_fraction=0.0, max_seq_len=2048, cache_dir=a.cache, num_proc=a.num_proc)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        prep = prepare(cfg, tok, "tiny-llama")
        dt = time.perf_counter() - t0
    st = prep.train_stats
    return {"seconds": dt, "conversations": st.rows_in, "kept": st.kept, "tokens": st.tokens,
            "supervised_tokens": st.supervised_tokens, "cache_hit": prep.cache_hit, "peak_rss_mb": mem.rss / 2**20,
            "peak_pss_mb": mem.pss / 2**20, "peak_anon_mb": mem.anon / 2**20}


def _rows(path: str) -> list[list[dict]]:
    with open(path) as f:
        return [json.loads(line)["messages"] for line in f]


def child_bare(a) -> dict:
    tok = _tokenizer()
    convs = _rows(a.file)
    texts = []
    for i in range(0, len(convs), 1000):
        texts += tok.apply_chat_template(convs[i:i + 1000], tokenize=False)
    del convs
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 1000):
            tokens += sum(map(len, tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"]))
        dt = time.perf_counter() - t0
    return {"seconds": dt, "conversations": len(texts), "tokens": tokens, "peak_rss_mb": mem.rss / 2**20,
            "peak_pss_mb": mem.pss / 2**20}


def child_trl(a) -> dict:
    from types import SimpleNamespace

    import datasets
    from trl import SFTConfig, SFTTrainer

    tok = _tokenizer()
    tok.chat_template = CHATML_GENERATION
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=a.file, split="train", cache_dir=a.cache)
        args = SFTConfig(output_dir=a.cache, assistant_only_loss=True, dataset_num_proc=a.num_proc,
                         max_length=None, report_to=[], bf16=False, use_cpu=True)
        stub = SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=None)
        out = SFTTrainer._prepare_dataset(stub, ds, tok, args, False, None, "train")
        dt = time.perf_counter() - t0
    tokens = supervised = 0
    for batch in out.select_columns(["input_ids", "labels"]).iter(batch_size=1000):
        tokens += sum(map(len, batch["input_ids"]))
        supervised += sum(sum(y != -100 for y in ys) for ys in batch["labels"])  # the masks TRL made
    return {"seconds": dt, "conversations": len(out), "tokens": tokens, "supervised_tokens": supervised,
            "peak_rss_mb": mem.rss / 2**20, "peak_pss_mb": mem.pss / 2**20}


def child_train(a) -> dict:
    """A training rank on the cached entry: peak RSS of ``python -m distsft.train`` (2 steps)."""
    out = Path(a.cache) / "run"
    cmd = [sys.executable, "-m", "distsft.train", f"output_dir={out}", "recipe=none", "trainer.max_steps=2",
           "trainer.micro_batch_size=1", "trainer.grad_accum=1", "trainer.global_batch_size=1",
           f"data.train_files=[{a.file}]", "data.val_fraction=0", "data.max_seq_len=2048",
           f"data.cache_dir={a.cache}", f"data.num_proc={a.num_proc}", "trainer.save_every=0", "export.enabled=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": time.perf_counter() - t0, "prepare_seconds": summary["data"]["prepare_seconds"],
            "cache_hit": summary["data"]["cache_hit"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


CHILDREN = {"distsft": child_distsft, "bare": child_bare, "trl": child_trl, "train": child_train}


def run_child(kind: str, file: Path, cache: Path, num_proc: int) -> dict:
    # a fresh datasets cache per measurement: reading the .jsonl into Arrow is part of the cost
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache.with_name(cache.name + "_hf"))}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--file", str(file), "--cache", str(cache),
                           "--num-proc", str(num_proc)], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,100000,200000")
    ap.add_argument("--num-proc", type=int, default=0, help="processes (0: one per CPU core, as data.num_proc=0)")
    ap.add_argument("--work", default=None, help="directory for the data and caches (default: a temporary one)")
    ap.add_argument("--skip", default="", help="comma-separated measurements to skip: trl,bare,train")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return

    from distsft.data.prepare import default_num_proc

    procs = a.num_proc or default_num_proc()
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.work or tempfile.mkdtemp(prefix="distsft-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"num_proc": procs, "cores": os.cpu_count(), "sizes": {}}
    for n in [int(x) for x in a.sizes.split(",")]:
        data = work / f"conversations_{n}.jsonl"
        if not data.exists():
            write_conversations(data, n)
        r = {}
        cache = work / f"cache_{n}"
        r["distsft"] = run_child("distsft", data, cache, procs)
        r["distsft (cached)"] = run_child("distsft", data, cache, procs)
        if "bare" not in skip:
            r["bare tokenizer"] = run_child("bare", data, work / f"bare_{n}", procs)
        if "trl" not in skip:
            r["trl"] = run_child("trl", data, work / f"trl_{n}", procs)
        if "train" not in skip:
            r["train rank"] = run_child("train", data, cache, procs)
        results["sizes"][n] = r
        print(f"{n} conversations done: " + json.dumps(r), file=sys.stderr)
    print(table(results))
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "data.json").write_text(json.dumps(results, indent=2))


def table(results: dict) -> str:
    lines = [f"processes: {results['num_proc']} (cores: {results['cores']})", "",
             ("| conversations | method | seconds | conversations/s | tokens/s | peak RSS (MB) | peak anon RSS (MB) | "
              "peak PSS with workers (MB) | x bare |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in results["sizes"].items():
        bare = r.get("bare tokenizer", {}).get("seconds")
        for method, m in r.items():
            if "error" in m:
                lines.append(f"| {n:,} | {method} | {m['error']} | | | | | | |")
                continue
            cps = m["conversations"] / m["seconds"] if m.get("conversations") else None
            tps = m["tokens"] / m["seconds"] if m.get("tokens") else None
            ratio = f"{m['seconds'] / bare:.2f}" if bare and method in ("distsft", "trl") else ""
            extra = f" (prepare {m['prepare_seconds']:.2f} s)" if "prepare_seconds" in m else ""
            lines.append(f"| {n:,} | {method}{extra} | {m['seconds']:.2f} | {f'{cps:,.0f}' if cps else ''} | "
                         f"{f'{tps:,.0f}' if tps else ''} | {m['peak_rss_mb']:,.0f} | "
                         f"{m.get('peak_anon_mb', float('nan')):,.0f} | "
                         f"{m.get('peak_pss_mb', float('nan')):,.0f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
