"""Provenance: what produced a checkpoint or a model — resolved config, package versions, the
project's git commit, and a fingerprint of the training data (content hashes of the files plus
every data option that changes tokens, the tokenizer and the template: the tokenization cache key)."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("distsft", "torch", "transformers", "accelerate", "deepspeed", "peft", "datasets", "bitsandbytes",
            "hydra-core", "tokenizers")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(data_fingerprint: str) -> dict:
    return {"packages": package_versions(), "git_commit": git_commit(), "data_fingerprint": data_fingerprint}


# Keys that do not change what is trained: everything else must match to resume
SAFE_TO_CHANGE = ("output_dir", "run_name", "logging.", "trainer.resume", "trainer.stop_after", "trainer.save_every",
                  "trainer.save_total_limit", "trainer.eval_every", "trainer.use_cuda", "trainer.max_bad_steps",
                  "trainer.spike_", "trainer.early_stop", "trainer.export_best", "export.", "preview.", "plan.",
                  "diagnosis.",
                  "data.num_workers", "data.num_proc", "data.cache", "model.name_or_path", "model.tokenizer",
                  "model.revision", "trainer.micro_batch_size", "trainer.grad_accum",
                  # the same function computed another way (speed or memory): switch them on at a resume after an OOM
                  "model.compile", "model.gradient_checkpointing", "model.checkpoint_every", "model.tiled_mlp_shards",
                  "model.offload_checkpoints", "trainer.loss_chunk",
                  "trainer.hang_timeout", "trainer.collective_timeout", "trainer.async_save", "trainer.async_stage")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_differences(saved: dict, current: dict) -> list[str]:
    """'key: was X, now Y' for every key that changes training (micro-batch/accumulation may change with the
    world size: the global batch is what must match)."""
    a, b = flatten(saved), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(SAFE_TO_CHANGE) or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: was {a.get(key)!r}, now {b.get(key)!r}")
    return diffs
