"""From a study's records to its claims: chosen lrs, per-arm figures, paired comparisons.

What is reported was fixed before any test score is read:
  shared    accuracy of the expert every arm has (`shared_expert`, the tutor by default)
  any       a question counts when any expert's greedy answer is right (coverage)
  majority  the majority vote of the experts' greedy answers
  best_val  the expert with the best accuracy on the selection split, per run
Each arm's lr is the one whose shared-expert accuracy on the selection split is best
(mean over the selection seeds); only records at that lr are reported. Comparisons are
paired: the same seeds and the same question ids on both sides
(metrics.paired_difference, a two-way bootstrap over seeds and questions).

Stage 2's own gain separates the two stages: an arm's shared-expert score minus that of
its stage-1 model of the same seed, per question (`stage2_gains`). Two arms that start
from different stage-1 recipes are also compared by the difference of those gains, per
(seed, question): (arm - its start) - (baseline - its start) (`gain_comparisons`). A run's
start is the model it started from: where a stage-1 model was trained again (its run
directory lost), the rebuilt model's own record (`start_record`, `rebuilt_starts`).
"""

from __future__ import annotations

import numpy as np

from meml.eval.metrics import choose_by_validation, mean_and_sd, paired_difference
from meml.study.jobs import chosen_lr, grid, is_default_lr, lr_tag, rl_job, stage1_job
from meml.study.spec import StudySpec

METRICS = ("shared", "any", "majority", "best_val")


def _vector(entry: dict, name: str) -> list[float | None]:
    return entry["scores"][name]


def best_on_validation(spec: StudySpec, record: dict) -> str:
    """The run's expert with the best accuracy on the selection split (ties: expert order)."""
    summary = record["eval"][spec.selection.split]["summary"]
    return choose_by_validation({name: [summary[f"acc/{name}"]] for name in record["experts"]})


def metric_scores(spec: StudySpec, record: dict, eval_set: str, metric: str) -> dict[str, float | None]:
    """question id -> score of one reported metric in one eval set."""
    entry = record["eval"][eval_set]
    experts = record["experts"]
    if metric == "shared":
        values = _vector(entry, spec.shared_expert if spec.shared_expert in experts else experts[0])
    elif metric == "best_val":
        values = _vector(entry, best_on_validation(spec, record))
    elif metric == "majority":
        values = _vector(entry, "majority")
    elif metric == "any":
        per = [_vector(entry, e) for e in experts]
        values = [
            None if all(v[q] is None for v in per) else max(v[q] or 0.0 for v in per)
            for q in range(len(entry["question_ids"]))
        ]
    else:
        raise ValueError(f"unknown metric {metric}; metrics: {METRICS}")
    return dict(zip(entry["question_ids"], values))


def accuracy(scores: dict[str, float | None]) -> float:
    valid = [v for v in scores.values() if v is not None]
    return float(np.mean(valid)) if valid else float("nan")


def arm_records(spec: StudySpec, arm: str, records: dict) -> tuple[float | None, list[dict]]:
    """The chosen lr and the records at it, in seed order (missing seeds left out)."""
    lr = chosen_lr(spec, arm, records)
    if lr is None and not is_default_lr(spec, arm):
        return None, []
    found = []
    for seed in spec.seeds:
        for phase in ("grid", "seeds"):
            rec = records.get(rl_job(spec, arm, lr, seed, phase).key)
            if rec is not None:
                found.append(rec)
                break
    return lr, found


def aligned_arrays(
    spec: StudySpec, groups: list[list[dict]], eval_set: str, metric: str
) -> tuple[list[np.ndarray], list[int]]:
    """(seeds, questions) score arrays of several groups of records (one record per seed
    each), on the seeds every group has and the questions every one of them scored."""
    by_seed = [
        {r["seed"]: metric_scores(spec, r, eval_set, metric) for r in g if eval_set in r["eval"]} for g in groups
    ]
    seeds = [s for s in spec.seeds if all(s in m for m in by_seed)]
    if not seeds:
        return [np.zeros((0, 0)) for _ in groups], []
    questions = [
        q for q in by_seed[0][seeds[0]] if all(q in m[s] and m[s][q] is not None for m in by_seed for s in seeds)
    ]
    return [np.array([[m[s][q] for q in questions] for s in seeds], dtype=float) for m in by_seed], seeds


