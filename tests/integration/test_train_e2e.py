"""End to end on the embedded default: run dir, TensorBoard scalars, export, learning, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_tiny, typed_cfg

SCALARS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/supervised_tokens_per_s",
           "train/step_time", "train/data_time", "eval/loss", "train/supervised_tokens", "train/packing_efficiency",
           "train/peak_memory_gb", "train/skipped_steps", "eval/gap"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default exactly as the quick start runs it (its own length and LR)."""
    out = tmp_path_factory.mktemp("default")
    return out, run_tiny(out)


def test_run_dir_layout(default_run):
    out, res = default_run
    for name in ("config.yaml", "summary.json", "train.log", "curves.png", "final/model.safetensors",
                 "final/config.json", "final/tokenizer.json", "final/generation_config.json"):
        assert (out / name).exists(), name
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts and all((out / "checkpoints" / c / "COMPLETE").exists() for c in ckpts)
    assert len(ckpts) <= 2  # save_total_limit
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "finished" and s["steps"] == s["total_steps"] > 0
    assert s["batch"] == {"micro_batch_size": 4, "grad_accum": 2, "world_size": 1, "global_batch_size": 8, "sp_size": 1,
                          "tp_size": 1}
    assert s["tokens"] > s["supervised_tokens"] > 0 and s["wall_time_s"] > 0
    assert s["final_eval_loss"] is not None


def test_default_run_learns(default_run):
    losses = [loss for _, loss in default_run[1].summary["train_loss_history"]]
    assert losses[0] > 5.0  # starts near ln(vocab) = 6.46
    assert losses[-1] < 0.4 * losses[0], losses
    evals = [loss for _, loss in default_run[1].summary["eval_loss_history"]]
    assert evals[-1] < evals[0]


def test_tensorboard_scalars(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, res = default_run
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert SCALARS <= tags, SCALARS - tags
    logged = {e.step: e.value for e in ea.Scalars("train/loss")}
    for step, loss in res.summary["train_loss_history"]:
        assert logged[step] == pytest.approx(loss, rel=1e-6)
    assert all(e.value > 0 for e in ea.Scalars("train/tokens_per_s"))


def test_data_time_shows_a_slow_loader(tmp_path, monkeypatch, default_run):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distsft.data.loader import StepLoader

    def scalars(run_dir, tag):
        ea = EventAccumulator(str(run_dir / "tensorboard"))
        ea.Reload()
        return [e.value for e in ea.Scalars(tag)]

    assert max(scalars(default_run[0], "train/data_time")) < 0.05  # control: tiny batches collate in ms
    real = StepLoader.steps

    def slow(self, *args, **kwargs):
        for group in real(self, *args, **kwargs):
            time.sleep(0.2)
            yield group

    monkeypatch.setattr(StepLoader, "steps", slow)
    run_tiny(tmp_path, "trainer.max_steps=3", "trainer.eval_every=0", "logging.log_every=1", "trainer.save_every=0")
    waits, steps = scalars(tmp_path, "train/data_time"), scalars(tmp_path, "train/step_time")
    assert len(waits) == 3 and all(0.2 <= w < s for w, s in zip(waits, steps))


def test_export_reloads_with_same_logits(default_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, res = default_run
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    mem = res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, mem(ids).logits, rtol=0, atol=1e-6)


def test_resume_is_exact(tmp_path):
    common = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=0", "logging.log_every=1"]
    straight = run_tiny(tmp_path / "a", *common)
    first = run_tiny(tmp_path / "b", *common, "trainer.stop_after=3")
    assert first.summary["status"] == "stopped" and first.summary["steps"] == 3
    assert not (tmp_path / "b" / "final").exists()  # nothing a later run could mistake for a result
    resumed = run_tiny(tmp_path / "b", *common)
    assert resumed.summary["status"] == "finished" and resumed.summary["steps"] == 6
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.summary["train_loss_history"] == straight.summary["train_loss_history"]  # steps 1-3 included
    assert resumed.summary["tokens"] == straight.summary["tokens"]
    # the curves of the resumed run show every step, the ones before the stop included
    from distsft.plots import history_from_tensorboard

    curves = history_from_tensorboard(tmp_path / "b" / "tensorboard")
    assert [s for s, _ in curves["train_loss"]] == [1, 2, 3, 4, 5, 6] == [s for s, _ in curves["lr"]]
    for (s, v), (s2, v2) in zip(curves["train_loss"], straight.summary["train_loss_history"]):
        assert s == s2 and abs(v - v2) < 1e-5
    from PIL import Image

    with Image.open(tmp_path / "b" / "curves.png") as png:
        assert png.size == (1500, 400)


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    common = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=0"]
    run_tiny(tmp_path, *common, "trainer.stop_after=2")
    # a crash during the next save leaves a directory without the completion marker
    broken = tmp_path / "checkpoints" / "step_4"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"garbage")
    res = run_tiny(tmp_path, *common)
    assert res.summary["steps"] == 4 and (broken / "COMPLETE").exists()


