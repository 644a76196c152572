"""Configuration stage: the typed config tree, its registration with Hydra, and batch arithmetic.

Every option is a dataclass field with a default and a one-line docstring (the ``#:``
comment above it). Hydra composes the YAML groups under ``conf/`` over these schemas, so an
unknown key or a wrong type fails at compose time naming the key. Cross-field rules that a
schema cannot express live in ``checks.py``; the batch arithmetic in ``batch.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent / "assets"


class ConfigError(ValueError):
    """A configuration that composes but cannot run; the message names the key(s)."""


@dataclass
class ModelConfig:
    #: Hub name or local directory of a causal LM (config + weights + tokenizer).
    name_or_path: str = str(ASSETS / "tiny-llama")
    #: Tokenizer name or directory; null means the same as name_or_path.
    tokenizer: Optional[str] = None
    #: pretrained (load the weights) or config (random weights from config.json: the tiny model).
    init: str = "pretrained"
    #: Storage dtype of the weights: float32 or bfloat16 (fp32 masters train; docs/precision.md).
    dtype: str = "float32"
    #: Attention kernel: auto (docs/training.md), sdpa, eager, flash_attention_2 or varlen.
    attn_implementation: str = "auto"
    #: Allow code from the model repository (needed by some hub models).
    trust_remote_code: bool = False
    #: Hub revision (branch, tag or commit) when loading by name.
    revision: Optional[str] = None
    #: Recompute activations in backward (non-reentrant): less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    #: With gradient_checkpointing: recompute only every Nth decoder layer (1: all; 2: half).
    checkpoint_every: int = 1
    #: Tiled MLP: each decoder MLP runs on this many chunks of a row (0: off; no MoE layers).
    tiled_mlp_shards: int = 0
    #: With gradient_checkpointing: keep saved layer inputs in pinned host memory.
    offload_checkpoints: bool = False
    #: Layer kernels: auto (liger where it runs, else torch), torch or liger (CUDA; no ZeRO-3/FSDP).
    kernels: str = "auto"
    #: Regional torch.compile of the decoder layers (the first step compiles); not with fsdp yet.
    compile: bool = False
    #: FP8 matmuls in the decoder's linear layers (CUDA sm_89+; docs/precision.md); not with QLoRA.
    fp8: bool = False


@dataclass
class DataConfig:
    #: Training data: .jsonl/.json/.parquet/.csv/.arrow files, dataset dirs or hub names.
    train_files: list[str] = field(default_factory=lambda: [str(ASSETS / "data" / "tiny_sft.jsonl")])
    #: Mixing weight per train file: <= 1 a fraction of its rows, > 1 that many rows; empty: all.
    train_weights: list[float] = field(default_factory=list)
    #: Validation files; when empty, val_fraction of every training file is held out.
    val_files: list[str] = field(default_factory=list)
    #: Fraction of each training file held out for eval when val_files is empty (0 disables eval).
    val_fraction: float = 0.05
    #: Row format: auto, messages, sharegpt, alpaca, prompt_completion, instruction_completion.
    format: str = "auto"
    #: Chat template: null (the tokenizer's own), a built-in name (docs/data.md), or a .jinja file.
    chat_template: Optional[str] = None
    #: Multi-turn rule for templates that rewrite earlier turns: final or per_turn (docs/data.md).
    multiturn: str = "final"
    #: Bad rows (missing field, wrong type, bad JSON, ...): error stops; skip counts, lists them.
    bad_rows: str = "error"
    #: Drop exact duplicate conversations across the training files.
    dedup: bool = False
    #: Drop examples shorter than this many tokens (0 keeps all).
    min_tokens: int = 0
    #: Tokens per packed sequence (and the longest example kept).
    max_seq_len: int = 512
    #: pack (best-fit-decreasing into max_seq_len rows) or pad (to a micro-batch's longest).
    mode: str = "pack"
    #: Which tokens carry loss: assistant (all assistant turns), last_assistant, or all.
    loss_on: str = "assistant"
    #: Supervise the reasoning (reasoning_content, <think>) of assistant turns; false: context only.
    train_on_reasoning: bool = True
    #: Examples longer than max_seq_len: drop (counted) or truncate.
    overlong: str = "drop"
    #: Seed of the split, the mixing, the shuffling and the packing order (epoch e uses seed + e).
    seed: int = 1234
    #: Cache tokenized data (keyed by data, tokenizer, template, options, versions).
    cache: bool = True
    #: Cache directory; null means $DISTSFT_CACHE or ~/.cache/distsft, plus /tokenized.
    cache_dir: Optional[str] = None
    #: Tokenizing processes (0: one per available CPU core, at most 32; 1: in the main process).
    num_proc: int = 0
    #: Most conversations per token-cache shard: what bounds preparation memory (docs/data.md).
    shard_size: int = 4096
    #: Seconds a rank waits for its node's first process to prepare the data before it stops.
    prepare_timeout: int = 3600
    #: DataLoader worker processes (0 collates in the training process).
    num_workers: int = 0


@dataclass
class PeftConfig:
    #: none (full fine-tune), lora or dora (weight-decomposed LoRA).
    method: str = "none"
    #: Quantise the frozen base at load: none, nf4 (QLoRA, 4-bit) or int8 (bitsandbytes).
    quantize: str = "none"
    #: LoRA rank.
    r: int = 16
    #: LoRA alpha (the update is scaled by alpha / r).
    alpha: int = 32
    #: Dropout on the LoRA input.
    dropout: float = 0.05
    #: Modules that get adapters: all-linear, or names such as [q_proj, v_proj].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    #: nf4: quantise the quantisation constants too (saves ~0.4 bit per parameter).
    double_quant: bool = True
    #: Dtype of the matmuls on quantised weights: bfloat16, float16 or float32.
    compute_dtype: str = "bfloat16"
    #: LoRA: add the adapter's output in its second matmul (one addmm); false: PEFT's forward.
    fused_add: bool = True


@dataclass
class OptimConfig:
    #: Optimizer: adamw (torch, fused), adamw_8bit, paged_adamw_8bit (bitsandbytes), adafactor.
    name: str = "adamw"
    #: Peak learning rate.
    lr: float = 2e-5
    #: Decoupled weight decay; never applied to biases, norm weights or other 1-D parameters.
    weight_decay: float = 0.0
    #: Adam beta1.
    beta1: float = 0.9
    #: Adam beta2.
    beta2: float = 0.999
    #: Adam epsilon.
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    #: Shape after warmup: cosine, linear or constant.
    name: str = "cosine"
    #: Warmup as a fraction of total optimizer steps (ignored when warmup_steps is set).
    warmup_ratio: float = 0.05
    #: Warmup steps; null derives them from warmup_ratio.
    warmup_steps: Optional[int] = None
    #: Final LR as a fraction of the peak (eta_min = min_lr_ratio * lr).
    min_lr_ratio: float = 0.1


@dataclass
class ParallelConfig:
    #: Strategy: ddp, deepspeed (ZeRO, zero_stage below) or fsdp (FSDP2: GPUs, or CPU over gloo).
    strategy: str = "ddp"
    #: DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
    zero_stage: int = 2
    #: DeepSpeed: keep optimizer state (and its step) on the CPU.
    offload_optimizer: bool = False
    #: DeepSpeed ZeRO-3: keep parameters on the CPU between uses.
    offload_params: bool = False
    #: Optional DeepSpeed JSON for other options; fields distsft owns must be "auto" or absent.
    deepspeed_config: Optional[str] = None
    #: FSDP2: reshard parameters after forward (ZeRO-3-like) instead of keeping them (ZeRO-2-like).
    fsdp_reshard_after_forward: bool = True
    #: Collective backend on CPU (gloo); GPUs always use nccl.
    cpu_backend: str = "gloo"
    #: Ulysses sequence parallelism (zero1|2|3): ranks that split each row (1: off).
    sp_size: int = 1
    #: Hybrid sharding: data-parallel ranks per shard group (HSDP, hpZ); null: a node's.
    dp_shard_size: Optional[int] = None
    #: Tensor parallelism (parallel=fsdp): ranks that split every weight matrix (1: off).
    tp_size: int = 1
    #: ZeRO-3 on GPUs: int8 weight gathers and int4 gradient reduce-scatter (ZeRO++ qwZ + qgZ).
    quantized_comm: bool = False

    @property
    def zero3(self) -> bool:
        return self.strategy == "deepspeed" and self.zero_stage == 3

    @property
    def sequence_parallel(self) -> bool:
        return self.sp_size > 1

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_size > 1

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3, FSDP or TP: no rank holds a whole weight (Liger's fused loss needs the head's)."""
        return self.zero3 or self.strategy == "fsdp" or self.tensor_parallel


