"""Guards: a NaN step is skipped everywhere with its samples named; repeated NaNs abort cleanly;
early stopping (1 and 2 processes) keeps and exports the best checkpoint; MFU and diagnosis."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

import distsft.trainer.loop as loop
import distsft.trainer.step as step
from distsft.diagnose import diagnose
from distsft.trainer.guards import TrainingError
from tests.conftest import launch, run_tiny, typed_cfg
from tests.integration.nan_entry import nan_on_calls, scale_calls

STEPS = ["trainer.max_steps=5", "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1"]


def poison(monkeypatch, bad_calls):
    monkeypatch.setattr(step, "forward_losses", nan_on_calls(step.forward_losses, bad_calls))


def test_nan_step_is_skipped_with_sample_ids(tmp_path, monkeypatch, caplog):
    poison(monkeypatch, {3})  # grad_accum 2: the first micro-batch of step 2
    with caplog.at_level(logging.WARNING, logger="distsft"):
        res = run_tiny(tmp_path, *STEPS)
    s = res.summary
    assert s["status"] == "finished" and s["skipped_steps"] == [2] and s["steps"] == 5
    warning = next(r.getMessage() for r in caplog.records if "non-finite" in r.getMessage())
    assert "step 2" in warning and "update skipped" in warning and "tiny_sft.jsonl row" in warning
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_nonfinite_update_that_deepspeed_applied_stops_the_run():
    from distsft.trainer.guards import BadStepGuard

    guard = BadStepGuard(max_bad=3)
    guard.check(1, False, lambda: ["f row 1"], 0)  # skipped: counted, training goes on
    with pytest.raises(TrainingError, match="non-finite gradient at step 2, and DeepSpeed applied the update"):
        guard.check(2, False, lambda: ["f row 2"], 0, applied=True)
    assert guard.skipped == [1, 2]


def test_loss_spike_is_logged_with_sample_ids_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real = step.forward_losses
    # step 9's first micro-batch (grad_accum 2) counts 20x
    monkeypatch.setattr(step, "forward_losses", scale_calls(real, lambda n: 20.0 if n == 17 else 1.0))
    with caplog.at_level(logging.WARNING, logger="distsft"):
        res = run_tiny(tmp_path, "trainer.max_steps=10", "trainer.eval_every=0", "trainer.save_every=0",
                       "trainer.spike_window=5")
    s = res.summary
    assert s["status"] == "finished" and s["loss_spikes"] == [9] and s["skipped_steps"] == []
    warning = next(r.getMessage() for r in caplog.records if "loss spike" in r.getMessage())
    assert "step 9" in warning and "running median" in warning and "tiny_sft.jsonl row" in warning
    monkeypatch.setattr(step, "forward_losses", real)  # negative control: the same run without the spike logs none
    assert run_tiny(tmp_path / "calm", "trainer.max_steps=10", "trainer.eval_every=0", "trainer.save_every=0",
                    "trainer.spike_window=5").summary["loss_spikes"] == []


def test_repeated_nans_abort_with_a_clear_message(tmp_path, monkeypatch):
    poison(monkeypatch, {"all"})
    with pytest.raises(TrainingError, match=r"3 consecutive steps with a non-finite loss or gradient norm"):
        run_tiny(tmp_path, *STEPS)
    assert not (tmp_path / "final").exists()


def test_early_stopping_exports_the_best(tmp_path, monkeypatch):
    curve = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(loop, "evaluate", lambda *a: next(curve))
    res = run_tiny(tmp_path, "trainer.max_steps=12", "trainer.eval_every=2", "trainer.save_every=0",
                   "trainer.early_stop_patience=2", "trainer.export_best=true")
    s = res.summary
    assert s["status"] == "early_stopped" and s["steps"] == 8  # evals at 2,4,6,8: best at 4, two worse after
    assert s["best_eval"] == {"step": 4, "loss": 2.0} and s["exported_step"] == 4
    best = load_file(tmp_path / "checkpoints" / "best" / "model.safetensors")
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_a_bad_last_step_is_reported_when_an_early_stop_ends_the_run_between_log_steps(tmp_path, monkeypatch):
    """The host judges a step's verdict a step late; the step an early stop ends on is judged all the same."""
    poison(monkeypatch, {11})  # grad_accum 2: the first micro-batch of step 6
    curve = iter([1.0, 2.0])
    monkeypatch.setattr(loop, "evaluate", lambda *a: next(curve))
    s = run_tiny(tmp_path, "trainer.max_steps=12", "trainer.eval_every=3", "logging.log_every=100",
                 "trainer.save_every=0", "trainer.early_stop_patience=1").summary
    assert s["status"] == "early_stopped" and s["steps"] == 6 and s["skipped_steps"] == [6]


