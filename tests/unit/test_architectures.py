"""The architecture matrix: for every model family distsft documents, a tiny random config saved with
save_pretrained and loaded through distsft's own loading path

- keeps packed documents apart under every attention backend it runs on CPU (sdpa, eager, distsft's varlen):
  packed rows give the per-token losses of each document run alone through eager attention (transformers'
  reference for the family's own attention: sliding windows, soft-capping), and a leaky batch (a plain causal
  mask; for varlen, no document boundaries) does not (the negative control). The sliding-window families run
  with a 16-token window, shorter than most documents, so the window is part of what is compared; varlen,
  which attends over the whole document, is not run on them (nor on gemma2, whose attention is soft-capped),
  and transformers refuses sdpa for gemma2;
- gets LoRA adapters with peft.target_modules=[all-linear] on exactly the layers the model itself says are
  linear (every nn.Linear but the output head, under the family's own names), and for an MoE on the fused
  expert weights and the router as *parameters* (PEFT 0.21: one rank-r adapter per expert, rank 2r on the
  fused gate_up_proj); a narrower target list does not match the expectation (the negative control);
- trains the same with gradient checkpointing (distsft's apply_peft path, full and LoRA): the same loss
  (cross-entropy + an MoE's router term) and gradients to 1e-5 in fp32, with the layers really recomputed.
"""

from __future__ import annotations

import pytest
import torch

from distsft.data.collate import TokenStore, collate_packed, model_inputs
from distsft.data.packing import best_fit_decreasing
from tests.helpers import per_token_ce, tokenize_messages

COMMON = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=2, bos_token_id=None)
# a router coefficient large enough for its term to show in the gradients (the families' default is 0.001)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.5)
WINDOW = dict(sliding_window=16)  # documents here are 19-100 tokens
ARCHS = {  # model_type: (config extras, attention backends whose packing is tested on CPU)
    "llama": ({}, ("sdpa", "eager", "varlen")),
    "qwen2": ({}, ("sdpa", "eager", "varlen")),
    "qwen3": ({}, ("sdpa", "eager", "varlen")),
    "mistral": (WINDOW, ("sdpa", "eager")),  # Mistral v0.1's 4096-token window (v0.2+: none)
    "phi3": ({}, ("sdpa", "eager", "varlen")),
    "olmo2": ({}, ("sdpa", "eager", "varlen")),
    "granite": ({}, ("sdpa", "eager", "varlen")),
    "gemma3_text": (WINDOW, ("sdpa", "eager")),  # local layers of 512-1024 tokens in Gemma 3
    "gemma2": (WINDOW, ("eager",)),  # transformers refuses sdpa for gemma2 (test_gemma2_refuses_sdpa)
    "qwen3_moe": ({"num_experts": 4, **MOE}, ("sdpa", "eager", "varlen")),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.5},
                ("sdpa", "eager", "varlen")),
}
CASES = [(arch, attn) for arch in sorted(ARCHS) for attn in ARCHS[arch][1]]
# what all-linear adapts, by the family's own names: modules, and "(param)" for PEFT's parameter adapters
ATTN, MLP = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
EXPERTS = {"experts.gate_up_proj (param)", "experts.down_proj (param)", "gate.weight (param)"}
KINDS = {**{arch: ATTN | MLP for arch in ARCHS}, "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
         "qwen3_moe": ATTN | EXPERTS, "mixtral": ATTN | EXPERTS}


@pytest.fixture(scope="module")
def docs(tokenizer):
    from distsft.assets.build import make_examples

    return [tokenize_messages(tokenizer, e["messages"], "assistant") for e in make_examples(8, seed=11)]


@pytest.fixture(scope="module")
def packed(docs):
    store = TokenStore([d["input_ids"] for d in docs], [d["labels"] for d in docs])
    rows = best_fit_decreasing(store.lengths, 160, seed=0)
    assert max(len(r) for r in rows) > 2
    return store, rows, collate_packed(store, rows, pad_id=0)


def save_tiny(arch: str, path) -> None:
    """The family's tiny random model (seed 0), written with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **COMMON, **ARCHS[arch][0])).save_pretrained(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> a directory holding that family's tiny random model, made once."""
    dirs = {}

    def get(arch: str):
        if arch not in dirs:
            dirs[arch] = tmp_path_factory.mktemp(arch)
            save_tiny(arch, dirs[arch])
        return dirs[arch]

    return get


