"""Export stage: the trained model as a Hugging Face directory in ``output_dir/final``.

    full     the whole model (safetensors, config, tokenizer, generation config)
    adapter  the LoRA/DoRA adapter only (adapter_config.json + adapter_model.safetensors), for
             PeftModel.from_pretrained(base, final); the tokenizer and a generation config come along
    merged   the adapter folded into a fresh, un-quantised copy of the base, saved as a plain model
             in the storage dtype (loads without peft or bitsandbytes); export_check scores it again
    auto     full for full fine-tuning, adapter under PEFT

What is written are the fp32 master weights of every trainable parameter, cast to ``model.dtype`` (a full
model) or kept in fp32 (adapters), whatever the strategy: under ddp and FSDP2 the parameters are the masters
(bf16 is autocast, or FSDP2's mixed-precision policy casting its unsharded copies); DeepSpeed's bf16 engine
computes with bf16 module weights and keeps the masters in its optimizer's fp32 partitions, which are
gathered here. Frozen weights (a PEFT base) have no master and are written as they are. ZeRO-3 shards every
weight, so gathering is collective: every rank calls ``export_final``.

Generation stops at the template's end of turn: the exported tokenizer's eos (the end-of-turn token under a
built-in template, data.build.use_template) joins the base's ``eos_token_id`` in ``generation_config.json`` (where
generate() and pipelines read it) and in ``config.json``, in every mode; an adapter directory gets its
``generation_config.json`` too (PEFT keeps the base's: load it with ``GenerationConfig.from_pretrained``).

Everything is written to ``final.tmp`` and renamed to ``final`` only when complete; a write that fails (a full
disk, whatever library raised it) removes ``final.tmp`` and ends the run in one line naming it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from .trainer.collective import main_decides

log = logging.getLogger(__name__)


def export_final(accelerator, model, tokenizer, out_dir: Path, resolved: dict, mode: str, base_loader,
                 provenance: dict | None = None, dtype: str | None = None) -> Path:
    """``base_loader()`` rebuilds the un-quantised base model (merged mode). ``dtype``: the storage dtype
    of a full model (model.dtype; training kept fp32 master weights, the checkpoints keep them too)."""
    final, tmp = out_dir / "final", out_dir / "final.tmp"
    inner = accelerator.unwrap_model(model)
    peft = hasattr(inner, "peft_config")
    # gathers sharded weights, every rank taking part; adapters stay fp32 (PEFT's dtype for them)
    state_dict = master_state_dict(accelerator, model, None if peft else dtype)
    mode = ("adapter" if peft else "full") if mode == "auto" else mode

    def write():  # the main process; a failure (a full disk) reaches every rank at once (main_decides)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_into(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind, and its room comes back
            raise
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def write_into(tmp: Path) -> None:
        if peft:
            from peft import get_peft_model_state_dict

            inner.save_pretrained(tmp / "adapter" if mode == "merged" else tmp,
                                  state_dict=get_peft_model_state_dict(inner, state_dict=state_dict))
            if mode == "merged":
                _merge(tmp, base_loader)
        else:
            inner.save_pretrained(tmp, state_dict=_in_dtype(state_dict, dtype), safe_serialization=True)
            if dtype:
                _set_config_dtype(tmp / "config.json", dtype)
        base = inner.get_base_model() if peft else inner
        stop_at_end_of_turn(tmp, base, tokenizer.eos_token_id)
        tokenizer.save_pretrained(tmp)
        OmegaConf.save(OmegaConf.create(resolved), tmp / "distsft_config.yaml")
        if provenance is not None:
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

    main_decides(accelerator, write, f"exporting {final}", tmp)
    return final


def master_state_dict(accelerator, model, dtype: str | None = None) -> dict | None:
    """The model's full state dict (on the main process; None or a copy elsewhere) with every trainable weight
    its fp32 master, cast to ``dtype`` if given as it arrives (the main process holds one copy of the weights, not
    the engine's and the masters). Collective: every rank calls it, in the same order."""
    import torch
    from accelerate.utils import DistributedType

    state_dict = accelerator.get_state_dict(model)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return state_dict  # ddp and FSDP2 hold the fp32 masters as their parameters
    from deepspeed.utils import safe_get_full_fp32_param

    names: dict[int, list[str]] = {}  # tied weights: one parameter, several names
    params = {}
    for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    missing = []
    for key, p in params.items():
        if not p.requires_grad:  # frozen (a PEFT base): no master, the module weight is the weight
            continue
        # the engine's bf16 module weight is a rounding of this; ZeRO-1/2 all-reduce the fragments of the
        # partitions, ZeRO-3 all-gathers them (a collective, whatever the rank)
        master = safe_get_full_fp32_param(p)
        if master is None:
            missing.extend(names[key])
        elif accelerator.is_main_process:
            master = master.detach().to("cpu", getattr(torch, dtype) if dtype else torch.float32, copy=True)
            for name in names[key]:
                if name in state_dict:
                    state_dict[name] = master
    if missing and accelerator.is_main_process:
        log.warning("export: no fp32 master for %d trainable weights (%s...): written as the engine holds them",
                    len(missing), ", ".join(missing[:3]))
    return state_dict


def stop_ids(model, eos_token_id: int | None) -> list[int]:
    """The base's eos ids (generation config, else config) with ``eos_token_id`` (the end of turn) added."""
    gen = getattr(model, "generation_config", None)
    base = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else model.config.eos_token_id
    ids = [] if base is None else [base] if isinstance(base, int) else list(base)
    if eos_token_id is not None and eos_token_id not in ids:
        ids.append(eos_token_id)
    return ids


def stop_at_end_of_turn(directory: Path, model, eos_token_id: int | None) -> None:
    """Write ``directory/generation_config.json`` (the base's, with the end of turn among its eos ids) and put
    the same ids in ``config.json`` when it has the key: generate() then stops at the end of the turn."""
    import copy

    from transformers import GenerationConfig

    ids = stop_ids(model, eos_token_id)
    gen = copy.deepcopy(model.generation_config) if getattr(model, "generation_config", None) is not None \
        else GenerationConfig.from_model_config(model.config)
    if ids:
        gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    gen.save_pretrained(directory)
    path = directory / "config.json"
    if ids and path.exists():
        config = json.loads(path.read_text())
        if "eos_token_id" in config:
            config["eos_token_id"] = gen.eos_token_id
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _in_dtype(state_dict: dict, dtype: str | None) -> dict:
    import torch

    if not dtype:
        return state_dict
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}


def _set_config_dtype(path: Path, dtype: str) -> None:
    """config.json names the dtype the weights are stored in (from_pretrained's dtype="auto" reads it)."""
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merge(tmp: Path, base_loader) -> None:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_loader(), tmp / "adapter").merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "adapter")
