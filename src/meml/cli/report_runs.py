"""What `meml report` reads and draws of a run: its records (metrics.jsonl, config.yaml,
results.json, command.txt, samples.jsonl), an equivalent `meml train` command, the plots."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    config: dict
    results: dict
    commands: list[str]
    samples: list[dict]

    @property
    def experts(self) -> list[str]:
        return [e["name"] for e in self.config.get("experts", [])]

    def series(self, stage: str, key: str) -> tuple[list[int], list[float]]:
        rows = [
            (self._x(r), r[key])
            for r in self.records
            if r.get("stage") == stage and isinstance(r.get(key), (int, float))
        ]
        return [s for s, _ in rows], [float(v) for _, v in rows]

    def _x(self, record: dict) -> int:
        """Eval records sit on the RL axis; "before" moves to -1 when "after_mef" holds step 0."""
        if (
            record.get("stage") == "eval"
            and record.get("tag") == "before"
            and any(r.get("stage") == "eval" and r.get("tag") == "after_mef" for r in self.records)
        ):
            return -1
        return record["step"]

    def last(self, stage: str) -> dict:
        return next((r for r in reversed(self.records) if r.get("stage") == stage), {})


def _eval_axis(runs: list) -> str:
    two_evals = any(r.get("tag") == "after_mef" for run in runs for r in run.records if r.get("stage") == "eval")
    return "RL step (-1: before stage 1, 0: after it)" if two_evals else "RL step"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def load_run(path: Path, name: str | None = None) -> Run:
    if not (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{path} has no metrics.jsonl: is it a run directory (the output_dir of meml train)?")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
    results = json.loads((path / "results.json").read_text()) if (path / "results.json").exists() else {}
    commands = (path / "command.txt").read_text().splitlines() if (path / "command.txt").exists() else []
    return Run(
        name or path.resolve().name,
        path,
        _read_jsonl(path / "metrics.jsonl"),
        config or {},
        results,
        commands,
        _read_jsonl(path / "samples.jsonl"),
    )


# ----------------------------------------------------------------------------- commands


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "task.options":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _value(v) -> str:
    """An override's value: plain where YAML reads it back unchanged, else JSON (valid YAML)."""
    try:
        if isinstance(v, str) and v and yaml.safe_load(v) == v:
            return v
    except yaml.YAMLError:
        pass
    return json.dumps(v)


def equivalent_command(config: dict, subcommand: str = "train") -> str:
    """`meml train` with every setting of `config` that differs from the defaults."""
    from meml.core.config import Config
    from meml.core.load import from_dict, to_dict

    resolved, default = _flat(to_dict(from_dict(config))), _flat(to_dict(Config()))
    overrides = [f"{k}={_value(v)}" for k, v in resolved.items() if default.get(k) != v]
    return shlex.join(["meml", subcommand, *overrides])


# ----------------------------------------------------------------------------- plots


@dataclass
class Plot:
    file: str
    title: str
    panels: list[str] = field(default_factory=list)
    drawn: dict[str, list[str]] = field(default_factory=dict)  # panel -> runs drawn on it


