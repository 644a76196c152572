"""The memory model (distsft.memory): the formulas against the ZeRO paper by hand, the precision contracts,
QLoRA and activations, the checkpointing options, and the longest-row savers (checkpoint offload)."""

from __future__ import annotations

import pytest

from distsft.memory import GIB, ModelShape, checkpointing_options, memory_estimate, suggest_checkpointing
from tests.conftest import typed_cfg

P = 1_000_000_000
SHAPE = ModelShape(params=P, trainable=P, quantizable=int(0.9 * P), layers=32, hidden=4096, kv_dim=1024,
                   intermediate=14336, vocab=128256)


@pytest.mark.parametrize("parallel,expect", [
    ("ddp", 16 * P),  # fp32 weights + grads + two fp32 moments
    ("zero1", 4 * P + 12 * P / 8),  # ZeRO paper: 4Psi + 12Psi/N
    ("zero2", 2 * P + 14 * P / 8),  # 2Psi + 14Psi/N
    ("zero3", 16 * P / 8),  # 16Psi/N
    ("zero3_offload", 2 * P / 8),  # weights and optimizer in CPU RAM; gradient partitions pass through the GPU
])
def test_memory_formulas_match_the_zero_paper(parallel, expect):
    """The paper's accounting has 2-byte gradients: trainer.grad_dtype=bfloat16 (DeepSpeed's own default)."""
    precision = "fp32" if parallel == "ddp" else "bf16"
    extra = () if parallel == "ddp" else ("trainer.grad_dtype=bfloat16",)
    cfg = typed_cfg(f"parallel={parallel}", f"trainer.precision={precision}", *extra)
    m = memory_estimate(cfg, SHAPE, world_size=8, micro_batch=1)
    assert m["weights"] + m["gradients"] + m["optimizer"] == pytest.approx(expect)


@pytest.mark.parametrize("parallel,grads", [
    ("zero1", 6 * P),  # the bf16 optimizer: bf16 gradients of the micro-batch + fp32 sums, unsharded
    ("zero2", 4 * P / 8),  # fp32 gradient partitions
    ("zero3", 4 * P / 8),
    ("fsdp", 4 * P / 8 + 4 * P),  # + the unsharded fp32 sums between the micro-batches of a step
])
def test_fp32_gradient_sums_under_bf16_are_counted(parallel, grads):
    cfg = typed_cfg(f"parallel={parallel}", "trainer.precision=bf16")
    m = memory_estimate(cfg, SHAPE, world_size=8, micro_batch=1, grad_accum=4)
    assert m["gradients"] == pytest.approx(grads)
    if parallel == "fsdp":  # no accumulation: reduce-scattered at once
        assert memory_estimate(cfg, SHAPE, world_size=8, micro_batch=1)["gradients"] == pytest.approx(4 * P / 8)


def test_full_fine_tuning_keeps_fp32_masters_whatever_the_storage_dtype():
    """A bf16 checkpoint under ddp + bf16 autocast trains fp32 weights: 16 bytes per parameter, not 8."""
    cfg = typed_cfg("trainer.precision=bf16", "model.dtype=bfloat16")
    m = memory_estimate(cfg, SHAPE, world_size=8, micro_batch=1)
    assert m["weights"] + m["gradients"] + m["optimizer"] == pytest.approx(16 * P)


def test_bf16_pure_holds_8_bytes_per_parameter():
    cfg = typed_cfg("trainer.precision=bf16_pure")
    m = memory_estimate(cfg, SHAPE, world_size=1, micro_batch=1)
    assert m["weights"] + m["gradients"] + m["optimizer"] == pytest.approx(8 * P)  # bf16 weights, grads, 2 moments


