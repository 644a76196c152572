"""Data pipeline, as a run uses it: prepare (the token cache, built once for the nodes that see it) -> the chat
template on the tokenizer -> pack -> the step loader and eval batches; then every rank checks that all prepared the
same data."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..trainer.collective import cache_builder
from .cachekey import cache_root
from .loader import StepLoader, eval_batches, pack
from .prepare import prepare
from .templates import end_of_turn_id

log = logging.getLogger("distsft")


@dataclass
class DataParts:
    data: object  # data.prepare.Prepared
    loader: StepLoader
    eval_batches: list | None
    total: int


def build_data(cfg: Config, acc, tokenizer, plan) -> DataParts:
    # one process builds the token cache (or finds it) for every node that sees it; the others wait for it and
    # map the same files (data.prepare_timeout bounds the wait)
    data = prepare(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.name_or_path,
                   builder=cache_builder(acc, cache_root(cfg.data)) if cfg.data.cache else acc.is_local_main_process)
    use_template(tokenizer, data.template, cfg.data.chat_template)
    loader = StepLoader(data.train, pack(data.train, cfg.data, data.train_stats), plan, acc.process_index, cfg.data,
                        tokenizer.pad_token_id, pin_memory=acc.device.type == "cuda")
    ev = None
    if data.eval is not None:
        ev = eval_batches(data.eval, pack(data.eval, cfg.data, data.eval_stats), plan.micro_batch_size,
                          acc.process_index, acc.num_processes, cfg.data, tokenizer.pad_token_id, plan.sp_size,
                          plan.tp_size)
    return DataParts(data, loader, ev or None, loader.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps))


def agree_on_data(acc, d: DataParts) -> None:
    """Every rank prepared (or mapped) the same data: the same fingerprint (files, options, versions), steps per
    epoch and steps in all. A rank that differs (another token cache, other files on its node) is named."""
    if acc.num_processes == 1:
        return
    import socket
    from collections import Counter

    from accelerate.utils import gather_object

    mine = (d.data.fingerprint, d.loader.steps_per_epoch, d.total)
    every = gather_object([(mine, socket.gethostname())])  # all-gather: every rank judges the same list
    common = Counter(v for v, _ in every).most_common(1)[0][0]
    odd = [(r, v, host) for r, (v, host) in enumerate(every) if v != common]
    if odd:
        ranks = "; ".join(f"rank {r} ({host}): data fingerprint {v[0]}, {v[1]} steps per epoch, {v[2]} in all"
                          for r, v, host in odd)
        raise ConfigError(f"the ranks did not prepare the same data: {ranks}; the others: data fingerprint "
                          f"{common[0]}, {common[1]} steps per epoch, {common[2]} in all (another token cache or "
                          "other data files on that node: every node must see the same data.train_files, and "
                          "data.cache should be on a shared filesystem or rebuilt on each node)")


def use_template(tokenizer, template: str, name: str | None) -> None:
    """Train and export with the same template. A built-in template's end-of-turn becomes the tokenizer's eos,
    which the export adds to the base's eos ids (generation_config.json): generate() stops at the end of a turn."""
    tokenizer.chat_template = template
    eot = end_of_turn_id(name, tokenizer)
    if eot is not None and eot != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot)
