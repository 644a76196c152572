"""Export stage, check: a merged export is scored again on the eval split, as a plain model.

A merge does not give back exactly what was trained. QLoRA's adapter learned against the NF4 weights, and is
folded into a fresh un-quantised base (not the weights it corrected); a bf16 base rounds W + ΔW once more
when the sum is stored. So ``final/`` is loaded the way a user loads it (from_pretrained, its storage dtype,
the training's attention kernel) and its eval loss is computed on the same eval batches with the trainer's
own ``evaluate`` (sum of token cross-entropies / supervised tokens, reduced over ranks: every rank scores its
share). It is logged next to the trained model's eval loss at the exported step, and ``summary.json`` records
both under ``export_check``.

Tolerance: a relative gap above 1% of the eval loss is a warning naming the likely cause. Measured on the tiny
base (LoRA, 4 steps at lr 1e-2; tests/integration/test_export_numerics.py): an fp32 merge 2e-8 (float rounding),
a bf16 merge 0.02% (bf16 keeps 8 significant bits: at most 2^-9 relative per weight, which mostly averages out
in the matmuls), QLoRA 0.08%. A merge that moves the loss by 1% changes what the model does, not only its last
bits; a stricter bound would warn on every bf16 merge of a large model, a looser one miss a QLoRA merge that
undid part of the fine-tune.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("distsft")

TOLERANCE = 0.01  # relative gap of the eval loss above which the merge is reported as lossy


def check_merged(cfg, accelerator, final: Path, eval_batches, trained_loss: float | None) -> dict:
    """Eval loss of ``final/`` against ``trained_loss`` (the trained model's, at the exported step). Every rank
    calls it (the eval loss is reduced over ranks)."""
    if not eval_batches or trained_loss is None:
        return _skipped("no eval split (data.val_fraction=0)")
    if cfg.parallel.sequence_parallel:
        return _skipped("the eval batches are sequence shards, which a plain model cannot score")
    model = _load_everywhere(cfg, accelerator, final)
    if model is None:
        return _skipped(f"final/ does not fit in {accelerator.device.type} memory next to the trained model")
    from .trainer.step import evaluate

    loss = evaluate(model, eval_batches, accelerator)
    del model
    _free(accelerator)
    gap = loss - trained_loss
    rel = gap / trained_loss if trained_loss else float("inf")
    within = abs(rel) <= TOLERANCE
    log.info("export check: final/ eval loss %.4f, trained %.4f (gap %+.4f, %+.3f%%)", loss, trained_loss, gap,
             100 * rel)
    if not within:
        log.warning("export check: final/ scores %.2f%% %s than the trained model on the eval split (tolerance "
                    "%.0f%%): %s", 100 * abs(rel), "worse" if gap > 0 else "better", 100 * TOLERANCE,
                    likely_cause(cfg))
    return {"final_eval_loss": loss, "trained_eval_loss": trained_loss, "gap": gap, "relative_gap": rel,
            "tolerance": TOLERANCE, "within_tolerance": within}


def likely_cause(cfg) -> str:
    if cfg.peft.quantize != "none":
        return (f"QLoRA dequantisation: the adapter learned against {cfg.peft.quantize} weights and is merged into "
                "the un-quantised base; export.mode=adapter keeps it on the quantised base it was trained with")
    if cfg.model.dtype == "bfloat16":
        return ("bf16 rounding of W+ΔW: the merged weights are stored in bfloat16; model.dtype=float32 merges "
                "without it, export.mode=adapter keeps the adapter apart")
    return "the merged model differs from the trained one (adapter weights or base not as trained)"


def _load_everywhere(cfg, accelerator, final: Path):
    """final/ as a plain model on this rank's device, or None on every rank when one rank runs out of memory."""
    from .model.attention import configured_attention
    from .model.load import load_model, whole_model

    cuda = accelerator.device.type == "cuda"
    model_cfg = replace(cfg.model, name_or_path=str(final), tokenizer=None, revision=None, init="pretrained",
                        attn_implementation=configured_attention(cfg, cuda))
    model, ok = None, 1.0
    try:
        with whole_model(accelerator):  # whole on every rank, not in ZeRO-3 shards
            model = load_model(model_cfg, cfg.trainer.seed).to(accelerator.device)
    except torch.OutOfMemoryError:
        model, ok = None, 0.0
        _free(accelerator)
    # every rank scores its share, or none does (evaluate's reduction is collective)
    agreed = accelerator.reduce(torch.tensor([ok], device=accelerator.device), reduction="sum")
    if int(agreed.item()) != accelerator.num_processes:
        del model
        _free(accelerator)
        return None
    return model


def _skipped(why: str) -> dict:
    log.info("export check: skipped (%s)", why)
    return {"skipped": why}


def _free(accelerator) -> None:
    gc.collect()
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
