"""No third-party traceback (#30): what transformers, datasets, safetensors, PyTorch and the system raise on a load
or a save is one line. Every case runs as a user runs it (``python -m distsft.train`` or ``python -m distsft.plan``
on real broken inputs) and must print exactly one ``distsft: error:`` line naming the path or key, exit with 2 and
print no traceback; ``DISTSFT_DEBUG=1`` shows the traceback. The runs of a group go two at a time.

    model      model_type 'nope'; a config transformers cannot build a causal LM from; a truncated safetensors file;
               a directory without weights; a hub id offline (HF_HUB_OFFLINE=1, empty HF_HOME) and without a
               network (a refused HF_ENDPOINT), both at once instead of after ~50 s of retries
    data       a corrupt parquet; a CSV that does not parse; a file whose read is an I/O error; a directory without
               data files; a hub dataset without a network
    writes     a full token cache, checkpoint and export filesystem (real tmpfs mounts), a read-only output_dir, a
               file where the checkpoints directory must be; nothing is left that a later run would trust
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, save_tiny

TINY = ROOT / "distsft" / "assets" / "tiny-llama"
ONE_STEP = ["trainer.max_steps=1", "trainer.eval_every=0", "logging.sample_every=0", "logging.plot=false",
            "logging.progress_bar=false"]


def cli(module: str, *overrides: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished ``python -m distsft.<module> overrides``, its seconds) on the CPU."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"distsft.{module}", *overrides], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - t0


def run_all(cases: dict) -> dict:
    """{name: (process, seconds)} of ``cases`` ({name: (module, overrides, env)}), two at a time."""
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(cli, module, *overrides, env=env) for name, (module, overrides, env) in
                   cases.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_line(name: str, proc: subprocess.CompletedProcess, *expected: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distsft: error:")]
    where = f"{name}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, where
    for text in expected:
        assert text in errors[0], f"{name}: {text!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """Real broken inputs: model directories, data files, an HF cache holding a hub model ``me/tiny``."""
    root = tmp_path_factory.mktemp("broken")
    nope = root / "nope"
    shutil.copytree(TINY, nope)
    config = json.loads((nope / "config.json").read_text())
    (nope / "config.json").write_text(json.dumps({**config, "model_type": "nope"}))
    vit = root / "vit"  # a model transformers knows, but not as a causal LM
    shutil.copytree(TINY, vit)
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    saved = save_tiny(root / "saved", seed=0)
    trunc, bare = root / "trunc", root / "bare"
    shutil.copytree(saved, trunc)
    weights = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(saved, bare)
    (bare / "model.safetensors").unlink()
    (root / "bad.parquet").write_bytes(b"PAR1" + b"\x00not a parquet file" * 50)
    (root / "bad.csv").write_text("instruction,output\nhi,there\n1,2,3,4\n")
    (root / "eio.jsonl").symlink_to("/proc/self/mem")  # a regular file whose first read is an I/O error (EIO)
    (root / "no_data").mkdir()
    (root / "no_data" / "notes.txt").write_text("not data\n")
    snapshot = root / "hf" / "hub" / "models--me--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(TINY, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (root / "empty_hf").mkdir()
    return root


def no_network(hf_home: Path) -> dict:
    """An endpoint that refuses every connection (nothing listens on a port just freed) and its own HF_HOME."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(hf_home)}


def test_model_sources_fail_in_one_line(broken, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(broken / "empty_hf")}
    cases = {
        "nope": ("train", [out, f"model.name_or_path={broken / 'nope'}"], None),
        "vit": ("train", [out, f"model.name_or_path={broken / 'vit'}"], None),
        "trunc": ("train", [out, f"model.name_or_path={broken / 'trunc'}", "model.init=pretrained"], None),
        "bare": ("train", [out, f"model.name_or_path={broken / 'bare'}", "model.init=pretrained"], None),
        "offline": ("plan", ["model.name_or_path=owner/model"], offline),
        "no_network": ("plan", ["model.name_or_path=owner/model"], no_network(broken / "empty_hf")),
    }
    done = run_all(cases)
    assert_one_line("nope", done["nope"][0], f"{broken / 'nope' / 'config.json'} names model_type 'nope'",
                    "model.trust_remote_code=true")
    assert_one_line("vit", done["vit"][0], f"model.name_or_path={broken / 'vit'}: transformers could not load the "
                    "model (ValueError: Unrecognized configuration class")
    assert_one_line("trunc", done["trunc"][0], f"{broken / 'trunc' / 'model.safetensors'} is not a readable "
                    "safetensors file")
    assert_one_line("bare", done["bare"][0], f"model.name_or_path={broken / 'bare'}: no weights", "model.init=config")
    for name, why in (("offline", "HF_HUB_OFFLINE=1"), ("no_network", "cannot be reached")):
        proc, seconds = done[name]
        assert_one_line(name, proc, "model.name_or_path=owner/model: not a local directory, not in the Hugging Face "
                        "cache", why, "model.name_or_path=<dir>")
        assert seconds < 30, (name, seconds)  # at once, not after huggingface_hub's ~50 s of retries
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_model_loads_at_once_without_a_network(broken):
    """The positive control: a hub id in the cache plans without a network, without waiting on retries."""
    proc, seconds = cli("plan", "model.name_or_path=me/tiny", env=no_network(broken / "hf"))
    assert proc.returncode == 0 and "parameters:" in proc.stdout, proc.stderr[-3000:]
    assert seconds < 30, seconds


