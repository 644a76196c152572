"""Hydra entry point: ``python -m distsft.train key=value ...`` (console script ``distsft-train``).

Composes ``conf/config.yaml`` over the typed schema, validates it, and runs the pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import ConfigError, register_configs, to_object

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from .data.sources import DataError
    from .run import run

    try:
        run(to_object(cfg))
    except (ConfigError, DataError) as e:
        # a user error: say what is wrong, without a traceback through the trainer
        print(f"distsft: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