@dataclass
class TrainerConfig:
    #: Sequences per micro-batch per process; null derives it from the other two.
    micro_batch_size: Optional[int] = 4
    #: Micro-batches accumulated per optimizer step; null derives it.
    grad_accum: Optional[int] = None
    #: Sequences per optimizer step over all processes; null derives it.
    global_batch_size: Optional[int] = 8
    #: Passes over the training data (ignored when max_steps > 0).
    epochs: float = 1.0
    #: Optimizer steps to run; 0 means epochs decide.
    max_steps: int = 0
    #: Gradient clipping by global norm; 0 disables clipping (the norm is still logged).
    max_grad_norm: float = 1.0
    #: fp32, bf16 (bf16 compute, fp32 masters and state) or bf16_pure (all bf16; ddp full FT only).
    precision: str = "fp32"
    #: precision=bf16: accumulate and reduce gradients in float32 or bfloat16 (half the traffic).
    grad_dtype: str = "float32"
    #: Output head: supervised (supervised positions, loss_chunk at a time) or full (all logits).
    loss_head: str = "supervised"
    #: Supervised positions per chunk of the head + loss, recomputed in backward (0: all at once).
    loss_chunk: int = 4096
    #: Evaluate every N optimizer steps (0: only at the end).
    eval_every: int = 50
    #: Write a checkpoint every N optimizer steps (the last step is always saved).
    save_every: int = 100
    #: Keep only the newest N complete checkpoints (0 keeps all).
    save_total_limit: int = 2
    #: auto resumes from the newest complete checkpoint in output_dir; never; or a checkpoint path.
    resume: str = "auto"
    #: Resume even when the checkpoint was trained with other data or settings (differences logged).
    resume_force: bool = False
    #: Seed of model init and of every process's RNG.
    seed: int = 42
    #: Use the GPU when one is visible; false forces CPU.
    use_cuda: bool = True
    #: Stop after this many optimizer steps in this invocation (0: no limit); for preemption drills.
    stop_after: int = 0
    #: Abort after this many consecutive non-finite steps (loss or gradient norm; each is skipped).
    max_bad_steps: int = 3
    #: Log a loss spike when a step's loss exceeds this many times the running median (0: off).
    spike_factor: float = 3.0
    #: Steps in the running median of spike_factor (judged once this many steps have passed).
    spike_window: int = 20
    #: Early stopping: stop after this many evals without improvement (0: off).
    early_stop_patience: int = 0
    #: Early stopping: an eval loss must beat the best by more than this to count as improvement.
    early_stop_min_delta: float = 0.0
    #: Keep a checkpoint of the best eval loss (checkpoints/best) and export it, not the last step.
    export_best: bool = False
    #: Seconds a rank may be silent before the job ends naming it (0: off; multi-process only).
    hang_timeout: float = 600.0
    #: Seconds a collective may wait before torch.distributed fails it (all ranks equally stuck).
    collective_timeout: float = 1800.0
    #: Checkpoint in the background: the loop waits only for a copy in host memory.
    async_save: bool = False
    #: Where async_save stages each rank's copy: a tmpfs local to the node (host memory).
    async_stage: str = "/dev/shm"