def test_memory_qlora_and_activations():
    cfg = typed_cfg("peft=qlora", "trainer.precision=bf16")
    shape = ModelShape(P, trainable=10_000_000, quantizable=int(0.9 * P), layers=32, hidden=4096, kv_dim=1024,
                       intermediate=14336, vocab=128256)
    m = memory_estimate(cfg, shape, world_size=1, micro_batch=1)
    # frozen non-linear weights in bf16, frozen linear ones in 4 bits, the adapters in fp32
    assert m["weights"] == pytest.approx((0.1 * P - 10_000_000) * 2 + 0.9 * P * 0.516 + 10_000_000 * 4)
    assert m["gradients"] == 4 * 10_000_000 and m["optimizer"] == 8 * 10_000_000  # fp32 adapters, two moments
    tokens = cfg.data.max_seq_len
    assert m["activations"] == tokens * 32 * (7 * 4096 + 2 * 1024 + 4 * 14336) * 2
    ckpt = memory_estimate(typed_cfg("peft=qlora", "trainer.precision=bf16", "model.gradient_checkpointing=true"),
                           shape, 1, 1)
    assert ckpt["activations"] < m["activations"] / 10
    half = memory_estimate(typed_cfg("peft=qlora", "trainer.precision=bf16", "model.gradient_checkpointing=true",
                                     "model.checkpoint_every=2"), shape, 1, 1)
    per_layer = (7 * 4096 + 2 * 1024 + 4 * 14336) * 2
    assert half["activations"] == tokens * (16 * 4096 * 2 + 16 * per_layer + per_layer)  # 16 of 32 recomputed
    assert m["logits"] == tokens * 128256 * (2 + 2 + 4 + 4)
    long = typed_cfg("peft=qlora", "trainer.precision=bf16", "data.max_seq_len=16384")
    assert memory_estimate(long, shape, 1, 1)["logits"] == 4096 * 128256 * 12  # one chunk of supervised positions
    full = typed_cfg("peft=qlora", "trainer.precision=bf16", "data.max_seq_len=16384", "trainer.loss_head=full")
    assert memory_estimate(full, shape, 1, 1)["logits"] == 16384 * 128256 * 12
    fused = memory_estimate(cfg, shape, 1, 1, fused_loss=True)
    assert fused["logits"] == 0  # frozen head: no gradient buffer either


def test_checkpointing_options_trade_memory_for_compute_and_the_cheapest_that_fits_is_suggested():
    cfg = typed_cfg("peft=lora", "trainer.precision=bf16", "model.dtype=bfloat16", "data.max_seq_len=4096")
    lora = ModelShape(8 * P, trainable=40_000_000, quantizable=7 * P, layers=32, hidden=4096, kv_dim=1024,
                      intermediate=14336, vocab=128256)
    opts = checkpointing_options(cfg, lora, 1, 4, fused_loss=True)
    assert [o["checkpoint_every"] for o in opts] == [None, 1, 2, 4, 8]
    off, every, second, fourth, eighth = (o["memory"] for o in opts)
    assert off > eighth > fourth > second > every  # the more layers recomputed, the less memory
    assert [o["extra_compute"] for o in opts] == [0, 0.5, 0.25, 0.125, 0.0625]  # a forward is half a LoRA step
    full = checkpointing_options(typed_cfg(), SHAPE, 1, 1, fused_loss=False)
    assert full[1]["extra_compute"] == pytest.approx(1 / 3)  # and a third of a full fine-tuning step
    def pick(gpu_bytes):
        best = suggest_checkpointing(opts, gpu_bytes)
        return best["checkpoint_every"] if best else "none fits"

    # the estimate must fit in 85% of the GPU: 62.8 GiB (every 2nd) fits 80 GiB, 83.3 (every 4th) does not
    assert pick(80 * GIB) == 2 and pick(second / 0.85 * 0.99) == 1 and pick(fourth / 0.85) == 4
    assert pick(every / 0.85 * 0.99) == "none fits" and pick(off / 0.85) is None  # None: no checkpointing
    assert suggest_checkpointing(opts, None) is None  # no GPU known: no suggestion


