"""The study's summary as Markdown tables (summary.md beside summary.json)."""

from __future__ import annotations

import numpy as np

from meml.study.spec import StudySpec
from meml.study.summary import METRICS


def _pm(entry: dict) -> str:
    if not entry["per_seed"]:
        return "-"
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}" if len(entry["per_seed"]) > 1 else f"{entry['mean']:.3f}"


def _difference_cells(c: dict) -> str:
    """'difference [low, high] | p | per seed' of a paired_difference entry."""
    per = ", ".join(f"{x:+.3f}" for x in c["per_seed"])
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | {c['p']:.3f} | {per}"


def _section(title: str, columns: list[str], rows: list[str]) -> list[str]:
    """A '## title' heading, a table with these columns and rows, and a blank line."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows, ""]


def _accuracy_row(name: str, lr: str, fig: dict, ev: dict) -> str:
    return f"| {name} | {lr} | {len(fig['seeds_done'])} | " + " | ".join(_pm(ev[m]) for m in METRICS) + " |"


def _start_cell(g: dict) -> str:
    rebuilt = g.get("rebuilt_start_seeds")
    return f"`{g['start']}`" + (f" (rebuilt: s{', s'.join(map(str, rebuilt))})" if rebuilt else "")


def markdown(spec: StudySpec, summary: dict) -> str:
    """The summary as Markdown tables (summary.md beside summary.json)."""
    label = spec.label
    lines = [
        f"# Study `{spec.name}`",
        "",
        f"Seeds {spec.seeds}; each arm's lr chosen on `{spec.selection.split}` (shared expert `{spec.shared_expert}`, "
        f"seeds {spec.selection_seeds}); accuracy is greedy, mean ± sd over seeds.",
        "",
    ]
    for eval_set in list(dict.fromkeys([*spec.report, *[e for e in spec.evaluation if e != spec.selection.split]])):
        rows = [
            _accuracy_row(f"stage 1 `{recipe}`", "-", fig, fig["eval"][eval_set])
            for recipe, fig in summary["stage1"].items()
            if fig["eval"].get(eval_set)
        ]
        rows += [
            _accuracy_row(fig["label"], "-" if fig["lr"] is None else f"{fig['lr']:.0e}", fig, fig["eval"][eval_set])
            for fig in summary["arms"].values()
            if fig["eval"].get(eval_set)
        ]
        columns = ["arm", "lr", "seeds", "shared", "any expert", "majority", "best expert (chosen on validation)"]
        lines += _section(f"`{eval_set}`", columns, rows)
    if summary["comparisons"]:
        columns = ["arm", "baseline", "set", "metric", "arm", "baseline", "difference [95% CI]", "p", "per seed"]
        rows = [
            f"| {label(c['arm'])} | {label(c['baseline'])} | {c['eval']} | {c['metric']} | "
            f"{c['arm_acc']:.3f} | {c['baseline_acc']:.3f} | {_difference_cells(c)} |"
            for c in summary["comparisons"]
        ]
        lines += _section("Paired comparisons", columns, rows)
    if summary.get("stage2_gains"):
        columns = ["arm", "start", "set", "start", "after stage 2", "gain [95% CI]", "p", "per seed"]
        rows = [
            f"| {label(g['arm'])} | {_start_cell(g)} | {g['eval']} | {g['start_acc']:.3f} | "
            f"{g['final_acc']:.3f} | {_difference_cells(g)} |"
            for g in summary["stage2_gains"]
        ]
        title = f"Stage 2's gain over its own stage-1 model (`{spec.shared_expert}`, paired by seed and question)"
        lines += _section(title, columns, rows)
    if summary.get("gain_comparisons"):
        columns = ["arm", "baseline", "set", "arm's gain", "baseline's gain", "difference [95% CI]", "p", "per seed"]
        rows = [
            f"| {label(c['arm'])} | {label(c['baseline'])} | {c['eval']} | {c['arm_gain']:+.3f} | "
            f"{c['baseline_gain']:+.3f} | {_difference_cells(c)} |"
            for c in summary["gain_comparisons"]
        ]
        title = "Stage-2 gains compared, for arms with different starts ((arm - start) - (baseline - start))"
        lines += _section(title, columns, rows)
    if summary.get("rebuilt_starts"):
        columns = ["model", "original", "set", "original", "rebuilt", "same score"]
        rows = [
            f"| {r['record']} | {r['original']} | {r['eval']} | {r['original_acc']:.3f} | {r['rebuilt_acc']:.3f} | "
            f"{r['same_score']} of {r['questions']} |"
            for r in summary["rebuilt_starts"]
        ]
        title = "Stage-1 models trained again (their run directory was lost; the gains above are measured against them)"
        lines += _section(title, columns, rows)
    rows = []
    for fig in summary["arms"].values():
        t = fig["train"]

        def f(key: str, fmt: str = "{:.3f}", t: dict = t) -> str:
            return fmt.format(t[key]) if isinstance(t.get(key), (int, float)) and not np.isnan(t[key]) else "-"

        rows.append(
            f"| {fig['label']} | {f('reward/mean')} | {f('all_wrong_frac_question')} | "
            f"{f('trained_sequences', '{:.1f}')} | "
            f"{f('iml/fired', '{:.2f}')} | {f('hsft/pushed', '{:.2f}')} | {f('step_time_s', '{:.1f}')} |"
        )
    columns = ["arm", "reward", "questions all wrong", "PG rows / step", "IML fired / step", "HSFT pushes / step"]
    lines += _section("Training (means over steps and seeds)", [*columns, "step s"], rows)
    return "\n".join(lines).rstrip("\n") + "\n"
