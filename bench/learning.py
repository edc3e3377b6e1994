"""Learning efficiency: MEML-GRPO against GRPO and Dr.GRPO at the same rollout budget, on a task
where SmolLM2-135M still fails most questions after stage 1.

    nohup .venv-vllm/bin/python bench/learning.py run > runs/learning/log.txt 2>&1 &   # hours on 2 cores
    python bench/learning.py plot          # bench/results/learning.json + docs/img/learning_*.png
    python bench/learning.py run --seeds 0 --arms meml --steps 2 --eval-every 1 --eval-questions 4 \
        --sft-examples 8 --backend hf --root /tmp/learn-smoke   # smoke run

`run` works through a list of jobs, one process at a time, and skips the ones already done
(a job's directory with results.json), so it can be stopped and started again:
  1. stage 1 once per (variant, seed), or once per variant with --sft-seed (every RL seed then
     starts from the same checkpoint, so the spread over seeds is stage 2's alone):
     `meml sft meml` (MEF on every expert's traces) and
     `meml sft grpo` (SFT on the tutor expert's traces, the ExpertX-SFT start of GRPO);
  2. stage 2 from those checkpoints (model.name_or_path=<run>/checkpoints/sft-*/model,
     sft.enabled=false), per seed:
       meml             MEML-GRPO, 3 experts x 4 answers, IML and HSFT      (from MEF)
       grpo, dr_grpo    one expert x 12 answers                             (from tutor SFT)
       moe_sft_grpo, moe_sft_dr_grpo   3 experts x 4, no IML/HSFT          (from MEF: isolates stage 2)
       no_hsft          MEML-GRPO without the hard-example buffer           (from MEF)
     Every arm samples 12 answers per question, with the same questions per step (same
     seed) and the same settings otherwise; held-out greedy accuracy on the same
     --eval-questions test questions before RL, every --eval-every steps and at the end.
Run directories go under --root (default runs/learning, git-ignored); checkpoints stay there.
Every job imports a copy of src/ taken when `run` first starts (--root/src-snapshot, its commit
in src-snapshot.txt), so edits to the working tree during the hours of runs change nothing.
`plot` reads their metrics.jsonl and writes mean and spread over seeds per arm: held-out
accuracy (best expert, the tutor expert all arms share, any expert), per-expert accuracy
of the multi-expert arms, training reward and zero-signal fraction per step, plus MEML's
IML firings, rescued questions and HSFT flushes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, spread, write_json  # noqa: E402

ARMS = {  # arm: (preset, answers per (question, expert), stage-1 variant)
    "meml": ("meml", 4, "mef"),
    "grpo": ("grpo", 12, "tutor"),
    "dr_grpo": ("dr_grpo", 12, "tutor"),
    "moe_sft_grpo": ("moe_sft_grpo", 4, "mef"),
    "moe_sft_dr_grpo": ("moe_sft_dr_grpo", 4, "mef"),
    "no_hsft": ("no_hsft", 4, "mef"),
}
SFT_PRESET = {"mef": "meml", "tutor": "grpo"}
LABELS = {
    "meml": "MEML-GRPO (3x4)",
    "grpo": "GRPO (1x12)",
    "dr_grpo": "Dr.GRPO (1x12)",
    "moe_sft_grpo": "MoE-SFT + GRPO (3x4)",
    "moe_sft_dr_grpo": "MoE-SFT + Dr.GRPO (3x4)",
    "no_hsft": "MEML-GRPO without HSFT (3x4)",
}
COLORS = {
    "meml": "tab:red",
    "grpo": "tab:blue",
    "dr_grpo": "tab:green",
    "moe_sft_grpo": "tab:purple",
    "moe_sft_dr_grpo": "tab:olive",
    "no_hsft": "tab:orange",
}


def common_overrides(args, seed: int) -> list[str]:
    return [
        f"seed={seed}",
        f"task.options.difficulty={args.difficulty}",
        f"task.max_eval_examples={args.eval_questions}",
        f"rollout.backend={args.backend}",
        "log.progress=false",
        "checkpoint.keep_last=1",
    ]


def sft_dir(args, variant: str, seed: int) -> Path:
    return Path(args.root) / f"sft-{variant}-s{seed}"


def sft_model(args, variant: str, seed: int) -> Path:
    found = sorted((sft_dir(args, variant, seed) / "checkpoints").glob("sft-*/model"))
    if not found:
        raise SystemExit(f"no stage-1 checkpoint in {sft_dir(args, variant, seed)}")
    return found[-1]


def sft_seeds(args, seeds: list[int]) -> list[int]:
    """Stage 1 per RL seed, or once (--sft-seed) with every RL seed starting from it."""
    return seeds if args.sft_seed is None else [args.sft_seed]


def jobs(args) -> list[tuple[Path, list[str]]]:
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = args.arms.split(",")
    out = []
    variants = sorted({ARMS[a][2] for a in arms})
    for seed in sft_seeds(args, seeds):
        for variant in variants:
            d = sft_dir(args, variant, seed)
            out.append(
                (
                    d,
                    [
                        "sft",
                        SFT_PRESET[variant],
                        f"output_dir={d}",
                        "eval.after=true",
                        "eval.before=false",
                        f"sft.max_examples={args.sft_examples}",
                        *common_overrides(args, seed),
                    ],
                )
            )
    for seed in seeds:
        for arm in arms:
            preset, group, variant = ARMS[arm]
            d = Path(args.root) / f"{arm}-s{seed}"
            out.append(
                (
                    d,
                    [
                        "train",
                        preset,
                        f"output_dir={d}",
                        "sft.enabled=false",
                        f"train.steps={args.steps}",
                        f"train.questions_per_step={args.questions}",
                        f"rollout.num_generations_per_expert={group}",
                        f"optim.lr={args.lr}",
                        f"eval.every_steps={args.eval_every}",
                        "eval.before=true",
                        "eval.after=true",
                        *common_overrides(args, seed),
                        (variant, seed if args.sft_seed is None else args.sft_seed),
                    ],
                )
            )
    return out


def snapshot_source(root: Path) -> dict:
    """A copy of src/ that every job imports (PYTHONPATH), taken at the first start: runs that
    take hours must not pick up edits made to the working tree meanwhile."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    snap = root / "src-snapshot"
    if not snap.exists():
        shutil.copytree(REPO / "src", snap, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (root / "src-snapshot.txt").write_text(f"{commit}{' (with uncommitted changes in src/)' if dirty else ''}\n")
    return {"PYTHONPATH": str(snap)}


def run(args) -> int:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **snapshot_source(root)}
    print(f"source: {root / 'src-snapshot'} = {(root / 'src-snapshot.txt').read_text().strip()}", flush=True)
    meml = str(Path(sys.executable).parent / "meml")
    for d, argv in jobs(args):
        if args.only_sft and argv[0] != "sft":
            continue
        if (d / "results.json").exists():
            print(f"done already: {d}", flush=True)
            continue
        if d.exists():
            shutil.rmtree(d)  # an interrupted job of ours: start it again
        argv = [a if not isinstance(a, tuple) else f"model.name_or_path={sft_model(args, *a)}" for a in argv]
        print(f"{time.strftime('%H:%M:%S')} {' '.join(['meml', *argv])}", flush=True)
        t0 = time.time()
        proc = subprocess.run([meml, *argv], cwd=REPO, capture_output=True, text=True, env=env)
        d.mkdir(parents=True, exist_ok=True)
        (d / "stdout.txt").write_text(proc.stdout[-20000:] + "\n--- stderr\n" + proc.stderr[-20000:])
        print(f"   exit {proc.returncode} after {time.time() - t0:.0f}s", flush=True)
        if proc.returncode:
            print(proc.stderr[-3000:], flush=True)
            return proc.returncode
    return 0


