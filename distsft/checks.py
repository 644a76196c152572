"""Configuration stage, part 2: a composed config becomes the typed tree (``to_object``), checked by the
rules a schema cannot express: unknown keys, allowed values, bounds, paths, and the combinations that do
not work (each refused with the alternative; docs/peft.md and docs/parallel.md list the matrix)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .comm import check_cluster
from .config import Config, ConfigError
from .trainer.trackers import check_trackers

CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("pretrained", "config"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2", "varlen"),
    "model.kernels": ("auto", "torch", "liger"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "instruction_completion"),
    "data.bad_rows": ("error", "skip"),
    "data.mode": ("pack", "pad"),
    "data.loss_on": ("assistant", "last_assistant", "all"),
    "data.multiturn": ("final", "per_turn"),
    "data.overlong": ("drop", "truncate"),
    "optim.name": ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"),
    "peft.method": ("none", "lora", "dora"),
    "peft.quantize": ("none", "nf4", "int8"),
    "peft.compute_dtype": ("bfloat16", "float16", "float32"),
    "export.mode": ("auto", "full", "adapter", "merged"),
    "schedule.name": ("cosine", "linear", "constant"),
    "parallel.strategy": ("ddp", "deepspeed", "fsdp"),
    "parallel.zero_stage": (1, 2, 3),
    "trainer.precision": ("fp32", "bf16", "bf16_pure"),
    "trainer.grad_dtype": ("float32", "bfloat16"),
    "trainer.loss_head": ("supervised", "full"),
}


# (key, test, what is expected): numeric ranges, checked at compose time before anything is written
RANGES: list[tuple[str, Any, str]] = [
    ("optim.lr", lambda v: 0 <= v < 1, "a learning rate in [0, 1)"),
    ("optim.weight_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: 0 < v < 1, "in (0, 1)"),
    ("schedule.warmup_steps", lambda v: v is None or v >= 0, ">= 0 or null"),
    ("trainer.max_grad_norm", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("trainer.epochs", lambda v: v >= 0, ">= 0"),
    ("trainer.eval_every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("trainer.save_every", lambda v: v >= 0, ">= 0 (0: only the last step)"),
    ("trainer.save_total_limit", lambda v: v >= 0, ">= 0 (0 keeps all)"),
    ("trainer.stop_after", lambda v: v >= 0, ">= 0"),
    ("trainer.hang_timeout", lambda v: v >= 0, ">= 0 seconds (0: no watchdog)"),
    ("parallel.dp_shard_size", lambda v: v is None or v >= 1, ">= 1 ranks, or null (one node's)"),
    ("plan.checkpoint_gbps", lambda v: v > 0, "> 0 GB/s"),
    ("plan.stage_gbps", lambda v: v > 0, "> 0 GB/s"),
    ("trainer.collective_timeout", lambda v: v > 0, "> 0 seconds"),
    ("trainer.max_bad_steps", lambda v: v >= 1, ">= 1"),
    ("trainer.spike_factor", lambda v: v == 0 or v > 1, "0 (off) or > 1"),
    ("trainer.spike_window", lambda v: v >= 1, ">= 1"),
    ("trainer.early_stop_patience", lambda v: v >= 0, ">= 0 (0: off)"),
    ("trainer.early_stop_min_delta", lambda v: v >= 0, ">= 0"),
    ("peft.r", lambda v: v >= 1, ">= 1"),
    ("peft.alpha", lambda v: v > 0, "> 0"),
    ("peft.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.min_tokens", lambda v: v >= 0, ">= 0"),
    ("data.num_proc", lambda v: v >= 0, ">= 0 (0: one per CPU core)"),
    ("data.shard_size", lambda v: v >= 1, ">= 1"),
    ("data.prepare_timeout", lambda v: v >= 1, ">= 1 second"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("logging.log_every", lambda v: v >= 1, ">= 1"),
    ("logging.sample_every", lambda v: v >= 0, ">= 0 (0: off)"),
    ("logging.sample_max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("logging.sample_count", lambda v: v >= 1, ">= 1"),
    ("preview.examples", lambda v: v >= 0, ">= 0"),
    ("plan.world_size", lambda v: v >= 1, ">= 1"),
    ("plan.host_memory_gib", lambda v: v is None or v > 0, "> 0 GiB, or null (not bounded)"),
    ("plan.nodes", lambda v: v is None or v >= 1, ">= 1, or null (the preset's)"),
    ("plan.gpus_per_node", lambda v: v is None or 1 <= v <= 64, "in [1, 64], or null (the preset's)"),
    ("plan.intra_node_gbps", lambda v: v is None or v > 0, "> 0 GB/s per GPU, or null (the preset's)"),
    ("plan.inter_node_gbps", lambda v: v is None or v > 0, "> 0 Gb/s per node, or null (the preset's)"),
    ("plan.intra_latency_us", lambda v: v is None or v >= 0, ">= 0 microseconds, or null (the preset's)"),
    ("plan.inter_latency_us", lambda v: v is None or v >= 0, ">= 0 microseconds, or null (the preset's)"),
    ("parallel.sp_size", lambda v: v >= 1, ">= 1 (1: no sequence parallelism)"),
    ("parallel.tp_size", lambda v: v >= 1, ">= 1 (1: no tensor parallelism)"),
    ("model.tiled_mlp_shards", lambda v: v >= 0, ">= 0 (0: off)"),
]


def to_object(cfg: DictConfig | Config) -> Config:
    """Resolve a composed DictConfig into the typed dataclass tree and validate it."""
    if not isinstance(cfg, Config):
        check_known_keys(cfg)
    obj = cfg if isinstance(cfg, Config) else OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Every key is a field of its schema. A plain typo fails at compose time already, but a ``+key`` override
    (Hydra's own hint after a typo) adds the key to a schema node, where it would be carried along unused."""
    import dataclasses
    import difflib

    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key {prefix}{key} (added with +{prefix}{key}=...?){hint}")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_known_keys(node, f"{prefix}{key}.")


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key, ok, expected in RANGES:
        value = _get(cfg, key)
        if not ok(value) or value != value:  # value != value: NaN
            raise ConfigError(f"{key}={value}: expected {expected}")
    t, d = cfg.trainer, cfg.data
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if cfg.model.checkpoint_every < 1:
        raise ConfigError(f"model.checkpoint_every={cfg.model.checkpoint_every} must be >= 1 "
                          "(1 recomputes every layer)")
    if cfg.model.offload_checkpoints and not cfg.model.gradient_checkpointing:
        raise ConfigError("model.offload_checkpoints=true moves what activation checkpointing keeps (each recomputed "
                          "layer's input) to host memory, and model.gradient_checkpointing=false keeps nothing of the "
                          "kind: add model.gradient_checkpointing=true, or drop model.offload_checkpoints")
    if t.loss_chunk < 0:
        raise ConfigError(f"trainer.loss_chunk={t.loss_chunk} must be >= 0 "
                          "(0: the head sees all supervised positions at once)")
    if d.max_seq_len < 2:
        raise ConfigError(f"data.max_seq_len={d.max_seq_len} must be >= 2")
    if d.multiturn == "per_turn" and d.loss_on != "assistant":
        raise ConfigError(f"data.multiturn=per_turn makes one example per assistant turn and supervises that turn, "
                          f"which data.loss_on={d.loss_on} contradicts: use data.loss_on=assistant with it, or "
                          f"data.multiturn=final")
    if not d.train_on_reasoning and d.loss_on == "all":
        raise ConfigError("data.train_on_reasoning=false takes the reasoning out of the assistant turns, which "
                          "data.loss_on=all supervises with everything else: use data.loss_on=assistant or "
                          "last_assistant with it, or data.train_on_reasoning=true")
    if t.max_steps < 0 or t.epochs <= 0 and t.max_steps == 0:
        raise ConfigError(f"set trainer.max_steps > 0 or trainer.epochs > 0 (got {t.max_steps}, {t.epochs})")
    if not 0.0 <= cfg.schedule.warmup_ratio < 1.0:
        raise ConfigError(f"schedule.warmup_ratio={cfg.schedule.warmup_ratio} must be in [0, 1)")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={cfg.schedule.min_lr_ratio} must be in [0, 1]")
    par = cfg.parallel
    if par.offload_params and not par.zero3:
        raise ConfigError("parallel.offload_params=true needs parallel.strategy=deepspeed with zero_stage=3")
    if par.offload_optimizer and par.strategy != "deepspeed":
        raise ConfigError("parallel.offload_optimizer=true needs parallel.strategy=deepspeed")
    check_combinations(cfg)
    check_sequence_parallel(cfg)
    check_hybrid(cfg)
    check_tensor_parallel(cfg)
    check_quantized_comm(cfg)
    check_trackers(cfg.logging.trackers)  # known and installed
    check_cluster(cfg)  # plan.cluster names a preset, and its overrides agree with plan.world_size
    if cfg.model.attn_implementation == "varlen" and d.mode != "pack":
        raise ConfigError("model.attn_implementation=varlen needs data.mode=pack (it reads packed cu_seqlens)")
    if t.export_best and not (t.eval_every and (d.val_files or d.val_fraction > 0)):
        raise ConfigError("trainer.export_best=true needs evals: set trainer.eval_every and data.val_fraction or "
                          "val_files")
    if len(cfg.diagnosis.bands) != 3 or sorted(cfg.diagnosis.bands) != list(cfg.diagnosis.bands):
        raise ConfigError(f"diagnosis.bands={cfg.diagnosis.bands}: expected 3 increasing loss values")
    if not cfg.output_dir:
        raise ConfigError("output_dir must be set")


