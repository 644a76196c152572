"""LR schedule: the LR the optimizer actually uses equals the documented formula."""

from __future__ import annotations

import math

import pytest
import torch

from distsft.config import ScheduleConfig
from distsft.trainer.schedule import build_scheduler


def lrs(cfg: ScheduleConfig, total: int, peak: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_points_match_formula(name):
    peak, lo, warm, total = 2e-3, 0.1, 10, 110
    got = lrs(ScheduleConfig(name=name, warmup_steps=warm, min_lr_ratio=lo), total, peak)
    eta_min = lo * peak

    def after(t):  # t: optimizer step index >= warmup
        u = (t - warm) / (total - warm)
        if name == "cosine":
            return eta_min + 0.5 * (peak - eta_min) * (1 + math.cos(math.pi * u))
        return eta_min + (peak - eta_min) * (1 - u)

    assert got[0] == pytest.approx(peak / (warm + 1))  # step 0: small but non-zero
    assert got[warm - 1] == pytest.approx(peak * warm / (warm + 1))
    assert got[warm] == pytest.approx(peak)  # end of warmup: the peak
    mid = warm + (total - warm) // 2
    assert got[mid] == pytest.approx(after(mid))
    assert got[mid] == pytest.approx((peak + eta_min) / 2)  # halfway: midpoint for both shapes
    assert got[-1] == pytest.approx(after(total - 1))
    assert after(total) == pytest.approx(eta_min)


def test_constant_and_warmup_ratio():
    got = lrs(ScheduleConfig(name="constant", warmup_ratio=0.1, min_lr_ratio=0.0), 50)
    assert got[4] == pytest.approx(5 / 6) and got[5:] == [1.0] * 45