def load(saved, arch: str, attn: str | None = None):
    """The family's tiny model through distsft's loading path (from_pretrained of the saved weights)."""
    from distsft.config import ModelConfig
    from distsft.model.load import load_model

    attn = attn or ARCHS[arch][1][0]
    model = load_model(ModelConfig(name_or_path=str(saved(arch)), init="pretrained", attn_implementation=attn), 0)
    assert model.config.model_type == arch
    return model


@pytest.mark.parametrize("arch,attn", CASES)
def test_packed_equals_alone(arch, attn, packed, saved):
    store, rows, batch = packed
    model, reference = load(saved, arch, attn).eval(), load(saved, arch, "eager").eval()
    varlen = attn == "varlen"
    with torch.no_grad():
        out = per_token_ce(model(**model_inputs(batch, varlen), use_cache=False).logits.float(), batch["labels"])
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                x, y = store.example(i)
                alone = per_token_ce(reference(input_ids=torch.from_numpy(x)[None], use_cache=False).logits.float(),
                                     torch.from_numpy(y)[None])
                torch.testing.assert_close(out[b, t:t + len(x) - 1], alone[0], rtol=1e-4, atol=1e-4,
                                           msg=f"{arch} {attn}")
                t += len(x)
        # varlen without document boundaries runs each row as one document; the others get a plain causal mask
        leak = {} if varlen else {"attention_mask": torch.ones_like(batch["input_ids"])}
        leaky = model(**model_inputs(batch), **leak, use_cache=False)
    assert (per_token_ce(leaky.logits.float(), batch["labels"]) - out).abs().max() >= 1e-3, (arch, attn)


@pytest.mark.parametrize("arch", sorted(a for a, (extra, _) in ARCHS.items() if extra.get("sliding_window")))
def test_the_window_is_part_of_the_comparison(arch, packed, saved):
    """The negative control of the windows: the same weights with a window longer than every document give
    other losses on the long documents, so packed == alone above held with the window in force."""
    from transformers import AutoModelForCausalLM

    store = packed[0]
    x, y = store.example(max(range(len(store.lengths)), key=lambda i: store.lengths[i]))
    assert len(x) > 2 * WINDOW["sliding_window"]
    windowed = load(saved, arch, "eager").eval()
    whole = AutoModelForCausalLM.from_pretrained(saved(arch), attn_implementation="eager", sliding_window=4096).eval()
    with torch.no_grad():
        a, b = (per_token_ce(m(input_ids=torch.from_numpy(x)[None], use_cache=False).logits.float(),
                             torch.from_numpy(y)[None]) for m in (windowed, whole))
    assert (a - b).abs().max() >= 1e-3, arch


def test_gemma2_refuses_sdpa(saved):
    """What a user gets for gemma2 with model.attn_implementation=sdpa (or auto on CPU, which means sdpa)."""
    with pytest.raises(ValueError, match="does not support an attention implementation through torch.nn.functional"):
        load(saved, "gemma2", "sdpa")


def adapted(model) -> tuple[set[str], set[str]]:
    """(names of the modules PEFT wrapped as layers, 'module.parameter' names it adapted as parameters), in the
    base model's naming."""
    from peft.tuners.lora import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules, params = set(), set()
    for name, m in model.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        name = name.removeprefix("base_model.model.")
        while name.endswith(".base_layer"):  # several parameters of one module nest their wrappers
            name = name.removesuffix(".base_layer")
        if isinstance(m, ParamWrapper):
            params.add(f"{name}.{m.parameter_name}")
        else:
            modules.add(name)
    return modules, params


def expected_targets(model) -> tuple[set[str], set[str]]:
    """What all-linear should adapt, from the model's own modules: every nn.Linear but the output head; and in
    each MoE block, every parameter of its children that are not nn.Linear (the fused experts and the router)."""
    from distsft.model.moe import moe_blocks

    head = model.get_output_embeddings()
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    name_of = {m: n for n, m in model.named_modules()}
    params = {f"{name_of[block]}.{child}.{p}" for block in moe_blocks(model)
              for child, sub in block.named_children() if not isinstance(sub, torch.nn.Linear)
              for p, _ in sub.named_parameters()}
    return linear, params