def check_sequence_parallel(cfg: Config) -> None:
    """parallel.sp_size > 1: what Ulysses sequence parallelism runs with (docs/parallel.md's list)."""
    par, sp = cfg.parallel, cfg.parallel.sp_size
    if sp == 1:
        return
    if par.strategy not in ("deepspeed", "fsdp"):
        raise ConfigError(f"parallel.sp_size={sp} runs DeepSpeed's Ulysses sequence parallelism: use parallel=zero1, "
                          f"zero2, zero3 or fsdp with it (got parallel.strategy={par.strategy})")
    if cfg.data.mode != "pack":
        raise ConfigError(f"parallel.sp_size={sp} splits packed rows (position_ids carry the documents across the "
                          "split, no attention mask): use data.mode=pack")
    if cfg.model.attn_implementation == "eager":
        raise ConfigError(f"model.attn_implementation=eager with parallel.sp_size={sp}: DeepSpeed's Ulysses "
                          "attention passes no mask, eager needs one; use sdpa or varlen")
    refused = {"model.kernels=liger": cfg.model.kernels == "liger",
               "model.compile=true": cfg.model.compile}
    for what, on in refused.items():
        if on:
            raise ConfigError(f"{what} with parallel.sp_size={sp} is not supported yet: drop one of them")


