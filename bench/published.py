"""The plan's communication model (distsft.comm, distsft.layouts) against published multi-node tables.

    python bench/published.py     # the side-by-side table of bench/README.md ("The plan's layouts against ...")

Each case states the publisher's setup (model shape, GPUs, network, batch, precision) and the utilisation the model
is given: the publisher's own stated MFU at its smallest size, converted to distsft's FLOP count (6N + causal
attention, 6*L*h*T per token; torchtitan and MosaicML count attention as 12*L*h*T), never fitted to the multi-node
rows. Their MFU already prices their activation recompute, so the model runs without recompute on the same FLOPs.
Shapes are built from the models' published dimensions (``llama_shape``; tests check it against distsft.plan's
meta-device count of bench/models/llama3_1_8b), so nothing is downloaded.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distsft.comm import CLUSTERS, Cluster, Volumes, dp_collectives
from distsft.config import Config
from distsft.layouts import Layout, evaluate
from distsft.memory import ModelShape


def llama_shape(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> ModelShape:
    """A Llama's parameter counts from its dimensions (untied head; the input embedding is a lookup, no FLOPs)."""
    kv = kv_heads * hidden // heads
    matmuls = layers * (2 * hidden * (hidden + kv) + 3 * hidden * intermediate)
    params = matmuls + layers * 2 * hidden + hidden + 2 * vocab * hidden  # + norms, embedding and head
    return ModelShape(params, params, matmuls, layers, hidden, kv, intermediate, vocab,
                      6.0 * (params - vocab * hidden), params, "llama", heads, kv_heads)


LLAMA31_8B = llama_shape(32, 4096, 14336, 32, 8, 128256)
LLAMA31_70B = llama_shape(80, 8192, 28672, 64, 8, 128256)


def converted_mfu(stated: float, shape: ModelShape, seq: int) -> float:
    """The publisher's MFU (attention counted 12*L*h*T per token) in distsft's count (6*L*h*T, causal)."""
    attn = 6 * shape.layers * shape.hidden * seq
    return stated * (shape.flops_per_token + attn) / (shape.flops_per_token + 2 * attn)


def config(seq: int, micro: int, grad_dtype: str = "float32") -> Config:
    c = Config()
    return replace(c, data=replace(c.data, max_seq_len=seq),
                   model=replace(c.model, dtype="bfloat16", attn_implementation="varlen"),
                   trainer=replace(c.trainer, precision="bf16", grad_dtype=grad_dtype, micro_batch_size=micro,
                                   grad_accum=None, global_batch_size=None))