def test_resume_refuses_changed_training_and_lists_the_differences(tmp_path):
    import shutil

    from distsft.config import ConfigError

    data = tmp_path / "d.jsonl"
    shutil.copy(typed_cfg().data.train_files[0], data)
    common = [f"data.train_files=[{data}]", "trainer.max_steps=4", "trainer.eval_every=0"]
    run_tiny(tmp_path / "run", *common, "trainer.stop_after=2")
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    prov = json.loads((ckpt / "provenance.json").read_text())
    assert prov["packages"]["torch"] and prov["data_fingerprint"]
    with pytest.raises(ConfigError, match=r"data.max_seq_len: was 256, now 128\n  optim.lr: was 0.003, now 0.001"):
        run_tiny(tmp_path / "run", *common, "optim.lr=1e-3", "data.max_seq_len=128")
    data.write_text(data.read_text().replace("plus", "and"))  # same options, other content
    with pytest.raises(ConfigError, match="training data: fingerprint was"):
        run_tiny(tmp_path / "run", *common)
    res = run_tiny(tmp_path / "run", *common, "trainer.resume_force=true")
    assert res.summary["status"] == "finished" and res.summary["steps"] == 4
    assert json.loads((tmp_path / "run" / "final" / "provenance.json").read_text())["data_fingerprint"] != \
        prov["data_fingerprint"]


def test_generate_answers_and_scores_per_split(default_run, tmp_path):
    from distsft.generate import GenerateConfig, load_final, run_generate, score

    out, res = default_run
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 3 plus 4?", "expected": "3 plus 4 is 7.", "split": "exact"},
        {"prompt": "what's 3 + 4", "expected": "7", "split": "variation"},
        {"prompt": "Who wrote Hamlet?", "expected": "Shakespeare", "split": "out_of_domain"}]))
    import io

    buf = io.StringIO()
    report = run_generate(GenerateConfig(run_dir=str(out), prompt="Spell river backwards.",
                                         prompts_file=str(cases), max_new_tokens=16), stream=buf)
    assert (out / "generate_eval.json").exists()
    assert set(report["scores"]) == {"exact", "variation", "out_of_domain", "overall"}
    assert report["scores"]["overall"]["n"] == 3 and len(report["answers"]) == 3
    # the answers are the trained model's own greedy outputs (same template as training)
    model, tok = load_final(out)
    from distsft.generate import answer

    assert report["answers"][0]["answer"] == answer(model, tok, "What is 3 plus 4?", 16)
    # bad input is one line naming the file (and line), before or instead of a traceback from deep inside a library
    from distsft.config import ConfigError

    cases.write_text('{"prompt": "p", "expected": "7"}\n{"prompt": "q", "expected": \n')
    with pytest.raises(ConfigError, match=f"{cases} line 2: not JSON"):
        run_generate(GenerateConfig(run_dir=str(out), prompts_file=str(cases)))
    broken = tmp_path / "broken"
    shutil.copytree(out / "final", broken / "final")
    (broken / "final" / "model.safetensors").write_bytes(b"\0" * 100)  # a truncated export
    with pytest.raises(ConfigError, match="model.safetensors is not a readable safetensors file"):
        load_final(broken)
    prompts = [{"prompt": "p", "expected": "7"}, {"prompt": "q", "expected": "x", "split": "s"}]
    assert score(prompts, ["7", "a x b"]) == {
        "overall": {"n": 2, "exact_match": 0.5, "contains_match": 1.0},
        "s": {"n": 1, "exact_match": 0.0, "contains_match": 1.0}}
