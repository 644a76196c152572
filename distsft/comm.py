"""Plan stage (communication model): the bytes each collective of a layout moves over each link per optimizer
step, how long they take on a cluster, and what of that hides behind compute. ``distsft.layouts`` applies it to
every layout; ``distsft.plan`` prints the ranking when ``plan.cluster`` names a preset (CLUSTERS).

Notation, per optimizer step of A micro-batches of B rows of T tokens (L layers, hidden h, key/value width kv):

    P, Ψ   all parameters and the trainable ones (Ψ = P for full fine-tuning); tensor parallelism divides both by tp
    w      bytes per gathered weight: 2 under bf16 compute (ZeRO's bf16 engine, FSDP2's param_dtype), 4 under fp32
           (a quantised frozen base: 0.5 nf4, 1 int8); ZeRO++ qwZ (``quantized``): 1, int8 blocks
    g      bytes per reduced gradient: 4 under fp32 and under bf16 with trainer.grad_dtype=float32 (the precision
           contract), 2 with trainer.grad_dtype=bfloat16 or bf16_pure; ZeRO++ qgZ (``quantized``): 0.5, int4
    a      bytes per activation: 2 under bf16 compute, 4 under fp32
    n      ranks of a collective's group, m of them on each node it spans; G GPUs per node

Ring collectives (NCCL's ring): each GPU sends, for a tensor of S bytes,

    all-gather, reduce-scatter, all-to-all   S(n-1)/n             all-reduce   2S(n-1)/n

A ring crosses each node's boundary once, so a node sends what one GPU sends over its NICs; each GPU's share of
that is 1/m of what it sends (inter), the rest goes over NVLink or PCIe (intra). Inside one node it is all intra.

Volumes per optimizer step, the tensors' bytes (the ZeRO paper's 2Ψ, 2Ψ, 3Ψ with the dtypes made explicit; each
GPU sends the ring share of them above, so ddp's all-reduce is 2Ψg(n-1)/n per GPU):

    ddp        gradients all-reduced once (no sync between micro-batches)                  2Ψg
    zero1      gradients reduce-scattered once, updated weights all-gathered               Ψg + Ψw
    zero2      gradients reduce-scattered every micro-batch (DeepSpeed reduces in backward) AΨg + Ψw
    zero3      every micro-batch: weights all-gathered in forward and in backward, gradients reduce-scattered
                                                                                            A(2Pw + Ψg)
               (DeepSpeed keeps a weight gathered when its next use comes within stage3_max_reuse_distance, 1e9
               parameters by default: backward gathers again only the share 1 - 1e9/(2P), none below 0.5B)
    zero3 hpZ  ZeRO++'s secondary partition: the backward all-gather reads a copy of the weights kept within the
               node (+Pw/S memory), intra only; the forward all-gather and the reduce-scatter still span every rank
               (the paper's M + 0 + M of 3M: hpZ alone is 2/3 of ZeRO-3's cross-node bytes; with qwZ and qgZ
               0.5M + 0 + 0.25M = 0.75M, the 4x)
    fsdp       every micro-batch two all-gathers (reshard after forward) but of the root module's weights (the
               embedding and final norm, gathered once); gradients accumulate unsharded and are reduce-scattered
               once                                                                        A(2P - root)w + Ψg
    hsdp       all-gathers and reduce-scatter within groups of S ranks on a node; then the 1/S shard all-reduced
               across the R = n/S groups, all over the NICs: 2(Ψg/S)(R-1)/R per GPU
    tp         per micro-batch, of B*T*h*a bytes each, within the node: in forward one all-reduce after each
               row-wise layer (2 a layer) and one after the vocabulary-parallel embedding; in backward one per
               column-wise layer's input (transformers' TP does not add q, k and v's input gradients before
               reducing them: 5 a Llama layer, where Megatron reduces 2); 2 more a recomputed layer. The output
               head: its logits all-gathered (rows x V x a, the rows its loss needs: the supervised positions)
               and its input's gradient all-reduced (rows x h x a)
    sp         Ulysses: per layer and micro-batch all-to-alls of q, k, v in and the attention output back,
               B*T/sp*(2h + 2kv)*a bytes a rank, in forward, again in backward and when recomputed

Time of a collective: max(intra bytes / intra bandwidth, inter bytes / (node NIC bandwidth / G)) at BUS_EFFICIENCY
of the nominal links (every GPU of a node runs its own group's collective at once, so each gets 1/G of the NICs),
plus per-hop latency x ring steps (n-1; 2(n-1) for all-reduce) x calls (one per layer and pass).

Compute per GPU, as the plan's step-time prediction counts it (distsft.memory.longest_sequences), at ASSUMED_MFU:
C = A*B*(FLOPs per token*T + 6*L*h*T^2)*(1 + recompute) / (tp*sp) / (peak * MFU).

Overlap (nested windows of C; a backward is 2/3 of a full fine-tuning micro-batch's FLOPs, 1/2 of a frozen base's,
plus any recompute):

    step    all of C: ZeRO-3/FSDP all-gathers (prefetched ahead of each layer)
    bwd     every backward: ZeRO-2's and ZeRO-3's reduce-scatters (they run in each micro-batch's backward)
    last    the last micro-batch's backward: ddp's all-reduce, ZeRO-1's and FSDP2's reduce-scatter (after no-sync)
    none    on the critical path: ZeRO-1/2's all-gather after the optimizer step, TP's all-reduces, SP's all-to-alls

    exposed = max(0, T_last - W_last, T_last + T_bwd - W_bwd, T_last + T_bwd + T_step - C) + T_none
    step time = C + exposed;  tokens/s per GPU = A*B*T / (tp*sp) / step time

Not counted: the first layer's gather before compute starts, the optimizer step, stragglers and congestion.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance default (parameters)
BUS_EFFICIENCY = 0.8  # NCCL's bus bandwidth / the links' nominal (nccl-tests read ~75-90% on NVLink and IB)


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    intra_gbps: float  # GB/s per GPU, one direction (NVLink 4: 450 on H100 SXM)
    inter_gbps: float  # Gb/s per node, all NICs together (8 x 400 Gb/s InfiniBand: 3200)
    intra_latency_us: float
    inter_latency_us: float
    peak_tflops: float  # dense bf16 per GPU
    memory_gib: float
    about: str = ""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


# presets for plan.cluster; plan.nodes, plan.gpus_per_node, plan.*_gbps and *_latency_us override them, and
# plan.gpu_memory_gib / logging.peak_flops their memory and FLOP/s
CLUSTERS = {
    "h100_ib": Cluster(8, 4, 450.0, 3200.0, 3.0, 8.0, 989.0, 80.0,
                       "8x H100 SXM per node on NVLink 4, 8x 400 Gb/s InfiniBand (one NIC per GPU)"),
    "a100_eth": Cluster(8, 2, 300.0, 100.0, 3.0, 30.0, 312.0, 80.0,
                        "8x A100 SXM 80GB per node on NVLink 3, one 100 Gb/s Ethernet NIC per node"),
    "workstation_pcie": Cluster(4, 1, 25.0, 100.0, 10.0, 30.0, 362.0, 48.0,
                                "4x L40S 48GB on PCIe Gen4 x16, no NVLink, one node"),
}
OVERRIDES = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "intra_node_gbps": "intra_gbps",
             "inter_node_gbps": "inter_gbps", "intra_latency_us": "intra_latency_us",
             "inter_latency_us": "inter_latency_us"}  # plan.<key> -> Cluster field


def cluster_of(plan) -> Cluster | None:
    """The preset plan.cluster names, with the plan's explicit overrides applied (None: no cluster)."""
    if not plan.cluster:
        return None
    given = {field: getattr(plan, key) for key, field in OVERRIDES.items() if getattr(plan, key) is not None}
    if plan.gpu_memory_gib:
        given["memory_gib"] = plan.gpu_memory_gib
    return replace(CLUSTERS[plan.cluster], **given)


