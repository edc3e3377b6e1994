"""Plots of a study summary (PNG): accuracy per arm, paired differences, the lr grids.

accuracy_<set>.png     per metric, each arm's mean (bar) and every seed (dots)
differences.png        each comparison's paired difference with its interval
lr_grid.png            selection-split accuracy of the shared expert against the lr
"""

from __future__ import annotations

from pathlib import Path

from meml.study.summary import METRICS

NAMES = {
    "shared": "shared expert",
    "any": "any expert correct",
    "majority": "majority vote",
    "best_val": "best expert (chosen on validation)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(summary: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    sets = list(dict.fromkeys([*summary["report"], *[s for a in summary["arms"].values() for s in a["eval"]]]))
    for eval_set in sets:
        if eval_set == summary["selection"]["split"]:
            continue
        paths.append(accuracy_plot(summary, eval_set, out / f"accuracy_{eval_set}.png"))
    if summary["comparisons"]:
        paths.append(differences_plot(summary, out / "differences.png"))
    if any(len(a["grid"]) > 1 for a in summary["arms"].values()):
        paths.append(lr_plot(summary, out / "lr_grid.png"))
    return paths


def accuracy_plot(summary: dict, eval_set: str, path: Path) -> Path:
    plt = _plt()
    rows = [(f"stage 1: {k}", v) for k, v in summary["stage1"].items()] + [
        (v["label"], v) for v in summary["arms"].values()
    ]
    rows = [(name, v["eval"][eval_set]) for name, v in rows if eval_set in v["eval"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 0.45 * len(rows) + 1.6), sharey=True)
    for ax, metric in zip(axes, METRICS):
        for y, (_, ev) in enumerate(rows):
            m = ev[metric]
            if m["per_seed"]:
                ax.barh(y, m["mean"], color="tab:blue" if y >= len(summary["stage1"]) else "tab:gray", alpha=0.5)
                ax.plot(m["per_seed"], [y] * len(m["per_seed"]), "k.", ms=5)
        ax.set_title(NAMES[metric], fontsize=10)
        ax.set_xlabel(f"{eval_set} accuracy")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [name for name, _ in rows])
    axes[0].invert_yaxis()
    fig.suptitle(
        f"{summary['study']}: greedy accuracy on '{eval_set}' (bar: mean over seeds, dots: seeds)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def differences_plot(summary: dict, path: Path) -> Path:
    plt = _plt()
    comps = summary["comparisons"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(comps) + 1.5))
    labels = []
    for y, c in enumerate(comps):
        color = "tab:green" if c["low"] > 0 else "tab:red" if c["high"] < 0 else "tab:gray"
        ax.plot([c["low"], c["high"]], [y, y], color=color, lw=2)
        ax.plot([c["diff"]], [y], "o", color=color)
        arm = summary["arms"][c["arm"]]["label"]
        base = summary["arms"][c["baseline"]]["label"]
        labels.append(f"{arm} - {base} ({c['eval']}, {c['metric']})")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(comps)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference in accuracy (95% two-way bootstrap over seeds and questions)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lr_plot(summary: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in summary["arms"].values():
        points = [(float(lr), sum(v.values()) / len(v)) for lr, v in arm["grid"].items() if v and lr != "default"]
        if len(points) > 1:
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=arm["label"])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"{summary['selection']['split']} {summary['selection']['metric']}")
    ax.set_title("learning-rate selection (on the validation split only)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
