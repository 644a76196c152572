"""Two CPU processes (accelerate launch, gloo) give the same per-step losses as one process with
doubled accumulation: the loss contract holds across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, launch, run_tiny

pytestmark = pytest.mark.multiproc
COMMON = ["trainer.max_steps=5", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
          "trainer.eval_every=5", "trainer.save_every=0", "logging.log_every=1"]


def test_two_processes_match_one(tmp_path):
    one = run_tiny(tmp_path / "one", *COMMON).summary  # 4 x 2 x 1
    two = launch(2, tmp_path / "two", *COMMON)  # 4 x 1 x 2
    assert one["batch"]["grad_accum"] == 2 and two["batch"] == {
        "micro_batch_size": 4, "grad_accum": 1, "world_size": 2, "global_batch_size": 8, "sp_size": 1,
        "tp_size": 1}
    steps1, losses1 = zip(*one["train_loss_history"])
    steps2, losses2 = zip(*two["train_loss_history"])
    assert steps1 == steps2 == (1, 2, 3, 4, 5)
    # fp32 on CPU; the only difference is the order of the cross-rank sum (gloo all-reduce)
    for a, b in zip(losses1, losses2):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)
    assert two["tokens"] == one["tokens"] and two["supervised_tokens"] == one["supervised_tokens"]
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
    # rank 0 speaks: one event file, one log
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_plain_num_processes_on_cpu_is_refused(tmp_path):
    """Without --multi_gpu Accelerate starts ONE process on a CPU machine; distsft says so."""
    accelerate_cli = str(Path(sys.executable).parent / "accelerate")  # exactly what a user types
    cmd = [accelerate_cli, "launch", "--num_processes", "2", "-m", "distsft.train",
           f"output_dir={tmp_path / 'x'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "started a single process" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_one_ranks_infinite_loss_is_skipped_by_every_rank(tmp_path):
    """Rank 1's loss alone is infinite on its 3rd micro-batch, with finite gradients (only the loss says so):
    the verdict must come from reduced quantities, so both ranks skip step 3 (fused AdamW decides on each rank's
    device: a rank-local verdict would let rank 0 step while rank 1 skips, and the replicas part)."""
    proc = launch(2, tmp_path, "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
                  "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1", "logging.sample_every=0",
                  "export.enabled=false", module="tests.integration.nan_entry", expect_ok=False,
                  env={"DISTSFT_TEST_NAN_CALLS": "3", "DISTSFT_TEST_NAN_RANK": "1", "DISTSFT_TEST_NAN_KIND": "inf"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "finished" and s["skipped_steps"] == [3]
    for rank in (0, 1):  # each rank names the step it skipped
        assert f"rank {rank}: step 3 has a non-finite loss or gradient norm" in proc.stderr + proc.stdout


def test_a_failure_on_the_main_process_during_a_save_stops_every_rank_at_once_in_one_line(tmp_path):
    """The disk fills while the main process finishes checkpoint step_2 (its flush raises ENOSPC) and rank 1 waits
    for it in a collective. The failure is broadcast: both ranks stop at once (not after the collective timeout),
    the user reads one line naming the checkpoint and the OS error, and nothing half-written is trusted."""
    import time

    t0 = time.monotonic()
    proc = launch(2, tmp_path, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=0",
                  "logging.sample_every=0", module="tests.integration.fault_entry", expect_ok=False, timeout=300,
                  env={"DISTSFT_TEST_FAULT": "save_oserror"})
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distsft: error:")]
    assert len(errors) == 1 and "saving checkpoint step_2 failed on the main process" in errors[0] \
        and "No space left on device" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("distsft: error:")[0], proc.stderr[-3000:]  # the ranks' own output
    assert elapsed < 120, elapsed
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / "step_2").exists() and not list(ckpts.glob("step_*/COMPLETE"))


def test_a_stopped_rank_ends_the_job_fast_naming_it_and_a_relaunch_resumes(tmp_path):
    """Rank 1 freezes (SIGSTOP) in the forward of step 5, after checkpoints at steps 2 and 4; rank 0 waits for it in
    a collective. With trainer.hang_timeout=10 the watchdog ends the job in seconds (not the collective timeout),
    in one line naming rank 1, its PID, step and phase; its stack (py-spy reads a stopped process) and rank 0's
    are in output_dir/hang; the complete checkpoints are intact and a relaunch resumes from step 4."""
    import re
    import time

    from distsft.trainer.checkpoint import complete_checkpoints, damage
    from distsft.trainer.watchdog import HANG_EXIT

    common = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=0", "logging.sample_every=0",
              "logging.log_every=1"]
    t0 = time.monotonic()
    proc = launch(2, tmp_path, *common, "trainer.hang_timeout=10", module="tests.integration.fault_entry",
                  expect_ok=False, timeout=240, env={"DISTSFT_TEST_FAULT": "stop_self", "DISTSFT_TEST_FAULT_RANK": "1",
                                                     "DISTSFT_TEST_FAULT_CALL": "5"})
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distsft: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    m = re.search(r"rank 1 \(.+, pid (\d+)\) stopped responding \(no heartbeat\) at step 5 in forward/backward, "
                  r"silent for (\d+) s", lines[0])
    assert m and 10 <= int(m.group(2)) <= 10 + 5, lines[0]
    assert f"exit {HANG_EXIT}" in lines[0]
    assert elapsed < 90, elapsed  # start-up and 5 steps, then about the timeout (was the 30-minute collective timeout)
    hang = tmp_path / "hang"
    assert "forward_losses" in (hang / "rank_1.txt").read_text() or "freeze" in (hang / "rank_1.txt").read_text()
    assert "Thread" in (hang / "rank_0.txt").read_text()
    assert (hang / "report.txt").read_text().strip() == lines[0]  # what slurm/train.sbatch requeues on
    ckpts = complete_checkpoints(tmp_path / "checkpoints")
    assert [n for n, _ in ckpts] == [2, 4] and all(damage(p) == [] for _, p in ckpts)

    summary = launch(2, tmp_path, *common)
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert "resumed from" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("grace", [2, 60])
def test_sigterm_to_the_launcher_checkpoints_within_its_grace(tmp_path, grace):
    """SIGTERM to `accelerate launch` (a preemption that reaches the launcher): its agent passes it on to the ranks
    and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT s later. Checkpoints here take 6 s more (rank 0). With a 2 s grace
    the stop step's checkpoint is lost (the negative control) and the run has said, after its first checkpoint, that
    its checkpoints outlast the grace; with 60 s (what slurm/train.sbatch gives by default) the stop step's
    checkpoint is complete and a relaunch resumes from it."""
    import signal
    import time

    from distsft.trainer.checkpoint import complete_checkpoints
    from tests.conftest import CPU_ENV, ROOT, launch_cmd

    common = ["trainer.max_steps=12", "trainer.save_every=2", "trainer.eval_every=0", "logging.sample_every=0",
              "logging.log_every=1"]
    env = {**CPU_ENV, "DISTSFT_TEST_FAULT": "slow_commit", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace)}
    proc = subprocess.Popen(launch_cmd(2, tmp_path, *common, module="tests.integration.fault_entry"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "step 3/12" not in _text(tmp_path / "train.log") and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = [n for n, _ in complete_checkpoints(tmp_path / "checkpoints")]
    said = "took 6 s, longer than the 2 s the launcher leaves the ranks between a SIGTERM and killing them"
    if grace == 2:
        assert said in _text(tmp_path / "train.log")
        assert steps == [2], steps  # killed while writing the stop step's checkpoint
        return
    assert said.replace("2 s the", "60 s the") not in _text(tmp_path / "train.log")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted" and steps[-1] == summary["steps"] > 2, (steps, err[-2000:])
    assert launch(2, tmp_path, *common)["status"] == "finished"
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{steps[-1]}'}" in _text(tmp_path / "train.log")


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def _pid_of_rank(out, rank: int) -> int | None:
    for d in Path("/proc").iterdir():
        try:
            cmd, env = ((d / n).read_bytes().split(b"\0") for n in ("cmdline", "environ"))
        except OSError:
            continue
        if b"accelerate.commands.launch" not in cmd and f"output_dir={out}".encode() in cmd \
                and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def _launched(out, *overrides, env=None, module="distsft.train"):
    import subprocess

    from tests.conftest import CPU_ENV, launch_cmd

    return subprocess.Popen(launch_cmd(2, out, "trainer.eval_every=0", "logging.sample_every=0", "logging.log_every=1",
                                       *overrides, module=module),
                            cwd=ROOT, env={**CPU_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _until(condition, seconds: float) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_killed_rank_ends_the_job_in_seconds_whatever_the_sigterm_grace(tmp_path):
    """SIGKILL of rank 1 (a lost node) under the 600 s SIGTERM grace slurm/train.sbatch gives the launcher: the
    survivor fails its next collective, and the job ends within seconds (bound: 30 s), naming the killed rank."""
    import signal
    import time

    proc = _launched(tmp_path, "trainer.max_steps=100000", "trainer.save_every=0")
    try:
        _until(lambda: " step 2/" in _text(tmp_path / "train.log"), 180)
        os.kill(_pid_of_rank(tmp_path, 1), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 30 and proc.returncode != 0
        assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_lost_rank_is_judged_soon_after_a_stop_request(tmp_path):
    """Rank 1 freezes (SIGSTOP) with trainer.hang_timeout=100; rank 0 waits for it in a collective (as a survivor of a
    dead peer waits under NCCL). A SIGTERM to the launcher (600 s grace) asks for a stop that rank 0 cannot reach:
    its watchdog judges the lost rank within a tenth of the timeout (at least 3 beats: 15 s here) and ends the job,
    rather than at the 100 s timeout or the launcher's 600 s grace."""
    import signal
    import time

    proc = _launched(tmp_path, "trainer.max_steps=100000", "trainer.save_every=0", "trainer.hang_timeout=100",
                     module="tests.integration.fault_entry",
                     env={"DISTSFT_TEST_FAULT": "stop_self", "DISTSFT_TEST_FAULT_RANK": "1",
                          "DISTSFT_TEST_FAULT_CALL": "5"})
    try:
        _until(lambda: (pid := _pid_of_rank(tmp_path, 1)) and "State:\tT" in Path(f"/proc/{pid}/status").read_text(),
               180)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 40, err[-2000:]
        assert "rank 1 (" in err and "sooner for a lost rank once a stop was requested" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        pid = _pid_of_rank(tmp_path, 1)
        if pid:
            os.kill(pid, signal.SIGKILL)


