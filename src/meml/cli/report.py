"""`meml report`: PNG plots and a self-contained HTML page per run and across runs.

    meml report RUN_DIR                        -> RUN_DIR/report/index.html and its PNGs
    meml report runs/grpo-1 runs/meml-1        -> each run's report, plus one page with both
                                                  runs on the same axes (--out, default
                                                  <parent of the first run>/report-grpo-1-vs-meml-1)

Everything comes from files a run writes: metrics.jsonl (per-step records of the stages
"sft" and "rl", and "eval" records), config.yaml, results.json, command.txt and
samples.jsonl; a missing file leaves its part of the page out. Each figure has one panel
per metric (per expert where the metric is per expert) and one line per run, coloured the
same in every figure. The page embeds every PNG (base64) and names its file; a table
gives the final figures of each run and the commands that produced it: the command line
as recorded in command.txt, and an equivalent `meml train` command rebuilt from
config.yaml (every setting that differs from the defaults), which reproduces the config
exactly even when command.txt is absent.

    meml report bench/results/study            -> a study's records (`meml compare`): its
                                                  summary.json, summary.md and plots/, redone
                                                  from the records and study.json alone
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
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


# ----------------------------------------------------------------------------- page


def _text(value) -> str:
    """Escaped for HTML, without the control characters a random model can emit."""
    return html.escape(re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", str(value)))


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)


def final_figures(run: Run, window: int = 10) -> dict[str, object]:
    """The figures of one run's final-figures table."""
    row: dict[str, object] = {
        "SFT steps": len(run.series("sft", "loss")[0]),
        "RL steps": len(run.series("rl", "loss")[0]),
    }
    for key in ("reward/mean", "zero_signal_frac", "completion_len", "tokens_per_s"):
        values = run.series("rl", key)[1][-window:]
        if values:
            row[f"{key} (last {len(values)} steps)"] = sum(values) / len(values)
    evaluation = run.last("eval")
    if evaluation:
        row["eval"] = f"{evaluation.get('tag')} (step {evaluation.get('step')})"
        for k in [f"acc/{e}" for e in run.experts] + ["acc/best", "acc/any", "acc/majority", "coverage/gain"]:
            if k in evaluation:
                row[k] = evaluation[k]
        if "best_expert" in evaluation:
            row["best expert"] = evaluation["best_expert"]
    return row


def _table(runs: list[Run]) -> str:
    rows = [final_figures(run) for run in runs]
    keys = list(dict.fromkeys(k for row in sorted(rows, key=len, reverse=True) for k in row))  # the fullest row's order
    head = "".join(f"<th>{_text(run.name)}</th>" for run in runs)
    body = "".join(
        f"<tr><th>{_text(k)}</th>" + "".join(f"<td>{_text(_fmt(row.get(k)))}</td>" for row in rows) + "</tr>"
        for k in keys
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _commands(run: Run) -> str:
    recorded = "".join(f"<pre>{_text(c)}</pre>" for c in run.commands) or "<p>(no command.txt in this run)</p>"
    try:
        rebuilt = f"<pre>{_text(equivalent_command(run.config))}</pre>" if run.config else "<p>(no config.yaml)</p>"
    except Exception as exc:  # an old or foreign config: show why instead of failing the report
        rebuilt = f"<p>(config.yaml could not be read back: {_text(exc)})</p>"
    return (
        f"<h3>{_text(run.name)} <small>{_text(run.path)}</small></h3><p>as run (command.txt):</p>{recorded}"
        f"<p>equivalent command, from config.yaml:</p>{rebuilt}"
    )


def _samples(run: Run, limit: int = 6) -> str:
    if not run.samples:
        return ""
    last = max(s.get("step", 0) for s in run.samples)
    items = [s for s in run.samples if s.get("step", 0) == last][:limit]
    rows = "".join(
        f"<tr><td>{_text(s.get('expert'))}</td><td>{_text(s.get('reward'))}</td><td><pre>{_text(s.get('completion'))}</pre></td></tr>"
        for s in items
    )
    head = "<tr><th>expert</th><th>reward</th><th>completion</th></tr>"
    return f"<h2>Sample completions, step {last}</h2><table>{head}{rows}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
pre{white-space:pre-wrap;margin:2px 0;font-size:12px}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#444}"""
# Marks the page once loaded: <body data-images-loaded="shown/total">; a broken image is easy to spot.
CHECK = """window.addEventListener("load",function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)
{if(i[k].complete&&i[k].naturalWidth>0){n++}else{i[k].alt="missing image: "+i[k].dataset.file}}
document.body.dataset.imagesLoaded=n+"/"+i.length;});"""


def write_page(runs: list[Run], plots: list[Plot], out: Path, title: str) -> Path:
    figures = []
    for p in plots:
        data = base64.b64encode((out / p.file).read_bytes()).decode()
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_text(p.title)}" data-file="{_text(p.file)}">'
            f'<figcaption><a href="{_text(p.file)}">{_text(p.file)}</a>: {_text(p.title)}</figcaption></figure>'
        )
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_text(title)}</title><style>{STYLE}</style>'
        f"<script>{CHECK}</script></head><body><h1>{_text(title)}</h1><h2>Final figures</h2>{_table(runs)}"
        f"<h2>Commands</h2>{''.join(_commands(r) for r in runs)}<h2>Plots</h2>{''.join(figures)}"
        f"{''.join(_samples(r) for r in runs) if len(runs) == 1 else ''}</body></html>"
    )
    path = out / "index.html"
    path.write_text(page)
    return path


def make_report(runs: list[Run], out: Path, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # a figure that has no data any more must not linger beside the page
    return write_page(runs, draw_plots(runs, out), out, title)


def report(run_dirs: list[str], out: str | None = None, names: list[str] | None = None) -> list[Path]:
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, names or [None] * len(paths))]
    seen: dict[str, int] = {}
    for run in runs:  # two runs called "r" become r and r-2
        seen[run.name] = seen.get(run.name, 0) + 1
        run.name += f"-{seen[run.name]}" if seen[run.name] > 1 else ""
    pages = [make_report([run], run.path / "report", f"meml report: {run.name}") for run in runs]
    if len(runs) > 1:
        target = Path(out) if out else paths[0].resolve().parent / ("report-" + "-vs-".join(r.name for r in runs))
        pages.append(make_report(runs, target, "meml report: " + " vs ".join(r.name for r in runs)))
    return pages


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="plots and an HTML page per run and across runs, or of a study's records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run directories (output_dir of meml train), or a study's records directory")
    p.add_argument("--out", default=None, help="directory of the page comparing the runs")
    p.add_argument("--names", default=None, help="comma-separated names for the runs, in order")
    p.set_defaults(func=_run)


def _run(ns) -> int:
    studies = [Path(r) for r in ns.runs if (Path(r) / "study.json").exists()]
    for records in studies:
        from meml.cli.compare import write_summary
        from meml.study.spec import study_from_json

        write_summary(study_from_json(records / "study.json", records))
    ns.runs = [r for r in ns.runs if Path(r) not in studies]
    if not ns.runs:
        return 0
    names = ns.names.split(",") if ns.names else None
    if names and len(names) != len(ns.runs):
        from meml.core.errors import ConfigError

        raise ConfigError(f"--names gives {len(names)} names for {len(ns.runs)} runs")
    for page in report(ns.runs, ns.out, names):
        print(f"wrote {page}")
    return 0
