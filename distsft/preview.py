"""Preview: ``python -m distsft.preview key=value ...`` (console script ``distsft-preview``).

Composes the same config as training, then shows a few formatted examples with the supervised
tokens marked (green on a terminal, ``[[...]]`` otherwise) and the statistics of the whole dataset:
kept/dropped/skipped rows, tokens, supervised tokens, packing efficiency. Nothing is trained and
nothing is written except the tokenized-data cache. Use it to debug templates and masks, and to see
what ``data.multiturn`` does with a template that rewrites earlier turns (Qwen3's reasoning), what a
tool-calling row supervises (the assistant's calls and replies, not the tool results) and what
``data.train_on_reasoning`` leaves out.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .train import CONF_DIR, with_user_errors

register_configs()
GREEN, RESET = "\033[32m", "\033[0m"


def render_example(tokenizer, ids, labels, color: bool) -> str:
    """Decoded text with each run of supervised tokens marked."""
    out, run, sup = [], [], None
    for t, y in zip(list(ids) + [None], list(labels) + [None]):
        s = y is not None and y != -100
        if run and (s != sup or t is None):
            text = tokenizer.decode(run)
            out.append((GREEN + text + RESET if color else "[[" + text + "]]") if sup else text)
            run = []
        if t is not None:
            run.append(int(t))
            sup = s
    return "".join(out)


def preview(cfg, color: bool | None = None, stream=sys.stdout) -> None:
    from .checks import check_model_paths
    from .data.loader import pack, summarize
    from .data.prepare import prepare
    from .model.load import load_tokenizer

    check_model_paths(cfg)
    color = stream.isatty() if color is None else color
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.name_or_path)
    store = data.train
    marks = "green" if color else "[[...]]"
    print(f"supervised tokens are shown {marks}; loss_on={cfg.data.loss_on}, multiturn={cfg.data.multiturn}, "
          f"train_on_reasoning={str(cfg.data.train_on_reasoning).lower()}, "
          f"template={cfg.data.chat_template or 'the tokenizer' + chr(39) + 's own'}\n", file=stream)
    for i in range(min(cfg.preview.examples, len(store))):
        ids, labels = store.example(i)
        n_sup = int((labels != -100).sum())
        print(f"--- example {i} ({store.origin(i)}): {len(ids)} tokens, {n_sup} supervised", file=stream)
        print(render_example(tokenizer, ids, labels, color), file=stream)
    print("", file=stream)
    rows = pack(store, cfg.data, data.train_stats)
    print(summarize("train", data.train_stats), file=stream)
    _warn_if_one_step_cannot_fill(cfg, store, rows, stream)
    if cfg.parallel.sequence_parallel:  # the limits above are whole rows; a rank holds a slice of each
        sp = cfg.parallel.sp_size
        print(f"sequence parallelism: rows of up to data.max_seq_len={cfg.data.max_seq_len:,} tokens (packing, "
              f"truncation and the over-long policy use it), each of the {sp} ranks of a group holding "
              f"{-(-cfg.data.max_seq_len // sp):,} tokens of every row (parallel.sp_size={sp})", file=stream)
    if data.eval is not None:
        pack(data.eval, cfg.data, data.eval_stats)
        print(summarize("eval", data.eval_stats), file=stream)
    if data.skipped.rows:
        print(f"skipped bad rows: {data.skipped.counts()}", file=stream)
        for r in data.skipped.rows[:10]:
            print(f"  {r['message']}", file=stream)


def _warn_if_one_step_cannot_fill(cfg, store, rows, stream) -> None:
    """Training would refuse these rows (fewer than one optimizer step's sequences): say so here, with the fix,
    for the world size the plan assumes (WORLD_SIZE, else plan.world_size)."""
    import os

    from .batch import resolve_batch
    from .config import ConfigError
    from .data.loader import too_few_sequences

    t = cfg.trainer
    world = int(os.environ.get("WORLD_SIZE", cfg.plan.world_size))
    try:
        step = resolve_batch(t.micro_batch_size, t.grad_accum, t.global_batch_size, world, cfg.parallel.sp_size,
                             cfg.parallel.tp_size)
    except ConfigError:  # batch arithmetic is the plan's and the trainer's to refuse; the preview is about data
        return
    if len(rows) < step.global_batch_size:
        print(f"warning: training would stop here ({world} process{'es' if world > 1 else ''}): "
              + too_few_sequences(store, rows, step.global_batch_size, cfg.data), file=stream)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    with_user_errors(preview, cfg)


if __name__ == "__main__":
    main()