# ----------------------------------------------------------------------------- plot


def read_run(d: Path) -> dict:
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "rl": [r for r in recs if r.get("stage") == "rl"],
        "eval": [r for r in recs if r.get("stage") == "eval"],
        "config": (d / "config.yaml").read_text() if (d / "config.yaml").exists() else "",
    }


def spread_of(values: list[float]) -> dict:
    return {**spread(values), "values": values}


def plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(args.root)
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if any((root / f"{a}-s{s}" / "results.json").exists() for s in seeds)]
    runs = {
        a: {s: read_run(root / f"{a}-s{s}") for s in seeds if (root / f"{a}-s{s}" / "results.json").exists()}
        for a in arms
    }
    summary: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "arms": {}}
    sft = {}
    for variant in ("mef", "tutor"):
        for s in seeds:
            p = sft_dir(args, variant, s) / "results.json"
            if p.exists():
                sft.setdefault(variant, {})[s] = json.loads(p.read_text()).get("after", {})
    summary["stage1"] = sft

    def eval_curve(arm: str, key: str) -> tuple[list[int], list[list[float]]]:
        steps = sorted({r["step"] for s in runs[arm] for r in runs[arm][s]["eval"]})
        table = [
            [next((r.get(key) for r in runs[arm][s]["eval"] if r["step"] == st), float("nan")) for s in runs[arm]]
            for st in steps
        ]
        return steps, table

    def rl_curve(arm: str, key: str) -> tuple[list[int], list[list[float]]]:
        steps = sorted({r["step"] for s in runs[arm] for r in runs[arm][s]["rl"]})
        return steps, [
            [
                next((r.get(key, float("nan")) for r in runs[arm][s]["rl"] if r["step"] == st), float("nan"))
                for s in runs[arm]
            ]
            for st in steps
        ]

    def band(ax, steps, table, arm, smooth: int = 1):
        import numpy as np

        a = np.array(table, dtype=float)  # (steps, seeds)
        if smooth > 1:
            kernel = np.ones(smooth) / smooth
            a = np.stack(
                [np.convolve(np.pad(col, (smooth - 1, 0), mode="edge"), kernel, mode="valid") for col in a.T], axis=1
            )
        m, lo, hi = np.nanmean(a, 1), np.nanmin(a, 1), np.nanmax(a, 1)
        ax.plot(
            steps,
            m,
            color=COLORS[arm],
            label=f"{LABELS[arm]} (n={a.shape[1]})",
            marker="o" if len(steps) < 15 else None,
            ms=3,
        )
        ax.fill_between(steps, lo, hi, color=COLORS[arm], alpha=0.12)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, key, title in zip(
        axes,
        ("acc/best", "acc/tutor", "acc/any"),
        (
            "held-out accuracy, best expert",
            "held-out accuracy, tutor expert (shared by all arms)",
            "held-out, any expert correct",
        ),
    ):
        for arm in arms:
            band(ax, *eval_curve(arm, key), arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"greedy accuracy ({args.eval_questions} questions)")
    axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds (line) and min-max (band)", fontsize=9)
    fig.tight_layout()
    img = REPO / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig.savefig(img / "learning_accuracy.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for arm in arms:
        band(axes[0], *rl_curve(arm, "zero_signal_frac"), arm, smooth=args.smooth)
        band(axes[1], *rl_curve(arm, "zero_signal_frac_question"), arm, smooth=args.smooth)
        band(axes[2], *rl_curve(arm, "reward/mean"), arm, smooth=args.smooth)
    axes[0].set_title("zero-signal fraction of groups (a group: 4 answers in 3x4, 12 in 1x12)", fontsize=9)
    axes[1].set_title("questions with all 12 answers wrong (same for every arm)", fontsize=9)
    axes[2].set_title("training reward", fontsize=9)
    fig.suptitle(f"{args.smooth}-step moving mean over seeds (line) and min-max (band)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "learning_zero_signal.png", dpi=90)
    plt.close(fig)

    multi = [a for a in arms if ARMS[a][2] == "mef"]
    if multi:
        fig, axes = plt.subplots(1, len(multi), figsize=(5.2 * len(multi), 4), squeeze=False)
        for ax, arm in zip(axes[0], multi):
            import numpy as np

            for expert, color in zip(("tutor", "algebraist", "checker"), ("tab:blue", "tab:orange", "tab:green")):
                steps, table = eval_curve(arm, f"acc/{expert}")
                a = np.array(table, dtype=float)
                ax.plot(steps, np.nanmean(a, 1), color=color, label=expert, marker="o", ms=3)
                ax.fill_between(steps, np.nanmin(a, 1), np.nanmax(a, 1), color=color, alpha=0.12)
            ax.set_title(f"{LABELS[arm]}: held-out accuracy per expert", fontsize=10)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "learning_per_expert.png", dpi=90)
        plt.close(fig)

    for arm in arms:
        per_seed = {}
        for s, r in runs[arm].items():
            ev = sorted(r["eval"], key=lambda x: x["step"])
            first, last = ev[0], ev[-1]
            per_seed[s] = {
                "start": {k: first.get(k) for k in ("acc/best", "acc/tutor", "acc/any", "acc/majority")},
                "final": {k: last.get(k) for k in ("acc/best", "acc/tutor", "acc/any", "acc/majority")},
                "final_best_expert": last.get("best_expert"),
                "mean_eval_acc_best": sum(e["acc/best"] for e in ev) / len(ev),
                "zero_signal_frac": sum(x["zero_signal_frac"] for x in r["rl"]) / len(r["rl"]),
                "zero_signal_frac_question": sum(x.get("zero_signal_frac_question", float("nan")) for x in r["rl"])
                / len(r["rl"]),
                "zero_signal_first5": sum(x["zero_signal_frac"] for x in r["rl"][:5]) / max(1, len(r["rl"][:5])),
                "zero_signal_last5": sum(x["zero_signal_frac"] for x in r["rl"][-5:]) / max(1, len(r["rl"][-5:])),
                "reward": sum(x["reward/mean"] for x in r["rl"]) / len(r["rl"]),
                "trained_sequences_per_step": sum(x.get("trained_sequences", 0) for x in r["rl"]) / len(r["rl"]),
                "iml_fired_per_step": sum(x.get("iml/fired", 0) for x in r["rl"]) / len(r["rl"]),
                "rescued_per_step": sum(x.get("rescued", 0) for x in r["rl"]) / len(r["rl"]),
                "hsft_flushes": r["rl"][-1].get("hsft/flushes", 0),
                "completion_len": sum(x["completion_len"] for x in r["rl"]) / len(r["rl"]),
                "truncated_frac": sum(x["truncated_frac"] for x in r["rl"]) / len(r["rl"]),
                "step_time_s": sum(x["step_time_s"] for x in r["rl"]) / len(r["rl"]),
                "steps": len(r["rl"]),
            }
        agg = {}
        for key in (
            "mean_eval_acc_best",
            "zero_signal_frac",
            "zero_signal_frac_question",
            "zero_signal_first5",
            "zero_signal_last5",
            "reward",
            "trained_sequences_per_step",
            "iml_fired_per_step",
            "rescued_per_step",
            "hsft_flushes",
            "completion_len",
            "truncated_frac",
        ):
            agg[key] = spread_of([v[key] for v in per_seed.values()])
        for which in ("start", "final"):
            for k in ("acc/best", "acc/tutor", "acc/any", "acc/majority"):
                vals = [v[which][k] for v in per_seed.values() if v[which][k] is not None]
                if vals:
                    agg[f"{which}/{k}"] = spread_of(vals)
        gains = [v["final"]["acc/best"] - v["start"]["acc/best"] for v in per_seed.values()]
        agg["gain/acc/best"] = spread_of(gains)
        gains_t = [
            v["final"]["acc/tutor"] - v["start"]["acc/tutor"]
            for v in per_seed.values()
            if v["final"]["acc/tutor"] is not None
        ]
        if gains_t:
            agg["gain/acc/tutor"] = spread_of(gains_t)
        summary["arms"][arm] = {"per_seed": per_seed, "over_seeds": agg}
    write_json("learning.json", summary)
    print(
        f"{'arm':18}{'start best':>12}{'final best':>12}{'gain':>14}{'final tutor':>13}"
        f"{'zero groups':>13}{'zero q':>9}{'reward':>9}"
    )
    for arm, d in summary["arms"].items():
        o = d["over_seeds"]
        print(
            f"{arm:18}{o['start/acc/best']['mean']:>12.3f}{o['final/acc/best']['mean']:>12.3f}"
            f"{o['gain/acc/best']['mean']:>+9.3f}±{o['gain/acc/best']['sd']:.3f}{o['final/acc/tutor']['mean']:>13.3f}"
            f"{o['zero_signal_frac']['mean']:>13.3f}{o['zero_signal_frac_question']['mean']:>9.3f}{o['reward']['mean']:>9.3f}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "plot"))
    parser.add_argument("--root", default=str(REPO / "runs" / "learning"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--difficulty", type=int, default=3, help="task.options.difficulty of the arithmetic task")
    parser.add_argument("--steps", type=int, default=24, help="RL steps per run")
    parser.add_argument("--questions", type=int, default=4, help="questions per RL step")
    parser.add_argument("--lr", type=float, default=1e-5, help="optim.lr for every arm")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-questions", type=int, default=48)
    parser.add_argument("--backend", default="vllm", help="rollout.backend (vllm: run with the vLLM venv's python)")
    parser.add_argument(
        "--sft-examples", type=int, default=96, help="sft.max_examples: stage-1 questions (the default)"
    )
    parser.add_argument(
        "--sft-seed",
        type=int,
        default=None,
        help="one stage-1 run with this seed that every RL seed starts from (default: one per seed)",
    )
    parser.add_argument("--only-sft", action="store_true", help="run: only the stage-1 jobs")
    parser.add_argument("--smooth", type=int, default=3, help="moving-mean window of the per-step plots")
    args = parser.parse_args()
    return run(args) if args.command == "run" else plot(args)


if __name__ == "__main__":
    sys.exit(main())
