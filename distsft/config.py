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
    #: "pretrained" loads weights; "config" builds random weights from the config (embedded tiny model).
    init: str = "pretrained"
    #: Storage dtype of the weights: float32 or bfloat16 (a frozen PEFT base stays in it, a full export is written in it; trainable weights are always fp32 masters, see trainer.precision).
    dtype: str = "float32"
    #: Attention kernel: auto (flash_attention_2 if installed on CUDA, else sdpa), sdpa, eager, flash_attention_2, varlen.
    attn_implementation: str = "auto"
    #: Allow code from the model repository (needed by some hub models).
    trust_remote_code: bool = False
    #: Hub revision (branch, tag or commit) when loading by name.
    revision: Optional[str] = None
    #: Recompute activations in backward (non-reentrant): less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    #: With gradient_checkpointing: recompute only every Nth decoder layer (1: all; 2: half, trading memory for ~1/6 less compute).
    checkpoint_every: int = 1
    #: Tiled MLP (DeepSpeed's TiledMLP, for long rows): each decoder layer's MLP runs on this many chunks of the sequence, recomputed chunk by chunk in backward, so its intermediate activations exist for one chunk at a time (about one more MLP forward per step); 0: off. Single process or DeepSpeed; not for MoE layers.
    tiled_mlp_shards: int = 0
    #: With gradient_checkpointing: keep each recomputed layer's input (what checkpointing saves, h values per token per layer) in pinned host memory instead of the GPU's, copied out in forward and back in backward (the ALST recipe for long rows: the GPU then holds about one layer's input instead of every layer's). No effect on numerics.
    offload_checkpoints: bool = False
    #: Layer kernels: auto (liger where it can run, else torch), torch (transformers' own), or liger (Liger's Triton RMSNorm/RoPE/SwiGLU and a fused linear cross-entropy that never materialises the logits; CUDA, pip install liger-kernel; not with ZeRO-3/FSDP).
    kernels: str = "auto"
    #: torch.compile each decoder layer in place (regional: one compiled graph serves every layer, dynamic shapes so packed row widths do not recompile); the first step pays the compile. Not with parallel=fsdp yet.
    compile: bool = False
    #: FP8 matmuls in the decoder's linear layers (torchao float8 training: e4m3 inputs and weights with dynamic tensor-wise scales, e5m2 gradients) on FP8 tensor cores (CUDA sm_89+: H100/H200): trainable layers as torchao's Float8Linear (fp32 masters cast on the fly), a frozen LoRA/DoRA base with no weight-gradient matmul; weights stored as before. A precision mode of its own (the loss moves by FP8 rounding); pair with model.compile=true. Not with a quantised base (peft.quantize).
    fp8: bool = False