def paired_arrays(
    spec: StudySpec, a: list[dict], b: list[dict], eval_set: str, metric: str
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(seeds, questions) score arrays of two arms on their common seeds and questions."""
    (xa, xb), seeds = aligned_arrays(spec, [a, b], eval_set, metric)
    return xa, xb, seeds


def stage1_records(spec: StudySpec, recipe: str, records: dict) -> list[dict]:
    """A stage-1 recipe's records, in seed order (missing seeds left out)."""
    return [records[k] for s in spec.seeds if (k := stage1_job(spec, recipe, s).key) in records]


def start_records(spec: StudySpec, recs: list[dict], records: dict) -> list[dict]:
    """The record of the model each run started from, in the runs' order: the one it names
    (`start_record`, a stage-1 model trained again) or its recipe's for its seed."""
    out = []
    for r in recs:
        key = r.get("start_record") or stage1_job(spec, spec.arms[r["arm"]].stage1, r["seed"]).key
        if key in records:
            out.append(records[key])
    return out


def stage2_gains(spec: StudySpec, records: dict) -> list[dict]:
    """Per arm with a stage-1 start and per reported set: the shared expert's score minus its
    start's, paired by seed and question."""
    out = []
    b = spec.bootstrap
    for arm, a in spec.arms.items():
        if not a.stage1:
            continue
        _, recs = arm_records(spec, arm, records)
        starts = start_records(spec, recs, records)
        rebuilt = [r["seed"] for r in starts if "rebuilt_from" in r]
        for eval_set in spec.report:
            (final, start), seeds = aligned_arrays(spec, [recs, starts], eval_set, "shared")
            if not seeds or final.size == 0:
                continue
            diff = paired_difference(final, start, b.resamples, b.seed, b.confidence)
            out.append(
                {
                    "arm": arm,
                    "start": a.stage1,
                    "eval": eval_set,
                    "metric": "shared",
                    "final_acc": float(final.mean()),
                    "start_acc": float(start.mean()),
                    "seeds_used": seeds,
                    "rebuilt_start_seeds": [x for x in rebuilt if x in seeds],
                    **diff.as_dict(),
                }
            )
    return out


def rebuilt_starts(spec: StudySpec, records: dict) -> list[dict]:
    """Each stage-1 model trained again beside its original record, per reported set: both
    accuracies of the shared expert and on how many questions the two scored the same."""
    out = []
    for key, r in sorted(records.items()):
        original = records.get(r.get("rebuilt_from") or "")
        if original is None:
            continue
        for eval_set in spec.report:
            if eval_set not in r["eval"] or eval_set not in original["eval"]:
                continue
            a, b = (metric_scores(spec, x, eval_set, "shared") for x in (original, r))
            common = [q for q in a if a[q] is not None and b.get(q) is not None]
            out.append(
                {
                    "record": key,
                    "original": r["rebuilt_from"],
                    "eval": eval_set,
                    "original_acc": accuracy(a),
                    "rebuilt_acc": accuracy(b),
                    "questions": len(common),
                    "same_score": sum(a[q] == b[q] for q in common),
                }
            )
    return out


def gain_comparisons(spec: StudySpec, records: dict) -> list[dict]:
    """For each listed comparison whose two arms start from different stage-1 recipes: the
    difference of their stage-2 gains, (arm - start) - (baseline - its start), paired by
    seed and question on the cells all four score."""
    out = []
    b = spec.bootstrap
    for arm, base in spec.comparisons:
        sa, sb = spec.arms[arm].stage1, spec.arms[base].stage1
        if not sa or not sb or sa == sb:
            continue  # the same start: the plain comparison already is the difference of gains
        ra, rb = arm_records(spec, arm, records)[1], arm_records(spec, base, records)[1]
        groups = [ra, start_records(spec, ra, records), rb, start_records(spec, rb, records)]
        for eval_set in spec.report:
            (xa, xsa, xb, xsb), seeds = aligned_arrays(spec, groups, eval_set, "shared")
            if not seeds or xa.size == 0:
                continue
            diff = paired_difference(xa - xsa, xb - xsb, b.resamples, b.seed, b.confidence)
            out.append(
                {
                    "arm": arm,
                    "baseline": base,
                    "eval": eval_set,
                    "metric": "shared",
                    "arm_gain": float((xa - xsa).mean()),
                    "baseline_gain": float((xb - xsb).mean()),
                    "seeds_used": seeds,
                    **diff.as_dict(),
                }
            )
    return out


def summarize_study(spec: StudySpec, records: dict) -> dict:
    out: dict = {
        "study": spec.name,
        "seeds": spec.seeds,
        "selection": {
            "split": spec.selection.split,
            "seeds": spec.selection_seeds,
            "metric": f"acc/{spec.shared_expert}",
        },
        "report": spec.report,
        "stage1": {},
        "arms": {},
        "comparisons": [],
    }
    eval_sets = list(spec.evaluation)
    for recipe in spec.stage1:
        out["stage1"][recipe] = _figures(spec, stage1_records(spec, recipe, records), eval_sets)
    for arm, a in spec.arms.items():
        lr, recs = arm_records(spec, arm, records)
        entry = {
            "label": spec.label(arm),
            "preset": a.preset,
            "stage1": a.stage1 or None,
            "lr": lr,
            "grid": _grid_scores(spec, arm, records),
            **_figures(spec, recs, eval_sets),
        }
        out["arms"][arm] = entry
    for arm, base in spec.comparisons:
        _, ra = arm_records(spec, arm, records)
        _, rb = arm_records(spec, base, records)
        for eval_set in spec.report:
            for metric in METRICS:
                xa, xb, seeds = paired_arrays(spec, ra, rb, eval_set, metric)
                if not seeds or xa.size == 0:
                    continue
                b = spec.bootstrap
                diff = paired_difference(xa, xb, b.resamples, b.seed, b.confidence)
                out["comparisons"].append(
                    {
                        "arm": arm,
                        "baseline": base,
                        "eval": eval_set,
                        "metric": metric,
                        "arm_acc": float(xa.mean()),
                        "baseline_acc": float(xb.mean()),
                        "seeds_used": seeds,
                        **diff.as_dict(),
                    }
                )
    out["stage2_gains"] = stage2_gains(spec, records)
    out["gain_comparisons"] = gain_comparisons(spec, records)
    out["rebuilt_starts"] = rebuilt_starts(spec, records)
    return out


def _grid_scores(spec: StudySpec, arm: str, records: dict) -> dict:
    """Selection-split accuracy of the shared expert at every lr of the grid, per selection seed."""
    out = {}
    for lr in grid(spec, arm):
        values = {}
        for s in spec.selection_seeds:
            rec = records.get(rl_job(spec, arm, lr, s, "grid").key)
            if rec is not None:
                values[str(s)] = rec["eval"][spec.selection.split]["summary"].get(f"acc/{spec.shared_expert}")
        out[lr_tag(lr)] = values
    return out


def _figures(spec: StudySpec, recs: list[dict], eval_sets: list[str]) -> dict:
    """Per eval set and metric: the per-seed accuracies, their mean and sd; training means."""
    figures: dict = {"seeds_done": [r["seed"] for r in recs], "eval": {}}
    for eval_set in eval_sets:
        per_metric = {}
        for metric in METRICS:
            values = [accuracy(metric_scores(spec, r, eval_set, metric)) for r in recs if eval_set in r["eval"]]
            m, sd = mean_and_sd(values)
            per_metric[metric] = {"per_seed": values, "mean": m, "sd": sd}
        per_metric["best_val_expert"] = (
            [best_on_validation(spec, r) for r in recs] if eval_set != spec.selection.split else None
        )
        figures["eval"][eval_set] = per_metric
    keys = sorted({k for r in recs for k in r.get("train", {})})
    figures["train"] = {
        k: mean_and_sd([r["train"][k] for r in recs if isinstance(r["train"].get(k), (int, float))])[0] for k in keys
    }
    figures["wall_s"] = mean_and_sd([r["wall_s"] for r in recs])[0] if recs else None
    return figures
