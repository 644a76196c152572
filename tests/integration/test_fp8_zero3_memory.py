"""model.fp8 with full fine-tuning under ZeRO-3 (2 CPU processes): the forward leaves no more allocated for backward
than without FP8, where torchao's own Float8Linear.forward (the negative control) keeps every layer's gathered
weight; the same losses as torchao's, step after step (the re-gathered weights give the same gradients)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CPU_ENV, ROOT, free_port

pytestmark = pytest.mark.multiproc


def test_fp8_full_fine_tuning_keeps_zero3s_parameter_memory_saving(tmp_path):
    out = tmp_path / "fp8_zero3.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "tests.integration.fp8_zero3_worker", str(out)],
                          cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {r["variant"]: r for r in json.loads(out.read_text())}
    plain, fp8, torchao = runs["plain"], runs["fp8"], runs["torchao"]
    layer, layers = fp8["layer_linear_bytes"], fp8["layers"]  # 3 MiB of fp32 weights in each of 4 layers
    # what autograd holds for backward when the forward returns, exactly: the same storages as without FP8
    # (activations, 2.9 MB); torchao's forward holds every layer's gathered weight besides (15.5 MB)
    assert fp8["saved_bytes"] == plain["saved_bytes"], runs
    assert torchao["saved_bytes"] == fp8["saved_bytes"] + layers * layer, runs
    # the allocator's count (a missed free only adds: the worker takes the least of its steps), after the forward
    # and at the step's peak (one layer's weights gathered at a time, + the CPU emulation's fp32 copies of them)
    for what in ("held_after_forward", "peak_forward_backward"):
        assert fp8[what] < plain[what] + layer, (what, runs)
        assert torchao[what] > plain[what] + (layers - 1) * layer, (what, runs)
    # FP8 ran, torchao's recipe: the same loss as its Float8Linear at every step (the later ones after AdamW steps)
    assert fp8["losses"] == torchao["losses"], runs
    assert all(a != b for a, b in zip(fp8["losses"], plain["losses"], strict=True)), runs  # FP8 rounding, and
    assert abs(fp8["losses"][0] - plain["losses"][0]) < 0.01 * plain["losses"][0], runs  # only that
