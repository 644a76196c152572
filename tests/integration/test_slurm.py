"""slurm/train.sbatch on a real SLURM cluster: two nodes, preemption -> requeue -> exact resume, and a lost rank ->
requeue -> resume on fewer nodes.

Needs a cluster with two usable nodes; `bash slurm/local_cluster.sh` (which tests/run.sh calls) sets
up one on this machine when run as root. Without one the tests skip, saying why.
Each job costs ~10-15 s of process start-up; the module takes about a minute and a half.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

SBATCH = ROOT / "slurm" / "train.sbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


def _cluster_problem() -> str | None:
    """Why these tests cannot run here, or None."""
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found: no SLURM here (as root, `bash slurm/local_cluster.sh` sets up a local cluster)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        if ping.returncode != 0:  # fast; sinfo would retry for ~10 s first
            return f"slurmctld does not answer ({ping.stdout.splitlines()[0] if ping.stdout else ping.returncode}): " \
                   "run `bash slurm/local_cluster.sh`"
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "scontrol ping / sinfo do not answer (slurmctld down?): run `bash slurm/local_cluster.sh`"
    if p.returncode != 0:
        return f"sinfo failed ({p.stderr.strip() or p.returncode}): run `bash slurm/local_cluster.sh`"
    usable = {line.split()[0] for line in p.stdout.splitlines()
              if line.split()[-1].rstrip("*~#$@") in ("idle", "mix", "alloc")}
    if len(usable) < 2:
        return f"SLURM has fewer than 2 usable nodes (sinfo: {p.stdout.strip()!r})"
    return None


_problem = _cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_problem is not None, reason=str(_problem))]


class Jobs:
    """Submits slurm/train.sbatch jobs and watches them; cancels what is left at teardown."""

    def __init__(self):
        self.ids: list[str] = []
        self.logs: dict[str, Path] = {}

    def submit(self, workdir: Path, *overrides: str, nodes: int | str = 2, per_node: int = 1) -> str:
        """sbatch slurm/train.sbatch from workdir (the job's log goes there too)."""
        workdir.mkdir(parents=True, exist_ok=True)
        # the job inherits this environment (sbatch --export=ALL): the test's Python and data cache
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env.update(DISTSFT_PYTHON=sys.executable, DISTSFT_ROOT=str(ROOT), DISTSFT_PROCS_PER_NODE=str(per_node))
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--job-name=distsft-test", f"--chdir={workdir}",
               f"--output={workdir}/%x-%j.out", str(SBATCH), "logging.progress_bar=false", "trainer.use_cuda=false",
               *overrides]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == 0, f"sbatch failed: {p.stderr}"
        job = p.stdout.strip().split(";")[0]
        self.ids.append(job)
        self.logs[job] = workdir / f"distsft-test-{job}.out"
        return job

    def info(self, job: str) -> dict[str, str]:
        """JobState, Restarts, ExitCode, ... from scontrol (sacct once the controller forgot the job)."""
        p = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
        if p.returncode == 0 and "JobState=" in p.stdout:
            return dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)
        p = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State,ExitCode,Restarts"],
                           capture_output=True, text=True, timeout=30)
        fields = (p.stdout.strip().splitlines() or [""])[0].split("|")
        if len(fields) < 3:
            return {"JobState": "UNKNOWN"}
        return {"JobState": fields[0].split()[0], "ExitCode": fields[1], "Restarts": fields[2]}

    def log(self, job: str) -> str:
        path = self.logs[job]
        return path.read_text(errors="replace") if path.exists() else f"(no job log {path})"

    def tail(self, job: str) -> str:
        return self.log(job)[-6000:]

    def wait(self, job: str, timeout: float) -> dict[str, str]:
        """Until the job is finished for good (a requeued job goes through PENDING and runs again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(job)
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(1)
        pytest.fail(f"job {job} not finished after {timeout:.0f}s: {self.info(job)}\n{self.tail(job)}")

    def cancel_all(self) -> None:
        for job in self.ids:
            if self.info(job)["JobState"] not in TERMINAL:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture
def jobs():
    j = Jobs()
    yield j
    j.cancel_all()


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _wait_for_log(jobs: Jobs, job: str, path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if jobs.info(job)["JobState"] in TERMINAL:
            break
        time.sleep(0.2)
    pytest.fail(f"{text!r} never appeared in {path}: {jobs.info(job)}\n{jobs.tail(job)}")


@pytest.mark.timeout(600)
def test_two_nodes_one_process_each(tmp_path, jobs):
    job = jobs.submit(tmp_path, "trainer.max_steps=6", "trainer.save_every=3", "logging.log_every=1")
    info = jobs.wait(job, timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{jobs.tail(job)}"
    out = tmp_path / "runs" / f"distsft-test-{job}"  # the default run dir: <job name>-<job id>
    summary = _summary(out)
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["batch"]["world_size"] == 2  # 2 nodes x 1 CPU process
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_6" / "COMPLETE").is_file()
    assert "2 node(s)" in jobs.log(job) and "world size 2" in jobs.log(job)


@pytest.mark.timeout(600)
def test_two_nodes_shard_within_each_node(tmp_path, jobs):
    """2 nodes x 2 processes under parallel=fsdp: by default each node's ranks shard the model and the nodes are
    replicas (HSDP), so the parameter gathers stay inside a node; the run finishes and exports whole weights."""
    job = jobs.submit(tmp_path, "parallel=fsdp", "trainer.max_steps=4", "trainer.save_every=0", "trainer.eval_every=0",
                      "logging.sample_every=0", "trainer.micro_batch_size=2", per_node=2)
    info = jobs.wait(job, timeout=420)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{jobs.tail(job)}"
    out = tmp_path / "runs" / f"distsft-test-{job}"
    assert "HSDP: sharded within groups of 2 ranks, 2 groups" in (out / "train.log").read_text()
    summary = _summary(out)
    assert summary["status"] == "finished" and summary["batch"]["world_size"] == 4
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.timeout(900)
def test_preempt_requeue_resume_exact(tmp_path, jobs):
    """TERM (a preemption; USR1, the time limit's warning, takes the same trap) to the batch shell -> STOP ->
    checkpoint -> scontrol requeue -> resume -> same weights."""
    import torch
    from safetensors.torch import load_file

    steps = 150
    common = (f"trainer.max_steps={steps}", "trainer.save_every=1000", "logging.log_every=1")
    ref_out, out = tmp_path / "reference", tmp_path / "preempted"
    ref = jobs.submit(tmp_path, f"output_dir={ref_out}", *common)  # the uninterrupted reference, beside it
    job = jobs.submit(tmp_path, f"output_dir={out}", *common)

    _wait_for_log(jobs, job, out / "train.log", f"step 3/{steps}", timeout=300)
    # --batch: only the batch shell gets the signal (as with #SBATCH --signal=B:USR1@...); the trainer
    # learns of it through output_dir/STOP
    p = subprocess.run(["scancel", "--signal=TERM", "--batch", job], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr

    info = jobs.wait(job, timeout=420)  # includes the requeue delay (cred_expire: 10 s locally, 120 s default)
    log = jobs.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log[-6000:]}"
    assert int(info["Restarts"]) >= 1, f"the job was not requeued: {info}\n{log[-6000:]}"
    assert "TERM: asking the trainer" in log and "requeueing job" in log and "restart 1" in log, log[-6000:]
    train_log = (out / "train.log").read_text()
    stopped_at = re.search(r"stop requested: writing a checkpoint at step (\d+)", train_log)
    assert stopped_at and int(stopped_at.group(1)) < steps, train_log[-3000:]
    assert "resumed from" in train_log, train_log[-3000:]
    summary = _summary(out)
    assert summary["status"] == "finished" and summary["steps"] == steps
    assert summary["batch"]["world_size"] == 2
    assert not (out / "STOP").exists()

    ref_info = jobs.wait(ref, timeout=300)
    assert ref_info["JobState"] == "COMPLETED", f"{ref_info}\n{jobs.tail(ref)}"
    assert _summary(ref_out)["steps"] == steps
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(ref_out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's in {differ}"


def _rank_pid(out: Path, rank: int) -> int | None:
    """The PID of the training process of ``rank`` writing into ``out`` (all nodes are this host)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"distsft.train" in cmd and f"output_dir={out}".encode() in cmd and f"RANK={rank}".encode() in env \
                and b"accelerate.commands.launch" not in cmd:
            return int(proc.name)
    return None


@pytest.mark.timeout(900)
def test_a_lost_rank_requeues_the_job_which_resumes_on_fewer_nodes(tmp_path, jobs):
    """SIGKILL of rank 1 (a lost node) of a 2-node ZeRO-2 job submitted with --nodes=1-2: the batch script sees a
    failure without a user error and requeues the job; with the second node drained meanwhile, SLURM starts it on
    one node, and the run resumes from the last complete checkpoint written by 2 processes on 1 (DeepSpeed's universal
    checkpoint) and finishes."""
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    out, steps = tmp_path / "run", 40
    job = jobs.submit(tmp_path, f"output_dir={out}", "parallel=zero2", f"trainer.max_steps={steps}",
                      "trainer.save_every=4", "trainer.eval_every=0", "logging.log_every=1", "logging.sample_every=0",
                      nodes="1-2")
    _wait_for_log(jobs, job, out / "train.log", "step 9/", timeout=300)
    second = max(nodes.stdout.split())
    subprocess.run(["scontrol", "update", f"nodename={second}", "state=drain", "reason=distsft-test"], check=True,
                   timeout=30)
    try:
        pid = _rank_pid(out, 1)
        assert pid is not None, jobs.tail(job)
        os.kill(pid, 9)
        info = jobs.wait(job, timeout=480)  # includes the requeue delay
    finally:
        subprocess.run(["scontrol", "update", f"nodename={second}", "state=resume"], timeout=30)
    log = jobs.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log[-6000:]}"
    assert int(info["Restarts"]) >= 1 and "failed with a lost rank" in log, log[-6000:]
    train_log = (out / "train.log").read_text()
    assert "written by 2 processes under zero2, loaded by 1 under zero2" in train_log, train_log[-3000:]
    summary = _summary(out)
    assert summary["status"] == "finished" and summary["steps"] == steps and summary["batch"]["world_size"] == 1


@pytest.mark.timeout(600)
def test_submitit_sweep_runs_each_job_on_slurm(tmp_path):
    """hydra/launcher=submitit_slurm: a -m sweep becomes SLURM jobs, each with its own run dir."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "distsft.train", "-m", "hydra/launcher=submitit_slurm",
                           "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
                           "experiment=tiny_smoke", "optim.lr=1e-3,3e-3", "logging.progress_bar=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "tiny_smoke"
    jobs = sorted(d for d in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name))
    assert len(jobs) == 2 and all(list(j.glob("*_result.pkl")) for j in jobs)  # ran as SLURM array tasks
    runs = sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert [d.name for d in runs] == ["experiment=tiny_smoke,optim.lr=0.001", "experiment=tiny_smoke,optim.lr=0.003"]
    assert all(_summary(d)["status"] == "finished" for d in runs)
