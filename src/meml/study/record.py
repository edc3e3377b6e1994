"""One finished run of a study as one JSON record: what ran, what it scored, how it trained.

    {"job", "kind", "arm", "seed", "lr", "phase", "stage1", "steps", "experts",
     "test_questions", "config", "command", "evals",
     "eval": {set: {"summary": {...}, "question_ids": [...],
                    "scores": {expert: [1, 0, ...], "majority": [...]}}},
     "train": {...per-run means from metrics.jsonl...}, "code": {...}, "wall_s", "finished"}

Scores are the verifier's, per question in the order of question_ids (null where the
verifier abstained); every figure of the study's summary is recomputed from them.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

import meml


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def eval_entry(out_dir: Path, experts: list[str]) -> dict:
    """Summary and per-question scores of one `meml eval` output directory."""
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} is missing: the evaluation did not finish")
    summary = json.loads(summary_path.read_text())
    summary.pop("settings", None)
    records = _read_jsonl(out_dir / "records.jsonl")
    ids = [r["question_id"] for r in records]
    scores = {name: [r["experts"][name]["greedy"]["score"] for r in records] for name in experts}
    scores["majority"] = [
        None if all(r["experts"][n]["greedy"]["score"] is None for n in experts) else (r.get("majority_score") or 0.0)
        for r in records
    ]
    return {"summary": summary, "question_ids": ids, "scores": scores}


def train_stats(run_dir: Path) -> dict:
    """Means over the run's steps of what says how it learned (and at what cost)."""
    recs = _read_jsonl(run_dir / "metrics.jsonl")
    rl = [r for r in recs if r.get("stage") == "rl"]
    sft = [r for r in recs if r.get("stage") == "sft"]
    out: dict = {}
    if sft:
        out["sft_steps"] = len(sft)
        out["sft_tokens"] = int(sum(r.get("tokens", 0) for r in sft))
        out["sft_final_loss"] = sft[-1].get("loss")
        out["sft_step_time_s"] = float(np.mean([r["step_time_s"] for r in sft]))
    if rl:

        def mean(key: str) -> float | None:
            values = [r[key] for r in rl if isinstance(r.get(key), (int, float))]
            return float(np.mean(values)) if values else None

        out["rl_steps"] = len(rl)
        for key in (
            "reward/mean",
            "correct/mean",
            "zero_signal_frac",
            "zero_signal_frac_question",
            "all_wrong_frac_question",
            "trained_sequences",
            "iml/fired",
            "rescued",
            "hsft/pushed",
            "completion_len",
            "truncated_frac",
            "step_time_s",
            "time/generate_s",
            "time/update_s",
            "loss",
            "pg_loss",
            "iml/loss",
            "hsft/loss",
            "grad_norm",
        ):
            out[key] = mean(key)
        out["hsft/flushes"] = rl[-1].get("hsft/flushes", 0)
        # tokens_per_s is completion tokens / step time, so their product is the step's tokens
        out["completion_tokens"] = int(round(sum(r.get("tokens_per_s", 0) * r.get("step_time_s", 0) for r in rl)))
    return out


def code_version() -> dict:
    root = Path(meml.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {"meml": getattr(meml, "__version__", "?"), "commit": commit, "src_modified": bool(dirty)}


def build_record(spec, job, config: dict, command: list[str], wall_s: float) -> dict:
    experts = [e["name"] for e in config["experts"]]
    evals = {name: eval_entry(job.run_dir / f"eval-{name}", experts) for name in job.evals}
    test = evals.get("test")
    return {
        "study": spec.name,
        "job": job.key,
        "kind": job.kind,
        "arm": job.arm,
        "seed": job.seed,
        "lr": job.lr,
        "phase": job.phase if job.kind == "rl" else "stage1",
        "stage1": job.start.arm if job.start else None,
        "steps": config["train"]["steps"] if job.kind == "rl" else 0,
        "experts": experts,
        "test_questions": len(test["question_ids"]) if test else 0,
        "config": config,
        "command": command,
        "evals": job.evals,
        "eval": evals,
        "train": train_stats(job.run_dir),
        "code": code_version(),
        "wall_s": wall_s,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
