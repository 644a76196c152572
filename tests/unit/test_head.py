"""model.head: the output head at supervised positions only, in chunks, equals the plain full-logits loss
(value and every gradient, fp32) and holds less memory; a shifted position set differs (negative control).
A model that changes the logits after its head (scaled, soft-capped, in place, or not from the head at all),
whatever its config says, loses the head on its first forward and trains on the plain path with its own loss;
a Llama under ZeRO-3-like output hooks keeps it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distsft.batch import BatchPlan
from distsft.data.collate import model_inputs, supervised_positions
from distsft.data.loader import StepLoader, pack
from distsft.data.prepare import prepare
from distsft.model import head
from distsft.trainer.loss import token_ce_sum
from distsft.trainer.step import forward_loss_sum
from tests.conftest import peak_allocated, typed_cfg


@pytest.fixture(scope="module")
def batch(tokenizer):
    cfg = typed_cfg("data.val_fraction=0").data
    prep = prepare(cfg, tokenizer)
    loader = StepLoader(prep.train, pack(prep.train, cfg, prep.train_stats), BatchPlan(4, 1, 1, 4), 0, cfg,
                        tokenizer.pad_token_id)
    return next(loader.steps(0))[0]


def plain_loss(model, batch):
    return token_ce_sum(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])


def loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        d = float((a[1][k] - b[1][k]).norm() / b[1][k].norm())
        assert d <= 1e-5, (k, d)


def test_batch_carries_the_supervised_positions(batch):
    labels = batch["labels"]
    t = labels.size(1)
    idx, targets = batch["sup_index"], batch["sup_targets"]
    assert len(idx) == int(batch["n_supervised"]) > 0  # the first label of a row is never supervised
    assert torch.equal(labels[idx // t, idx % t + 1], targets)


@pytest.mark.parametrize("chunk", [0, 37, 100_000])  # all at once, many recomputed chunks, one chunk
def test_head_loss_equals_the_plain_path(tiny_model, batch, chunk):
    assert batch["n_supervised"] > 37 * 3
    plain = loss_and_grads(tiny_model, plain_loss, batch)
    patched = copy.deepcopy(tiny_model)
    assert head.install(patched, chunk).startswith("supervised positions")
    assert_same(loss_and_grads(patched, forward_loss_sum, batch), plain)
    assert head.installed(patched)  # a Llama returns its head's output as is: the proof holds, the head stays
    # outside a training forward the head is the model's own: full logits
    with torch.no_grad():
        torch.testing.assert_close(patched(**model_inputs(batch)).logits, tiny_model(**model_inputs(batch)).logits)


def test_head_loss_with_an_adapted_head_equals_the_plain_path(tiny_model, batch):
    """LoRA on the output head too: the patched head runs PEFT's forward (adapter included)."""
    from distsft.config import PeftConfig
    from distsft.model.peft import apply_peft

    torch.manual_seed(0)
    lora = apply_peft(tiny_model, PeftConfig(method="lora", r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]),
                      gradient_checkpointing=False)
    for n, p in lora.named_parameters():  # non-zero B: the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    plain = loss_and_grads(lora, plain_loss, batch)
    assert head.install(lora, 50).endswith("in one chunk")  # sub-modules: never a rank-dependent call count
    assert head.installed(lora) and any("lm_head.lora" in k for k in plain[1])
    assert_same(loss_and_grads(lora, forward_loss_sum, batch), plain)


def test_negative_control_a_shifted_position_set_differs(tiny_model, batch):
    patched = copy.deepcopy(tiny_model)
    head.install(patched, 0)
    idx, targets = supervised_positions(batch["labels"])
    with torch.no_grad(), head.supervised(patched, idx + 1, targets):  # off by one position
        shifted = patched(**model_inputs(batch)).logits
        assert not torch.allclose(shifted, plain_loss(tiny_model, batch), rtol=1e-3)


@pytest.mark.parametrize("where", ["config", "text_config"])
@pytest.mark.parametrize("name", ["final_logit_softcapping", "lm_head_multiplier"])
def test_models_that_transform_logits_keep_the_plain_path(tiny_model, where, name):
    """The pre-check: a config attribute (in the config or a sub-config) that transforms the logits."""
    config = tiny_model.config
    if where == "text_config":
        config.text_config = config = LlamaConfig(vocab_size=640)
    setattr(config, name, 30.0)
    why = head.install(tiny_model, 0)
    assert why.startswith("plain") and f"{'text_config.' if where == 'text_config' else ''}{name}=30.0" in why
    assert not head.installed(tiny_model)


