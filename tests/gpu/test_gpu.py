"""GPU-only checks (marked; skipped without CUDA): PyTorch's flash varlen kernel keeps packed documents
apart in bf16, and a bf16 GPU run tracks the fp32 CPU run of the same tiny model."""

from __future__ import annotations

import pytest
import torch

from distsft.data.collate import TokenStore, collate_packed, model_inputs
from distsft.data.packing import best_fit_decreasing
from tests.conftest import run_tiny, typed_cfg
from tests.helpers import per_token_ce, tokenize_messages

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_torch_varlen_packed_equals_alone_bf16(tokenizer):
    from distsft.assets.build import make_examples
    from distsft.model.load import load_model

    model = load_model(typed_cfg("model.attn_implementation=varlen", "model.dtype=bfloat16").model, seed=0,
                       cuda=True).cuda().eval()
    docs = [tokenize_messages(tokenizer, e["messages"], "assistant") for e in make_examples(16, seed=3)]
    store = TokenStore([d["input_ids"] for d in docs], [d["labels"] for d in docs])
    rows = best_fit_decreasing(store.lengths, 192, seed=0)
    batch = {k: v.cuda() if k != "max_seqlen" else v for k, v in collate_packed(store, rows, 0).items()}
    with torch.no_grad():
        packed = per_token_ce(model(**model_inputs(batch, True), use_cache=False).logits, batch["labels"])
        plain = dict(batch, cu_seqlens=torch.arange(len(rows) + 1, dtype=torch.int32, device="cuda")
                     * batch["input_ids"].shape[1], max_seqlen=torch.tensor(batch["input_ids"].shape[1]))
        leaky = per_token_ce(model(**model_inputs(plain, True), use_cache=False).logits, batch["labels"])
        worst = 0.0
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                x, y = (torch.from_numpy(a)[None].cuda() for a in store.example(i))
                alone = per_token_ce(model(input_ids=x, use_cache=False).logits, y)
                worst = max(worst, (packed[b, t:t + x.shape[1] - 1] - alone[0]).abs().max().item())
                t += x.shape[1]
    assert worst <= 2e-2  # bf16 logits: a few ulps of ~6.5
    assert (leaky - packed).abs().max().item() >= 5e-2  # negative control


def test_bf16_gpu_run_tracks_fp32_cpu(tmp_path):
    steps = ["trainer.max_steps=20", "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1"]
    cpu = run_tiny(tmp_path / "cpu", *steps).summary["train_loss_history"]
    gpu = run_tiny(tmp_path / "gpu", *steps, "trainer.use_cuda=true", "trainer.precision=bf16",
                   "model.attn_implementation=varlen").summary["train_loss_history"]
    for (_, a), (_, b) in zip(cpu, gpu):
        assert abs(a - b) <= 0.05 * a