@dataclass
class LoggingConfig:
    #: Log scalars and a console line every N optimizer steps.
    log_every: int = 10
    #: Peak FLOP/s of one device for MFU; null: the GPU's from a table (no MFU on CPU unless set).
    peak_flops: Optional[float] = None
    #: Generate replies to the sample prompts every N steps, logged to every tracker (0: off).
    sample_every: int = 0
    #: Sample prompts (user turns, training chat template); empty: first user turns of the data.
    sample_prompts: list[str] = field(default_factory=list)
    #: With sample_prompts empty: this many prompts from data.val_files, else data.train_files.
    sample_count: int = 3
    #: Tokens generated per sample (greedy).
    sample_max_new_tokens: int = 32
    #: Experiment trackers (main process): tensorboard, mlflow, wandb; see docs/trackers.md.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    #: Show a progress bar with ETA (main process only, and only when stderr is a terminal).
    progress_bar: bool = True
    #: At the end, draw output_dir/curves.png: loss, learning rate and gradient norm per step.
    plot: bool = True


@dataclass
class ExportConfig:
    #: Write the final model to output_dir/final.
    enabled: bool = True
    #: auto (full, or adapter under PEFT), full, adapter or merged (adapters folded into the base).
    mode: str = "auto"


@dataclass
class DiagnosisConfig:
    #: Train-loss edges: overfit < 1st < sweet spot < 2nd < underfit; > 3rd may be barely learning.
    bands: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0])