def test_data_sources_fail_in_one_line(broken, tmp_path):
    def train_on(path):
        return [f"output_dir={tmp_path / 'out'}", f"data.train_files=[{path}]"]

    cases = {name: ("train", train_on(broken / name), None)
             for name in ("bad.parquet", "bad.csv", "eio.jsonl", "no_data")}
    cases["hub"] = ("train", train_on("owner/dataset"), no_network(broken / "empty_hf"))
    done = run_all(cases)
    assert_one_line("parquet", done["bad.parquet"][0], f"{broken / 'bad.parquet'}: could not be read as .parquet "
                    "(ArrowInvalid")
    assert_one_line("csv", done["bad.csv"][0], f"{broken / 'bad.csv'}: could not be read as .csv (ParserError",
                    "Expected 2 fields in line 3")
    assert_one_line("eio", done["eio.jsonl"][0], f"{broken / 'eio.jsonl'}: cannot be read (Input/output error)")
    assert_one_line("no_data", done["no_data"][0], f"{broken / 'no_data'}: a directory, but not a dataset saved "
                    "with save_to_disk")
    assert_one_line("hub", done["hub"][0], "owner/dataset: no such local file or directory, and the Hub cannot be "
                    "reached", "HF_HUB_OFFLINE=1")
    assert done["hub"][1] < 30
    assert not (tmp_path / "out").exists()


def test_more_files_datasets_would_reject(tmp_path):
    """In-process (no subprocess needed for the message): a JSON file that does not parse, an unsupported file
    type, a saved dataset whose Arrow files are damaged."""
    import re

    import datasets

    from distsft.data.errors import DataError, Skipped
    from distsft.data.sources import read_rows

    (tmp_path / "bad.json").write_text('[{"messages": [}')
    (tmp_path / "notes.txt").write_text("hello\n")
    datasets.Dataset.from_list([{"text": "hi"}]).save_to_disk(str(tmp_path / "saved"))
    for arrow in (tmp_path / "saved").glob("*.arrow"):
        arrow.write_bytes(b"damaged")
    cases = {"bad.json": r"could not be read as \.json \(ValueError: ", "notes.txt": r"unsupported file type '\.txt'",
             "saved": r"the saved dataset cannot be read \(.*save it again with save_to_disk"}
    for name, expected in cases.items():
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: ") + expected) as e:
            read_rows(str(tmp_path / name), "error", Skipped())
        assert "\n" not in str(e.value), name


def test_the_debug_switch_shows_the_libraries_traceback(broken, tmp_path):
    proc, _ = cli("plan", f"model.name_or_path={broken / 'vit'}", env={"DISTSFT_DEBUG": "1", "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert "ValueError: Unrecognized configuration class" in proc.stderr  # transformers' own error, under ours


def test_a_file_where_the_checkpoints_directory_must_be(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("mine")
    proc, _ = cli("train", f"output_dir={out}", *ONE_STEP)
    assert_one_line("file", proc, "saving checkpoint step_1 failed on the main process: Not a directory",
                    str(out / "checkpoints"), "a file stands where a directory must be")
    assert (out / "checkpoints").read_text() == "mine" and not (out / "final").exists()


@pytest.fixture
def mount(tmp_path):
    """``mount(path, size, read_only=False)``: a real tmpfs at ``path``, unmounted after the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the development machines run as root)")
    mounted = []

    def mount_at(path: Path, size: str, read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount_at
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_failed_writes_fail_in_one_line_and_leave_nothing_trusted(tmp_path, mount):
    """A full token cache, checkpoint and export filesystem, and a read-only output_dir (the tiny model's
    checkpoint is 2.2 MB, its weights 0.5 MB)."""
    cache = mount(tmp_path / "cache", "8k")
    saving, exporting = tmp_path / "saving", tmp_path / "exporting"
    mount(saving / "checkpoints", "256k")
    mount(exporting / "final.tmp", "64k")
    read_only = mount(tmp_path / "read_only", "64k", read_only=True)
    done = run_all({
        "cache": ("train", [f"output_dir={tmp_path / 'out'}", *ONE_STEP], {"DISTSFT_CACHE": str(cache)}),
        "checkpoint": ("train", [f"output_dir={saving}", *ONE_STEP], None),
        "export": ("train", [f"output_dir={exporting}", *ONE_STEP], None),
        "read_only": ("train", [f"output_dir={read_only}", *ONE_STEP], None),
    })
    assert_one_line("cache", done["cache"][0], f"writing the tokenized data into {cache / 'tokenized'}", "0 B free",
                    "free space there", "data.cache_dir")
    assert [p for p in (cache / "tokenized").iterdir() if p.suffix != ".failed"] == []  # no entry, no temporary one
    assert not (tmp_path / "out").exists()
    assert_one_line("checkpoint", done["checkpoint"][0], "saving checkpoint step_1 failed on rank 0: No space left on "
                    f"device ({saving / 'checkpoints' / '.step_1.tmp'}")
    assert list((saving / "checkpoints").iterdir()) == [] and not (saving / "final").exists()
    assert_one_line("export", done["export"][0], f"exporting {exporting / 'final'} failed on the main process: No "
                    f"space left on device ({exporting / 'final.tmp'}")
    assert list((exporting / "final.tmp").iterdir()) == [] and not (exporting / "final").exists()
    assert_one_line("read_only", done["read_only"][0], f"output_dir={read_only} is not writable")