def check_hybrid(cfg: Config) -> None:
    """parallel.dp_shard_size: shard groups exist under FSDP2 (HSDP) and ZeRO-3 (hpZ) only, without Ulysses."""
    par, size = cfg.parallel, cfg.parallel.dp_shard_size
    if size is None:
        return
    if not (par.strategy == "fsdp" or par.zero3):
        raise ConfigError(f"parallel.dp_shard_size={size} shards within groups of ranks under parallel=fsdp (HSDP) or "
                          f"parallel=zero3 (ZeRO++ hpZ); under parallel.strategy={par.strategy}"
                          f"{f' zero_stage={par.zero_stage}' if par.strategy == 'deepspeed' else ''} there is no "
                          "parameter sharding to group: drop it, or use one of those")
    if par.sequence_parallel:
        raise ConfigError(f"parallel.dp_shard_size={size} with parallel.sp_size={par.sp_size} is not supported yet "
                          "(hpZ's groups and Ulysses' groups are not composed): drop one of them")


def check_tensor_parallel(cfg: Config) -> None:
    """parallel.tp_size > 1: TP over FSDP2 (Accelerate's device mesh, transformers' tp_plan), full fine-tuning."""
    par, tp = cfg.parallel, cfg.parallel.tp_size
    if tp == 1:
        return
    if par.strategy != "fsdp":
        raise ConfigError(f"parallel.tp_size={tp} runs tensor parallelism over FSDP2 (a data-parallel x "
                          f"tensor-parallel device mesh): use parallel=fsdp with it (got parallel.strategy="
                          f"{par.strategy}; DeepSpeed's AutoTP is not wired in)")
    refused = {f"peft={cfg.peft.method}": cfg.peft.method != "none",
               "model.kernels=liger": cfg.model.kernels == "liger", "model.fp8=true": cfg.model.fp8,
               "model.tiled_mlp_shards": cfg.model.tiled_mlp_shards > 0}  # (compile: refused under fsdp already)
    for what, on in refused.items():
        if on:
            raise ConfigError(f"{what} with parallel.tp_size={tp} is not supported yet: drop one of them "
                              "(docs/parallel.md, 'Tensor parallelism', lists what TP runs with)")