def test_fsdp2_trains_like_ddp_and_exports_full_weights(tmp_path):
    """FSDP2 (GPU only): same per-step losses as DDP on one GPU, and a gathered final/ export."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import launch

    steps = ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=2", "logging.log_every=1",
             "trainer.use_cuda=true"]
    n = max(1, min(2, torch.cuda.device_count()))
    env_gpu = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n))}
    ddp = launch(n, tmp_path / "ddp", "parallel=ddp", *steps, env=env_gpu)
    fsdp = launch(n, tmp_path / "fsdp", "parallel=fsdp", *steps, env=env_gpu)
    for (_, a), (_, b) in zip(ddp["train_loss_history"], fsdp["train_loss_history"]):
        assert b == pytest.approx(a, rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    assert all(p.numel() > 0 for p in model.parameters())


def test_liger_fused_loss_equals_logits_loss(tokenizer):
    """model.kernels=liger: the fused linear cross-entropy (no logits) gives the same summed loss and
    gradients as the logits path, on packed varlen rows; and its training run tracks the torch one."""
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel")
    from distsft.assets.build import make_examples
    from distsft.model.kernels import apply_kernels
    from distsft.model.load import load_model
    from distsft.trainer.step import forward_loss_sum

    cfg = typed_cfg("model.attn_implementation=varlen", "model.dtype=bfloat16").model
    docs = [tokenize_messages(tokenizer, e["messages"], "assistant") for e in make_examples(16, seed=5)]
    store = TokenStore([d["input_ids"] for d in docs], [d["labels"] for d in docs])
    batch = collate_packed(store, best_fit_decreasing(store.lengths, 192, seed=0), 0)
    batch = {k: v.cuda() if k != "max_seqlen" else v for k, v in batch.items()}
    out = []
    for kernels in ("torch", "liger"):
        model = apply_kernels(load_model(cfg, seed=0, cuda=True).cuda().train(), kernels)
        loss = forward_loss_sum(model, batch)
        loss.backward()
        out.append((loss.item(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (a, ga), (b, gb) = out
    assert b == pytest.approx(a, rel=2e-3)  # bf16 logits (torch) vs fp32 accumulation inside Liger
    assert ((ga.float() - gb.float()).norm() / ga.float().norm()).item() < 2e-2


def test_plan_memory_estimate_tracks_max_memory_allocated(tmp_path):
    """distsft.plan's per-GPU estimate against torch.cuda.max_memory_allocated of the same config: a
    Llama-3.2-1B shape, full fine-tune in bf16, 2 x 1024-token rows (the trainer's own run, 3 steps)."""
    from distsft.memory import memory_estimate
    from distsft.model.kernels import resolve_kernels
    from distsft.plan import model_shape
    from tests.conftest import ROOT

    over = [f"model.name_or_path={ROOT / 'bench/models/llama3_2_1b'}", "model.init=config",
            f"model.tokenizer={ROOT / 'distsft/assets/tiny-llama'}", "model.dtype=bfloat16", "trainer.precision=bf16",
            "data.max_seq_len=1024", "trainer.micro_batch_size=2", "trainer.grad_accum=1",
            "trainer.global_batch_size=null", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0",
            "export.enabled=false", "optim.lr=1e-5"]
    cfg = typed_cfg(*over)
    torch.cuda.reset_peak_memory_stats()
    run_tiny(tmp_path, *over, "trainer.use_cuda=true")
    measured = torch.cuda.max_memory_allocated()
    fused = resolve_kernels(cfg.model.kernels, cuda=True, sharded=False)[0] == "liger"
    est = memory_estimate(cfg, model_shape(cfg), 1, 2, fused_loss=fused)["total"]
    print(f"estimate {est / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB (liger={fused})")
    assert 0.75 < est / measured < 1.25


def test_training_step_queues_work_without_a_host_sync(tmp_path, monkeypatch):
    """With fused AdamW a training step never waits for the GPU: the supervised-token count, the
    non-finite verdict (fused AdamW's found_inf) and the stop flag stay on the device, and the host
    reads them a step late. torch's sync debug mode turns any sync inside the step into an error.
    (Liger's fused cross-entropy reads its token count back once per micro-batch: torch kernels here.)"""
    import distsft.trainer.loop as loop

    real, calls = loop.train_step, {"n": 0}

    def strict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the first step builds optimizer state and warms caches
            return real(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop, "train_step", strict)
    s = run_tiny(tmp_path, "trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=0",
                 "logging.log_every=3", "trainer.use_cuda=true", "trainer.precision=bf16",
                 "model.attn_implementation=varlen", "model.kernels=torch").summary
    assert s["status"] == "finished" and s["steps"] == 6 and calls["n"] == 6


def test_compiled_layers_match_eager_with_the_default_gpu_kernels(tmp_path):
    """model.compile on CUDA with the default kernels (Liger when installed, the varlen flash kernel):
    the same per-step losses as eager within bf16 noise, and the layers really ran compiled."""
    from torch._dynamo.utils import counters

    steps = ["trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1",
             "data.val_fraction=0", "logging.sample_every=0", "trainer.use_cuda=true", "trainer.precision=bf16"]
    eager = run_tiny(tmp_path / "eager", *steps).summary["train_loss_history"]
    torch._dynamo.reset()
    counters.clear()
    compiled = run_tiny(tmp_path / "compiled", *steps, "model.compile=true").summary["train_loss_history"]
    assert counters["stats"]["unique_graphs"] >= 1
    for (_, a), (_, b) in zip(eager, compiled, strict=True):
        assert abs(a - b) <= 0.02 * a


def test_checkpoint_offload_lowers_peak_memory_and_keeps_numerics():
    """model.offload_checkpoints on a GPU: 8 checkpointed layers, one 8192-token row, bf16 weights. The same loss
    and gradients as plain checkpointing (the copies are exact; the attention backward may add in another order), and
    max_memory_allocated falls by about the layer inputs it keeps in host memory (8 x 8192 x hidden x 2 bytes, less the
    two in flight)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.model.offload import apply_checkpoint_offload

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=640, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192)
    plain = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to("cuda", torch.bfloat16).train()
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloaded = copy.deepcopy(plain)
    layers, stats = apply_checkpoint_offload(offloaded)
    ids = torch.randint(0, 640, (1, 8192), device="cuda")

    def step(model):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cuda.max_memory_allocated() - base, {
            n: p.grad.float() for n, p in model.named_parameters()}

    loss_a, peak_a, grads_a = step(plain)
    loss_b, peak_b, grads_b = step(offloaded)
    one_input = 8192 * 1024 * 2
    print(f"peak above weights: {peak_a / 2**20:.0f} MiB plain, {peak_b / 2**20:.0f} MiB offloaded; "
          f"host {stats['bytes'] / 2**20:.0f} MiB")
    assert layers == 8 and stats["bytes"] == 8 * one_input
    assert loss_b == pytest.approx(loss_a, rel=1e-6)  # the flash backward may add in another order: bf16 ulps
    for n in grads_a:
        assert (grads_a[n] - grads_b[n]).abs().max() <= 1e-2 * grads_a[n].abs().max() + 1e-6, n
    assert peak_a - peak_b >= 5 * one_input


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_fp8_runs_fp8_matmuls_on_the_gpu_and_tracks_bf16(tmp_path, peft):
    """model.fp8 on an FP8 GPU (sm_89+): LoRA (a frozen bf16 base) and full fine-tuning (fp32 masters, torchao's
    Float8Linear) on the pretrained tiny base give per-step losses within 3% of the same run without it, and ran
    torch's scaled (FP8) matmul on CUDA."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (sm_89+)")
    pytest.importorskip("torchao.float8", reason="pip install 'distsft[fp8]'")
    from torch.profiler import ProfilerActivity, profile

    steps = ["model=tiny_base", f"peft={peft}", "trainer.max_steps=8", "trainer.eval_every=0", "trainer.save_every=0",
             "logging.log_every=1", "data.val_fraction=0", "logging.sample_every=0", "trainer.use_cuda=true",
             "trainer.precision=bf16", "model.dtype=bfloat16", "model.kernels=torch"]
    plain = run_tiny(tmp_path / "plain", *steps).summary["train_loss_history"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fp8 = run_tiny(tmp_path / "fp8", *steps, "model.fp8=true").summary["train_loss_history"]
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm") > 0
    for (_, a), (_, b) in zip(plain, fp8, strict=True):
        assert abs(a - b) <= 0.03 * a


def test_fused_lora_add_tracks_pefts_forward_on_the_gpu(tmp_path):
    """peft.fused_add in bf16 on CUDA: the adapters' output is added by addmm_ (in cuBLAS's epilogue), and the
    per-step losses stay within bf16 rounding of PEFT's own forward (peft.fused_add=false)."""
    from torch.profiler import ProfilerActivity, profile

    steps = ["model=tiny_base", "peft=lora", "trainer.max_steps=8", "trainer.eval_every=0", "trainer.save_every=0",
             "logging.log_every=1", "data.val_fraction=0", "logging.sample_every=0", "trainer.use_cuda=true",
             "trainer.precision=bf16", "model.dtype=bfloat16"]
    runs, addmm = {}, {}
    for fused in (False, True):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runs[fused] = run_tiny(tmp_path / str(fused), *steps, f"peft.fused_add={str(fused).lower()}").summary
        addmm[fused] = sum(e.count for e in prof.key_averages() if e.key == "aten::addmm_")
    assert addmm[False] == 0 < addmm[True]
    for (_, a), (_, b) in zip(runs[False]["train_loss_history"], runs[True]["train_loss_history"], strict=True):
        assert abs(a - b) <= 0.01 * a
