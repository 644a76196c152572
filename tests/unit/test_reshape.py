"""trainer.reshape.route: how a checkpoint loads into a run of another layout or size, or the one line that refuses
it (the loading itself is tested with real runs in tests/integration/test_deepspeed.py)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from distsft.config import ConfigError, ParallelConfig
from distsft.trainer.reshape import layout, route


def _ckpt(tmp_path, world: int, **parallel):
    ckpt = tmp_path / "step_3"
    ckpt.mkdir()
    OmegaConf.save(OmegaConf.create({"parallel": {**vars(ParallelConfig()), **parallel}}), ckpt / "config.yaml")
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 3, "world_size": world}))
    return ckpt


@pytest.mark.parametrize("saved, now, world, how", [
    (dict(strategy="ddp"), ParallelConfig(strategy="ddp"), 1, "as saved"),
    (dict(strategy="fsdp"), ParallelConfig(strategy="fsdp"), 4, "as saved"),  # DCP reshards on load
    (dict(strategy="deepspeed", zero_stage=2), ParallelConfig(strategy="deepspeed", zero_stage=2), 2, "as saved"),
    (dict(strategy="deepspeed", zero_stage=2), ParallelConfig(strategy="deepspeed", zero_stage=2), 1, "universal"),
    (dict(strategy="deepspeed", zero_stage=3), ParallelConfig(strategy="deepspeed", zero_stage=3,
                                                               offload_optimizer=True), 2, "as saved"),
])
def test_route(tmp_path, saved, now, world, how):
    assert route(_ckpt(tmp_path, 2, **saved), now, world) == how


@pytest.mark.parametrize("saved, now, says", [
    (dict(strategy="deepspeed", zero_stage=2), ParallelConfig(strategy="fsdp"),
     "under parallel=fsdp: it was written under parallel=zero2, whose optimizer state is in another engine's format; "
     "resume with parallel=zero2"),
    (dict(strategy="ddp"), ParallelConfig(strategy="deepspeed", zero_stage=1), "resume with parallel=ddp"),
    (dict(strategy="deepspeed", zero_stage=3, offload_params=True), ParallelConfig(strategy="deepspeed", zero_stage=2),
     "written under parallel=zero3_offload, and DeepSpeed loads ZeRO state only into its own stage"),
])
def test_a_change_the_engines_cannot_load_is_refused_in_one_line(tmp_path, saved, now, says):
    with pytest.raises(ConfigError, match="cannot resume from") as e:
        route(_ckpt(tmp_path, 2, **saved), now, 2)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_layout_names_the_preset():
    assert [layout(p) for p in ({"strategy": "ddp"}, {"strategy": "deepspeed", "zero_stage": 1},
                                {"strategy": "deepspeed", "zero_stage": 3, "offload_params": True})] == \
        ["ddp", "zero1", "zero3_offload"]
