"""`meml eval MODEL_OR_RUN`: greedy accuracy per expert on a task's test split.

MODEL_OR_RUN is a run directory (its config and newest valid checkpoint are used), a
model directory, a .gguf file or a hub id; without it, the configured model.
Writes <output>/summary.json and <output>/records.jsonl.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from meml import checkpoint as ckpt
from meml.config import from_dict, load_config
from meml.evaluation import greedy_eval, records_as_dicts
from meml.session import attach_model, open_session

log = logging.getLogger("meml")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="greedy accuracy per expert on the task's test split")
    p.add_argument("--preset", default=None, help="preset whose task and experts to use")
    p.add_argument("args", nargs="*", help="[MODEL_OR_RUN] [key=value ...]")
    p.set_defaults(func=lambda ns: run_eval(*_target_and_overrides(ns.args), preset=ns.preset))


def _target_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    from meml.cli import split_args

    return split_args(args)


def run_eval(target: str | None, overrides: list[str], preset: str | None = None) -> int:
    model_source = None
    if target and (Path(target) / "config.yaml").exists() and (Path(target) / "checkpoints").exists():
        import yaml

        run_dir = Path(target)
        base = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        latest = ckpt.find_latest(run_dir)
        if latest is None:
            raise FileNotFoundError(f"{run_dir} has no valid checkpoint to evaluate")
        model_source = str(latest / "model")
        cfg = load_config(preset, [*_as_overrides(base), *overrides])
        out = run_dir / "eval" / latest.name
    else:
        extra = [f"model.name_or_path={target}"] if target else []
        cfg = load_config(preset, [*extra, *overrides])
        out = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / "eval"
    cfg.sft.enabled = False
    cfg.output_dir = str(out)
    cfg.log.backends = ["jsonl"]
    s = open_session(cfg, preset, load_model=False)
    attach_model(s, source=model_source)
    summary, records = greedy_eval(s, s.eval_examples, cfg.eval.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records_as_dicts(records)))
    for k, v in summary.items():
        print(f"{k:24s} {v:.4f}" if isinstance(v, float) else f"{k:24s} {v}")
    print(f"wrote {out / 'summary.json'} and {out / 'records.jsonl'}")
    return 0


def _as_overrides(cfg) -> list[str]:
    """A saved run's task, experts and model settings as overrides (so the eval matches it)."""
    import yaml

    from meml.config import to_dict

    d = to_dict(cfg)
    return [f"task={yaml.safe_dump(d['task'], default_flow_style=True).strip()}",
            f"experts={yaml.safe_dump(d['experts'], default_flow_style=True).strip()}",
            f"eval={yaml.safe_dump(d['eval'], default_flow_style=True).strip()}"]