def test_no_rank_outlives_its_launcher(tmp_path):
    """SIGKILL of the launcher alone (its agent dies without ending its workers): the ranks die with it
    (PR_SET_PDEATHSIG), instead of training on, unsupervised, into output_dir."""
    import signal
    import time

    from tests.conftest import CPU_ENV, launch_cmd

    def ranks() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if d.name.isdigit() and int(d.name) != launcher.pid and b"distsft.train" in cmd \
                    and f"output_dir={tmp_path}".encode() in cmd:
                found.append(int(d.name))
        return found

    launcher = subprocess.Popen(launch_cmd(2, tmp_path, "trainer.max_steps=100000", "trainer.save_every=0",
                                           "trainer.eval_every=0", "logging.sample_every=0", "logging.log_every=1"),
                                cwd=ROOT, env=CPU_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not ((tmp_path / "train.log").exists() and " step 2/" in (tmp_path / "train.log").read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        assert len(ranks()) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while ranks() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ranks() == [], "ranks outlived their launcher"
    finally:
        for pid in ranks():
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_a_rank_with_other_data_stops_every_rank_naming_it(tmp_path):
    """Rank 1 maps another token cache (its data fingerprint differs): before any step, every rank stops with
    one line naming rank 1, its host and both fingerprints; nothing is trained."""
    proc = launch(2, tmp_path, "trainer.max_steps=2", module="tests.integration.fault_entry", expect_ok=False,
                  env={"DISTSFT_TEST_FAULT": "other_data", "DISTSFT_TEST_FAULT_RANK": "1"})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distsft: error:")]
    assert len(lines) == 1 and "the ranks did not prepare the same data: rank 1 (" in lines[0], proc.stderr[-3000:]
    assert "data fingerprint 000000" in lines[0] and "Traceback" not in proc.stderr.split("distsft: error:")[0]
    assert not (tmp_path / "checkpoints").exists()
