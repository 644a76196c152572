"""One owner per setting: the Hydra config builds the strategy; launchers and DeepSpeed JSON that
disagree stop start-up naming both owners."""

from __future__ import annotations

import json

import pytest

from distsft.batch import BatchPlan
from distsft.config import ConfigError
from distsft.trainer.strategy import check_launcher, deepspeed_config, plugins
from tests.conftest import typed_cfg

PLAN = BatchPlan(4, 2, 2, 16)


def test_deepspeed_config_is_filled_from_hydra():
    cfg = typed_cfg("parallel=zero3_offload", "trainer.max_grad_norm=0.5", "trainer.precision=bf16")
    ds = deepspeed_config(cfg.parallel, cfg.trainer, PLAN, cuda=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (4, 2, 16)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert "zero_force_ds_cpu_optimizer" not in ds  # on CUDA DeepSpeed's CPUAdam runs
    assert deepspeed_config(cfg.parallel, cfg.trainer, PLAN, cuda=False)["zero_force_ds_cpu_optimizer"] is False


def test_bf16_gradients_are_accumulated_and_reduced_in_fp32_unless_traded(tmp_path):
    """DeepSpeed and FSDP2 would sum and reduce bf16 gradients by default; distsft sets fp32 (trainer.grad_dtype)."""
    import torch

    from distsft.trainer.strategy import ddp_kwargs

    cfg = typed_cfg("parallel=zero2", "trainer.precision=bf16")
    ds = deepspeed_config(cfg.parallel, cfg.trainer, PLAN, cuda=False)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    policy = plugins(typed_cfg("parallel=fsdp").parallel, cfg.trainer, PLAN, cuda=False)["fsdp_plugin"] \
        .mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert ddp_kwargs(cfg.trainer) == []  # autocast over fp32 weights: fp32 gradients already

    traded = typed_cfg("parallel=zero2", "trainer.precision=bf16", "trainer.grad_dtype=bfloat16")
    ds = deepspeed_config(traded.parallel, traded.trainer, PLAN, cuda=False)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    policy = plugins(typed_cfg("parallel=fsdp").parallel, traded.trainer, PLAN, cuda=False)["fsdp_plugin"] \
        .mixed_precision_policy
    assert policy.reduce_dtype == torch.bfloat16
    assert ddp_kwargs(traded.trainer)[0].comm_hook.value == "bf16"

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}}))
    cfg = typed_cfg("parallel=zero2", "trainer.precision=bf16", f"parallel.deepspeed_config={user}")
    with pytest.raises(ConfigError, match=r"sets data_types.grad_accum_dtype=\"bf16\", but trainer.grad_dtype owns it"):
        deepspeed_config(cfg.parallel, cfg.trainer, PLAN, cuda=False)
    with pytest.raises(ConfigError, match="trainer.grad_dtype=bfloat16 rounds .* trainer.precision=fp32"):
        typed_cfg("trainer.grad_dtype=bfloat16")
    from distsft.checks import check_device_combinations

    with pytest.raises(ConfigError, match="bf16 hook, which needs CUDA"):
        check_device_combinations(traded_ddp := typed_cfg("trainer.precision=bf16", "trainer.grad_dtype=bfloat16"),
                                  cuda=False)
    check_device_combinations(traded_ddp, cuda=True)


def test_user_deepspeed_json_auto_fields_merge_and_owned_fields_conflict(tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"gradient_accumulation_steps": "auto", "zero_optimization": {"overlap_comm": True},
                              "communication_data_type": "fp32"}))
    cfg = typed_cfg("parallel=zero2", f"parallel.deepspeed_config={ok}")
    ds = deepspeed_config(cfg.parallel, cfg.trainer, PLAN, cuda=False)
    assert ds["gradient_accumulation_steps"] == 2 and ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"] == {"overlap_comm": True, "stage": 2}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    cfg = typed_cfg("parallel=zero2", f"parallel.deepspeed_config={bad}")
    with pytest.raises(ConfigError,
                       match=r"bad.json sets gradient_accumulation_steps=8, but trainer.grad_accum owns it"):
        deepspeed_config(cfg.parallel, cfg.trainer, PLAN, cuda=False)


def test_a_launcher_deepspeed_config_is_adopted_where_the_command_line_is_silent(monkeypatch):
    """`accelerate config` with DeepSpeed ZeRO-2 + offload, bf16 and accumulation 4: taken over as parallel.*,
    trainer.precision and trainer.grad_accum (the global batch then derived); refused only on a real conflict."""
    from distsft.checks import to_object
    from distsft.trainer.strategy import adopt_launcher
    from tests.conftest import compose_cfg

    for k, v in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_MIXED_PRECISION": "bf16",
                 "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}.items():
        monkeypatch.setenv(k, v)
    cfg = compose_cfg()
    adopted = adopt_launcher(cfg, set())
    assert adopted == ["parallel.strategy=deepspeed", "parallel.offload_optimizer=True", "trainer.precision=bf16",
                       "trainer.grad_accum=4"]  # zero_stage 2 and no param offload: already the config's
    typed = to_object(cfg)
    assert (typed.parallel.zero_stage, typed.trainer.micro_batch_size, typed.trainer.global_batch_size) == (2, 4, None)
    check_launcher(typed.parallel, typed.trainer)  # now they agree
    same = compose_cfg("parallel=zero2", "parallel.offload_optimizer=true")
    adopt_launcher(same, {"parallel", "parallel.offload_optimizer"})  # the command line agrees: fine
    with pytest.raises(ConfigError, match=r"the accelerate launcher sets parallel.zero_stage=2 but the command line "
                                          r"says parallel.zero_stage=3"):
        adopt_launcher(compose_cfg("parallel=zero3"), {"parallel"})
    with pytest.raises(ConfigError, match=r"launcher sets trainer.precision=bf16 but the command line says "
                                          r"trainer.precision=fp32"):
        adopt_launcher(compose_cfg("trainer.precision=fp32"), {"trainer.precision"})
    with pytest.raises(ConfigError, match="the accelerate launcher runs deepspeed but parallel.strategy=ddp"):
        check_launcher(typed_cfg().parallel, typed_cfg("trainer.precision=bf16").trainer)  # not adopted: refused
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="mixed_precision=fp16; distsft trains in fp32 or bf16"):
        adopt_launcher(compose_cfg(), set())


