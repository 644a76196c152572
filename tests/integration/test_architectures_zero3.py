"""ZeRO-3 beyond llama, with 2 CPU processes: a tiny Qwen3-MoE (its sparse blocks marked as ZeRO-3 leaf modules,
and the log says so) and a tiny Gemma-3 (dense: nothing marked), each saved with save_pretrained and trained from
``model.name_or_path`` (shard-on-load) with the embedded tokenizer and data. The loss is finite and falls; the
exported ``final/`` loads with ``from_pretrained``, its weights are exactly the trained weights gathered from the
last checkpoint's ZeRO-3 shards by DeepSpeed's own zero_to_fp32, and every one of them moved from the base. For the
MoE (routing, experts and the router term under sharding are what is new here; llama's parity is test_deepspeed's)
losses and weights also equal one process on the same global batches (plain path, 1e-5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import launch, run_tiny
from tests.unit.test_architectures import save_tiny

pytestmark = pytest.mark.multiproc
STEPS = 4
OVERRIDES = ["parallel=zero3", "model.init=pretrained", f"trainer.max_steps={STEPS}", f"trainer.save_every={STEPS}",
             "trainer.eval_every=0", "logging.log_every=1", "logging.plot=false", "logging.sample_every=0"]
LEAVES = {"qwen3_moe": "ZeRO-3 leaf modules: Qwen3MoeSparseMoeBlock (2 blocks",
          "gemma3_text": "ZeRO-3 leaf modules: none (no mixture-of-experts blocks)"}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tokenizer):
    """model_type -> (base dir, output dir, summary, console) of its 2-process ZeRO-3 run, launched once."""
    runs = {}

    def get(arch: str):
        if arch not in runs:
            root = tmp_path_factory.mktemp(arch)
            base_dir, out = root / "base", root / "run"
            save_tiny(arch, base_dir)
            tokenizer.save_pretrained(base_dir)
            proc = launch(2, out, f"model.name_or_path={base_dir}", *OVERRIDES, expect_ok=False)
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[arch] = base_dir, out, json.loads((out / "summary.json").read_text()), proc.stdout + proc.stderr
        return runs[arch]

    return get


def weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", sorted(LEAVES))
def test_zero3_trains_and_exports(arch, zero3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    base_dir, out, s, console = zero3_run(arch)
    assert LEAVES[arch] in console  # logged while the model is built, before the run's train.log exists
    losses = [x for _, x in s["train_loss_history"]]
    assert s["status"] == "finished" and s["strategy"] == "DeepSpeed ZeRO-3" and s["batch"]["world_size"] == 2
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

    assert AutoConfig.from_pretrained(out / "final").model_type == arch
    exported, base = weights(out / "final"), weights(base_dir)
    assert s["parameters"]["total"] == sum(p.numel() for p in exported.values())  # counted from the placeholders
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / f"step_{STEPS}"),
                                                        tag="pytorch_model")
    assert exported.keys() == gathered.keys() == base.keys()
    for name, p in exported.items():
        assert torch.equal(p, gathered[name]), name
    still = sorted(n for n, p in base.items() if torch.equal(p, exported[n]))
    assert still == [], still  # every weight trained: the comparison above is not of the base with itself


def test_zero3_moe_matches_one_process(zero3_run, tmp_path):
    base_dir, out, s, _ = zero3_run("qwen3_moe")
    # one process, plain path, doubled accumulation: the same global batches
    ref = run_tiny(tmp_path, f"model.name_or_path={base_dir}", *OVERRIDES[1:]).summary
    assert [x for _, x in ref["train_loss_history"]] == pytest.approx([x for _, x in s["train_loss_history"]],
                                                                       rel=1e-5)
    exported, one = weights(out / "final"), weights(tmp_path / "final")
    for name, p in exported.items():
        assert float((p - one[name]).norm() / one[name].norm()) <= 1e-5, name