def torchtitan() -> list[dict]:
    """docs/performance.md (torchtitan, Dec 2024): Llama 3.1 8B, FSDP, local batch 2 x 8192 tokens, selective AC,
    no compile, H100 (96 GB HBM2e, 500 W) with NVLink and 400 Gb/s RDMA per GPU; 1D FSDP is 33% MFU (their count)."""
    mfu = converted_mfu(0.33, LLAMA31_8B, 8192)
    out = []
    for gpus, published in ((8, 5762), (128, 5605)):
        cluster = replace(CLUSTERS["h100_ib"], nodes=gpus // 8, memory_gib=96.0)
        r = evaluate(config(8192, 2), LLAMA31_8B, cluster, Layout("fsdp"), 2 * gpus, 989e12, mfu)
        out.append(row("torchtitan Llama-3.1-8B FSDP, tok/s per GPU", f"{gpus} H100", published,
                       r["tokens_per_s_per_gpu"], f"MFU {mfu:.3f}; exposed comm {r['exposed_s'] * 1e3:.1f} ms"))
    out.append(row("torchtitan, 128 / 8 GPUs", "ratio", 5605 / 5762, out[1]["plan"] / out[0]["plan"], ""))
    return out


def mpt_shape() -> ModelShape:
    """MPT-7B: 32 layers of 4096, multi-head attention, a 4x GELU MLP, tied 50432-token embedding (6.659e9 as
    MosaicML counts it); ``intermediate`` is the SwiGLU width with the same weights (memory only)."""
    params = 6_658_859_008
    return ModelShape(params, params, params - 50432 * 4096, 32, 4096, 4096, 16384 * 2 // 3, 50432,
                      6.0 * params, params, "mpt", 32)


def mosaicml() -> list[dict]:
    """llm-foundry scripts/train/benchmarking/README.md, "A100 40GB with 1600 Gbps node-node interconnect (RoCE)":
    MPT-7B, 2048 tokens, FSDP FULL_SHARD with bf16 PURE (weights, gradients and their reduction in bf16), full
    activation checkpointing; 50.92% MFU at 8 GPUs (their count)."""
    shape = mpt_shape()
    mfu = converted_mfu(0.5092, shape, 2048)
    out = []
    for gpus, micro, accum, published in ((8, 12, 4, 3679), (16, 16, 1, 3645), (32, 18, 1, 3725),
                                          (64, 18, 1, 3665), (128, 18, 1, 3623)):
        cluster = Cluster(8, gpus // 8, 300.0, 1600.0, 3.0, 10.0, 312.0, 40.0, "A100 40GB, 8x 200 Gb/s RoCE")
        r = evaluate(config(2048, micro, "bfloat16"), shape, cluster, Layout("fsdp"), micro * accum * gpus,
                     312e12, mfu)
        out.append(row("MosaicML MPT-7B FSDP, tok/s per GPU", f"{gpus} A100 40GB", published,
                       r["tokens_per_s_per_gpu"], f"MFU {mfu:.3f}; comm {r['comm_s']:.2f} s of {r['step_s']:.1f} s"))
    return out


def cross_node(layout: str, quantized: bool, grad_bytes: float = 2.0, nodes: int = 48) -> float:
    """Cross-node bytes per GPU of one ZeRO-3 micro-batch (Ψ = 1e9, bf16 weights)."""
    v = Volumes(1e9, 1e9, 2.0, grad_bytes, 0.0, 0.0, 1, 1)
    n = nodes * 8
    return sum(c.bytes_per_gpu()[1] for c in dp_collectives(layout, v, n, 8, 8, quantized))


def zeropp() -> list[dict]:
    """ZeRO++ (arXiv 2306.10209; DeepSpeed's blogs/zeropp): cross-node volume of ZeRO-3 3M (forward all-gather M,
    backward all-gather M, reduce-scatter M, in fp16) against ZeRO++'s 0.5M + 0 + 0.25M = 0.75M (qwZ, hpZ, qgZ)."""
    base = cross_node("zero3", False)
    fp32 = cross_node("zero3_hpz", False, 4.0) / cross_node("zero3", False, 4.0)
    return [row("ZeRO++ cross-node bytes / ZeRO-3's", "hpZ alone", 2 / 3, cross_node("zero3_hpz", False) / base,
                f"fp32 gradients (distsft's default): {fp32:.3f}"),
            row("ZeRO++ cross-node bytes / ZeRO-3's", "hpZ + qwZ + qgZ", 0.25, cross_node("zero3_hpz", True) / base,
                "the paper's 4x")]


def row(case: str, setting: str, published: float, plan: float, note: str) -> dict:
    return {"case": case, "setting": setting, "published": published, "plan": plan,
            "error": plan / published - 1, "note": note}


def main() -> list[dict]:
    rows = torchtitan() + mosaicml() + zeropp()
    print("| case | setting | published | plan | error | model's assumptions |\n|---|---|---:|---:|---:|---|")
    for r in rows:
        fmt = "{:,.0f}" if r["published"] > 10 else "{:.3f}"
        print(f"| {r['case']} | {r['setting']} | {fmt.format(r['published'])} | {fmt.format(r['plan'])} | "
              f"{r['error']:+.1%} | {r['note']} |")
    return rows


if __name__ == "__main__":
    main()
