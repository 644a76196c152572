"""After the run: what the loss curves say, and what to try next (heuristics, stated as such).

Two readings of the final train loss (per-token cross-entropy on supervised tokens):

- its level, in the bands ``diagnosis.bands`` (default 0.2 / 0.5 / 1.0): below the first, likely
  overfit (memorising); up to the second, the sweet spot; above, underfit;
- how far it fell from where it started (the first logged loss; ln V, the vocabulary, for a model
  that starts from random weights): a loss above the bands that fell by less than a tenth is
  *barely learning*; one that fell a lot is underfit but still learning, and wants more training
  rather than another learning rate.

An eval loss that rose clearly (more than 2%) above its best while the train loss kept falling is
overfitting, unless the run barely learned (a wobble of a model that learned nothing is noise).
The band and the verdict never contradict each other. These are rules of thumb from instruction
tuning of chat models; small or unusual data can sit elsewhere.
"""

from __future__ import annotations

import math

LEARNING = 0.10  # a loss that fell by less than this share of its start is "barely learning"
EVAL_RISE = 0.02  # an eval loss this much (relative) above its best counts as rising


def diagnose(train: list[tuple[int, float]], evals: list[tuple[int, float]], bands: list[float],
             vocab_size: int | None = None) -> dict:
    if not train:
        return {"verdict": "no data", "advice": "no training step was logged", "heuristic": True}
    start, final = train[0][1], train[-1][1]
    fell = (start - final) / start if start > 0 else 0.0
    lo, mid, hi = bands
    if final < lo:
        band, advice = "likely overfit", "reduce epochs by 20-30% or halve the learning rate"
    elif final < mid:
        band, advice = "sweet spot", ("keep these settings; when the data grows, scale epochs down to keep "
                                      "the example views (examples x epochs) the same")
    elif fell < LEARNING and final >= hi:
        band, advice = "barely learning", (f"the loss fell only {fell:.0%} (from {start:.2f}); check the data and "
                                           "template (python -m distsft.preview), then raise the learning rate 2-3x")
    else:
        band = "underfit"
        advice = (f"still learning (the loss fell {fell:.0%}, from {start:.2f}): train longer (epochs +50%)"
                  + (" or raise the learning rate 1.5x" if final < hi else ""))
    out = {"final_train_loss": final, "start_train_loss": start, "fell": fell, "band": band, "verdict": band,
           "advice": advice, "bands": list(bands), "heuristic": True}
    if vocab_size:
        out["uniform_loss"] = math.log(vocab_size)  # where a model guessing uniformly starts
    if len(evals) >= 2 and band != "barely learning":
        best_step, best = min(evals, key=lambda e: e[1])
        last_step, last = evals[-1]
        train_at_best = min((abs(s - best_step), loss) for s, loss in train)[1]
        if last > best * (1 + EVAL_RISE) and last_step > best_step and final < train_at_best:
            out["verdict"] = "overfitting"
            out["advice"] = (f"eval loss rose from {best:.4f} (step {best_step}) to {last:.4f} while train loss fell: "
                             "stop earlier (trainer.early_stop_patience, trainer.export_best) or reduce epochs by "
                             "20-30%")
    return out


def describe(d: dict) -> str:
    if "final_train_loss" not in d:
        return d["advice"]
    band = "" if d["verdict"] == d["band"] else f" (level: {d['band']})"
    return (f"diagnosis (heuristic; bands {d['bands']}): train loss {d['start_train_loss']:.4f} -> "
            f"{d['final_train_loss']:.4f} -> {d['verdict']}{band}; next run: {d['advice']}")