def check_cluster(cfg) -> None:
    """plan.cluster names a preset; its overrides need it; plan.world_size agrees with its GPUs."""
    from .config import ConfigError

    plan = cfg.plan
    if plan.cluster is None:
        given = [f"plan.{k}" for k in OVERRIDES if getattr(plan, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} describe a cluster: name the preset they change with "
                              f"plan.cluster={'|'.join(CLUSTERS)}")
        return
    if plan.cluster not in CLUSTERS:
        raise ConfigError(f"plan.cluster={plan.cluster!r} is not one of {', '.join(CLUSTERS)} (or null: no layouts)")
    world = cluster_of(plan).world
    if plan.world_size not in (1, world):
        raise ConfigError(f"plan.world_size={plan.world_size} but plan.cluster={plan.cluster} has {world} GPUs "
                          "(plan.nodes x plan.gpus_per_node): set one of them")


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: ``size`` bytes in all (over its ``calls``), on a group of ``n`` ranks with
    ``m`` of them on each node, hidden behind the compute of ``window`` (step, bwd, last, none)."""

    name: str
    kind: str  # all_gather, reduce_scatter, all_reduce, all_to_all
    size: float
    n: int
    m: int
    calls: int
    window: str

    def bytes_per_gpu(self) -> tuple[float, float]:
        """(intra-node, inter-node) bytes this collective sends from each GPU per step."""
        if self.n <= 1:
            return 0.0, 0.0
        sent = self.size * (self.n - 1) / self.n * (2 if self.kind == "all_reduce" else 1)
        inter = sent / self.m if self.n > self.m else 0.0  # one of every m ring edges leaves the node
        return sent - inter, inter

    def seconds(self, c: Cluster) -> float:
        intra, inter = self.bytes_per_gpu()
        if not intra and not inter:
            return 0.0
        nic_share = c.inter_gbps / 8 * 1e9 / c.gpus_per_node  # bytes/s of the node's NICs per GPU
        wire = max(intra / (c.intra_gbps * 1e9), inter / nic_share) / BUS_EFFICIENCY
        hop = (c.inter_latency_us if self.n > self.m else c.intra_latency_us) * 1e-6
        return wire + self.calls * (self.n - 1) * (2 if self.kind == "all_reduce" else 1) * hop


WINDOWS = ("last", "bwd", "step")  # nested: the last backward, every backward, the whole step


def exposed_seconds(times: dict[str, float], compute: float, backward: float, accum: int) -> float:
    """Communication not hidden behind compute (the module docstring's rule), from the seconds per window."""
    width = {"last": backward / accum, "bwd": backward, "step": compute}
    worst, queued = 0.0, 0.0
    for w in WINDOWS:
        queued += times.get(w, 0.0)
        worst = max(worst, queued - width[w])
    return worst + times.get("none", 0.0)


@dataclass(frozen=True)
class Volumes:
    """One model replica's tensors per tensor-parallel rank: parameters p (P/tp) gathered at w bytes each, trainable
    ones t (Ψ/tp) reduced at g bytes each; a micro-batch's activations of one layer (B*T*h*a) and its Ulysses
    all-to-all buffers (B*T/sp*(2h + 2kv)*a); layers L, micro-batches A, layers recomputed per micro-batch."""

    p: float
    t: float
    w: float
    g: float
    layer_acts: float
    sp_acts: float
    layers: int
    accum: int
    recomputed: int = 0
    root: float = 0.0  # parameters FSDP2 keeps gathered from forward to backward: its root module's (embedding, norm)
    regather: float = 1.0  # share of the weights ZeRO-3 gathers again in backward (REUSE_DISTANCE)
    head_acts: float = 0.0  # a micro-batch's rows through the output head: their inputs' bytes (rows x h x a)
    logits: float = 0.0  # ... and their logits' bytes (rows x V x a)

    def quantized(self) -> Volumes:
        """ZeRO++: weights gathered as int8 blocks (qwZ), gradients reduced as int4 (qgZ)."""
        return replace(self, w=1.0, g=0.5)


def dp_collectives(layout: str, v: Volumes, n: int, m: int, shard: int, quantized: bool = False) -> list[Collective]:
    """The data-parallel collectives of a layout (ddp, zero1, zero2, zero3, zero3_hpz, fsdp, hsdp) on a group of n
    ranks with m per node; ``shard``: hpZ's secondary partition / HSDP's shard group. ``quantized``: ZeRO++'s qwZ
    and qgZ, for the zero3 layouts only (the model's, not a trainer setting)."""
    A, L = v.accum, v.layers
    q = v.quantized() if quantized and layout.startswith("zero3") else v
    weights, trainable, grads = v.p * v.w, v.t * v.w, v.t * v.g
    if layout == "ddp":
        return [Collective("all-reduce gradients", "all_reduce", grads, n, m, L, "last")]
    if layout in ("zero1", "zero2"):
        every = A if layout == "zero2" else 1  # ZeRO-2 reduces in every backward, ZeRO-1 at the boundary
        return [Collective("reduce-scatter gradients", "reduce_scatter", every * grads, n, m, every * L,
                           "bwd" if layout == "zero2" else "last"),
                Collective("all-gather updated weights", "all_gather", trainable, n, m, L, "none")]
    if layout in ("zero3", "zero3_hpz"):
        hpz = layout == "zero3_hpz"  # the backward's gather reads the node's secondary copy, in bf16
        again = v.regather * A * (weights if hpz else q.p * q.w)
        return [Collective("all-gather weights (forward)", "all_gather", A * q.p * q.w, n, m, A * L, "step"),
                Collective("all-gather weights (backward)", "all_gather", again,
                           shard if hpz else n, min(m, shard) if hpz else m, A * L, "step"),
                Collective("reduce-scatter gradients", "reduce_scatter", A * q.t * q.g, n, m, A * L, "bwd")]
    if layout in ("fsdp", "hsdp"):
        group = shard if layout == "hsdp" else n
        gathered = A * (2 * v.p - v.root) * v.w  # the root module's weights stay gathered from forward to backward
        out = [Collective("all-gather weights (forward + backward)", "all_gather", gathered, group,
                          min(m, group), 2 * A * L, "step"),
               Collective("reduce-scatter gradients", "reduce_scatter", grads, group, min(m, group), L, "last")]
        if layout == "hsdp" and n > group:  # the shard's all-reduce across the replicas (one per shard group)
            out.append(Collective("all-reduce gradient shards", "all_reduce", grads / group, n // group,
                                  max(1, m // group), L, "last"))
        return out
    raise ValueError(f"unknown layout {layout!r}")


COLUMN_WISE = 5  # column-wise layers a decoder layer (q, k, v, gate, up): one input-gradient all-reduce each


def model_collectives(v: Volumes, tp: int, sp: int) -> list[Collective]:
    """Tensor parallelism's all-reduces and Ulysses' all-to-alls (groups inside a node, on the critical path)."""
    out = []
    passes = 2 * v.layers * v.accum + v.recomputed * v.accum  # layer forwards and backwards, and recomputes
    if tp > 1:
        calls = v.accum * (2 * v.layers + 1 + COLUMN_WISE * v.layers + 2 * v.recomputed)
        out.append(Collective("TP all-reduce activations", "all_reduce", calls * v.layer_acts, tp, tp, calls, "none"))
        if v.logits:
            out += [Collective("TP all-gather logits", "all_gather", v.accum * v.logits, tp, tp, v.accum, "none"),
                    Collective("TP all-reduce head input gradient", "all_reduce", v.accum * v.head_acts, tp, tp,
                               v.accum, "none")]
    if sp > 1:
        out.append(Collective("SP all-to-all q,k,v,out", "all_to_all", passes * v.sp_acts, sp, sp, 4 * passes,
                              "none"))
    return out
