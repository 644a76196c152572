"""One precision contract on every strategy: under bf16, gradients are accumulated over the micro-batches and
reduced across ranks in fp32 (trainer.grad_dtype=float32), under ddp, ZeRO and FSDP2 alike.

Left to themselves, DeepSpeed (``data_types.grad_accum_dtype`` and ``communication_data_type`` default to the model
dtype) and Accelerate's FSDP2 policy (``reduce_dtype`` = bf16) sum each micro-batch's gradient into a bf16 buffer:
the error grows with the number of micro-batches summed. The measure: 2 processes, micro 1 x accumulation 32, the
same bf16-representable start, and the distance of each run's final fp32 masters from an fp32 run's, as a share of
the fp32 run's update. The sharded strategies must be as close as ddp (1.05x); the negative control,
``trainer.grad_dtype=bfloat16`` under ZeRO-2 (DeepSpeed's own default), must be measurably further.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import checkpoint_masters, launch, run_tiny, save_tiny

pytestmark = pytest.mark.multiproc
STEPS = 3
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=1", "trainer.global_batch_size=64",
             "optim.lr=1e-4", "schedule=constant", "schedule.warmup_steps=0", "data.max_seq_len=128",
             "trainer.eval_every=0", "trainer.save_every=0", "model.init=pretrained", "model.dtype=bfloat16",
             "data.val_fraction=0", "logging.plot=false", "logging.sample_every=0", "export.enabled=false",
             "logging.log_every=1"]
RUNS = {"ddp": ("parallel=ddp",), "zero1": ("parallel=zero1",), "zero2": ("parallel=zero2",),
        "zero3": ("parallel=zero3",), "fsdp": ("parallel=fsdp",),
        "zero2_bf16_grads": ("parallel=zero2", "trainer.grad_dtype=bfloat16")}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The tiny model stored in bfloat16: every strategy starts from the same bf16-representable weights."""
    return save_tiny(tmp_path_factory.mktemp("bf16start"), seed=5, dtype=torch.bfloat16)


def masters(out) -> dict[str, torch.Tensor]:
    return checkpoint_masters(out / "checkpoints" / f"step_{STEPS}")


def flat(weights: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([weights[n].float().flatten() for n in names])


def test_bf16_gradients_accumulate_and_reduce_in_fp32_on_every_strategy(start, tmp_path):
    from safetensors.torch import load_file

    base = [f"model.name_or_path={start}", *OVERRIDES]
    run_tiny(tmp_path / "fp32", *base)  # the reference: fp32 throughout, one process (the same global batches)
    ref = masters(tmp_path / "fp32")
    names = sorted(ref)
    origin = flat(load_file(start / "model.safetensors"), names)
    update = (flat(ref, names) - origin).norm()
    error = {}
    for name, extra in RUNS.items():
        summary = launch(2, tmp_path / name, *base, "trainer.precision=bf16", *extra)
        want = "bf16" if "trainer.grad_dtype=bfloat16" in extra else "fp32"
        assert f"accumulated and reduced in {want}" in summary["precision"], summary["precision"]
        error[name] = float((flat(masters(tmp_path / name), names) - flat(ref, names)).norm() / update)
    print("distance from the fp32 run, share of its update:", {k: round(v, 4) for k, v in error.items()})
    # measured (2 CPU processes): ddp 0.0183; zero1 (DeepSpeed's bf16 optimizer) = zero2 = zero3 = fsdp 0.0190
    # (1.04x: their bf16 weights keep the residual stream in bf16, where autocast over fp32 weights keeps it in
    # fp32); bf16 sums 0.0198 (1.08x)
    for name in ("zero1", "zero2", "zero3", "fsdp"):
        assert error[name] <= 1.05 * error["ddp"], (name, error)
    # the negative control: the same compute as zero2, only the gradient sums in bf16
    assert error["zero2_bf16_grads"] > 1.02 * error["zero2"], error
    assert error["zero2_bf16_grads"] > 1.05 * error["ddp"], error
