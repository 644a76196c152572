"""Trainer, its experiment trackers (``logging.trackers``): where the scalars, the resolved config and the
sample generations go besides the log lines. Main process only; ``metrics.Reporter`` drives them.

    tensorboard  output_dir/tensorboard, written by torch's SummaryWriter in metrics.Reporter: one events file
                 per invocation in one directory, so plots.history_from_tensorboard sees every step of a resumed
                 run (Accelerate's TensorBoardTracker would add a run-name level and an hparams subdirectory)
    mlflow       Accelerate's MLflowTracker. By default a local store in the run directory: output_dir/mlflow.db
                 (sqlite) with artifacts in output_dir/mlartifacts; MLFLOW_TRACKING_URI names another store
    wandb        Accelerate's WandBTracker, offline unless WANDB_MODE says otherwise, files in output_dir/wandb
                 (``wandb sync output_dir/wandb/offline-run-*`` uploads them later)

Every tracker gets the same: the scalars of ``metrics`` (x axis: optimizer step), the resolved config as
hyper-parameters (flat dotted keys such as ``optim.lr``; lists and null as JSON), and each round of samples
(TensorBoard: the text ``samples``; MLflow: the artifact samples/step_<N>.json; W&B: the table ``samples`` of
step, prompt, output). MLflow's experiment and W&B's project are named by run_name, and so are their runs.
Each invocation is one tracker run: a resumed run starts a new MLflow/W&B run at the resumed step (tagged
with its output_dir), while TensorBoard shows every step in one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..config import ConfigError
from ..provenance import flatten

# what each tracker needs installed (tensorboard is a dependency of distsft); distsft[<tracker>] installs it
NEEDS = {"tensorboard": (), "mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",)}
OUTPUT_DIR_TAG = "distsft.output_dir"


def check_trackers(names: list[str]) -> None:
    """logging.trackers: known names, each once, installed (a missing one is refused naming its install)."""
    for name in names:
        if name not in NEEDS:
            raise ConfigError(f"logging.trackers: {name!r} is not one of {', '.join(NEEDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"logging.trackers={list(names)} names a tracker twice")
    for name in names:
        missing = [m for m in NEEDS[name] if not _installed(m)]
        if missing:
            raise ConfigError(f"logging.trackers: {name} is not installed (no module {', '.join(missing)}): "
                              f'pip install "distsft[{name}]"')


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # hidden from the import system, or half removed
        return False


def accelerate_trackers(names: list[str]) -> list[str] | None:
    """``Accelerator(log_with=...)``: every tracker but TensorBoard, which metrics.Reporter writes itself."""
    return [n for n in names if n != "tensorboard"] or None


def hyper_parameters(config: dict) -> dict[str, bool | int | float | str]:
    """The resolved config as every tracker stores it: flat dotted keys, scalar values (lists and null as JSON)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(config).items()}


def tensorboard_hparams(writer, params: dict) -> None:
    """``params`` into the writer's own events file (TensorBoard's HParams tab); SummaryWriter.add_hparams
    would write each call into a new subdirectory of output_dir/tensorboard instead."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(params, {}):
        writer.file_writer.add_summary(summary)


class Trackers:
    """The Accelerate trackers of one invocation (main process): started with the config, finished at the end."""

    def __init__(self, accelerator, output_dir: Path, run_name: str, params: dict, start_step: int):
        self.acc = accelerator
        self.names = {str(t) for t in accelerator.log_with}
        out = Path(output_dir).absolute()
        self.local_mlflow = "mlflow" in self.names and "MLFLOW_TRACKING_URI" not in os.environ
        tags = {OUTPUT_DIR_TAG: str(out), "distsft.start_step": str(start_step)}
        kwargs = {}
        if "mlflow" in self.names:
            if self.local_mlflow:
                self._local_mlflow_store(out)
            kwargs["mlflow"] = {"logging_dir": str(out / "mlartifacts"), "run_name": run_name, "tags": tags}
        if "wandb" in self.names:
            mode = {}
            if "WANDB_MODE" not in os.environ:  # offline: no network unless asked for (no error reports either)
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
                mode = {"mode": "offline"}
            kwargs["wandb"] = {"dir": str(out), "name": run_name, "tags": [f"start_step={start_step}"], **mode}
        try:
            accelerator.init_trackers(run_name, config=params, init_kwargs=kwargs)
        except BaseException:
            self.close()  # what did start is finished, and MLflow's tracking URI is as it was
            raise

    @staticmethod
    def _local_mlflow_store(out: Path) -> None:
        # read when mlflow is first imported: a store in the run directory reports usage to no one
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        out.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.acc.log(values, step=step)

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        if "mlflow" in self.names:
            import mlflow

            run = self.acc.get_tracker("mlflow", unwrap=True)  # the active MLflow run
            mlflow.log_dict({"step": step, "samples": [{"prompt": p, "output": o} for p, o in samples]},
                            f"samples/step_{step:06d}.json", run_id=run.info.run_id)
        if "wandb" in self.names:
            self.acc.get_tracker("wandb").log_table("samples", columns=["step", "prompt", "output"],
                                                    data=[[step, p, o] for p, o in samples], step=step)

    def close(self) -> None:
        try:
            for tracker in self.acc.trackers:
                tracker.finish()
        finally:
            self.acc.trackers.clear()  # finished here: the run's accelerator.end_training() finds none left
            if self.local_mlflow:
                import mlflow

                mlflow.set_tracking_uri(None)  # and MLFLOW_TRACKING_URI unset again, as before the run
