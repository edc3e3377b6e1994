"""The adaptive expert budget's coverage at a fixed budget, chosen on validation, scored on test.

    python bench/budget_coverage.py                            # the study's stage-1 MEF model
    python bench/budget_coverage.py --model PATH --budget 12   # any model or run directory
    python bench/budget_coverage.py --quick                    # a smoke run (tiny sizes; figures meaningless)

The question it answers (issue: "at the same sampling budget, three experts cover fewer
questions than the best single expert"): with A answers per question, does the split the
adaptive budget would choose find a correct answer for more questions than the uniform split
(A/N per expert) and than the best single expert given all A?

Steps, each a `meml eval` in its own process (records and summaries kept under --out-dir):
  1. validation (task.eval_split=validation): A sampled answers per (question, expert);
     each expert's success rate s_i = its pass@1 there;
  2. the split the adaptive budget makes from those rates (algo/budget.split_budget with
     rollout.budget's floor, temperature and scale: the split a training run settles on once
     its success averages reach these rates);
  3. test: A sampled answers per (question, expert) with eval.coverage_split = that split:
     budget_coverage/* (split vs max(uniform, best single x A), paired bootstrap interval)
     and the compute-matched coverage (uniform vs best single);
  4. from the two runs' per-sample records, the best fixed split: the split of A (at least
     the bandit's floor each, and also with no floor) with the highest validation coverage
     (eval/metrics.best_split), scored on test the same way. It bounds what any split rule
     with that floor could have chosen from these validation answers. The same records also
     score the split of each `rollout.budget.scale` (linear, log) at the configured floor and
     temperature.
The splits are fitted on validation only; the test figures never choose anything.
--reuse keeps an evaluation whose summary is already in --out-dir (step 4 on earlier runs).

Writes bench/results/budget_coverage.json (with the commands that made it). Coverage does not
depend on the machine's load; the run's wall time does (not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_json  # noqa: E402

STUDY_MODEL = REPO / "runs" / "study" / "stage1-mef-s0"
# the evidence study's task (studies/sparse_arithmetic.yaml): arithmetic at difficulty 3
TASK = "task.options={difficulty: 3, train_size: 2000, validation_size: 100, test_size: 200}"


def meml_eval(
    python: str, model: str, split: str, questions: int, extra: list[str], out: Path, reuse: bool = False
) -> dict:
    cmd = [
        python,
        "-m",
        "meml.cli",
        "eval",
        model,
        TASK,
        f"task.eval_split={split}",
        f"task.max_eval_examples={questions}",
        f"output_dir={out}",
        *extra,
    ]
    print("$ " + " ".join(cmd), flush=True)
    if reuse and (out / "summary.json").exists():
        print(f"  (reused {out / 'summary.json'})", flush=True)
        return {"command": " ".join(cmd[1:]), "reused": True, "summary": json.loads((out / "summary.json").read_text())}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"meml eval on {split} failed (exit {proc.returncode})")
    summary = json.loads((out / "summary.json").read_text())
    return {"command": " ".join(cmd[1:]), "wall_s": round(time.time() - t0, 1), "summary": summary}


def fitted_splits(out_dir: Path, experts: list[str], budget: int, rates: list[float], rule) -> dict:
    """Step 4: the best fixed split on validation (with the bandit's floor, and with none), and
    the split of each scale of the budget's rule, scored on test against max(uniform, best
    single expert x A)."""
    from meml.algo.budget import split_budget
    from meml.eval.evaluate import QuestionRecord, sample_counts
    from meml.eval.metrics import best_split, budget_coverage

    floor = rule.min_per_expert

    def counts(split: str):
        lines = (out_dir / split / "records.jsonl").read_text().splitlines()
        records = [QuestionRecord.from_dict(json.loads(line)) for line in lines if line.strip()]
        return sample_counts(records, experts, budget)

    (nv, cv), (nt, ct) = counts("validation"), counts("test")
    candidates = {
        f"scale_{scale}": split_budget(budget, rates, floor, rule.temperature, scale) for scale in ("linear", "log")
    }
    candidates |= {"floor": best_split(nv, cv, budget, floor), "no_floor": best_split(nv, cv, budget, 0)}
    out = {}
    for name, split in candidates.items():
        m = 0 if name == "no_floor" else floor
        result = budget_coverage(nt, ct, experts, split, resamples=5000, seed=0)
        out[name] = {"floor": m, "split": dict(zip(experts, split)), "test": result.as_summary()}
        print(
            f"{name}: split {split} (floor {m}), fitted on validation: test coverage {result.coverage:.3f}; gain vs "
            f"max(uniform, best single) {result.gain:+.3f} [{result.gain_low:+.3f}, {result.gain_high:+.3f}]",
            flush=True,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(STUDY_MODEL), help="model path, hub id or meml run directory")
    parser.add_argument("--budget", type=int, default=12, help="A: answers per question")
    parser.add_argument("--validation", type=int, default=100, help="validation questions (the split is fitted here)")
    parser.add_argument("--test", type=int, default=200, help="test questions (the split is scored here)")
    parser.add_argument("--backend", default="vllm" if Path(REPO / ".venv-vllm/bin/python").exists() else "hf")
    parser.add_argument("--python", default="", help="interpreter for meml eval (default: the vLLM venv for vllm)")
    parser.add_argument("--override", action="append", default=[], help="key=value for both evaluations")
    parser.add_argument("--out-dir", default=str(REPO / "runs" / "budget_coverage"))
    parser.add_argument("--out", default="budget_coverage.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 + 4 questions, 16 new tokens")
    parser.add_argument("--reuse", action="store_true", help="keep evaluations already in --out-dir")
    args = parser.parse_args()

    from meml.algo.budget import split_budget
    from meml.core.config import BudgetConfig

    python = args.python or (str(REPO / ".venv-vllm/bin/python") if args.backend == "vllm" else sys.executable)
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model} does not exist (the study's stage-1 model: run `meml compare`, or --model)")
    if args.quick:
        args.validation, args.test = 4, 4
        args.override += ["eval.max_new_tokens=16", "eval.bootstrap_resamples=100"]
    common = [
        f"rollout.backend={args.backend}",
        f"eval.samples={args.budget}",
        "eval.pass_k=[1]",
        *args.override,
    ]
    out_dir = Path(args.out_dir)
    val = meml_eval(python, args.model, "validation", args.validation, common, out_dir / "validation", args.reuse)
    s = val["summary"]
    experts = [k.removeprefix("pass@1/") for k in s if k.startswith("pass@1/") and k != "pass@1/best"]
    rates = [s[f"pass@1/{e}"] for e in experts]
    b = BudgetConfig()
    split = split_budget(args.budget, rates, b.min_per_expert, b.temperature, b.scale)
    print(f"validation pass@1 {dict(zip(experts, [round(r, 3) for r in rates]))} -> split {split}", flush=True)
    test = meml_eval(
        python,
        args.model,
        "test",
        args.test,
        [*common, f"eval.coverage_split=[{','.join(map(str, split))}]"],
        out_dir / "test",
        args.reuse,
    )
    t = test["summary"]
    figures = {k: v for k, v in t.items() if k.startswith(("budget_coverage/", "coverage/"))}
    report = {
        "model": str(args.model),
        "budget": args.budget,
        "experts": experts,
        "validation_pass1": dict(zip(experts, rates)),
        "split": dict(zip(experts, split)),
        "split_rule": {"floor": b.min_per_expert, "temperature": b.temperature, "scale": b.scale},
        "test": figures,
        "test_questions": t.get("sampled_questions"),
        "validation_questions": s.get("sampled_questions"),
        "fitted_on_validation": fitted_splits(out_dir, experts, args.budget, rates, b),
        "commands": [val["command"], test["command"]],
        "quick": args.quick,
    }
    print(
        f"test, {args.budget} answers a question over {report['test_questions']} questions: adaptive split "
        f"{split} {t['budget_coverage/split']:.3f}, uniform {t.get('budget_coverage/uniform', float('nan')):.3f}, "
        f"best single ({t['budget_coverage/best_expert']}) {t['budget_coverage/best_single']:.3f}; gain vs the "
        f"better {t['budget_coverage/gain']:+.3f} [{t['budget_coverage/gain_low']:+.3f}, "
        f"{t['budget_coverage/gain_high']:+.3f}]"
    )
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