def kinds(modules: set[str], params: set[str]) -> set[str]:
    """Layer kinds: 'q_proj', ...; parameters as 'experts.down_proj (param)'."""
    return {m.rsplit(".", 1)[-1] for m in modules} | {".".join(p.split(".")[-2:]) + " (param)" for p in params}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_all_linear_lora_targets(arch, saved):
    from distsft.config import PeftConfig
    from distsft.model.peft import apply_peft

    model = load(saved, arch)
    want_modules, want_params = expected_targets(model)
    assert "lm_head" not in want_modules and isinstance(model.lm_head, torch.nn.Linear)  # excluding it is a choice
    r, alpha = 4, 8
    lora = apply_peft(model, PeftConfig(method="lora", r=r, alpha=alpha, dropout=0.0), gradient_checkpointing=False)
    modules, params = adapted(lora)
    assert (modules, params) == (want_modules, want_params), arch
    assert kinds(modules, params) == KINDS[arch], arch
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)  # the base is frozen
    experts = {b for b in params if ".experts." in b}
    if experts:  # per expert: rank 2r on gate_up_proj (gate and up fused, r each), r on down_proj; alpha/r kept
        e = model.config.num_experts if arch == "qwen3_moe" else model.config.num_local_experts
        for name, m in lora.named_modules():
            if getattr(m, "parameter_name", None) in ("gate_up_proj", "down_proj"):
                rank = 2 * r if m.parameter_name == "gate_up_proj" else r
                assert m.r["default"] == rank and m.lora_A["default"].weight.shape[0] == rank * e, name
                assert m.scaling["default"] == alpha / r, name


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen3_moe"])
def test_lora_targets_negative_control(arch, saved):
    """Attention projections only (the way to leave an MoE's experts and router alone): the comparison sees the
    missing MLP / experts."""
    from distsft.config import PeftConfig
    from distsft.model.peft import apply_peft

    model = load(saved, arch)
    want = expected_targets(model)
    targets = ["qkv_proj", "o_proj"] if arch == "phi3" else sorted(ATTN)
    lora = apply_peft(model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, target_modules=targets), False)
    modules, params = adapted(lora)
    assert (modules, params) != want
    assert kinds(modules, params) == set(targets)
    missing = kinds(*want) - kinds(modules, params)
    assert missing == (EXPERTS if arch == "qwen3_moe" else KINDS[arch] - set(targets))


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(the loss contract on one micro-batch: CE / supervised tokens + an MoE's router term / rows, gradients,
    forward calls of the layers' attention: a recomputed layer runs its forward, hence its attention, again)."""
    from distsft.trainer.step import forward_losses

    calls = [0]
    attention = [m for n, m in model.named_modules() if n.endswith(".self_attn")]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in attention]
    ce, balance = forward_losses(model, batch)
    loss = ce / (batch["labels"][:, 1:] != -100).sum()
    if balance is not None:
        loss = loss + balance[0] / batch["input_ids"].shape[0]
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls[0]


@pytest.mark.parametrize("method", ["none", "lora"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gradient_checkpointing_same_loss_and_gradients(arch, method, packed, saved):
    from distsft.config import PeftConfig
    from distsft.model.moe import router
    from distsft.model.peft import apply_peft

    batch = packed[2]
    peft = PeftConfig(method=method, r=4, alpha=8, dropout=0.0)
    out, state = {}, None
    for ckpt in (False, True):
        model = apply_peft(load(saved, arch), peft, gradient_checkpointing=ckpt)
        assert model.is_gradient_checkpointing == ckpt
        if state is None:  # LoRA's B starts at zero (no gradient reaches A): start both runs from the same random B
            torch.manual_seed(1)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.02)
            state = model.state_dict()
        model.load_state_dict(state)
        out[ckpt] = loss_and_grads(model.train(), batch)
    (loss, grads, calls), (ckpt_loss, ckpt_grads, ckpt_calls) = out[False], out[True]
    assert ckpt_calls == 2 * calls == 2 * COMMON["num_hidden_layers"]  # every layer ran again in backward
    assert (router(model) is not None) == (arch in ("qwen3_moe", "mixtral"))  # the router term is in the loss
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ckpt_grads.keys() and len(grads) > 0
    if method == "lora":
        assert all("lora_" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(ckpt_grads[n], grads[n], rtol=1e-5, atol=1e-6, msg=f"{arch} {method} {n}")


def test_liger_refuses_granite_and_auto_keeps_torch(saved):
    """Granite multiplies its logits by 1/logits_scaling, which Liger's fused cross-entropy cannot: asking for
    Liger stops with the way out (on a GPU as on CPU), and auto picks the torch kernels."""
    from distsft.model.kernels import apply_kernels, resolve_kernels

    with pytest.raises(RuntimeError, match="logits_scaling.*model.kernels=torch"):
        apply_kernels(load(saved, "granite"), "liger")
    assert resolve_kernels("auto", cuda=True, sharded=False, model_type="granite")[0] == "torch"
    assert resolve_kernels("auto", cuda=False, sharded=False, model_type="llama")[0] == "torch"