@dataclass
class DataConfig:
    #: Training data: .jsonl/.json/.parquet/.csv/.arrow files, saved dataset dirs, or hub dataset names (owner/name, pinned as owner/name@revision).
    train_files: list[str] = field(default_factory=lambda: [str(ASSETS / "data" / "tiny_sft.jsonl")])
    #: Mixing weight per train file: <= 1 takes that fraction of its rows, a whole number > 1 that many rows (a row count, not a multiplier: 2 and 2.0 both keep 2 rows; more than the file has repeats it); empty = all rows.
    train_weights: list[float] = field(default_factory=list)
    #: Validation files; when empty, val_fraction of every training file is held out.
    val_files: list[str] = field(default_factory=list)
    #: Fraction of each training file held out for eval when val_files is empty (0 disables eval).
    val_fraction: float = 0.05
    #: Row format: auto (detected per file), messages, sharegpt, alpaca, prompt_completion, instruction_completion.
    format: str = "auto"
    #: Chat template: null (the tokenizer's own), a built-in (chatml, llama3, llama3.1, qwen2.5, qwen3, qwen3_nothink, gemma, mistral_v7, phi3), or a path to a .jinja file.
    chat_template: Optional[str] = None
    #: Multi-turn rule for templates that rewrite earlier turns (Qwen3 drops earlier reasoning): final (default: each conversation once, every reply supervised as the full rendering shows it; append-only templates train as before) or per_turn (one example per assistant turn, supervising that turn, each reply rendered last: keeps all reasoning, repeats the history).
    multiturn: str = "final"
    #: Bad rows (missing field, wrong type, unknown role, no assistant turn, invalid JSON): error stops, skip counts and reports them.
    bad_rows: str = "error"
    #: Drop exact duplicate conversations across the training files.
    dedup: bool = False
    #: Drop examples shorter than this many tokens (0 keeps all).
    min_tokens: int = 0
    #: Tokens per packed sequence (and the longest example kept).
    max_seq_len: int = 512
    #: "pack": best-fit-decreasing packing into max_seq_len; "pad": pad to the longest row in a micro-batch.
    mode: str = "pack"
    #: Which tokens carry loss: assistant (all assistant turns), last_assistant, or all.
    loss_on: str = "assistant"
    #: Supervise the reasoning (reasoning_content, <think>) of assistant turns; false: context only.
    train_on_reasoning: bool = True
    #: Examples longer than max_seq_len: drop (counted) or truncate.
    overlong: str = "drop"
    #: Seed of the split, the mixing, the shuffling and the packing order (epoch e uses seed + e).
    seed: int = 1234
    #: Cache tokenized data (keyed by file contents or a hub dataset's commit, tokenizer, template, data options, and the distsft/transformers/tokenizers/jinja2 versions).
    cache: bool = True
    #: Cache directory; null means $DISTSFT_CACHE or ~/.cache/distsft, plus /tokenized.
    cache_dir: Optional[str] = None
    #: Processes that tokenize, one cache shard at a time (0: one per available CPU core, at most 32; 1: in the main process).
    num_proc: int = 0
    #: Most conversations per token-cache shard: the unit of parallel tokenization, and what bounds preparation memory (cut smaller so every process gets ~4 shards).
    shard_size: int = 4096
    #: Seconds a rank waits for its node's first process to prepare the data before it stops with an error.
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
    #: Dtype of the matmuls on quantised weights (and of their storage under ZeRO-3).
    compute_dtype: str = "bfloat16"
    #: LoRA: add each adapter's output into its layer's output inside the adapter's second matmul (one in-place addmm, the scale as its alpha) instead of PEFT's separate scale and add passes over the layer's output; the same function with one rounding fewer. DoRA and quantised bases keep PEFT's forward.
    fused_add: bool = True