def test_checkpoint_offload_row_lengthens_rows_and_respects_the_host_budget():
    """An 8B-like shape (SHAPE, bf16, LoRA-like frozen base) on 141 GiB: the offload row keeps two layer inputs on
    the GPU instead of 32, so it goes further than checkpointing + tiled MLP; its pinned host memory is the
    layer inputs it moved (layers x T x h x 2 bytes) and stays within 85% of plan.host_memory_gib when given;
    its copies add time."""
    from dataclasses import replace

    from distsft.memory import HEADROOM, longest_sequences, memory_estimate

    cfg = typed_cfg("model.dtype=bfloat16", "trainer.precision=bf16")
    frozen = replace(SHAPE, trainable=SHAPE.params // 100, flops_per_token=2e9)
    rows = {o["option"]: o for o in longest_sequences(cfg, frozen, 1, False, 141 * GIB, 989e12)}
    tiled, offload = rows["+ checkpointing + tiled MLP"], rows["+ checkpoint offload"]
    assert offload["max_seq_len"] > 2 * tiled["max_seq_len"]
    assert offload["host_memory"] == 32 * offload["max_seq_len"] * 4096 * 2 and tiled["host_memory"] == 0
    assert offload["transfer_seconds"] > 0 and offload["seconds_per_row"] > offload["transfer_seconds"]
    on = replace(cfg, model=replace(cfg.model, gradient_checkpointing=True, offload_checkpoints=True))
    off = replace(on, model=replace(on.model, offload_checkpoints=False))
    saved = memory_estimate(off, frozen, 1, 1)["activations"] - memory_estimate(on, frozen, 1, 1)["activations"]
    assert saved == 30 * cfg.data.max_seq_len * 4096 * 2  # all but two layer inputs leave the GPU
    bounded = {o["option"]: o for o in longest_sequences(cfg, frozen, 1, False, 141 * GIB, 989e12, 64 * GIB)}
    b = bounded["+ checkpoint offload"]
    # host-bound (here below the tiled row: offload is all or none)
    assert 0 < b["max_seq_len"] < offload["max_seq_len"]
    assert b["host_memory"] <= HEADROOM * 64 * GIB < 32 * (b["max_seq_len"] + 256) * 4096 * 2


def _attention_step_peak(impl: str, length: int, checkpointing: bool) -> int:
    """Peak bytes allocated by one forward + backward of the tiny model over one packed row of two documents."""
    import torch

    from distsft.model.load import load_model
    from tests.conftest import peak_allocated

    cfg = typed_cfg(f"model.attn_implementation={impl}")
    model = load_model(cfg.model, seed=0)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    half = length // 2
    ids = torch.randint(3, 600, (1, length), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(half), torch.arange(length - half)])[None]
    cu = torch.tensor([0, half, length], dtype=torch.int32)
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=half, max_length_k=half) if impl == "varlen" else {}

    def step():
        model.model(input_ids=ids, position_ids=pos, use_cache=False, **extra).last_hidden_state.pow(2).sum().backward()

    return peak_allocated(step)[0]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_attention_square_terms_match_the_cpu_allocator(checkpointing):
    """The plan's [T, T] terms against what one step allocates on CPU (fp32, a 2048-token row of two documents):
    sdpa's masks and eager's scores, above the varlen kernel (whose memory is linear in the row, the plan's
    attention term 0), within -10%/+15% (the plan may round up, not down). The CPU varlen reference is linear:
    twice the row, at most ~2.3x the bytes (3-D SDPA inputs ran the math kernel, and were ~4x)."""
    from distsft.memory import attention_bytes
    from distsft.plan import model_shape

    t = 2048
    shape = model_shape(typed_cfg())
    linear = _attention_step_peak("varlen", t, checkpointing)
    assert linear < 2.3 * _attention_step_peak("varlen", t // 2, checkpointing)
    for impl in ("sdpa", "eager"):
        cfg = typed_cfg(f"model.attn_implementation={impl}", f"data.max_seq_len={t}",
                        f"model.gradient_checkpointing={str(checkpointing).lower()}")
        measured = _attention_step_peak(impl, t, checkpointing) - linear
        estimate = attention_bytes(cfg, shape, rows=1, a=4)
        assert 0.9 * measured <= estimate <= 1.15 * measured, (impl, estimate / 2**20, measured / 2**20)
