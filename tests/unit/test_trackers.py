"""logging.trackers at compose time (distsft/trainer/trackers.py through checks.validate): a tracker that is not
installed is refused in one line naming the key and its install; unknown or repeated names too. "Not installed"
is made real for the import system: a finder in front of sys.meta_path that finds no such module (and the
module dropped from sys.modules for the test), so the check's own lookup is what fails."""

from __future__ import annotations

import sys

import pytest

from distsft.config import ConfigError
from distsft.trainer.trackers import accelerate_trackers, hyper_parameters
from tests.conftest import typed_cfg


class Uninstalled:
    """A meta-path finder for which the named top-level packages do not exist."""

    def __init__(self, *names: str):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        # any other name: not ours to answer, the next finder looks


def uninstall(monkeypatch, *names: str) -> None:
    monkeypatch.setattr(sys, "meta_path", [Uninstalled(*names), *sys.meta_path])
    for module in [m for m in sys.modules if m.partition(".")[0] in names]:
        monkeypatch.delitem(sys.modules, module)


def test_a_tracker_that_is_not_installed_is_refused_naming_its_install(monkeypatch):
    uninstall(monkeypatch, "wandb")
    with pytest.raises(ConfigError) as e:
        typed_cfg("logging.trackers=[tensorboard,wandb]")
    assert str(e.value) == 'logging.trackers: wandb is not installed (no module wandb): pip install "distsft[wandb]"'


def test_mlflow_needs_the_packages_of_its_local_store_too(monkeypatch):
    uninstall(monkeypatch, "alembic", "sqlalchemy")
    with pytest.raises(ConfigError, match=r'^logging.trackers: mlflow is not installed \(no module sqlalchemy, '
                                          r'alembic\): pip install "distsft\[mlflow\]"$'):
        typed_cfg("logging.trackers=[mlflow]")


def test_tensorboard_alone_needs_no_extra(monkeypatch):
    uninstall(monkeypatch, "mlflow", "wandb", "sqlalchemy", "alembic")
    assert typed_cfg().logging.trackers == ["tensorboard"]
    assert typed_cfg("logging.trackers=[]").logging.trackers == []


@pytest.mark.parametrize("trackers, message", [
    ("[tensorboard,comet_ml]", "logging.trackers: 'comet_ml' is not one of tensorboard, mlflow, wandb"),
    ("[tensorboard,tensorboard]", "logging.trackers=['tensorboard', 'tensorboard'] names a tracker twice"),
])
def test_unknown_or_repeated_trackers_are_refused(trackers, message):
    with pytest.raises(ConfigError) as e:
        typed_cfg(f"logging.trackers={trackers}")
    assert str(e.value) == message


def test_accelerate_gets_every_tracker_but_tensorboard():
    assert accelerate_trackers(["tensorboard"]) is None
    assert accelerate_trackers(["tensorboard", "mlflow", "wandb"]) == ["mlflow", "wandb"]


def test_hyper_parameters_are_the_config_as_flat_scalars():
    config = {"run_name": "x", "optim": {"lr": 1e-3}, "model": {"compile": False, "revision": None},
              "data": {"train_files": ["a.jsonl"], "max_seq_len": 256}}
    assert hyper_parameters(config) == {"run_name": "x", "optim.lr": 1e-3, "model.compile": False,
                                        "model.revision": "null", "data.train_files": '["a.jsonl"]',
                                        "data.max_seq_len": 256}
