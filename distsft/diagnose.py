"""After the run: what the loss curves say, and what to try next (heuristics, stated as such).

Bands of the final train loss (``diagnosis.bands``, default 0.2 / 0.5 / 1.0, per-token cross-entropy
on supervised tokens): below the first, likely overfit (memorising); up to the second, the sweet
spot; up to the third, underfit; above, barely learning. An eval loss that rose from its best
while the train loss kept falling is overfitting whatever the band. These are rules of thumb from
instruction tuning of chat models; small or unusual data can sit elsewhere.
"""

from __future__ import annotations


def diagnose(train: list[tuple[int, float]], evals: list[tuple[int, float]], bands: list[float]) -> dict:
    if not train:
        return {"verdict": "no data", "advice": "no training step was logged", "heuristic": True}
    final = train[-1][1]
    lo, mid, hi = bands
    if final < lo:
        verdict, advice = "likely overfit", "reduce epochs by 20-30% or halve the learning rate"
    elif final < mid:
        verdict, advice = "sweet spot", ("keep these settings; when the data grows, scale epochs down to keep "
                                         "the example views (examples x epochs) the same")
    elif final < hi:
        verdict, advice = "underfit", "increase epochs by 30-50% or raise the learning rate 1.5-2x"
    else:
        verdict, advice = "barely learning", ("check the data and template (python -m distsft.preview), then raise "
                                              "the learning rate 2-3x or train much longer")
    out = {"final_train_loss": final, "band": verdict, "verdict": verdict, "advice": advice, "bands": list(bands),
           "heuristic": True}
    if len(evals) >= 2:
        best_step, best = min(evals, key=lambda e: e[1])
        last_step, last = evals[-1]
        train_at_best = min((abs(s - best_step), loss) for s, loss in train)[1]
        if last > best and last_step > best_step and final < train_at_best:
            out["verdict"] = "overfitting"
            out["advice"] = (f"eval loss rose from {best:.4f} (step {best_step}) to {last:.4f} while train loss fell: "
                             "stop earlier (trainer.early_stop_patience, trainer.export_best) or reduce epochs by "
                             "20-30%")
    return out


def describe(d: dict) -> str:
    if "final_train_loss" not in d:
        return d["advice"]
    return (f"diagnosis (heuristic bands {d['bands']}): final train loss {d['final_train_loss']:.4f} -> "
            f"{d['verdict']}; next run: {d['advice']}")