CAP = 0.05  # the "soft-capped" model's final_logit_softcapping, under text_config (the tiny model's logits are small)
# models that change the logits after their head, with nothing on their config that says so (but the soft-capping
# under text_config), from the Llama's logits and its last hidden states
CHANGES = {
    "scaled": lambda logits, model, hidden: logits * 2,
    "in place": lambda logits, model, hidden: logits.mul_(2),
    "soft-capped": lambda logits, model, hidden: CAP * torch.tanh(logits / CAP),
    "not the head's": lambda logits, model, hidden: torch.nn.functional.linear(hidden, model.lm_head.weight),
}


class Changed(LlamaForCausalLM):
    """The Llama with ``change`` applied to its logits after the head (a class attribute, set per test)."""

    change = None

    def forward(self, **kwargs):
        out = super().forward(**kwargs, output_hidden_states=True)
        out.logits = self.change(out.logits, self, out.hidden_states[-1])
        return out


def changed(tiny_model, change: str):
    """A copy of the tiny Llama (same weights) whose forward makes ``change`` to the logits after its head."""
    model = copy.deepcopy(tiny_model)
    name = "".join(c for c in change.title() if c.isalpha())
    model.__class__ = type(f"{name}Llama", (Changed,), {"change": staticmethod(CHANGES[change])})
    if change == "soft-capped":  # under the sub-config, where a multimodal model keeps it
        model.config.text_config = LlamaConfig(vocab_size=640, final_logit_softcapping=CAP)
    return model


def reference_loss(change: str):
    """The plain full-logits loss of the changed model, computed from the untouched Llama's outputs."""
    def fn(model, batch):
        out = model(**model_inputs(batch), use_cache=False, output_hidden_states=True)
        return token_ce_sum(CHANGES[change](out.logits, model, out.hidden_states[-1]), batch["labels"])
    return fn


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_model_that_changes_the_logits_after_its_head_loses_the_head(tiny_model, batch, change, caplog,
                                                                        monkeypatch):
    """Without the pre-check (no config attribute names the change), the structural proof fails on the first
    forward: the head is uninstalled, that micro-batch is recomputed on the plain path (value and gradients of
    the changed model's own loss), the warning names the model class once, and later steps stay plain."""
    monkeypatch.setattr(head, "AFTER_HEAD", ())  # the soft-capping under text_config would stop install itself
    model = changed(tiny_model, change)
    want = loss_and_grads(tiny_model, reference_loss(change), batch)
    if change != "not the head's":  # the change matters: the head's own loss is another number
        assert not torch.allclose(want[0], plain_loss(tiny_model, batch), rtol=1e-3)
    assert head.install(model, 37).startswith("supervised positions")
    with caplog.at_level("WARNING", logger="distsft.model.head"):
        assert_same(loss_and_grads(model, forward_loss_sum, batch), want)
        assert not head.installed(model) and "forward" not in vars(model.lm_head)
        assert_same(loss_and_grads(model, forward_loss_sum, batch), want)  # the next step: plain from the start
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and type(model).__name__ in warnings[0] and "plain path" in warnings[0], warnings


def test_the_pre_check_reads_the_text_config(tiny_model, batch):
    """With the pre-check: the soft-capping under text_config keeps the plain path from install on."""
    model = changed(tiny_model, "soft-capped")
    assert "text_config.final_logit_softcapping=0.05" in head.install(model, 0)
    want = loss_and_grads(tiny_model, reference_loss("soft-capped"), batch)
    assert_same(loss_and_grads(model, forward_loss_sum, batch), want)