def check_quantized_comm(cfg: Config) -> None:
    """parallel.quantized_comm: ZeRO++'s quantized collectives exist for ZeRO-3 on CUDA (checked at start-up)."""
    par = cfg.parallel
    if par.quantized_comm and not par.zero3:
        raise ConfigError("parallel.quantized_comm quantizes ZeRO-3's weight gathers and gradient reduce-scatters "
                          f"(ZeRO++ qwZ, qgZ): use parallel=zero3 with it (got parallel.strategy={par.strategy}"
                          f"{f' zero_stage={par.zero_stage}' if par.strategy == 'deepspeed' else ''})")


def check_combinations(cfg: Config) -> None:
    """Combinations that do not work, refused with the alternative (docs/peft.md lists the matrix)."""
    pe, par, opt = cfg.peft, cfg.parallel, cfg.optim
    ds = par.strategy == "deepspeed"
    if pe.quantize != "none" and pe.method == "none":
        raise ConfigError(f"peft.quantize={pe.quantize} freezes the base in {pe.quantize}: it needs adapters to train "
                          "(peft=qlora, or peft.method=lora)")
    if pe.method == "none" and cfg.export.mode in ("adapter", "merged"):
        raise ConfigError(f"export.mode={cfg.export.mode} needs adapters (peft=lora|dora|qlora); use export.mode=full")
    if pe.method != "none" and cfg.export.mode == "full":
        raise ConfigError("export.mode=full under PEFT: use export.mode=merged (a full model with the adapters "
                          "folded in) or adapter")
    if pe.quantize != "none" and par.strategy == "fsdp":
        raise ConfigError("peft.quantize with parallel=fsdp is not supported; use parallel=zero3 (QLoRA) or ddp")
    if pe.quantize != "none" and ds and par.offload_params:
        raise ConfigError("peft.quantize with parallel.offload_params: DeepSpeed cannot offload bitsandbytes weights; "
                          "use parallel=zero3 without parameter offload")
    if opt.name != "adamw" and par.offload_optimizer:
        raise ConfigError(f"optim.name={opt.name} with parallel.offload_optimizer=true: DeepSpeed keeps the offloaded "
                          "optimizer state itself (its CPUAdam); use optim=adamw")
    if cfg.trainer.precision == "bf16_pure" and (par.strategy != "ddp" or opt.name != "adamw" or pe.method != "none"):
        raise ConfigError(f"trainer.precision=bf16_pure (bf16 weights, stochastic rounding in torchao's AdamW) is for "
                          f"full fine-tuning with optim=adamw under parallel=ddp "
                          f"(got parallel.strategy={par.strategy}, "
                          f"optim.name={opt.name}, peft.method={pe.method}); use trainer.precision=bf16 (fp32 masters) "
                          "otherwise: DeepSpeed and FSDP keep fp32 masters themselves, adapters are small")
    if cfg.trainer.grad_dtype == "bfloat16" and cfg.trainer.precision != "bf16":
        raise ConfigError(f"trainer.grad_dtype=bfloat16 rounds the accumulated and reduced gradients of a bf16 run; "
                          f"with trainer.precision={cfg.trainer.precision} there is no bf16 gradient to trade: drop "
                          "trainer.grad_dtype, or set trainer.precision=bf16")
    if cfg.model.compile and par.strategy == "fsdp":
        raise ConfigError("model.compile=true with parallel=fsdp is not supported yet (FSDP2 shards the layers that "
                          "would be compiled, and it is untested here); use parallel=ddp or zero1|zero2|zero3, or "
                          "model.compile=false")
    if cfg.model.fp8 and pe.quantize != "none":
        raise ConfigError(f"model.fp8=true: peft.quantize={pe.quantize} keeps the base in bitsandbytes' own format and "
                          "matmuls; use peft=lora (an unquantised base), or drop model.fp8")
    if opt.name == "adafactor" and ds:
        raise ConfigError("optim.name=adafactor under DeepSpeed ZeRO sees flattened 1-D shards and cannot factor its "
                          "second moment; use optim=adamw_8bit (or adamw) with ZeRO, or adafactor with parallel=ddp")


