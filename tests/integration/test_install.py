"""A non-editable install (a built wheel, as `pip install .` makes) runs from any directory: the console
script finds the Hydra configs shipped inside the package."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import CPU_ENV, ROOT

pytestmark = pytest.mark.slow  # tens of seconds each: out of the fast tier


def test_the_wheel_installs_and_its_console_script_trains_from_another_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("distsft-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    # the dependencies come from the test environment (a plain path entry: its editable distsft stays out)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**CPU_ENV, "PYTHONPATH": ""}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import distsft.train as t; print(t.CONF_DIR)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith("distsft/conf")  # the installed copy, not the checkout
    job = subprocess.run([str(venv / "bin" / "distsft-train"), "--cfg", "job"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "run_name: tiny" in job.stdout and "parallel:" in job.stdout
    run = subprocess.run([str(venv / "bin" / "distsft-train"), "experiment=tiny_smoke", "output_dir=out",
                          "logging.progress_bar=false"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((work / "out" / "summary.json").read_text())["status"] == "finished"