def test_in_eval_with_no_supervised_token_the_check_still_decides(tiny_model, batch, monkeypatch):
    """evaluate's path (no_grad, eval mode) and an empty supervised set: a 0 from the head still has to be the
    model's logits; the scaled model loses the head, the Llama keeps it, both sum to 0."""
    from distsft.data.tokenize import IGNORE

    monkeypatch.setattr(head, "AFTER_HEAD", ())
    empty = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
    empty.update(zip(("sup_index", "sup_targets"), supervised_positions(empty["labels"])))
    assert empty["sup_index"].numel() == 0
    for model, keeps in ((copy.deepcopy(tiny_model), True), (changed(tiny_model, "scaled"), False)):
        head.install(model, 0)
        model.eval()
        with torch.no_grad():
            assert float(forward_loss_sum(model, empty)) == 0.0
            assert head.installed(model) is keeps
            if not keeps:  # and the next eval batch is right on the plain path
                torch.testing.assert_close(forward_loss_sum(model, batch),
                                           reference_loss("scaled")(tiny_model, batch), rtol=1e-5, atol=0)


class _Detach(torch.autograd.Function):
    """DeepSpeed ZeRO-3's PreBackwardFunctionForModule (runtime/zero/parameter_offload.py, 0.19): every module
    output becomes ``output.detach()`` through an autograd function: a new object over the same memory."""

    @staticmethod
    def forward(x):
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def _zero3_like_output_hook(module, args, output):
    if isinstance(output, torch.Tensor):
        return _Detach.apply(output)
    for key in [k for k, v in output.items() if isinstance(v, torch.Tensor)]:  # a ModelOutput, in place
        output[key] = _Detach.apply(output[key])
    return output


def test_zero3_like_output_hooks_keep_the_head(tiny_model, batch):
    """Positive control of the proof: ZeRO-3's hooks hand back another tensor object over the same memory (on
    the head and on the model): still the head's sum, so the head stays, with the plain path's loss."""
    plain = loss_and_grads(tiny_model, plain_loss, batch)
    model = copy.deepcopy(tiny_model)
    head.install(model, 37)
    model.lm_head.register_forward_hook(_zero3_like_output_hook)
    model.register_forward_hook(_zero3_like_output_hook)
    assert_same(loss_and_grads(model, forward_loss_sum, batch), plain)
    assert head.installed(model)


@pytest.mark.parametrize("multiplier", [2.0, 1.0])
def test_falcon_h1_lm_head_multiplier_takes_the_plain_path(batch, multiplier, monkeypatch):
    """transformers' FalconH1ForCausalLM returns ``lm_head(h) * lm_head_multiplier``: the pre-check stops a
    multiplier other than 1; without the pre-check (and at 1.0, where ``* 1.0`` is still a new tensor) the proof
    does. Either way the loss is that of the scaled logits, not of the head's own output."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    torch.manual_seed(0)
    config = FalconH1Config(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=64,
                            mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
                            lm_head_multiplier=multiplier, tie_word_embeddings=False, max_position_embeddings=1024)
    falcon = FalconH1ForCausalLM(config).float()
    want = loss_and_grads(falcon, plain_loss, batch)  # the model as it serves: scaled logits
    with torch.no_grad():
        unscaled = token_ce_sum(falcon.lm_head(falcon.model(**model_inputs(batch)).last_hidden_state), batch["labels"])
    assert multiplier == 1.0 or not torch.allclose(want[0], unscaled, rtol=1e-3)
    model = copy.deepcopy(falcon)
    if multiplier != 1.0:
        assert "lm_head_multiplier=2.0" in head.install(model, 0)
        assert_same(loss_and_grads(model, forward_loss_sum, batch), want)
        monkeypatch.setattr(head, "AFTER_HEAD", ())
        model = copy.deepcopy(falcon)
    assert head.install(model, 0).startswith("supervised positions")
    assert_same(loss_and_grads(model, forward_loss_sum, batch), want)
    assert not head.installed(model)


def test_the_chunked_head_holds_less_memory(tiny_model, batch):
    """Peak tensor bytes of forward + backward (torch.profiler's allocator events on CPU)."""
    def step(model, fn):
        return lambda: fn(model, batch).backward()

    plain, _ = peak_allocated(step(tiny_model, plain_loss))
    patched = copy.deepcopy(tiny_model)
    head.install(patched, 64)
    chunked, _ = peak_allocated(step(patched, forward_loss_sum))
    print(f"peak allocated: plain {plain / 2**20:.2f} MiB, supervised head in chunks of 64 {chunked / 2**20:.2f} MiB")
    assert chunked < 0.75 * plain
