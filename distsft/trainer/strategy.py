"""Trainer: the parallel strategy, built from the Hydra config (its only owner).

The accelerate config in ``launch/`` describes hardware (processes, machines). Batch sizes,
accumulation, clipping, precision and the ZeRO/FSDP settings belong to the Hydra config, which
builds the DeepSpeed / FSDP plugin here. A launcher or DeepSpeed JSON that sets any of them
differently stops start-up with a message naming both owners.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from ..batch import BatchPlan
from ..config import ConfigError, ParallelConfig, TrainerConfig

PRECISION = {"fp32": "no", "bf16": "bf16", "bf16_pure": "no"}  # bf16_pure: bf16 weights, no autocast needed


def launcher_settings() -> dict[str, object]:
    """The training settings an ``accelerate config`` / ``accelerate launch`` passed down (environment), as the
    distsft keys they map to."""
    env, out = os.environ, {}
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        out["parallel.strategy"] = "deepspeed"
        out["parallel.zero_stage"] = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        out["parallel.offload_optimizer"] = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
        out["parallel.offload_params"] = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu"
    elif env.get("ACCELERATE_USE_FSDP") == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError("the accelerate launcher asks for FSDP version 1; distsft runs FSDP2: set "
                              "fsdp_version: 2 in the accelerate config "
                              "(or launch hardware-only and set parallel=fsdp)")
        out["parallel.strategy"] = "fsdp"
        out["parallel.fsdp_reshard_after_forward"] = env.get("FSDP_RESHARD_AFTER_FORWARD", "true") == "true"
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", "bf16"):
        raise ConfigError(f"the accelerate launcher sets mixed_precision={precision}; distsft trains in fp32 or bf16 "
                          "(trainer.precision): set mixed_precision to bf16 or no")
    if precision == "bf16":
        out["trainer.precision"] = "bf16"
    if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        out["trainer.grad_accum"] = int(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"])
    if env.get("ACCELERATE_GRADIENT_CLIPPING") not in (None, "none"):
        out["trainer.max_grad_norm"] = float(env["ACCELERATE_GRADIENT_CLIPPING"])
    return out


def adopt_launcher(cfg, given: set[str]) -> list[str]:
    """Take over the launcher's settings (a DictConfig, before validation) for every key not ``given`` on the
    command line; refuse a real conflict, naming both values. Returns 'key=value' of what was adopted."""
    adopted = []
    for key, value in launcher_settings().items():
        ours = OmegaConf.select(cfg, key)
        if key in given or (key.startswith("parallel.") and "parallel" in given):  # parallel=zero3 gives them all
            if ours != value:
                raise ConfigError(f"the accelerate launcher sets {key}={value} but the command line says {key}={ours}: "
                                  "one owner per setting, drop one of them")
            continue
        if ours != value:
            OmegaConf.update(cfg, key, value, merge=False)
            adopted.append(f"{key}={value}")
    if any(a.startswith("trainer.grad_accum=") for a in adopted) and "trainer.global_batch_size" not in given:
        OmegaConf.update(cfg, "trainer.global_batch_size", None, merge=False)  # derived from the adopted accumulation
    return adopted


def check_launcher(parallel: ParallelConfig, trainer: TrainerConfig) -> None:
    """Settings of the accelerate launcher must agree with the config (adopt_launcher took over the ones the
    command line did not give)."""
    launcher = launcher_settings()
    if launcher.get("parallel.strategy") not in (None, parallel.strategy):
        raise ConfigError(f"the accelerate launcher runs {launcher['parallel.strategy']} but parallel.strategy="
                          f"{parallel.strategy}: one owner per setting (drop parallel=... or launch hardware-only)")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", PRECISION[trainer.precision]):
        raise ConfigError(f"the accelerate launcher sets mixed_precision={launched} but trainer.precision="
                          f"{trainer.precision}: precision belongs to the Hydra config (drop --mixed_precision, "
                          f"or set trainer.precision)")


# DeepSpeed JSON fields that distsft fills from the Hydra config
OWNED = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "train_batch_size": "trainer.global_batch_size",
    "gradient_clipping": "trainer.max_grad_norm",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload_optimizer",
    "zero_optimization.offload_param": "parallel.offload_params",
    "sequence_parallel_size": "parallel.sp_size",
    "zero_optimization.zero_hpz_partition_size": "parallel.dp_shard_size",
    "zero_optimization.zero_quantized_weights": "parallel.quantized_comm",
    "zero_optimization.zero_quantized_gradients": "parallel.quantized_comm",
    "data_types.grad_accum_dtype": "trainer.grad_dtype",
    "communication_data_type": "trainer.grad_dtype",
    "optimizer": "optim.*",
    "scheduler": "schedule.*",
}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def deepspeed_config(parallel: ParallelConfig, trainer: TrainerConfig, plan: BatchPlan, cuda: bool) -> dict:
    user: dict = {}
    if parallel.deepspeed_config:
        path = Path(parallel.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config={path}: file not found")
        user = json.loads(path.read_text())
        ours = grad_dtypes(trainer)
        for key, owner in OWNED.items():
            value = _get(user, key)
            if key in ("data_types.grad_accum_dtype", "communication_data_type") and \
                    SHORT_DTYPE.get(value, value) == _get(ours, key):
                continue  # the value distsft sets anyway
            if value is not None and value != "auto":
                raise ConfigError(f"{path} sets {key}={json.dumps(value)}, but {owner} owns it in distsft: set it "
                                  f'to "auto" (or remove it) and use {owner}')
    zero = dict(user.get("zero_optimization", {}), stage=parallel.zero_stage)
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if parallel.zero_stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)  # export gathers full weights
        group = shard_group(parallel, plan.world_size, local_world_size(plan.world_size))
        if group < plan.world_size:  # ZeRO++ hpZ: a secondary copy of the weights within each group of ranks
            zero["zero_hpz_partition_size"] = group
        if parallel.quantized_comm:  # ZeRO++ qwZ (int8 weight all-gather) and qgZ (int4 gradient reduce-scatter)
            zero.update(zero_quantized_weights=True, zero_quantized_gradients=True)
    cfg = {k: v for k, v in user.items() if k not in OWNED and k != "zero_optimization"}
    cfg.update({
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": trainer.max_grad_norm,
        "bf16": {"enabled": trainer.precision == "bf16"},
        "zero_optimization": zero,
        **grad_dtypes(trainer),
        # ZeRO-3's zero.Init (the weights loaded into shards) reads it to size the data-parallel world
        **({"sequence_parallel_size": parallel.sp_size} if parallel.sequence_parallel else {}),
        "steps_per_print": 10**9,  # distsft logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    })
    if parallel.offload_optimizer and not cuda:
        # on a CPU machine the states are already in CPU memory: keep torch's AdamW instead of
        # compiling DeepSpeed's CPUAdam (which is what runs on GPUs)
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}  # DeepSpeed's spelling


def grad_dtypes(trainer: TrainerConfig) -> dict:
    """DeepSpeed's gradient dtypes under bf16. Unset, DeepSpeed 0.19 accumulates the micro-batches' gradients and
    reduces them in the model's dtype (``engine.get_data_types``, ``communication_data_type``): bf16, where ddp
    accumulates and reduces fp32 gradients. ``trainer.grad_dtype`` decides both, on every strategy."""
    short = SHORT_DTYPE[trainer.grad_dtype] if trainer.precision == "bf16" else "fp32"
    return {"data_types": {"grad_accum_dtype": short}, "communication_data_type": short}


def fsdp_mixed_precision(trainer: TrainerConfig):
    """FSDP2's policy under bf16: bf16 compute copies of the (fp32) sharded weights; gradients accumulated without
    sync and reduce-scattered in ``trainer.grad_dtype``. Left to Accelerate, both dtypes would be bf16."""
    if trainer.precision != "bf16":
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, trainer.grad_dtype))


def ddp_kwargs(trainer: TrainerConfig) -> list:
    """DDP reduces the fp32 gradients of autocast in fp32; trainer.grad_dtype=bfloat16 compresses the all-reduce to
    bf16 (torch's bf16_compress_hook; the accumulation over micro-batches stays fp32 in ``.grad``)."""
    if trainer.precision != "bf16" or trainer.grad_dtype != "bfloat16":
        return []
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.BF16)]


