"""Prepare: ``python -m distsft.prepare key=value ...`` (console script ``distsft-prepare``).

Builds the token cache entry for a config ahead of training, with the same overrides training will
get (the data files, tokenizer, template and data options make its key): load, normalise, tokenize
and mask in ``data.num_proc`` processes, write the shards, pack. Every later run, preview or plan
with the same data settings maps the entry instead of preparing again. On a cluster, run it once
where the cache lives (a shared filesystem), or once per node when ``data.cache_dir`` is node-local.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .train import CONF_DIR, with_user_errors

register_configs()


def prepare_main(cfg, stream=sys.stdout) -> dict:
    from .checks import check_model_paths
    from .data.loader import pack, summarize
    from .data.prepare import cache_root, default_num_proc, prepare
    from .model.load import load_tokenizer

    check_model_paths(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.name_or_path)
    pack(data.train, cfg.data, data.train_stats)
    if data.eval is not None:
        pack(data.eval, cfg.data, data.eval_stats)
    where = cache_root(cfg.data) / data.fingerprint if cfg.data.cache else "nowhere (data.cache=false)"
    how = "found in the cache" if data.cache_hit else \
        f"prepared with {cfg.data.num_proc or default_num_proc()} process(es)"
    print(f"token cache: {where}\n{how} in {data.seconds:.2f} s", file=stream)
    print(summarize("train", data.train_stats), file=stream)
    if data.eval_stats is not None:
        print(summarize("eval", data.eval_stats), file=stream)
    if data.skipped.rows:
        print(f"skipped bad rows: {data.skipped.counts()}", file=stream)
    return {"path": str(where), "cache_hit": data.cache_hit, "seconds": data.seconds}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    with_user_errors(prepare_main, cfg)


if __name__ == "__main__":
    main()
