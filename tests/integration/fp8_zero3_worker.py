"""``torchrun --nproc_per_node 2 -m tests.integration.fp8_zero3_worker OUT.json``: what a forward under ZeRO-3 (2 CPU
ranks, gloo) leaves allocated for backward, with the decoder's trainable linear layers in FP8 (model.fp8, full
fine-tuning) and without.

A 4-layer Llama; per variant (without FP8 its layers run ``F.linear``, which DeepSpeed's ZeRO-3 replaces with its
memory-efficient linear, ``LinearFunctionForZeroStage3``: it saves the parameter, not a view of it):

    plain    the model as built
    fp8      model.fp8 (distsft.model.fp8.apply_fp8): torchao's Float8Linear with distsft's forward
    torchao  the same modules with torchao's own Float8Linear.forward, which saves ``weight.t()`` (the negative
             control: what model.fp8 did before)

DeepSpeed is told to release every gathered parameter after its module (``stage3_max_reuse_distance=0``; at its
default, 1e9 elements, a model this small would stay gathered whatever the layers save) and to reduce gradients
a layer at a time (a smaller ``reduce_bucket_size``: at its default every gradient waits for the end of backward,
and the step's peak would be theirs). Rank 0 writes, per variant:

- ``held_after_forward``, ``peak_forward``, ``peak_forward_backward``: bytes the CPU allocator's events count
  (tests/conftest.py's accounting) as allocated when the forward returns and at the peak of a forward and of a
  forward + backward, above what was live before. The least of ``REPEAT`` steps: the profiler records the frees
  of the profiled thread only, and gloo's worker thread sometimes drops the last reference to a gathered buffer,
  whose free is then missed (up to ~5 MB more in one step); a missed free only adds, so the least is the figure.
- ``saved_bytes``: the bytes of the storages autograd holds for backward when the forward returns (every tensor
  saved, each storage once, as large as it is then: a saved parameter that ZeRO-3 released holds 0). Exact.
- ``losses``: every step's (the later ones after AdamW steps: the gradients of the re-gathered weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYERS, HIDDEN, INTER, KV = 4, 256, 768, 128  # q, o: HIDDEN x HIDDEN; k, v: KV x HIDDEN; gate, up, down: INTER x HIDDEN
LINEAR_BYTES = 4 * (2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * INTER * HIDDEN)  # one layer's linear weights, fp32
REPEAT = 6
DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_force_ds_cpu_optimizer": False,
      "steps_per_print": 10**9, "zero_optimization": {
          "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
          "stage3_prefetch_bucket_size": 0, "reduce_bucket_size": HIDDEN * INTER}}


def allocated(fn):
    """(bytes allocated when ``fn()`` returns, peak while it ran, both above what was live before; its result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return live, peak, result


def saved_bytes(fn):
    """(bytes of the storages autograd saved while ``fn()`` ran, as large as they are when it returns; its result)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = fn()
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}.values()), result


def build(variant: str):
    import deepspeed
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from torchao.float8.float8_linear import Float8Linear
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.model.fp8 import apply_fp8

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER,
                               num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV // 64,
                               head_dim=64, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    if variant != "plain":
        assert apply_fp8(model) == (0, 7 * LAYERS)
    if variant == "torchao":
        for module in model.modules():
            if isinstance(module, Float8Linear):
                vars(module).pop("forward", None)  # the class's: torchao's matmul_with_hp_or_float8_args(x, weight.t())
    model.train()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=DS)
    assert torch.nn.functional.linear is zero3_linear_wrap  # the engine's conversion of the model put it there
    return engine


def measure(variant: str, ids: torch.Tensor) -> dict:
    engine = build(variant)
    losses, held, peak_forward, peak_step, saved = [], [], [], [], []

    def forward():
        return engine(input_ids=ids, labels=ids).loss

    def step(loss):
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    def forward_backward():
        loss = forward()
        engine.backward(loss)
        return loss

    step(forward())  # the first step records DeepSpeed's trace (before it, every parameter is released anyway)
    for _ in range(REPEAT):
        bytes_, peak, (nbytes, loss) = allocated(lambda: saved_bytes(forward))
        held.append(bytes_)
        peak_forward.append(peak)
        saved.append(nbytes)
        step(loss)
    for _ in range(REPEAT):
        _, peak, loss = allocated(forward_backward)
        peak_step.append(peak)
        engine.step()
        losses.append(loss.item())
    assert len(set(saved)) == 1, saved
    return {"variant": variant, "held_after_forward": min(held), "peak_forward": min(peak_forward),
            "peak_forward_backward": min(peak_step), "saved_bytes": saved[0], "losses": losses,
            "held_each": held, "peak_forward_backward_each": peak_step, "layers": LAYERS,
            "layer_linear_bytes": LINEAR_BYTES}


def main(out: Path) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    results = [measure(v, ids) for v in ("plain", "fp8", "torchao")]
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