def test_a_resumed_run_keeps_the_guards_state_and_history(tmp_path, monkeypatch):
    """Skipped steps, the spike median, the best eval and the patience count travel in the checkpoint:
    stopped at step 4 and resumed, the run reports the same skipped step (2) and spike (5: found only if
    the median of steps 3-4 came back), stops early at the same step, exports the same best and writes the
    same summary (loss histories, diagnosis, token counts)."""
    common = ["trainer.max_steps=12", "trainer.eval_every=2", "trainer.save_every=2", "trainer.early_stop_patience=2",
              "trainer.export_best=true", "trainer.spike_window=2"]
    real = step.forward_losses

    def run(out, *extra, curve, factors):  # factors: micro-batch call number -> loss factor (grad_accum 2)
        monkeypatch.setattr(step, "forward_losses", scale_calls(real, lambda n: factors.get(n, 1.0)))
        monkeypatch.setattr(loop, "evaluate", lambda *a: next(curve))
        return run_tiny(out, *common, *extra).summary

    evals = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8]
    whole = run(tmp_path / "whole", curve=iter(evals), factors={3: math.nan, 9: 20.0})
    curve = iter(evals)  # one curve across the stop and the resume
    run(tmp_path / "split", "trainer.stop_after=4", curve=curve, factors={3: math.nan})
    resumed = run(tmp_path / "split", curve=curve, factors={1: 20.0})  # the resumed run starts at step 5
    assert whole["skipped_steps"] == [2] and whole["loss_spikes"] == [5]
    assert whole["status"] == resumed["status"] == "early_stopped" and whole["steps"] == resumed["steps"] == 8
    for key in ("best_eval", "exported_step", "skipped_steps", "loss_spikes", "train_loss_history",
                "eval_loss_history", "diagnosis", "tokens", "supervised_tokens"):
        assert json.dumps(resumed[key]) == json.dumps(whole[key]), key  # NaN (step 2's window) as "NaN"
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "whole", tmp_path / "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiproc
def test_early_stopping_stops_all_ranks(tmp_path):
    # min_delta larger than any loss: only the first eval counts as an improvement
    s = launch(2, tmp_path, "trainer.max_steps=10", "trainer.eval_every=1", "trainer.save_every=0",
               "trainer.early_stop_patience=2", "trainer.early_stop_min_delta=100")
    assert s["status"] == "early_stopped" and s["steps"] == 3 and s["batch"]["world_size"] == 2
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_mfu_flops_formula():
    from distsft.model.load import load_model
    from distsft.model.peft import apply_peft
    from distsft.trainer.metrics import model_flops

    cfg = typed_cfg()
    model = load_model(cfg.model, seed=0)
    total = sum(p.numel() for p in model.parameters())
    n = total - 640 * 64  # the input embedding is a lookup
    assert model_flops(model, total, total) == (6 * n, 6 * 2 * 4 * 16)  # 6N; 6 * layers * heads * head_dim
    lora = apply_peft(model, typed_cfg("peft=lora").peft, False)
    t = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    per_token, _ = model_flops(lora, t, sum(p.numel() for p in lora.parameters()))
    assert per_token == 4 * (sum(p.numel() for p in lora.parameters()) - 640 * 64)



