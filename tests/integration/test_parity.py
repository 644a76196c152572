"""Parity of every strategy with a trusted reference on weights loaded by ``from_pretrained``.

distsft computes the loss with its supervised-position head in chunks (model.head), the reference
from full logits. The reference is plain torch: the model loaded with ``from_pretrained``, ``torch.optim.AdamW`` with
Hugging Face-style decay groups (everything but biases and norm weights decays, chosen by module
type and name, not by shape), gradient clipping, and one backward per optimizer step of
sum(token CE) / supervised tokens over the same global batch. distsft runs the same steps with 2
processes under each strategy. Weight decay is 0.1, so a strategy that decays the wrong tensors
(ZeRO-3's shard-on-load placeholders are 1-D: they all landed in the no-decay group) moves every
2-D weight by about steps x lr x wd = 5e-4 relative and fails the 1e-5 comparison; the negative
control shows that the comparison sees exactly that difference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import launch, typed_cfg

pytestmark = pytest.mark.multiproc
STEPS = 5
LR, WD = 1e-3, 0.1
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "trainer.global_batch_size=8",
             "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1", "data.max_seq_len=128",
             "schedule=constant", "schedule.warmup_steps=0", f"optim.lr={LR}", f"optim.weight_decay={WD}",
             "model.init=pretrained", "data.val_fraction=0", "logging.plot=false",
             "trainer.loss_chunk=50"]  # the supervised head in several chunks, their count different on each rank
TOL = 1e-5


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The tiny model saved with save_pretrained: the from_pretrained path (shard-on-load under ZeRO-3)."""
    from distsft.model.load import load_model, load_tokenizer

    cfg = typed_cfg()
    src = tmp_path_factory.mktemp("pretrained") / "tiny"
    load_model(cfg.model, seed=7).save_pretrained(src)
    load_tokenizer(cfg.model).save_pretrained(src)
    return src


def hf_decay_groups(model, weight_decay: float) -> list[dict]:
    """transformers.Trainer's rule: no decay for biases and the weights of normalisation layers."""
    norm = {f"{n}.{pn}" if n else pn for n, m in model.named_modules() if "Norm" in type(m).__name__
            for pn, _ in m.named_parameters(recurse=False)}
    decay = [p for n, p in model.named_parameters() if n not in norm and not n.endswith("bias")]
    rest = [p for n, p in model.named_parameters() if n in norm or n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def reference_run(src, weight_decay: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(per-step losses, final weights) of plain torch on distsft's step batches (one process: the
    step's global batch is the same whatever the world size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.batch import resolve_batch
    from distsft.data.loader import StepLoader, pack
    from distsft.data.prepare import prepare

    cfg = typed_cfg(f"model.name_or_path={src}", *OVERRIDES)
    tok = AutoTokenizer.from_pretrained(src)
    data = prepare(cfg.data, tok, str(src))
    plan = resolve_batch(2, None, 8, 1)  # micro 2 x accum 4: the global batch of 2 processes x 2 x 2
    loader = StepLoader(data.train, pack(data.train, cfg.data, data.train_stats), plan, 0, cfg.data, tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(hf_decay_groups(model, weight_decay), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for step, micro_batches in enumerate(loader.steps(0)):
        if step == STEPS:
            break
        n = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        total = 0.0
        for mb in micro_batches:
            logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(),
                                 ignore_index=-100, reduction="sum") / n
            ce.backward()  # one step: the gradient of the whole global batch
            total += ce.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def reference(pretrained):
    return reference_run(pretrained, WD)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "zero3_offload", "fsdp"])
def test_strategy_matches_plain_torch_adamw_with_decay(strategy, pretrained, reference, tmp_path):
    ref_losses, ref_weights = reference
    s = launch(2, tmp_path, f"parallel={strategy}", f"model.name_or_path={pretrained}", *OVERRIDES)
    losses = [x for _, x in s["train_loss_history"]]
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=TOL), strategy
    # the parameter counts read from ZeRO-3's placeholders too are the full sizes
    assert s["parameters"]["total"] == s["parameters"]["trainable"] == sum(v.numel() for v in ref_weights.values())
    weights = load_file(tmp_path / "final" / "model.safetensors")
    ref = {k: v for k, v in ref_weights.items() if k in weights}  # a tied head is saved once
    assert max_rel_diff(weights, ref) <= TOL, strategy


def test_negative_control_decay_off_fails_the_comparison(pretrained, reference):
    """Without decay the weights differ by ~steps x lr x wd: the parity comparison must see it."""
    _, with_decay = reference
    _, without = reference_run(pretrained, 0.0)
    assert max_rel_diff(without, with_decay) > 20 * TOL