def check_paths(cfg: Config) -> None:
    """Paths a run reads and writes, checked before anything is written: the output directory can be one,
    and a local model or tokenizer directory exists (with readable weights when they are loaded). A name
    that is not a local path is a hub name (loaded where a network exists)."""
    import os
    from pathlib import Path

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} exists and is not a directory; choose another output_dir")
    if out.is_dir() and not os.access(out, os.W_OK):  # a read-only filesystem (root included) or permissions
        raise ConfigError(f"output_dir={out} is not writable (a read-only filesystem, or its permissions); choose "
                          "another output_dir")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise ConfigError(f"output_dir={out} cannot be created: {parent} is not a writable directory")
    check_model_paths(cfg)
    stage = Path(cfg.trainer.async_stage)
    if cfg.trainer.async_save and not (stage.is_dir() and os.access(stage, os.W_OK)):
        raise ConfigError(f"trainer.async_stage={stage}: not a writable directory (trainer.async_save stages each "
                          "rank's checkpoint there, in host memory: a tmpfs such as /dev/shm)")


def check_model_paths(cfg: Config) -> None:
    """The model's and tokenizer's sources, before anything loads: a local directory exists with a config.json
    transformers knows, tokenizer files and (when loaded) readable weights; a hub id can be fetched or is cached
    (``model.source``)."""
    from .model.source import check_model_source

    check_model_source(cfg.model)


def check_device_combinations(cfg: Config, cuda: bool, capability: tuple[int, int] | None = None) -> None:
    """Combinations that depend on the device (``capability``: the GPU's compute capability, read when needed)."""
    pe, par = cfg.peft, cfg.parallel
    from .model.precision import half_compute

    if not cuda and par.quantized_comm:
        raise ConfigError("parallel.quantized_comm runs ZeRO++'s CUDA quantization kernels (int8 weights, int4 "
                          "gradients), which DeepSpeed has for GPUs only; on CPU drop it "
                          "(parallel.quantized_comm=false)")
    if not cuda and par.strategy == "ddp" and cfg.trainer.grad_dtype == "bfloat16":
        raise ConfigError("trainer.grad_dtype=bfloat16 under parallel=ddp compresses the all-reduce with torch's "
                          "bf16 hook, which needs CUDA (NCCL); on CPU use trainer.grad_dtype=float32 (or ZeRO/FSDP)")
    if cuda and cfg.model.fp8:
        import torch

        capability = capability or torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise ConfigError(f"model.fp8=true needs FP8 tensor cores (compute capability 8.9+: H100, H200, L40S); "
                              f"this GPU has {capability[0]}.{capability[1]}: drop model.fp8")

    if cuda and cfg.model.attn_implementation == "varlen" and not half_compute(cfg):
        raise ConfigError("model.attn_implementation=varlen on CUDA runs flash kernels, which need bf16 compute: set "
                          "trainer.precision=bf16 (or use attn_implementation=sdpa for fp32)")
    if cfg.model.kernels == "liger":
        if not cuda:
            raise ConfigError("model.kernels=liger needs CUDA (Liger's kernels are Triton GPU kernels); use "
                              "model.kernels=torch on this machine")
        if par.shards_parameters:
            raise ConfigError("model.kernels=liger reads the output head's full weight for its fused loss, which "
                              "ZeRO-3 and FSDP shard; use model.kernels=torch with them, or parallel=zero2")
    if not cuda and pe.quantize == "nf4" and par.zero3:
        raise ConfigError("peft.quantize=nf4 with ZeRO-3 needs CUDA (bitsandbytes' CPU 4-bit kernels cannot read the "
                          "bf16 storage ZeRO-3 requires); on CPU use parallel=zero2 or ddp")