@dataclass
class OptimConfig:
    #: Optimizer: adamw (torch, fused kernel), adamw_8bit, paged_adamw_8bit (bitsandbytes), adafactor (transformers).
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
    #: Strategy: ddp (plain data parallel), deepspeed (ZeRO, stage below) or fsdp (FSDP2: GPUs, or CPU processes over gloo).
    strategy: str = "ddp"
    #: DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
    zero_stage: int = 2
    #: DeepSpeed: keep optimizer state (and its step) on the CPU.
    offload_optimizer: bool = False
    #: DeepSpeed ZeRO-3: keep parameters on the CPU between uses.
    offload_params: bool = False
    #: Optional DeepSpeed JSON for options distsft does not set; fields distsft owns must be "auto" or absent.
    deepspeed_config: Optional[str] = None
    #: FSDP2: reshard parameters after forward (ZeRO-3-like) instead of keeping them (ZeRO-2-like).
    fsdp_reshard_after_forward: bool = True
    #: Collective backend on CPU (gloo); GPUs always use nccl.
    cpu_backend: str = "gloo"
    #: Ulysses sequence parallelism (DeepSpeed's, parallel=zero1|2|3): each packed row is split into sp_size contiguous slices, one per rank of a group; world = data-parallel x sp_size, and the global batch counts data-parallel replicas.
    sp_size: int = 1
    #: Hybrid sharding: shard within groups of this many ranks (fsdp: HSDP; zero3: hpZ); null: one node's.
    dp_shard_size: Optional[int] = None

    @property
    def zero3(self) -> bool:
        return self.strategy == "deepspeed" and self.zero_stage == 3

    @property
    def sequence_parallel(self) -> bool:
        return self.sp_size > 1

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 or FSDP: no rank holds a whole weight (Liger's fused loss needs the head's)."""
        return self.zero3 or self.strategy == "fsdp"


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
    #: fp32; bf16 (bf16 compute, fp32 master weights and optimizer state whatever model.dtype stores); or bf16_pure (bf16 weights and AdamW state, updates stochastically rounded by torchao: half the memory, ddp full fine-tuning only).
    precision: str = "fp32"
    #: Under precision=bf16, the dtype gradients are accumulated over micro-batches and reduced across ranks in: float32 (the precision contract: the same numerics on ddp, ZeRO and FSDP2) or bfloat16 (half the gradient traffic and ZeRO/FSDP2 gradient buffers, but every micro-batch's sum is rounded to bf16: a trade, not the default).
    grad_dtype: str = "float32"
    #: Output head and loss: supervised (the head runs only at supervised positions, in chunks of loss_chunk) or full (logits of every position, cross-entropy in the trainer; more memory and head FLOPs).
    loss_head: str = "supervised"
    #: Supervised positions per chunk of the output head + cross-entropy (only supervised positions reach the head; more than this many are recomputed chunk by chunk in backward so one chunk's logits exist at a time; 0: all at once).
    loss_chunk: int = 4096
    #: Evaluate every N optimizer steps (0: only at the end).
    eval_every: int = 50
    #: Write a checkpoint every N optimizer steps (the last step is always saved).
    save_every: int = 100
    #: Keep only the newest N complete checkpoints (0 keeps all).
    save_total_limit: int = 2
    #: auto resumes from the newest complete checkpoint in output_dir; never; or a checkpoint path.
    resume: str = "auto"
    #: Resume even when the checkpoint was trained with other data or settings (the differences are logged).
    resume_force: bool = False
    #: Seed of model init and of every process's RNG.
    seed: int = 42
    #: Use the GPU when one is visible; false forces CPU.
    use_cuda: bool = True
    #: Stop after this many optimizer steps in this invocation (0: no limit); for tests and preemption drills.
    stop_after: int = 0
    #: Abort after this many consecutive steps with a non-finite loss or gradient norm (each is skipped).
    max_bad_steps: int = 3
    #: Log a loss spike (with the step's sample ids) when a step's loss exceeds this many times the running median of the last spike_window steps (0: off).
    spike_factor: float = 3.0
    #: Steps in the running median for spike_factor (spikes are looked for once this many steps have passed).
    spike_window: int = 20
    #: Early stopping: stop after this many evals without improvement (0: off).
    early_stop_patience: int = 0
    #: Early stopping: an eval loss must beat the best by more than this to count as improvement.
    early_stop_min_delta: float = 0.0
    #: Keep a checkpoint of the best eval loss (checkpoints/best) and export it instead of the last step.
    export_best: bool = False
    #: Seconds a rank may go without a heartbeat (stopped, frozen), or without progress while another rank waits for it, before the job ends naming it, with stack dumps in output_dir/hang (0: no watchdog; several processes only).
    hang_timeout: float = 600.0
    #: Seconds a collective (all-reduce, gather, barrier) may wait before torch.distributed fails it; the bound for ranks that are all equally stuck.
    collective_timeout: float = 1800.0
    #: Checkpoint in the background: the loop waits only for a copy in host memory (docs: async checkpoints).
    async_save: bool = False
    #: Where async_save stages each rank's copy: a tmpfs local to the node (host memory).
    async_stage: str = "/dev/shm"


@dataclass
class LoggingConfig:
    #: Log scalars and a console line every N optimizer steps.
    log_every: int = 10
    #: Peak FLOP/s of one device for MFU; null looks the GPU up in a table (no MFU on CPU unless set).
    peak_flops: Optional[float] = None
    #: Generate replies to the sample prompts every N steps, logged to every tracker (0: off).
    sample_every: int = 0
    #: Sample prompts (user turns, training chat template); empty: first user turns of the data.
    sample_prompts: list[str] = field(default_factory=list)
    #: With sample_prompts empty: prompts from the top rows of data.val_files, else data.train_files.
    sample_count: int = 3
    #: Tokens generated per sample (greedy).
    sample_max_new_tokens: int = 32
    #: Experiment trackers (main process): tensorboard, mlflow, wandb; see docs/trackers.md.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    #: Show a progress bar with ETA (main process only, and only when stderr is a terminal).
    progress_bar: bool = True
    #: At the end, draw output_dir/curves.png: train/eval loss, learning rate, gradient norm (from TensorBoard, so resumed runs show every step).
    plot: bool = True


@dataclass
class ExportConfig:
    #: Write the final model to output_dir/final.
    enabled: bool = True
    #: auto (full model, or the adapter under PEFT), full, adapter (PeftModel dir) or merged (adapters folded into the base).
    mode: str = "auto"


@dataclass
class DiagnosisConfig:
    #: Final train-loss band edges (heuristics): below the 1st likely overfit, then sweet spot, then underfit (barely learning when above the 3rd and the loss fell less than 10% from its start).
    bands: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0])


@dataclass
class PlanConfig:
    #: Processes (GPUs) the plan assumes: batch arithmetic and sharded memory (WORLD_SIZE wins when set).
    world_size: int = 1
    #: Also draw the planned LR schedule into this PNG file (null: table only).
    lr_plot: Optional[str] = None
    #: GPU memory (GiB) to fit into when suggesting activation checkpointing (null: this machine's GPU, if any).
    gpu_memory_gib: Optional[float] = None
    #: Host RAM (GiB) each GPU's process may pin for offloaded checkpoints (model.offload_checkpoints): the longest-row answer with offload stays within 85% of it (null: not bounded; the plan still prints what it needs).
    host_memory_gib: Optional[float] = None
    #: GB/s one rank writes a checkpoint at (file system and fsync): the time a save holds the loop.
    checkpoint_gbps: float = 1.0
    #: GB/s one rank copies its checkpoint share into host memory at (trainer.async_save's staging).
    stage_gbps: float = 2.0
    #: Cluster preset for the layout ranking: h100_ib, a100_eth, workstation_pcie (null: no ranking).
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
    #: Run directory: config.yaml, tensorboard/, checkpoints/, final/, summary.json. Deterministic; a -m sweep adds one subdir per job.
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


def reference() -> str:
    """Markdown table of every config key, its default and its docstring (the README embeds it)."""
    import dataclasses
    import inspect

    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls, prefix: str) -> None:
        src = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            idx = next(i for i, line in enumerate(src) if line.strip().startswith(f"{f.name}:"))
            doc = src[idx - 1].strip().removeprefix("#:").strip()
            if isinstance(default, str) and default.startswith(str(ASSETS)):
                default = "(embedded asset)"
            elif isinstance(default, list):
                default = ["(embedded asset)" if str(x).startswith(str(ASSETS)) else x for x in default]
            lines.append(f"| `{prefix}{f.name}` | `{default}` | {doc.replace('|', '/')} |")

    walk(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    import re
    import sys

    if sys.argv[1:] == ["--readme"]:  # refresh the table between the README's markers
        readme = Path(__file__).resolve().parent.parent / "README.md"
        text = re.sub(r"(<!-- config-reference:[^\n]*-->\n).*?(\n<!-- /config-reference -->)",
                      lambda m: m.group(1) + reference() + m.group(2), readme.read_text(), flags=re.S)
        readme.write_text(text)
    else:
        print(reference())
