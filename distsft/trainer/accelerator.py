"""Trainer: the Accelerator for this machine and strategy, with a world-size guard.

On a CPU-only machine Accelerate must be told to use gloo: otherwise it can report one process
on every rank while the backend forms a bigger group underneath, and every rank believes it is
the main one. :func:`check_world` stops such a run at start-up instead of training it wrongly.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ..batch import BatchPlan
from ..compat import checked
from ..config import ConfigError, ParallelConfig, TrainerConfig
from .strategy import PRECISION, check_launcher, ddp_kwargs, local_world_size, plugins, shard_group


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(parallel: ParallelConfig, trainer: TrainerConfig, plan: BatchPlan,
                      log_with: list[str] | None = None) -> Accelerator:
    """``log_with``: Accelerate's trackers (trackers.accelerate_trackers), started by metrics.Reporter."""
    check_launcher(parallel, trainer)
    cuda = trainer.use_cuda and torch.cuda.is_available()
    launched = launched_world_size() > 1
    if not launched and parallel.strategy != "ddp":
        single_process_group()
    # a single process gets no process group unless DeepSpeed/FSDP needs one
    group = launched or parallel.strategy != "ddp"
    kwargs = [InitProcessGroupKwargs(backend="nccl" if cuda else parallel.cpu_backend,
                                     timeout=timedelta(seconds=trainer.collective_timeout))] if group else []
    extra = plugins(parallel, trainer, plan, cuda)
    if parallel.strategy == "ddp":
        kwargs += ddp_kwargs(trainer)
    if "deepspeed_plugin" in extra and not cuda:
        announce_op_build()
    if parallel.sequence_parallel and parallel.strategy == "deepspeed":  # (under fsdp: the mesh below, model.sequence)
        extra["parallelism_config"] = sequence_parallelism(parallel.sp_size, plan)
    mesh = fsdp_parallelism(parallel, plan.world_size)  # set once the Accelerator is made (use_mesh)
    accelerator = Accelerator(
        # cpu=True disables DeepSpeed; DeepSpeed on a CPU machine runs on its CPU accelerator instead (FSDP
        # keeps cpu=True: fsdp_on_cpu turns the CPU processes' state into FSDP)
        cpu=not cuda and (not extra or "fsdp_plugin" in extra),
        mixed_precision=PRECISION[trainer.precision],
        gradient_accumulation_steps=plan.grad_accum,
        kwargs_handlers=kwargs,
        # the trainer steps its scheduler once per optimizer step itself (no per-process stepping)
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        **extra,
    )
    if "fsdp_plugin" in extra and not cuda:
        fsdp_on_cpu(accelerator, extra["fsdp_plugin"])
    if mesh is not None and accelerator.num_processes > 1:
        use_mesh(accelerator, mesh)
    check_world(accelerator)
    return accelerator


