"""Checkpoints a run can trust: the COMPLETE marker holds each file's size and CRC-32; a damaged newest
checkpoint (truncated weights, an emptied optimizer state, an altered byte) is named and skipped, the
previous intact one is resumed, and the run ends with the weights of one that never stopped."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from distsft.config import ConfigError
from distsft.trainer.checkpoint import damage
from tests.conftest import run_tiny

COMMON = ["trainer.max_steps=8", "trainer.save_every=2", "trainer.save_total_limit=0", "trainer.eval_every=0",
          "logging.log_every=1", "logging.plot=false", "logging.sample_every=0"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_tiny(out, *COMMON)
    return load_file(out / "final" / "model.safetensors")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path):
    path.write_bytes(b"")


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_marker_lists_every_file_with_size_and_checksum(tmp_path):
    run_tiny(tmp_path, *COMMON, "trainer.stop_after=2")
    ckpt = tmp_path / "checkpoints" / "step_2"
    files = json.loads((ckpt / "COMPLETE").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(files) == on_disk and "model.safetensors" in files and "optimizer.bin" in files
    assert damage(ckpt) == []
    flip_a_byte(ckpt / "optimizer.bin")  # same size, other bytes: only the checksum sees it
    assert damage(ckpt) == ["optimizer.bin differs from what was written (checksum)"]


@pytest.mark.parametrize("harm,file", [(truncate, "model.safetensors"), (empty, "optimizer.bin")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, harm, file, caplog):
    caplog.set_level(logging.INFO)
    run_tiny(tmp_path, *COMMON, "trainer.stop_after=6")  # checkpoints at steps 2, 4, 6
    harm(tmp_path / "checkpoints" / "step_6" / file)
    res = run_tiny(tmp_path, *COMMON)
    assert res.summary["status"] == "finished" and res.summary["steps"] == 8
    assert "not resuming from" in caplog.text and "step_6" in caplog.text and file in caplog.text
    assert "resumed from" in caplog.text and "step_4 at step 4" in caplog.text
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert final.keys() == straight.keys() and all(torch.equal(final[k], straight[k]) for k in final)


def test_an_explicit_resume_from_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    run_tiny(tmp_path / "a", *COMMON, "trainer.stop_after=2")
    ckpt = tmp_path / "a" / "checkpoints" / "step_2"
    empty(ckpt / "optimizer.bin")
    with pytest.raises(ConfigError, match=r"step_2: the checkpoint is damaged \(optimizer.bin has 0 bytes, \d+ were"):
        run_tiny(tmp_path / "b", *COMMON, f"trainer.resume={ckpt}")
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_a_checkpoint_renamed_without_its_marker_is_removed_and_never_resumed(tmp_path, straight, caplog):
    """A crash between the rename into step_<N> and the COMPLETE marker leaves a whole-looking directory: the next
    run resumes from the newest complete one, removes it (and an interrupted save's temporary directory) at start,
    and a save removes one that appears later."""
    import shutil

    from distsft.trainer.checkpoint import prune

    caplog.set_level(logging.INFO)
    run_tiny(tmp_path, *COMMON, "trainer.stop_after=4")  # checkpoints at steps 2 and 4
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "step_4", ckpts / "step_6")
    (ckpts / "step_6" / "COMPLETE").unlink()  # renamed into place, the marker never written
    shutil.copytree(ckpts / "step_2", ckpts / ".step_8.tmp")
    res = run_tiny(tmp_path, *COMMON)
    assert "resumed from" in caplog.text and "step_4 at step 4" in caplog.text
    assert "removed" in caplog.text and "step_6: an unfinished checkpoint (no COMPLETE marker)" in caplog.text
    assert res.summary["status"] == "finished" and not (ckpts / ".step_8.tmp").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4", "step_6", "step_8"]  # step_6 anew
    assert all((ckpts / f"step_{n}" / "COMPLETE").exists() for n in (2, 4, 6, 8))
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(final[k], straight[k]) for k in straight)

    shutil.copytree(ckpts / "step_8", ckpts / "step_10")  # at a save: pruned with the temporary directories
    (ckpts / "step_10" / "COMPLETE").unlink()
    prune(ckpts, keep=0)
    assert not (ckpts / "step_10").exists() and (ckpts / "step_8" / "COMPLETE").exists()