def local_world_size(world: int) -> int:
    """Processes on this node (the launcher's LOCAL_WORLD_SIZE; all of them without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def shard_group(parallel: ParallelConfig, world: int, local: int) -> int:
    """Data-parallel ranks that shard the model together: ``parallel.dp_shard_size``, or by default one node's when
    the run spans several nodes (the gathers stay on the fast links), else every one. Only FSDP2 (HSDP) and ZeRO-3
    (hpZ) shard in groups; the other strategies answer the data-parallel world. Under tensor parallelism a
    data-parallel rank is a group of tp ranks (world / tp of them, local / tp on a node)."""
    tp = parallel.tp_size
    world, local = world // tp, max(local // tp, 1)
    if not (parallel.strategy == "fsdp" or parallel.zero3):
        return world
    # by default one node's ranks when the run spans nodes (one rank per node: nothing to keep inside a node);
    # under sequence parallelism flat (its groups and the shard groups are not composed)
    size = parallel.dp_shard_size or (local if world > local > 1 and not parallel.sequence_parallel else world)
    if world % size:
        ranks = f"{world} data-parallel ranks (world / parallel.tp_size={tp})" if tp > 1 else f"{world} processes"
        raise ConfigError(f"parallel.dp_shard_size={size} does not divide the {ranks}: shard groups must "
                          f"tile them (a divisor of {world}, e.g. the {local} of a node)")
    return size


def plugins(parallel: ParallelConfig, trainer: TrainerConfig, plan: BatchPlan, cuda: bool) -> dict:
    """Keyword arguments for Accelerator: the DeepSpeed or FSDP plugin, or nothing for DDP."""
    if parallel.strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        ds = deepspeed_config(parallel, trainer, plan, cuda)
        # the launcher's DeepSpeed fields were adopted into the config (or agree with it); the config built here
        # is their one owner, so Accelerate must not weigh them against it a second time
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        zero3 = parallel.zero_stage == 3  # ZeRO-3 loads pretrained weights straight into shards
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=zero3,
                                                    zero3_save_16bit_model=zero3)}
    if parallel.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=parallel.fsdp_reshard_after_forward,
            auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT",
            cpu_ram_efficient_loading=False, mixed_precision_policy=fsdp_mixed_precision(trainer))}
    return {}


def describe(parallel: ParallelConfig) -> str:
    if parallel.strategy == "deepspeed":
        off = [n for n, on in (("optimizer", parallel.offload_optimizer), ("params", parallel.offload_params)) if on]
        return f"DeepSpeed ZeRO-{parallel.zero_stage}" + (f" (offload {' + '.join(off)} to CPU)" if off else "")
    if parallel.strategy == "fsdp":
        return f"FSDP2 (reshard_after_forward={parallel.fsdp_reshard_after_forward})"
    return "DDP"


def describe_groups(parallel: ParallelConfig, world: int) -> str:
    """How the ranks split the work, for the start line: tensor and sequence parallelism, and the shard groups (flat,
    or hybrid)."""
    group, tp, sp = shard_group(parallel, world, local_world_size(world)), parallel.tp_size, parallel.sp_size
    parts = [f"tensor parallel over groups of {tp} ranks (parallel.tp_size={tp})"] * (tp > 1) + [
        f"Ulysses sequence parallel over groups of {sp} ranks (parallel.sp_size={sp})"] * (sp > 1)
    replicas = world // (tp * sp)
    out = "".join(f"; {p}" for p in parts) + (
        f", {replicas} data-parallel {'replica' if replicas == 1 else 'replicas'}" if parts else "")
    dp = world // tp
    if group == dp or dp == 1:
        return out
    ranks = "data-parallel ranks" if tp > 1 else "ranks"
    if group == 1:
        return out + f"; not sharded, replicated over the {dp} {ranks} (parallel.dp_shard_size=1)"
    how = "HSDP: sharded within" if parallel.strategy == "fsdp" else "hpZ: weights gathered within"
    return out + f"; {how} groups of {group} {ranks}, {dp // group} groups (parallel.dp_shard_size={group})"