def test_launcher_strategy_and_precision_conflicts(monkeypatch):
    cfg = typed_cfg()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed_precision=bf16 but trainer.precision=fp32"):
        check_launcher(cfg.parallel, cfg.trainer)
    check_launcher(cfg.parallel, typed_cfg("trainer.precision=bf16").trainer)  # agreeing is fine


def test_fsdp_builds_its_plugin_on_cpu_too_and_offload_needs_deepspeed():
    cfg = typed_cfg("parallel=fsdp")
    plugin = plugins(cfg.parallel, cfg.trainer, PLAN, cuda=False)["fsdp_plugin"]
    assert plugin.fsdp_version == 2  # FSDP2 on CPU processes too (tests/integration: it shards and trains like ddp)
    with pytest.raises(ConfigError, match="offload_params=true needs parallel.strategy=deepspeed with zero_stage=3"):
        typed_cfg("parallel=zero2", "parallel.offload_params=true")


def test_liger_kernels_refused_where_they_cannot_run():
    from distsft.checks import check_device_combinations

    with pytest.raises(ConfigError, match="model.kernels=liger needs CUDA"):
        check_device_combinations(typed_cfg("model.kernels=liger"), cuda=False)
    for strategy in ("parallel=zero3", "parallel=fsdp"):
        with pytest.raises(ConfigError, match="ZeRO-3 and FSDP shard"):
            check_device_combinations(typed_cfg("model.kernels=liger", strategy), cuda=True)
    check_device_combinations(typed_cfg("model.kernels=liger", "parallel=zero2"), cuda=True)  # allowed
    with pytest.raises(ConfigError, match="model.kernels='ligr' is not one of auto, torch, liger"):
        typed_cfg("model.kernels=ligr")


def test_auto_kernels_choose_liger_only_where_it_can_run():
    from distsft.model.kernels import resolve_kernels

    assert resolve_kernels("auto", cuda=False, sharded=False)[0] == "torch"
    assert resolve_kernels("auto", cuda=True, sharded=True)[0] == "torch"
    assert resolve_kernels("torch", cuda=True, sharded=False)[0] == "torch"
    assert resolve_kernels("liger", cuda=True, sharded=False)[0] == "liger"
    # Granite scales its logits: Liger has no fused loss for it, so auto keeps the torch kernels and says why
    kernels, why = resolve_kernels("auto", cuda=True, sharded=False, model_type="granite")
    assert kernels == "torch" and "logits_scaling" in why


def test_auto_attention_prefers_a_varlen_kernel_for_packed_bf16_on_cuda():
    import importlib.util

    from distsft.model.attention import auto_attention

    flash = importlib.util.find_spec("flash_attn") is not None
    assert auto_attention(cuda=False, packed=True, half=True) == "sdpa"
    assert auto_attention(cuda=True, packed=True, half=True) == ("flash_attention_2" if flash else "varlen")
    assert auto_attention(cuda=True, packed=False, half=True) == ("flash_attention_2" if flash else "sdpa")
    assert auto_attention(cuda=True, packed=True, half=False) == ("flash_attention_2" if flash else "sdpa")


def test_shard_groups_default_to_one_node_on_several_and_tile_the_world():
    """parallel.dp_shard_size: by default a node's ranks when the run spans nodes (HSDP / hpZ), every rank on one
    node; a size that does not divide the world is refused; strategies without parameter sharding have no groups."""
    from distsft.config import ConfigError, ParallelConfig
    from distsft.trainer.strategy import shard_group

    fsdp, zero3 = ParallelConfig(strategy="fsdp"), ParallelConfig(strategy="deepspeed", zero_stage=3)
    assert shard_group(fsdp, 16, 8) == 8 and shard_group(zero3, 16, 8) == 8
    assert shard_group(fsdp, 8, 8) == 8 and shard_group(fsdp, 4, 1) == 4  # one node, or one rank a node: flat
    assert shard_group(ParallelConfig(strategy="fsdp", dp_shard_size=4), 16, 8) == 4
    assert shard_group(ParallelConfig(strategy="deepspeed", zero_stage=2), 16, 8) == 16
    assert shard_group(ParallelConfig(strategy="deepspeed", zero_stage=3, sp_size=2), 16, 8) == 16  # Ulysses: flat
    with pytest.raises(ConfigError, match="parallel.dp_shard_size=3 does not divide the 16 processes"):
        shard_group(ParallelConfig(strategy="fsdp", dp_shard_size=3), 16, 8)