def test_mfu_flops_count_a_tied_head_once_as_a_matmul():
    """Llama-3.2-1B ties the output head to the input embedding: its 128k x 2048 matmul must be counted
    (6 * 1.236e9 per token), not dropped with the embedding lookup (that would be 6 * 0.973e9)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.trainer.metrics import model_flops
    from tests.conftest import ROOT

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "bench/models/llama3_2_1b"))
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert total == 1_235_814_400
    assert model_flops(model, total, total)[0] == 6 * total


def test_mfu_scalar_logged_when_peak_known(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_tiny(tmp_path, *STEPS, "logging.peak_flops=1e12")
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert all(0 < e.value < 1 for e in ea.Scalars("train/mfu"))


@pytest.mark.parametrize("start,final,verdict", [(2.0, 0.1, "likely overfit"), (2.0, 0.3, "sweet spot"),
                                                 (2.0, 0.7, "underfit"), (1.6, 1.5, "barely learning"),
                                                 (6.46, 1.5, "underfit")])
def test_diagnosis_bands(start, final, verdict):
    d = diagnose([(1, start), (10, final)], [], [0.2, 0.5, 1.0])
    assert d["verdict"] == verdict == d["band"] and d["heuristic"] and d["advice"]


def test_diagnosis_is_relative_to_where_the_loss_started():
    """The quick start (6.46 = ln 640 -> 1.5) is still learning: train longer, not "raise the LR 3x"; a LoRA run
    on a random base (6.46 -> 5.92) with an eval wobble of 0.01 barely learned, it did not overfit."""
    quick = diagnose([(10, 6.46), (200, 1.5)], [], [0.2, 0.5, 1.0], vocab_size=640)
    assert quick["verdict"] == "underfit" and "still learning (the loss fell 77%" in quick["advice"]
    assert "2-3x" not in quick["advice"] and quick["uniform_loss"] == pytest.approx(6.4615, abs=1e-3)
    lora = diagnose([(10, 6.46), (200, 5.92)], [(100, 5.95), (200, 5.96)], [0.2, 0.5, 1.0])
    assert lora["band"] == lora["verdict"] == "barely learning" and "fell only 8%" in lora["advice"]
    wobble = diagnose([(10, 2.0), (200, 0.4)], [(100, 0.45), (200, 0.455)], [0.2, 0.5, 1.0])
    assert wobble["verdict"] == "sweet spot"  # +1% on eval is not overfitting


def test_diagnosis_overfitting_from_eval_curve():
    train = [(s, 2.0 - 0.1 * s) for s in range(1, 11)]
    evals = [(2, 1.9), (4, 1.6), (6, 1.7), (8, 1.9), (10, 2.1)]
    d = diagnose(train, evals, [0.2, 0.5, 1.0])
    assert d["verdict"] == "overfitting" and "rose from 1.6000 (step 4)" in d["advice"]
    assert json.dumps(d)


def _text_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    return ea.Tags()["tensors"], ea


def test_sample_generations_in_tensorboard(tmp_path):
    run_tiny(tmp_path, *STEPS, "logging.sample_every=2", "logging.sample_max_new_tokens=4")
    tags, ea = _text_tags(tmp_path)
    assert "samples/text_summary" in tags
    events = ea.Tensors("samples/text_summary")
    assert [e.step for e in events] == [2, 4, 5]
    text = events[-1].tensor_proto.string_val[0].decode()
    assert "**prompt:** What is 12 plus 7?" in text and "**output:**" in text


@pytest.mark.multiproc
@pytest.mark.parametrize("parallel", ["zero3", "fsdp"])
def test_sample_generations_under_sharded_parameters_with_replies_of_different_lengths(tmp_path, parallel):
    """Every rank generates (ZeRO-3 and FSDP2 gather parameters collectively in each forward); rank 0 writes.
    Rank 1's replies run to the token limit while rank 0's end at once (the random tiny model's first token is
    its eos): the rank that finishes first keeps stepping with the other (synced_gpus), where it would leave
    the other waiting in a gather (a hang, caught by the timeout)."""
    launch(2, tmp_path, f"parallel={parallel}", "trainer.max_steps=2", "trainer.eval_every=0",
           "trainer.save_every=0", "logging.sample_every=2", "logging.sample_max_new_tokens=6", "export.enabled=false",
           module="tests.integration.fault_entry", env={"DISTSFT_TEST_FAULT": "uneven_samples",
                                                        "DISTSFT_TEST_FAULT_RANK": "1"}, timeout=240)
    tags, _ = _text_tags(tmp_path)
    assert "samples/text_summary" in tags


def test_fused_adamw_skips_a_nonfinite_step_on_the_device_bit_exactly():
    """A NaN step through the device-side skip (fused AdamW's found_inf) leaves parameters, moments and
    step count exactly as if the step had never been taken; a finite step does change them (control)."""
    from distsft.config import OptimConfig
    from distsft.trainer.optim import build_optimizer, skip_flag

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1))
    flag = skip_flag(opt)
    assert flag is not None and opt.defaults["fused"]
    x = torch.randn(4, 8)

    def step(scale: float):
        model(x).sum().mul(scale).backward()
        finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        flag.copy_(~finite)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def snapshot():
        state = [v.clone() for s in opt.state.values() for v in s.values()]
        return [p.detach().clone() for p in model.parameters()] + state

    step(1.0)
    before = snapshot()
    step(math.nan)  # skipped on the device
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    step(1.0)  # negative control: a finite step moves parameters, moments and the step count
    moved = snapshot()
    assert not any(torch.equal(a, b) for a, b in zip(after, moved))


def stop_requested_at_call(monkeypatch, n: int) -> None:
    """A stop request (SIGTERM, the STOP file) that this process sees at its n-th poll (once per step)."""
    from distsft.trainer import preempt

    calls = {"n": 0}

    def local(self):
        calls["n"] += 1
        return 1.0 if calls["n"] == n else 0.0

    monkeypatch.setattr(preempt.StopRequest, "local", local)


@pytest.mark.parametrize("optim,stop_seen_at", [("adamw", 4), ("adafactor", 3)])
def test_stop_request_is_read_one_step_late_only_when_the_device_decides(tmp_path, monkeypatch, optim,
                                                                           stop_seen_at):
    """A stop requested during step 3: with fused AdamW (no host sync in the step) the host reads it
    after step 4 is queued and checkpoints there; Adafactor's step is decided on the host, so at 3."""
    stop_requested_at_call(monkeypatch, 3)
    s = run_tiny(tmp_path, "trainer.max_steps=8", "trainer.eval_every=0", "trainer.save_every=0",
                 f"optim={optim}").summary
    assert s["status"] == "preempted" and s["steps"] == stop_seen_at
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{stop_seen_at}"]


def test_the_stop_step_saves_first_and_skips_eval_and_samples(tmp_path, monkeypatch):
    """Preemption's grace period is for the checkpoint: at the stop step no eval and no sample generation run
    (both are due at every step here), the checkpoint is written and the run ends."""
    stop_requested_at_call(monkeypatch, 3)
    s = run_tiny(tmp_path, "trainer.max_steps=8", "trainer.eval_every=1", "trainer.save_every=0",
                 "logging.sample_every=1", "logging.sample_max_new_tokens=2", "optim=adafactor").summary
    assert s["status"] == "preempted" and s["steps"] == 3
    assert [step for step, _ in s["eval_loss_history"]] == [1, 2]  # none at the stop step
    assert (tmp_path / "checkpoints" / "step_3" / "COMPLETE").exists()
    _, ea = _text_tags(tmp_path)
    assert [e.step for e in ea.Tensors("samples/text_summary")] == [1, 2]