def sequence_parallelism(sp_size: int, plan: BatchPlan):
    """Ulysses sequence parallelism through Accelerate's ParallelismConfig: at ``prepare`` Accelerate registers
    DeepSpeed's all-to-all attention in front of the model's own attention function (model.sequence) and hands
    DeepSpeed its sequence-parallel groups. The trainer shards the rows itself (data.collate.sequence_shard),
    so Accelerate's data-loader adapter is never used."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    # the attention implementation is filled in by model.sequence.prepare_attention, once the model is loaded
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_disable_in_eval=False)
    return ParallelismConfig(sp_size=sp_size, sp_backend="deepspeed", sp_handler=handler,
                             dp_replicate_size=plan.dp_size)


def fsdp_parallelism(parallel: ParallelConfig, world: int):
    """FSDP2's device mesh as Accelerate's ParallelismConfig, ``dp_replicate x dp_shard x sp x tp``: HSDP (sharded
    within each group of ``strategy.shard_group`` ranks, the groups replicas of each other, gradients all-reduced
    across them), Ulysses sequence parallelism (``sp``: FSDP2 shards over dp_shard x sp, whose ranks hold the same
    weights) and tensor parallelism (``tp`` innermost: a node's neighbouring ranks); None for flat sharding without
    TP or SP, or another strategy."""
    if parallel.strategy != "fsdp":
        return None
    tp, sp, group = parallel.tp_size, parallel.sp_size, shard_group(parallel, world, local_world_size(world))
    peers = world // tp  # the ranks FSDP2 shards over (data- and sequence-parallel)
    if group == peers and tp == 1 and sp == 1:
        return None
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(dp_replicate_size=peers // group, dp_shard_size=group // sp, sp_size=sp, tp_size=tp)


def use_mesh(accelerator: Accelerator, pc) -> None:
    """What ``Accelerator(parallelism_config=...)`` does, done once the Accelerator exists (on CPU processes once
    they are FSDP: fsdp_on_cpu), with one difference: the mesh keeps a ``dp_shard`` dimension of size 1 when tp
    spans every data-parallel rank, so FSDP2 and TP compose the same way at every size (Accelerate refuses that
    case: its FSDP needs a dimension to shard over)."""
    from torch.distributed.device_mesh import init_device_mesh

    checked("trainer.tp_mesh")
    sizes = {"dp_replicate": pc.dp_replicate_size, "dp_shard": pc.dp_shard_size, "sp": pc.sp_size, "tp": pc.tp_size}
    dims = {k: v for k, v in sizes.items() if v > 1 or k == "dp_shard"}
    mesh = init_device_mesh(accelerator.device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
    data = tuple(k for k in dims if k.startswith("dp"))
    # the names Accelerate's FSDP2 reads: it shards over "dp_shard_cp" (here the sequence-parallel ranks too, which
    # hold the same weights) and replicates over "dp_replicate"
    mesh[tuple(k for k in ("dp_shard", "sp") if k in dims)]._flatten("dp_shard_cp")
    mesh[data]._flatten("dp")
    mesh[tuple(k for k in dims if k != "tp")]._flatten("dp_cp")
    accelerator.state.parallelism_config, accelerator.state.device_mesh = pc, mesh
    pc.device_mesh = mesh
    if pc.tp_enabled:
        supply_replicate_parallel()


def supply_replicate_parallel() -> None:
    """Accelerate 1.16's ``_prepare_tp`` makes every parameter TP left whole a replicated DTensor, so that FSDP2
    shards all of them over the same 2-D mesh, with ``transformers.integrations.tensor_parallel.ReplicateParallel``,
    which transformers 5 no longer has. Its behaviour, restored: the module's tensor inputs become replicated
    DTensors, its output a local tensor again."""
    import transformers.integrations.tensor_parallel as tpi

    if hasattr(tpi, "ReplicateParallel"):
        return
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inputs(module, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

    def output(module, out, mesh):
        return out.to_local() if isinstance(out, DTensor) else out

    class ReplicateParallel:
        def prepare_module_tp(self, module, mesh):
            if not getattr(module, "_distsft_replicated", False):  # once per module (it is asked per parameter)
                module._distsft_replicated = True
                distribute_module(module, mesh, input_fn=inputs, output_fn=output)

    tpi.ReplicateParallel = ReplicateParallel


def fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Accelerate applies its FSDP plugin only to GPU-like distributed types: on CPU processes (gloo) it
    would silently run DDP. FSDP2's ``fully_shard`` works on CPU, so mark the state as FSDP: the same code
    path (Accelerate's FSDP2 preparation, checkpointing and gathering) then runs on CPU and on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:  # one process: nothing to shard
        return
    checked("trainer.fsdp_on_cpu")
    PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin


def announce_op_build() -> None:
    """DeepSpeed on CPU processes compiles its shared-memory collectives (a C++ op) on the first start on a
    machine and caches it: say so before the silent pause (about 30-60 s on 2 cores)."""
    import glob
    import logging

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    if int(os.environ.get("RANK", "0")) == 0 and not glob.glob(f"{root}/**/deepspeed_shm_comm/*.so", recursive=True):
        logging.getLogger("distsft").info(
            "DeepSpeed compiles its CPU collectives op (deepspeed_shm_comm) on this first start and caches it in %s: "
            "a pause of about a minute", root)


def single_process_group() -> None:
    """``python -m distsft.train parallel=zero2`` without a launcher: DeepSpeed and FSDP need a process group
    even for one process, so describe a 1-process group in the environment torch.distributed reads (a
    launcher's own variables are left alone). ZeRO on one process still offloads and partitions nothing
    else; more processes need ``accelerate launch``, ``torchrun`` or ``srun``."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def requested_by_launcher() -> int | None:
    """--num_processes of an ``accelerate launch`` that is our parent process, if any.

    On a machine without GPUs, ``accelerate launch --num_processes 2`` (no --multi_gpu) quietly
    runs ONE process; this lets us stop instead of training with a different batch than asked.
    """
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    head = argv[:3]  # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    if not (any(a.endswith("accelerate") for a in head) and "launch" in argv
            or "accelerate.commands.launch" in head):
        return None
    for i, a in enumerate(argv):
        if a.startswith("--num_processes="):
            return int(a.split("=", 1)[1])
        if a == "--num_processes" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def check_world(accelerator: Accelerator) -> None:
    launched = launched_world_size()
    asked = requested_by_launcher()
    if asked and asked > 1 and launched == 1:
        raise ConfigError(
            f"`accelerate launch --num_processes {asked}` started a single process: without GPUs Accelerate "
            "only starts several processes with --multi_gpu (torchrun; CPU processes then talk over gloo). "
            f"Use `accelerate launch --multi_gpu --num_processes {asked} ...` or "
            "`accelerate launch --config_file launch/cpu_2proc.yaml ...`")
    backend = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not accelerator.num_processes == backend == launched:
        raise ConfigError(
            f"world size mismatch: launcher says {launched}, torch.distributed {backend}, Accelerate "
            f"{accelerator.num_processes}; on CPU keep parallel.cpu_backend=gloo and launch with "
            "`accelerate launch --multi_gpu --num_processes N`")