@dataclass
class PlanConfig:
    #: Processes (GPUs) the plan assumes: batch arithmetic, sharding (WORLD_SIZE wins if set).
    world_size: int = 1
    #: Also draw the planned LR schedule into this PNG file (null: table only).
    lr_plot: Optional[str] = None
    #: GPU memory (GiB) to fit when suggesting checkpointing (null: this machine's GPU, if any).
    gpu_memory_gib: Optional[float] = None
    #: Host RAM (GiB) per GPU for offloaded checkpoints: the plan stays within 85% (null: no bound).
    host_memory_gib: Optional[float] = None
    #: GB/s one rank writes a checkpoint at (file system and fsync): the time a save holds the loop.
    checkpoint_gbps: float = 1.0
    #: GB/s one rank copies its checkpoint share into host memory at (trainer.async_save's staging).
    stage_gbps: float = 2.0
    #: Cluster preset for the layout ranking: h100_ib, a100_eth, workstation_pcie (null: none).
    cluster: Optional[str] = None
    #: Nodes of plan.cluster (null: the preset's); world = nodes x gpus_per_node.
    nodes: Optional[int] = None
    #: GPUs per node of plan.cluster (null: the preset's).
    gpus_per_node: Optional[int] = None
    #: GB/s per GPU, one direction, inside a node (NVLink 4: 450; null: the preset's).
    intra_node_gbps: Optional[float] = None
    #: Gb/s per node between nodes, all NICs together (8 x 400 Gb/s IB: 3200; null: the preset's).
    inter_node_gbps: Optional[float] = None
    #: Microseconds per ring step inside a node (null: the preset's).
    intra_latency_us: Optional[float] = None
    #: Microseconds per ring step between nodes (null: the preset's).
    inter_latency_us: Optional[float] = None


@dataclass
class PreviewConfig:
    #: Examples that distsft.preview prints with their supervised tokens marked.
    examples: int = 3


@dataclass
class Config:
    #: Run directory (config.yaml, checkpoints/, final/, summary.json); a -m sweep adds a subdir.
    output_dir: str = "outputs/${run_name}${distsft_sweep:}"
    #: Name of the run (used in the default output_dir).
    run_name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    diagnosis: DiagnosisConfig = field(default_factory=DiagnosisConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    """Register the schema (first in ``conf/config.yaml``'s defaults) and the asset resolver."""
    ConfigStore.instance().store(name="distsft_schema", node=Config)
    if not OmegaConf.has_resolver("distsft_asset"):
        # ${distsft_asset:tiny-llama} -> the embedded asset shipped inside the package
        OmegaConf.register_new_resolver("distsft_asset", lambda rel: str(ASSETS / rel))
    if not OmegaConf.has_resolver("distsft_sweep"):
        OmegaConf.register_new_resolver("distsft_sweep", sweep_suffix)


def sweep_suffix() -> str:
    """'/<the swept overrides of this job>' inside a Hydra multirun (-m), else ''. Only the keys the sweep
    varies name the directory (``optim.lr=0.001``), not every override of the command line, and a '/' in a
    value (a path) cannot nest directories. Every rank composes the same overrides, so the run dir stays
    deterministic. Where the command line is not this process's (a submitit job), Hydra's override_dirname."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    swept = _swept_keys(sys.argv[1:])
    parts = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    name = ",".join(parts) if parts else hc.job.override_dirname
    return "/" + (name.replace("/", "_") or f"job{hc.job.num}")


def _swept_keys(argv: list[str]) -> set[str]:
    """Keys of the command-line overrides that sweep (a,b / range(...) / choice(...) / glob(...))."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:  # not Hydra's command line (a submitit worker): fall back to override_dirname
        return set()
    return {o.key_or_group for o in overrides if o.is_sweep_override()}
