"""How a meml RL step's time and peak memory grow: with the number of experts, with G, with length.

    python bench/scaling.py                  # all three sweeps (about an hour on a quiet 2-core machine)
    python bench/scaling.py --sweeps length --lengths 64,128,256,512
    python bench/scaling.py --sweeps settings   # the memory settings at the default shape
    python bench/scaling.py --plot-only      # redraw docs/img/scaling.png from bench/results/scaling.json
    python bench/scaling.py --questions 1 --total 4 --experts-list 1,2 --groups 2 --lengths 8,16 \\
        --steps 1 --warmup 0 --max-load 99 --out /tmp/scaling.json --plot /tmp/scaling.png   # smoke run

Three sweeps of the RL step on the default model (SmolLM2-135M-Instruct, transformers
rollouts, --questions questions a step), each point in its own process:
  experts  1, 2, 3, 4 experts at a fixed total of --total answers per question (G = total / E:
           12, 6, 4, 3 by default); experts 1-3 are the default job's, the 4th an extra prompt
  group    G in --groups at 3 experts (3 x G answers per question)
  length   completion length in --lengths (64-512) at 3 experts x G = 4
  settings the default shape (3 experts x G = 4, 128 tokens) under the memory settings in
           SETTINGS: what activation checkpointing and smaller micro-batches cost in step time
           for what they save in peak RSS
A point that appears in more than one sweep (3 experts x G = 4 x 128 tokens is in all four)
is measured once.
Lengths are forced: every completion runs to exactly max_new_tokens (stop tokens masked
until then, bench/common.py:force_lengths), so the length on the x axis is the length that
was measured, and every sequence is trained (zero-advantage ones included) with IML and HSFT
off, so a step's work depends on its shape alone, not on which answers happened to be right
(--with-iml-hsft puts them back; their rows then vary from run to run). Per point: step time
(mean, sd, min, max over the steps after --warmup), its generation and update parts, tokens
generated and trained, and the process's peak RSS (os.wait4; model and optimizer included).

How to read it: within a sweep the work grows as the x value does: generation by the tokens
sampled (and, for experts, by the number of distinct prompts: E per question), the update by
the tokens trained; a line bending upward means a cost growing faster than the tokens
(attention is quadratic in length; the KV cache and the logits grow with rows x length).
Step times need a quiet machine (the driver waits for a 1-minute load below --max-load);
peak RSS does not. Writes bench/results/scaling.json and docs/img/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    emit,
    force_lengths,
    machine,
    meml_steps,
    rl_only_overrides,
    run_child,
    spread,
    wait_for_quiet,
)

FOURTH_EXPERT = {
    "name": "estimator",
    "system_prompt": "You are an estimator. Guess the size of the result first, then work it out exactly, "
    "compare the two, then give the final answer.",
    "trace_source": "prose",
}


# memory settings (the `settings` sweep), each a list of overrides on top of the point's shape
SETTINGS = {
    "default": [],
    "micro2048": ["train.micro_batch_tokens=2048"],
    "micro1024": ["train.micro_batch_tokens=1024"],
    "checkpointing": ["model.gradient_checkpointing=true"],
    "low_memory": [
        "model.gradient_checkpointing=true",
        "train.micro_batch_tokens=2048",
        "train.logit_chunk_tokens=512",
    ],
}


def points(args) -> list[dict]:
    out = []
    sweeps = args.sweeps.split(",")
    if "experts" in sweeps:
        for e in map(int, args.experts_list.split(",")):
            if args.total % e:
                raise SystemExit(f"--total {args.total} is not divisible by {e} experts")
            out.append({"sweep": "experts", "x": e, "experts": e, "group": args.total // e, "length": args.length})
    if "group" in sweeps:
        for g in map(int, args.groups.split(",")):
            out.append({"sweep": "group", "x": g, "experts": 3, "group": g, "length": args.length})
    if "length" in sweeps:
        for n in map(int, args.lengths.split(",")):
            out.append({"sweep": "length", "x": n, "experts": 3, "group": args.length_group, "length": n})
    if "settings" in sweeps:
        for name in args.settings.split(","):
            if name not in SETTINGS:
                raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
            out.append({"sweep": "settings", "x": name, "experts": 3, "group": 4, "length": args.length})
    for p in out:
        p.setdefault("settings", "default")
        if p["sweep"] == "settings":
            p["settings"] = p["x"]
    return out


# ----------------------------------------------------------------------------- one point (child)


def child(args) -> dict:
    from meml.core.config import ExpertConfig

    out = tempfile.mkdtemp(prefix="scaling-")
    overrides = (
        rl_only_overrides(
            out,
            args.seed,
            args.steps,
            args.questions,
            args.group,
            args.length,
            **{
                "algo.iml.enabled": str(args.with_iml_hsft).lower(),
                "algo.hsft.enabled": str(args.with_iml_hsft).lower(),
            },
        )
        + SETTINGS[args.settings]
    )

    def set_experts(cfg) -> None:
        experts = [*cfg.experts, ExpertConfig(**FOURTH_EXPERT)]
        cfg.experts = experts[: args.experts]

    run = meml_steps("meml", overrides, skip_zero=False, on_session=force_lengths, edit_config=set_experts)
    run["point"] = {"experts": args.experts, "group": args.group, "length": args.length, "settings": args.settings}
    return run


def summarize(run: dict, warmup: int) -> dict:
    measured = [st for st in run["steps"] if st["step"] > warmup] or run["steps"]
    times = [st["time_s"] for st in measured]

    def avg(key):
        return statistics.fmean(st["metrics"].get(key, 0.0) for st in measured)

    return {
        "measured_steps": len(measured),
        "step_time_s": spread(times),
        "generate_s": statistics.fmean(st["parts"].get("generate", 0.0) for st in measured),
        "update_s": avg("time/update_s"),
        "completion_tokens": statistics.fmean(st["completion_tokens"] for st in measured),
        "sequences": statistics.fmean(st["sequences"] for st in measured),
        "trained_tokens": statistics.fmean(
            sum(v for k, v in st["counts"].items() if k.startswith("train_tokens/")) for st in measured
        ),
        "peak_rss_mb": run["peak_rss_mb"],
    }


# ----------------------------------------------------------------------------- driver and plot


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in ("experts", "group", "length", "settings") if any(p["sweep"] == s for p in report["points"])]
    titles = {
        "experts": f"experts (total {report['config']['total']} answers / question)",
        "group": "G (answers per expert, 3 experts)",
        "length": f"completion length (3 experts x G={report['config']['length_group']})",
        "settings": "memory settings (3 experts x G=4)",
    }
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        pts = [p for p in report["points"] if p["sweep"] == sweep and "summary" in p]
        if sweep != "settings":
            pts.sort(key=lambda p: p["x"])
        labels = [str(p["x"]) for p in pts]
        xs = list(range(len(pts))) if sweep == "settings" else [p["x"] for p in pts]
        sm = [p["summary"] for p in pts]
        means, sds = [s["step_time_s"]["mean"] for s in sm], [s["step_time_s"]["sd"] for s in sm]
        ax.errorbar(xs, means, yerr=sds, marker="o", label="step")
        ax.plot(xs, [s["generate_s"] for s in sm], marker="s", ls="--", label="generation")
        ax.plot(xs, [s["update_s"] for s in sm], marker="^", ls=":", label="update")
        ax.set_xlabel(titles[sweep])
        ax.set_ylabel("seconds per step")
        ax.set_ylim(bottom=0)
        if sweep == "length":
            ax.set_xscale("log", base=2)
        mem = ax.twinx()
        mem.plot(xs, [s["peak_rss_mb"] / 1024 for s in sm], color="grey", marker="x", label="peak RSS")
        mem.set_ylabel("peak RSS (GB)", color="grey")
        mem.set_ylim(bottom=0)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8 if sweep == "settings" else None)
        if ax is axes[0][0]:
            lines = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
            ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="upper left")
    fig.suptitle(f"meml RL step, {report['config']['questions']} questions a step, forced lengths")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", default="experts,group,length,settings")
    parser.add_argument("--questions", type=int, default=4, help="questions per RL step")
    parser.add_argument("--total", type=int, default=12, help="answers per question in the experts sweep")
    parser.add_argument("--experts-list", default="1,2,3,4")
    parser.add_argument("--groups", default="2,4,8", help="G values at 3 experts")
    parser.add_argument("--lengths", default="64,128,256,512")
    parser.add_argument("--length", type=int, default=128, help="completion length outside the length sweep")
    parser.add_argument("--length-group", type=int, default=4, help="G in the length sweep")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="memory settings in the settings sweep")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-iml-hsft", action="store_true", help="keep IML and HSFT on (rows then vary)")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--wait-s", type=float, default=900)
    parser.add_argument("--out", default=str(RESULTS_DIR / "scaling.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "scaling.png"))
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--experts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--group", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(child(args))
        return 0
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.read_text()), Path(args.plot))
        return 0
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "experts", "group")},
        "machine": machine(),
        "points": [],
    }
    measured: dict[tuple, dict] = {}  # (experts, group, length, settings) -> its result, shared by sweeps
    for p in points(args):
        key = (p["experts"], p["group"], p["length"], p["settings"])
        if key in measured:
            report["points"].append({**p, **measured[key], "same_as": list(key)})
            continue
        argv = [
            *("--child", "--experts", str(p["experts"]), "--group", str(p["group"]), "--length", str(p["length"])),
            *("--settings", p["settings"]),
            *("--questions", str(args.questions), "--steps", str(args.steps), "--seed", str(args.seed)),
            *(["--with-iml-hsft"] if args.with_iml_hsft else []),
        ]
        wait_for_quiet(args.max_load, args.wait_s)
        shape = f"{p['experts']} experts x G={p['group']}, {p['length']} tokens, {p['settings']}"
        label = f"{p['sweep']}={p['x']} ({shape})"
        try:
            run = run_child([sys.executable, __file__, *argv], label=label)
        except SystemExit as exc:
            report["points"].append({**p, "error": str(exc)})
            continue
        sm = summarize(run, args.warmup)
        measured[key] = {"summary": sm, "steps": run["steps"], "load_1m": run["load_1m"]}
        report["points"].append({**p, **measured[key]})
        print(
            f"   step {sm['step_time_s']['mean']:.1f} s (sd {sm['step_time_s']['sd']:.1f}; generate "
            f"{sm['generate_s']:.1f}, update {sm['update_s']:.1f}), {sm['completion_tokens']:.0f} tokens, "
            f"peak RSS {sm['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    plot(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
