"""The precision contract: trainer.precision=bf16 keeps fp32 master weights whatever model.dtype stores.

A checkpoint stored in bfloat16 (as every real preset is), lr 1e-5, 20 steps. Near a weight of 0.02
half a bf16 ULP is ~6e-5, larger than an AdamW step at lr 1e-5: a bf16 weight does not move. With fp32
masters the bf16 run's weight changes track the fp32 run's; the negative control (plain torch AdamW on
bf16 weights, what ``model.dtype=bfloat16`` used to mean under ddp) leaves most weights unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import run_tiny, save_tiny, typed_cfg

pytestmark = pytest.mark.slow  # tens of seconds each: out of the fast tier

STEPS, LR = 20, 1e-5
OVERRIDES = [f"trainer.max_steps={STEPS}", f"optim.lr={LR}", "schedule=constant", "schedule.warmup_steps=0",
             "trainer.eval_every=0", "trainer.save_every=0", "model.init=pretrained", "model.dtype=bfloat16",
             "data.val_fraction=0", "logging.plot=false", "logging.sample_every=0", "export.enabled=false",
             "logging.log_every=5"]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("bf16"), seed=3, dtype=torch.bfloat16)


def deltas(weights: dict, start: dict) -> torch.Tensor:
    """Changes of the 2-D weights, flattened (all fp32)."""
    return torch.cat([(weights[k].float() - start[k].float()).flatten() for k in sorted(start) if start[k].ndim == 2])


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def naive_bf16_weights(src, cfg) -> dict:
    """Negative control: plain torch AdamW stepping bf16 weights, on distsft's batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.batch import resolve_batch
    from distsft.data.loader import StepLoader, pack
    from distsft.data.prepare import prepare

    tok = AutoTokenizer.from_pretrained(src)
    data = prepare(cfg.data, tok, str(src))
    loader = StepLoader(data.train, pack(data.train, cfg.data, data.train_stats),
                        resolve_batch(4, None, 8, 1), 0, cfg.data, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step, micro_batches in zip(range(STEPS), loader.steps(0)):
        n = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        for mb in micro_batches:
            logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits
            (F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(),
                             reduction="sum") / n).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_bf16_keeps_fp32_masters_and_small_updates_survive(bf16_checkpoint, tmp_path):
    src = bf16_checkpoint
    start = load_file(src / "model.safetensors")
    runs = {}
    for precision in ("fp32", "bf16"):
        res = run_tiny(tmp_path / precision, f"model.name_or_path={src}", f"trainer.precision={precision}", *OVERRIDES)
        assert res.summary["precision"].startswith(("fp32 compute", "bf16 compute")), res.summary["precision"]
        assert "fp32 master weights" in res.summary["precision"]
        weights = load_file(tmp_path / precision / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
        assert all(w.dtype == torch.float32 for w in weights.values())  # the checkpoint holds the masters
        runs[precision] = deltas(weights, start)
    changed = float((runs["bf16"] != 0).float().mean())
    assert changed > 0.8, changed
    assert corr(runs["bf16"], runs["fp32"]) >= 0.99

    naive = deltas(naive_bf16_weights(src, typed_cfg(f"model.name_or_path={src}", *OVERRIDES)), start)
    naive_changed = float((naive != 0).float().mean())
    assert naive_changed < 0.5 * changed, (naive_changed, changed)  # most small updates rounded away
    assert corr(naive, runs["fp32"]) < 0.9


def test_bf16_pure_keeps_bf16_weights_and_lands_between_masters_and_naive(bf16_checkpoint, tmp_path):
    """bf16_pure: bf16 weights and AdamW state, every update stochastically rounded (torchao). Small updates
    survive in expectation: many more weights move than under naive bf16, yet less exactly than with fp32
    masters. Its checkpoint holds bf16 weights (half the bytes) and summary.json says which contract ran."""
    src = bf16_checkpoint
    start = load_file(src / "model.safetensors")
    ref = run_tiny(tmp_path / "fp32", f"model.name_or_path={src}", *OVERRIDES)
    pure = run_tiny(tmp_path / "pure", f"model.name_or_path={src}", "trainer.precision=bf16_pure", *OVERRIDES)
    assert "stochastically rounded" in pure.summary["precision"] and "no fp32 masters" in pure.summary["precision"]
    ckpt = load_file(tmp_path / "pure" / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    assert {w.dtype for w in ckpt.values()} == {torch.bfloat16}
    fp32 = deltas(load_file(tmp_path / "fp32" / "checkpoints" / f"step_{STEPS}" / "model.safetensors"), start)
    d = deltas(ckpt, start)
    naive = deltas(naive_bf16_weights(src, typed_cfg(f"model.name_or_path={src}", *OVERRIDES)), start)
    changed, naive_changed = float((d != 0).float().mean()), float((naive != 0).float().mean())
    assert changed > 2 * naive_changed, (changed, naive_changed)
    assert corr(naive, fp32) < corr(d, fp32) < 0.99995, (corr(naive, fp32), corr(d, fp32))
    losses = [x for _, x in pure.summary["train_loss_history"]]
    assert losses == pytest.approx([x for _, x in ref.summary["train_loss_history"]], rel=1e-2)


def test_bf16_pure_is_refused_where_it_does_not_apply():
    from distsft.config import ConfigError

    for extra in ("parallel=zero2", "peft=lora", "optim=adafactor"):
        with pytest.raises(ConfigError,
                           match="trainer.precision=bf16_pure .* is for full fine-tuning with optim=adamw"):
            typed_cfg("trainer.precision=bf16_pure", extra)


def test_full_export_is_stored_in_model_dtype(bf16_checkpoint, tmp_path):
    """Trained in fp32 masters, exported in the storage dtype the user chose (and config.json says so)."""
    import json

    run_tiny(tmp_path, f"model.name_or_path={bf16_checkpoint}", "trainer.precision=bf16",
             *[o for o in OVERRIDES if o != "export.enabled=false"], "trainer.max_steps=2")
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "final" / "config.json").read_text())["dtype"] == "bfloat16"