def figure_specs(runs: list[Run]) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """(file, title, stage, [(panel title, metric key)]) for every figure worth drawing."""
    experts = list(dict.fromkeys(e for run in runs for e in run.experts))
    per_expert = [(f"{e}", e) for e in experts]
    return [
        (
            "reward.png",
            "RL reward per expert",
            "rl",
            [("mean", "reward/mean"), *((t, f"reward/{e}") for t, e in per_expert)],
        ),
        (
            "zero_signal.png",
            "Zero-signal groups (all rewards equal)",
            "rl",
            [("all groups", "zero_signal_frac"), *((t, f"zero_signal/{e}") for t, e in per_expert)],
        ),
        (
            "iml.png",
            "Inter-expert mutual learning",
            "rl",
            [("IML loss", "iml/loss"), ("questions where IML fired", "iml/fired")],
        ),
        (
            "hsft.png",
            "Hard-example SFT buffer",
            "rl",
            [("flushes (cumulative)", "hsft/flushes"), ("items in buffer", "hsft/buffer")],
        ),
        (
            "eval_accuracy.png",
            "Held-out greedy accuracy",
            "eval",
            [
                *((t, f"acc/{e}") for t, e in per_expert),
                ("best expert", "acc/best"),
                ("any expert", "acc/any"),
                ("majority vote", "acc/majority"),
            ],
        ),
        (
            "coverage.png",
            "Compute-matched coverage: N experts x k vs best single x N*k",
            "eval",
            [
                ("mixture", "coverage/mixture"),
                ("best single expert", "coverage/best"),
                ("gain (95% bootstrap band)", "coverage/gain"),
            ],
        ),
        (
            "entropy.png",
            "Policy entropy on trained answers (nats/token)",
            "rl",
            [(t, f"entropy/{e}") for t, e in per_expert],
        ),
        (
            "budget.png",
            "Adaptive expert budget: answers per question and success average",
            "rl",
            [
                *((f"{t}: answers", f"budget/{e}") for t, e in per_expert),
                *((f"{t}: success", f"budget/success/{e}") for t, e in per_expert),
            ],
        ),
        (
            "dynamic.png",
            "Dynamic sampling",
            "rl",
            [
                ("refill rounds", "dynamic/rounds"),
                ("extra rollouts", "dynamic/extra_rollouts"),
                ("dropped groups", "dynamic/dropped_groups"),
                ("informative groups", "dynamic/informative_groups"),
            ],
        ),
        (
            "overlong.png",
            "Length limit",
            "rl",
            [("answers cut at the limit", "truncated_frac"), ("overlong penalty (mean)", "reward/overlong")],
        ),
        ("completion_len.png", "Completion length (tokens)", "rl", [("mean completion length", "completion_len")]),
        ("tokens_per_s.png", "Throughput (tokens/s)", "rl", [("RL", "tokens_per_s")]),
        ("loss.png", "Training loss", "rl", [("RL loss", "loss")]),
        ("sft_loss.png", "Stage 1 (MEF) SFT loss", "sft", [("SFT loss", "loss"), ("SFT tokens/s", "tokens_per_s")]),
    ]


def draw_plots(runs: list[Run], out: Path) -> list[Plot]:
    """One PNG per figure with data; every run on the same axes, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    markers = "os^Dv<>p"  # and a marker per run, so runs that coincide stay visible
    plots = []
    for file, title, stage, panels in figure_specs(runs):
        panels = [(t, k) for t, k in panels if any(run.series(stage, k)[0] for run in runs)]
        if not panels:
            continue
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 3.0 * rows + 0.4), squeeze=False)
        plot = Plot(file, title, [t for t, _ in panels])
        for ax, (panel, key) in zip(axes.flat, panels):
            for i, run in enumerate(runs):
                steps, values = run.series(stage, key)
                if steps:
                    ax.plot(
                        steps,
                        values,
                        marker=markers[i % len(markers)],
                        markersize=4,
                        linewidth=1.5,
                        alpha=0.85,
                        color=colours(i % 10),
                        label=run.name,
                    )
                    plot.drawn.setdefault(panel, []).append(run.name)
                    low, high = run.series(stage, f"{key}_low"), run.series(stage, f"{key}_high")
                    if low[0] and low[0] == high[0] == steps:  # an interval logged beside the value
                        ax.fill_between(steps, low[1], high[1], color=colours(i % 10), alpha=0.15, linewidth=0)
            if key.startswith(("acc/", "zero_signal", "coverage/mixture", "coverage/best")):
                ax.set_ylim(-0.03, 1.03)  # fractions: the whole range, so runs compare at a glance
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel(f"{stage} step" if stage != "eval" else _eval_axis(runs))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(out / file, dpi=90)
        plt.close(fig)
        plots.append(plot)
    return plots
