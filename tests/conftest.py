"""Shared test helpers: compose the real Hydra config, run the real pipeline, launch 2 processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distsft.checks import to_object
from distsft.config import register_configs

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tokenized-data cache of this test session only (subprocesses inherit it)."""
    os.environ["DISTSFT_CACHE"] = str(tmp_path_factory.mktemp("distsft-cache"))


def compose_cfg(*overrides: str):
    """The DictConfig `python -m distsft.train <overrides>` would see."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def typed_cfg(*overrides: str):
    return to_object(compose_cfg(*overrides))


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_tiny(out: Path, *overrides: str):
    """Run the pipeline in this process (1 process, CPU) on the embedded default."""
    from distsft.run import run

    reset_accelerate()
    try:
        return run(typed_cfg(f"output_dir={out}", "logging.progress_bar=false", "trainer.use_cuda=false",
                             *overrides))
    finally:
        reset_accelerate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(num_processes: int, out: Path, *overrides: str, port: int | None = None,
               launcher_args: tuple[str, ...] = (), module: str = "distsft.train") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch" / "cpu_2proc.yaml"), "--num_processes", str(num_processes),
            "--main_process_port", str(port or free_port()), *launcher_args,
            "-m", module, f"output_dir={out}", "logging.progress_bar=false", *overrides]


# DeepSpeed keeps parameters under 1e5 elements (stage3_param_persistence_threshold) whole on every rank after
# their first gather: all of the tiny model's. This override shards them all, as a real model's large weights are,
# so ZeRO-3 tests exercise the gathering around every use.
SHARD_ALL = ROOT / "tests" / "assets" / "ds_shard_all.json"
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch(num_processes: int, out: Path, *overrides: str, timeout: int = 600, expect_ok: bool = True,
           env: dict | None = None, module: str = "distsft.train"):
    """`accelerate launch` num_processes CPU processes (gloo; ``env`` may give GPUs back); returns
    summary.json (or the process). ZeRO-3 runs partition every parameter (SHARD_ALL) unless a test gives its own
    DeepSpeed config."""
    if (any(o.startswith("parallel=zero3") for o in overrides)
            and not any(o.startswith("parallel.deepspeed_config=") for o in overrides)):
        overrides = (*overrides, f"parallel.deepspeed_config={SHARD_ALL}")
    proc = subprocess.run(launch_cmd(num_processes, out, *overrides, module=module), cwd=ROOT,
                          env={**CPU_ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def tokenizer():
    from distsft.model.load import load_tokenizer

    return load_tokenizer(typed_cfg().model)


@pytest.fixture
def tiny_model():
    from distsft.model.load import load_model

    return load_model(typed_cfg().model, seed=0)


def save_tiny(directory: Path, seed: int, dtype=None) -> Path:
    """The embedded tiny model (initialised with ``seed``, cast to ``dtype``) and its tokenizer, saved where
    from_pretrained loads them: ``directory/tiny``."""
    from distsft.model.load import load_model, load_tokenizer

    cfg = typed_cfg()
    model = load_model(cfg.model, seed=seed)
    (model.to(dtype) if dtype is not None else model).save_pretrained(directory / "tiny")
    load_tokenizer(cfg.model).save_pretrained(directory / "tiny")
    return directory / "tiny"


def peak_allocated(fn) -> tuple[int, object]:
    """(peak bytes of tensors allocated while ``fn()`` runs, above what was live before; its result), from
    the CPU allocator's events as torch.profiler records them (tensor bytes, not process RSS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()  # + allocation, - free
        peak = max(peak, live)
    return peak, result


def checkpoint_masters(ckpt: Path) -> dict:
    """The fp32 master weights in a checkpoint directory written by any strategy, by parameter name (as
    ``model.named_parameters()`` names them): DeepSpeed's fp32 optimizer partitions (zero_to_fp32; ZeRO-1 under
    bf16 runs DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 refuses: bf16_optimizer_masters), FSDP2's
    DCP shards, or the model file of ddp."""
    import torch

    if is_bf16_optimizer_checkpoint(ckpt / "pytorch_model"):
        return bf16_optimizer_masters(ckpt / "pytorch_model")
    if (ckpt / "pytorch_model" / "latest").exists() or (ckpt / "latest").exists():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return {k: v.float() for k, v in
                get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model").items()}
    dcp = ckpt / "pytorch_model_fsdp_0"
    if dcp.is_dir():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(dcp), f"{tmp}/model.pt")
            state = torch.load(f"{tmp}/model.pt", weights_only=True)["model"]  # Accelerate's key
        return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def is_bf16_optimizer_checkpoint(ds_dir: Path) -> bool:
    """DeepSpeed names every optimizer file of a bf16 run bf16_zero_pp_rank_*; the ZeRO-1/2 optimizer's states
    carry zero_stage, the BF16_Optimizer's do not."""
    import torch

    files = sorted(ds_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    return bool(files) and "zero_stage" not in torch.load(files[0], map_location="cpu",
                                                          weights_only=False)["optimizer_state_dict"]


def bf16_optimizer_masters(ds_dir: Path) -> dict:
    """The fp32 masters of a checkpoint written by DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 and
    ``data_types.grad_accum_dtype: fp32``): each rank's file holds its slice of every group's flat fp32 partition
    (``single_partition_of_fp32_groups``) and, per parameter name, the (numel, start) of the fragment of that
    parameter in it (``param_slice_mappings``). A parameter split between ranks has its fragments in rank order.
    Frozen parameters and buffers (no masters) come from the module's weights as saved, cast to fp32."""
    import torch

    model = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    files = sorted(ds_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"), key=lambda f: int(f.name.split("_")[4]))
    optim = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    assert len(files) == max(optim[0]["partition_count"]), f"{len(files)} optimizer files in {ds_dir}"
    out = {k: v.float() for k, v in model["module"].items()}
    for g, shapes in enumerate(model["param_shapes"]):
        for name, shape in shapes.items():
            parts = [o["single_partition_of_fp32_groups"][g].narrow(0, a.start, a.numel)
                     for o in optim if (a := o["param_slice_mappings"][g].get(name)) is not None]
            out[name] = torch.cat(parts).view(shape).clone()
    for alias, name in model["shared_params"].items():
        out[alias] = out[name]
    return out
