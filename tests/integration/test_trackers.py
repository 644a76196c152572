"""logging.trackers end to end (one process): a tiny run on a user's JSONL file logs to TensorBoard, MLflow and
W&B, and each is read back with its own reader — MLflow through MlflowClient on the local store in output_dir,
W&B from its offline transaction log (output_dir/wandb/offline-run-*/run-*.wandb, parsed into wandb's own
protobuf records), TensorBoard through its EventAccumulator: the same loss history as summary.json, the config as
hyper-parameters, and sample generations whose prompts are the first user turns of the user's file."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distsft.trainer.trackers import hyper_parameters
from tests.conftest import run_tiny

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

STEPS = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=0", "logging.log_every=1",
         "logging.sample_every=2", "logging.sample_max_new_tokens=4", "logging.plot=false", "export.enabled=false",
         "data.max_seq_len=256"]
PROMPTS = [f"Name a fruit that starts with the letter {c}." for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def write_user_data(path: Path) -> Path:
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p},
                          {"role": "assistant", "content": f"A fruit: {p[-2]}pple."}]} for p in PROMPTS * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """data=jsonl on the user's file (no recipe: logging.sample_prompts is empty, so samples come from the file)."""
    out = tmp_path_factory.mktemp("tracked")
    data = write_user_data(out.parent / "user.jsonl")
    res = run_tiny(out, "data=jsonl", f"data.train_files=[{data}]", "data.val_fraction=0.1", *STEPS,
                   "logging.trackers=[tensorboard,mlflow,wandb]")
    return out, res.summary, OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")  # named by run_name
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_has_the_loss_history_the_config_and_the_samples(tracked_run):
    out, summary, resolved = tracked_run
    client, run = mlflow_run(out)
    assert run.info.run_name == "run" and run.data.tags["distsft.output_dir"] == str(out.absolute())
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(history) == [tuple(x) for x in summary["train_loss_history"]]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    params = run.data.params
    assert params == {k: str(v) for k, v in hyper_parameters(resolved).items()}
    assert params["optim.lr"] == "2e-05" and json.loads(params["data.train_files"]) == resolved["data"]["train_files"]
    assert params["logging.trackers"] == '["tensorboard", "mlflow", "wandb"]'
    files = [f.path for f in client.list_artifacts(run.info.run_id, "samples")]
    assert files == ["samples/step_000002.json", "samples/step_000004.json"]
    logged = json.loads((Path(client.download_artifacts(run.info.run_id, files[-1], str(out / "dl")))).read_text())
    assert logged["step"] == 4 and [s["prompt"] for s in logged["samples"]] == PROMPTS[:3]
    assert (out / "mlartifacts").is_dir()  # the artifacts stay in the run directory too


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): a header (":W&B", magic, version), then LevelDB-log blocks
    of 32 KiB whose records (crc32, length, type: full, first, middle, last) carry wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, parts = head, b""
    while pos + head <= len(data):
        if block - pos % block < head:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + head])
        chunk, pos = data[pos + head:pos + head + n], pos + head + n
        if kind == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def test_wandb_runs_offline_in_the_run_dir_with_the_same_history_config_and_samples(tracked_run):
    out, summary, resolved = tracked_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline: nothing was sent anywhere
    history, config = {}, {}
    for r in wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                history[r.history.step.num] = items["train/loss"]
        elif kind in ("config", "run"):
            update = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
        if kind == "run":
            assert r.run.project == "run" and r.run.display_name == "run"
    assert sorted(history.items()) == [tuple(x) for x in summary["train_loss_history"]]
    params = hyper_parameters(resolved)
    assert {k: config.get(k) for k in params} == params
    tables = sorted((runs[0] / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 2
    rows = json.loads(tables[-1].read_text())
    assert rows["columns"] == ["step", "prompt", "output"] and [r[1] for r in rows["data"]] == PROMPTS[:3]


def test_tensorboard_keeps_its_dir_and_gets_the_config_and_the_users_prompts(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary, _ = tracked_run
    assert len(list((out / "tensorboard").iterdir())) == 1  # one events file, no hparams subdirectory
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    logged = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert logged == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in summary["train_loss_history"]]
    assert "_hparams_/experiment" in ea.PluginTagToContent("hparams")  # TensorBoard's HParams tab
    text = ea.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert all(f"**prompt:** {p}" in text for p in PROMPTS[:3]) and "12 plus 7" not in text
