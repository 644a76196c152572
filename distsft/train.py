"""Hydra entry point: ``python -m distsft.train key=value ...`` (console script ``distsft-train``).

Composes ``conf/config.yaml`` over the typed schema, validates it, and runs the pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .checks import to_object
from .config import ConfigError, register_configs


def _conf_dir() -> str:
    """The Hydra config groups: distsft/conf in an installed package, conf/ beside the package in a checkout
    (an editable install maps the package name, not the directory)."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return str(installed if (installed / "config.yaml").is_file() else here.parent / "conf")


CONF_DIR = _conf_dir()
register_configs()


def quiet_third_parties() -> None:
    """Lines a user cannot act on: DeepSpeed's guess that a CPU machine has no GPU (named instead),
    transformers/datasets progress bars when stderr is not a terminal (they would run into the log), and
    transformers 5's renaming of gradient to activation checkpointing, which PEFT still calls by the old names, and
    torch's renaming of the all-gather that DeepSpeed's ZeRO calls."""
    import os
    import warnings

    import torch

    warnings.filterwarnings("ignore", r"`(is_gradient_checkpointing|gradient_checkpointing_enable|"
                            r"torch\.distributed\.all_gather_into_tensor)` is deprecated", FutureWarning)

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.stderr.isatty():
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()


def with_user_errors(task, cfg: DictConfig, typed=to_object) -> None:
    """Run task(typed(cfg)); a user error (bad config, data, paths, checkpoint; a run stopped by its
    guards) is one line on stderr and exit code 2, with no traceback (``DISTSFT_DEBUG=1`` shows it).
    With several processes only the main one prints it: every rank meets the same error."""
    import os

    from .data.sources import DataError
    from .trainer.guards import TrainingError
    from .trainer.watchdog import tell_the_launcher

    try:
        task(typed(cfg))
    except (ConfigError, DataError, TrainingError) as e:
        if os.environ.get("DISTSFT_DEBUG") == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"distsft: error: {e}", file=sys.stderr)
            tell_the_launcher(f"distsft: error: {e}")
        sys.stderr.flush()
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    import logging
    import os

    from .run import run
    from .trainer.watchdog import die_with_launcher

    quiet_third_parties()
    die_with_launcher()  # no rank outlives its launcher (and writes on into output_dir)
    with_user_errors(run, cfg, typed=lambda c: to_object(with_launcher_settings(c)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _in_sweep():
        # Everything is written and the process group is gone. Native extensions of the CPU collectives
        # (DeepSpeed's shared-memory op) have been seen to abort in their exit-time destructors
        # ("terminate called without an active exception"), turning a finished run into a failed one
        # for the launcher: leave without running them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def with_launcher_settings(cfg: DictConfig) -> DictConfig:
    """The config with what an ``accelerate config`` set (DeepSpeed/FSDP, mixed precision, accumulation,
    clipping) taken over wherever the command line did not set it."""
    import logging
    import os

    from hydra.core.hydra_config import HydraConfig

    from .trainer.strategy import adopt_launcher

    given = set()
    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            key = override.split("=", 1)[0].lstrip("+~")
            given.add(key)
    adopted = adopt_launcher(cfg, given)
    if adopted and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("distsft").info("adopted from the accelerate launcher's config: %s", ", ".join(adopted))
    return cfg


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
