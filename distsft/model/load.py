"""Model pipeline (load): tokenizer and causal LM from a hub name or a local directory.

``model.init=config`` builds random weights from the directory's ``config.json`` (the embedded
tiny model); ``pretrained`` loads weights with ``from_pretrained``. The KV cache is switched
off for training: with a cache, transformers stops deriving block-diagonal masks from packed
``position_ids`` and documents silently attend to each other.

Whatever transformers raises while loading is one line naming the key and the source (``source.loading``), and a
hub id the Hub cannot be asked about (offline, no network) is read from the local cache at once instead of after
a minute of retries (``source.hub_kwargs``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config import ModelConfig
from .attention import resolve_attention
from .source import hub_kwargs, loading

log = logging.getLogger(__name__)


def located(name: str) -> str:
    """A local directory as an absolute path (what an exported adapter records as its base, so that it loads
    from any directory); a hub name as it is."""
    from pathlib import Path

    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_tokenizer(cfg: ModelConfig):
    name = cfg.tokenizer or cfg.name_or_path
    with loading("model.tokenizer" if cfg.tokenizer else "model.name_or_path", name, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(located(name), revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code, **hub_kwargs(name))
    if tok.pad_token_id is None:
        # Pads never carry loss or attention, so reusing eos is safe and saves resizing embeddings.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; using eos %r for padding", tok.eos_token)
    return tok


def load_model(cfg: ModelConfig, seed: int, cuda: bool = False, quantization=None, device=None):
    """The base model. ``quantization`` (a BitsAndBytesConfig) quantises the weights as they load."""
    dtype = getattr(torch, cfg.dtype)
    common = dict(trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=resolve_attention(cfg.attn_implementation, cuda))
    if cfg.init == "config":
        config = load_config(cfg)
        torch.manual_seed(seed)  # same seed -> same random init on every rank and every run
        with loading("model.name_or_path", cfg.name_or_path, "model"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
        if quantization is not None:  # a random base is quantised the way from_pretrained would
            model = _quantise_random(model, quantization, dtype, device, common)
    else:
        extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
        with loading("model.name_or_path", cfg.name_or_path, "model"):
            model = AutoModelForCausalLM.from_pretrained(located(cfg.name_or_path), revision=cfg.revision,
                                                         dtype=dtype, **common, **extra,
                                                         **hub_kwargs(cfg.name_or_path))
    model.config.use_cache = False
    return model


def load_config(cfg: ModelConfig):
    """The model's configuration (config.json), from a local directory or a hub id."""
    with loading("model.name_or_path", cfg.name_or_path, "model configuration"):
        return AutoConfig.from_pretrained(located(cfg.name_or_path), revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code, **hub_kwargs(cfg.name_or_path))


def _quantise_random(model, quantization, dtype, device, common):
    import tempfile

    from safetensors.torch import save_model

    # through the real loading path; written by hand because save_pretrained writes on rank 0 only
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=quantization,
                                                    device_map={"": device}, **common)


@contextmanager
def whole_model(accelerator, enabled: bool = True):
    """Build a model whole even under ZeRO-3 (which would otherwise create it in shards with
    zero.Init, a collective): for a random init, so the same seed gives the same weights under every
    strategy, and for the base that rank 0 alone loads to merge adapters at export. Pretrained
    weights for training still load straight into shards."""
    plugin = accelerator.state.deepspeed_plugin
    if not enabled or plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def base_model(model):
    """The transformers model under a DDP/DeepSpeed wrapper (``.module``) and PEFT's adapters."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
