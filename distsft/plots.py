"""After the run (and for the plan): PNG curves, drawn with matplotlib's Agg backend (no display).

    curves.png   train loss and eval loss | learning rate | gradient norm, against the optimizer step
    (plan)       the LR schedule over the planned steps, when plan.lr_plot names a file
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless node
    import matplotlib.pyplot as plt

    return plt


TAGS = {"train_loss": "train/loss", "eval_loss": "eval/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}


def history_from_tensorboard(log_dir: Path) -> dict:
    """Every logged step of the run dir's TensorBoard events, across restarts (a step logged twice, as
    after a resume from an older checkpoint, keeps its latest value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(log_dir).is_dir():
        return {}
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    out = {}
    for key, tag in TAGS.items():
        if tag in have:
            latest = {}
            for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
                latest[e.step] = e.value
            out[key] = sorted(latest.items())
    return out


def training_curves(history: dict, path: Path) -> Path:
    """history: {"train_loss": [(step, v)], "eval_loss": [...], "lr": [...], "grad_norm": [...]}"""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = ((("train_loss", "train"), ("eval_loss", "eval")), (("lr", "learning rate"),),
              (("grad_norm", "gradient norm (before clipping)"),))
    for ax, series, title in zip(axes, panels, ("loss", "learning rate", "gradient norm")):
        for key, label in series:
            points = history.get(key) or []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lr_curve(points: list[tuple[int, float]], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    steps, lrs = zip(*points)
    ax.plot(steps, lrs)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
