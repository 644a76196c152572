"""Plan stage (layouts): every way to lay the model out on the cluster that ``plan.cluster`` describes, each with
its memory per GPU (``distsft.memory``), the bytes its collectives move over each link and its step time
(``distsft.comm``), and its tokens/s per GPU; the layouts that fit are ranked and the best one's overrides printed.

Layouts: ddp, zero1, zero2, zero3, zero3 + hpZ (a secondary copy of the weights within each node), fsdp, hsdp
(sharded within a node, replicated across nodes), fsdp and hsdp also with tensor parallelism (tp 2, 4, 8 inside a
node, for model types with a tensor-parallel plan whose heads it divides: the trainer runs TP over FSDP2), the ZeRO
stages and flat fsdp with Ulysses sequence parallelism (sp 2, 4, 8; fsdp also with tp, tp x sp inside a node): every
row is a layout the trainer runs, its overrides printed. Every layout keeps the
config's micro-batch and global batch (grad_accum follows the data-parallel size; a layout it does not divide is
left out, saying why), its precision and its activation checkpointing.

Memory per GPU: memory_estimate over the data-parallel ranks that shard (world/tp; HSDP's shard group; it divides
by tp itself), with what it leaves out: hpZ's secondary copy, P*w/S.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .batch import resolve_batch
from .comm import (
    REUSE_DISTANCE,
    Cluster,
    Volumes,
    dp_collectives,
    exposed_seconds,
    model_collectives,
)
from .config import Config, ConfigError
from .memory import (
    ASSUMED_MFU,
    GIB,
    HEADROOM,
    ModelShape,
    memory_estimate,
    recomputed_layers,
)

LAYOUTS = ("ddp", "zero1", "zero2", "zero3", "zero3_hpz", "fsdp", "hsdp")
TP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # model types whose transformers config has a TP plan
TP_LAYOUTS = ("fsdp", "hsdp")  # TP over FSDP2's mesh (DeepSpeed's AutoTP is not wired in)
SIZES = (1, 2, 4, 8)
SHOWN = 12  # rows of the printed ranking


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    sp: int = 1
    shard: int = 0  # ranks per shard group: hpZ's secondary partition, HSDP's shards (0: not hybrid)

    @property
    def label(self) -> str:
        hybrid = {"zero3_hpz": f"zero3 hpZ/{self.shard}", "hsdp": f"hsdp {self.shard}"}.get(self.name, self.name)
        return hybrid + (f" tp{self.tp}" if self.tp > 1 else "") + (f" sp{self.sp}" if self.sp > 1 else "")

    def overrides(self, cluster: Cluster) -> str:
        """What distsft.train is given for this layout (the default shard group is one node's ranks)."""
        parallel = {"zero3_hpz": "zero3", "hsdp": "fsdp"}.get(self.name, self.name)
        out = [f"parallel={parallel}"]
        if self.shard:
            out.append(f"parallel.dp_shard_size={self.shard}")
        elif parallel in ("zero3", "fsdp") and cluster.nodes > 1 and self.sp == 1:  # flat, not the default node
            out.append(f"parallel.dp_shard_size={cluster.world // self.tp}")
        out += [f"parallel.tp_size={self.tp}"] * (self.tp > 1) + [f"parallel.sp_size={self.sp}"] * (self.sp > 1)
        return " ".join(out)


def candidates(shape: ModelShape, cluster: Cluster) -> list[Layout]:
    """Every layout to weigh on this cluster (tp and sp groups stay inside a node)."""
    g = cluster.gpus_per_node
    heads = (shape.heads, shape.kv_heads or shape.heads)
    tps = [t for t in SIZES if shape.model_type in TP_FAMILIES and g % t == 0 and all(n % t == 0 for n in heads)
           and shape.intermediate % t == 0] or [1]
    # Ulysses splits the heads a tensor-parallel rank holds; tp x sp stay inside a node
    return [Layout(name, tp, sp, g // tp if name in HYBRID else 0)
            for tp in tps for sp in SIZES if g % (tp * sp) == 0 and (shape.heads // tp) % sp == 0
            for name in LAYOUTS if _runs(name, tp, sp, g, cluster.nodes)]


HYBRID = ("zero3_hpz", "hsdp")


def _runs(name: str, tp: int, sp: int, g: int, nodes: int) -> bool:
    """Combinations the trainer runs and that differ from another candidate."""
    if name in HYBRID and (nodes == 1 or g // tp == 1):  # one node (or one rank a node): the flat layout
        return False
    if sp > 1:  # Ulysses runs under ZeRO without tp, and under flat FSDP2 with or without (not with shard groups)
        return name == "fsdp" or (tp == 1 and name in ("zero1", "zero2", "zero3"))
    return tp == 1 or name in TP_LAYOUTS


def layout_config(cfg: Config, layout: Layout) -> Config:
    name = {"zero3_hpz": "zero3", "hsdp": "fsdp"}.get(layout.name, layout.name)
    strategy = "deepspeed" if name.startswith("zero") else name
    par = replace(cfg.parallel, strategy=strategy, zero_stage=int(name[-1]) if strategy == "deepspeed" else 2,
                  sp_size=layout.sp, tp_size=layout.tp, offload_optimizer=False, offload_params=False)
    return replace(cfg, parallel=par)


def volumes(cfg: Config, shape: ModelShape, layout: Layout, micro: int, accum: int, sup_share: float = 1.0) -> Volumes:
    """``sup_share``: the supervised share of the tokens (the rows the output head computes, with the supervised
    head)."""
    from .model.precision import half_compute

    a = 2 if half_compute(cfg) else 4
    weights = {"nf4": 0.5, "int8": 1.0}.get(cfg.peft.quantize)  # a quantised base is gathered as stored
    w = a if weights is None else (shape.quantizable * weights + (shape.params - shape.quantizable) * 2) / shape.params
    bf16_grads = cfg.trainer.precision == "bf16_pure" or (
        cfg.trainer.precision == "bf16" and cfg.trainer.grad_dtype == "bfloat16")
    tokens = micro * cfg.data.max_seq_len / layout.sp
    recomputed = recomputed_layers(shape.layers, cfg.model.checkpoint_every) if cfg.model.gradient_checkpointing else 0
    rows = tokens * (sup_share if cfg.trainer.loss_head == "supervised" else 1.0)  # through the output head
    return Volumes(shape.params / layout.tp, shape.trainable / layout.tp, w, 2 if bf16_grads else 4,
                   tokens * shape.hidden * a, tokens * (2 * shape.hidden + 2 * shape.kv_dim) * a / layout.tp,
                   shape.layers, accum, recomputed, root=(shape.vocab + 1) * shape.hidden / layout.tp,
                   regather=min(1.0, max(0.0, 1 - REUSE_DISTANCE / (2 * shape.params))),
                   head_acts=rows * shape.hidden * a, logits=rows * shape.vocab * a)


def layout_memory(cfg: Config, shape: ModelShape, layout: Layout, dp: int, micro: int, accum: int,
                  vol: Volumes) -> dict[str, float]:
    from .model.kernels import resolve_kernels

    par = cfg.parallel
    fused = resolve_kernels(cfg.model.kernels, cuda=True, sharded=par.shards_parameters, model_type=shape.model_type,
                            sequence_parallel=par.sequence_parallel)[0] == "liger"
    mem = memory_estimate(cfg, shape, layout.shard if layout.name == "hsdp" else dp, micro, fused, accum)
    if layout.name == "zero3_hpz":
        mem["weights"] += vol.p * vol.w / layout.shard
    mem["total"] = sum(v for k, v in mem.items() if k != "total")
    return mem


def evaluate(cfg: Config, shape: ModelShape, cluster: Cluster, layout: Layout, global_batch: int, peak: float,
             mfu: float = ASSUMED_MFU, quantized: bool = False, sup_share: float = 1.0) -> dict:
    """One layout's memory, collectives, times and throughput per optimizer step (comm's and memory's formulas)."""
    micro = cfg.trainer.micro_batch_size or 1
    try:
        batch = resolve_batch(micro, None, global_batch, cluster.world, layout.tp * layout.sp)
    except ConfigError as e:
        return {"layout": layout.label, "error": str(e).split(";")[0]}
    c, accum, dp = layout_config(cfg, layout), batch.grad_accum, cluster.world // layout.tp
    vol = volumes(c, shape, layout, micro, accum, sup_share)
    colls = dp_collectives(layout.name, vol, dp, cluster.gpus_per_node // layout.tp, layout.shard, quantized)
    colls += model_collectives(vol, layout.tp, layout.sp)
    forward = 1 / 2 if shape.trainable < shape.params else 1 / 3  # a frozen base has no weight gradients
    extra = forward * vol.recomputed / shape.layers
    t = c.data.max_seq_len
    flops = micro * accum * (shape.flops_per_token * t + 6 * shape.layers * shape.hidden * t * t) / (
        layout.tp * layout.sp)
    compute, backward = flops * (1 + extra) / (peak * mfu), flops * (1 - forward + extra) / (peak * mfu)
    times: dict[str, float] = {}
    rows = []
    for col in colls:
        seconds = col.seconds(cluster)
        times[col.window] = times.get(col.window, 0.0) + seconds
        rows.append({"name": col.name, "window": col.window, "bytes": col.bytes_per_gpu(), "seconds": seconds})
    step = compute + exposed_seconds(times, compute, backward, accum)
    q = quantized and layout.name.startswith("zero3")  # ZeRO++ qwZ + qgZ
    return {"layout": layout.label + " q" * q,
            "overrides": layout.overrides(cluster) + " parallel.quantized_comm=true" * q, "grad_accum": accum,
            "memory": layout_memory(c, shape, layout, dp, micro, accum, vol)["total"], "compute_s": compute,
            "comm_s": sum(times.values()), "exposed_s": step - compute, "step_s": step,
            "intra_bytes": sum(r["bytes"][0] for r in rows), "inter_bytes": sum(r["bytes"][1] for r in rows),
            "tokens_per_s_per_gpu": micro * accum * t / (layout.tp * layout.sp) / step, "collectives": rows}


def plan_layouts(cfg: Config, shape: ModelShape, cluster: Cluster, name: str, global_batch: int, peak: float,
                 mfu: float = ASSUMED_MFU, sup_share: float = 1.0) -> dict:
    """Every candidate evaluated; those within HEADROOM of the GPU ranked by tokens/s per GPU, then by the seconds of
    communication (among layouts that hide it all, the one with the most compute to spare)."""
    # parallel.quantized_comm: ZeRO-3's layouts with ZeRO++'s int8 weights and int4 gradients on the wire
    rows = [evaluate(cfg, shape, cluster, lay, global_batch, peak, mfu, cfg.parallel.quantized_comm, sup_share)
            for lay in candidates(shape, cluster)]
    budget = HEADROOM * cluster.memory_gib * GIB
    fits = sorted((r for r in rows if "error" not in r and r["memory"] <= budget),
                  # a tie (all traffic hidden): the least traffic, the most slack for the model's error
                  key=lambda r: (-round(r["tokens_per_s_per_gpu"]), r["comm_s"], r["memory"]))
    return {"cluster": name, "spec": cluster, "peak": peak, "mfu": mfu, "seq_len": cfg.data.max_seq_len,
            "global_batch": global_batch, "fits": fits,
            "too_big": [r for r in rows if "error" not in r and r["memory"] > budget],
            "impossible": [r for r in rows if "error" in r]}


def render_layouts(p: dict) -> list[str]:
    c: Cluster = p["spec"]
    head = (f"layouts on plan.cluster={p['cluster']} ({c.about}): {c.nodes} x {c.gpus_per_node} GPUs, "
            f"{c.intra_gbps:g} GB/s per GPU in a node, {c.inter_gbps:g} Gb/s per node between nodes; compute at "
            f"{p['mfu']:.0%} MFU of {p['peak'] / 1e12:.0f} TFLOP/s; per optimizer step of {p['global_batch']} rows of "
            f"{p['seq_len']:,} tokens (distsft.comm's formulas):")
    columns = (f"  {'#':>2} {'layout':<20} {'GiB/GPU':>8} {'compute':>8} {'comm':>7} {'exposed':>8} "
               f"{'intra GB':>9} {'inter GB':>9} {'step s':>7} {'tok/s/GPU':>10}")
    lines = [head, columns]
    for i, r in enumerate(p["fits"][:SHOWN], 1):
        lines.append(f"  {i:>2} {r['layout']:<20} {r['memory'] / GIB:>8.1f} {r['compute_s']:>8.3g} {r['comm_s']:>7.3g} "
                     f"{r['exposed_s']:>8.3g} {r['intra_bytes'] / 1e9:>9,.1f} {r['inter_bytes'] / 1e9:>9,.1f} "
                     f"{r['step_s']:>7.3g} {r['tokens_per_s_per_gpu']:>10,.0f}")
    if len(p["fits"]) > SHOWN:
        lines.append(f"  ... {len(p['fits']) - SHOWN} more fit")
    if p["too_big"]:
        big = p["too_big"]
        lines.append(f"  over {HEADROOM:.0%} of {c.memory_gib:g} GiB: " + ", ".join(
            f"{r['layout']} ({r['memory'] / GIB:.0f} GiB)" for r in big[:SHOWN]) + (
            f" and {len(big) - SHOWN} more" if len(big) > SHOWN else ""))
    if p["impossible"]:
        lines.append("  not with this batch: " + ", ".join(r["layout"] for r in p["impossible"]) +
                     f" ({p['impossible'][0]['error']})")
    if not p["fits"]:
        lines.append("  no layout fits: shard more (nodes), checkpoint activations, or shorten the rows")
        return lines
    best = p["fits"][0]
    lines.append(f"best: {best['overrides']} (grad_accum {best['grad_accum']}); its collectives per GPU per step:")
    for col in best["collectives"]:
        lines.append(f"  {col['name']:<40} {col['bytes'][0] / 1e9:>8,.1f} GB intra {col['bytes'][1] / 1e9:>8,.1f} "
                     f"GB inter {col['seconds']:>8.3g} s  hidden by: {WINDOW_WORDS[col['window']]}")
    return lines


WINDOW_WORDS = {"step": "forward + backward", "bwd": "every backward", "last": "the last backward",
                "none": "nothing (critical path)"}
