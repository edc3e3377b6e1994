"""`meml eval`: per-expert accuracy, voting, pass@k and the diversity diagnostic.

    meml eval [MODEL_OR_RUN] [--preset P] [--task NAME] [key=value ...]

    meml eval runs/meml-20250101-120000                  a run's newest checkpoint, its task and experts
    meml eval HuggingFaceTB/SmolLM2-135M-Instruct --task gsm8k task.path=PATH/TO/gsm8k
    meml eval MODEL eval.samples=12                      + pass@k and "do my experts diversify?"

MODEL_OR_RUN is a run directory (its config and newest valid checkpoint are used), a
model directory, a .gguf file or a hub id; without it, the configured model. `--task NAME`
is short for task.name=NAME. A run's saved model.trust_remote_code is not taken over (code
shipped with a checkpoint runs only when this command line says model.trust_remote_code=true),
nor its reward.functions (not needed here; importing them would run their modules).
Questions go in batches of eval.questions_per_batch with a progress bar; after each batch its
records are appended to <out>/records.jsonl, so an interrupted evaluation started again
with the same command skips the questions already there.
<out> is output_dir when given, else <run>/eval/<checkpoint> for a run, else
runs/eval-<model>-<task>. Also written: <out>/summary.json and <out>/eval_settings.json
(what the records were made with; a rerun with other settings is refused, not mixed in).

Computes: greedy accuracy per expert, the best expert, any expert correct, the majority
vote of the experts; with eval.samples=n also pass@k per expert, the sampled majority,
zero-signal estimates and the compute-matched coverage (N experts x k against one x N*k,
paired bootstrap interval). Main settings: task.eval_split, task.max_eval_examples,
eval.max_new_tokens, eval.samples, eval.pass_k, eval.coverage_k, rollout.temperature,
output_dir. docs/EVAL.md has every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from meml.cli.args import pop_options, split_args
from meml.core.config import Config
from meml.core.errors import ConfigError
from meml.core.load import from_dict, load_config
from meml.train import checkpoint as ckpt

log = logging.getLogger("meml")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="per-expert accuracy, majority vote, pass@k and compute-matched coverage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default=None, help="preset whose task and experts to use")
    p.add_argument("--task", default=None, help="task name (short for task.name=NAME)")
    # REMAINDER keeps options that follow the target (`meml eval RUN --task gsm8k k=v`) for _run
    p.add_argument("args", nargs=argparse.REMAINDER, help="[MODEL_OR_RUN] [key=value ...]")
    p.set_defaults(func=_run)


def _run(ns) -> int:
    args, options = pop_options(ns.args, ("--preset", "--task"))
    target, overrides = split_args(args)
    return run_eval(target, overrides, preset=options.get("--preset", ns.preset), task=options.get("--task", ns.task))


def resolve(
    target: str | None, overrides: list[str], preset: str | None, task: str | None
) -> tuple[Config, Path, str | None]:
    """The config, the output directory and the model source (None: cfg.model)."""
    overrides = [*overrides, *([f"task.name={task}"] if task else [])]
    if target and (Path(target) / "config.yaml").exists() and (Path(target) / "checkpoints").exists():
        import yaml

        run_dir = Path(target)
        base = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if base.model.trust_remote_code:  # a run directory may come from anyone: its Python files do not run
            log.warning(
                "%s was made with model.trust_remote_code=true; ignoring that setting, so no Python file in its "
                "checkpoint runs. Add model.trust_remote_code=true to this command if you trust that code.",
                run_dir / "config.yaml",
            )
            base.model.trust_remote_code = False
        if base.reward.functions:  # not needed to measure accuracy, and importing them runs their modules
            log.info(
                "not importing the run's reward.functions (%s): meml eval does not use them",
                ", ".join(base.reward.functions),
            )
            base.reward.functions, base.reward.weights = [], []
        latest = ckpt.find_latest(run_dir)
        if latest is None:
            raise FileNotFoundError(f"{run_dir} has no valid checkpoint to evaluate")
        keep = _as_overrides(base, drop_task=bool(task) and task != base.task.name)  # another task: its own defaults
        cfg = load_config(preset, [*keep, *overrides])  # output_dir is only set when given here
        return cfg, Path(cfg.output_dir) if cfg.output_dir else run_dir / "eval" / latest.name, str(latest / "model")
    cfg = load_config(preset, [*([f"model.name_or_path={target}"] if target else []), *overrides])
    if cfg.output_dir:
        return cfg, Path(cfg.output_dir), None
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.model.name_or_path).name) or "model"
    return cfg, Path("runs") / f"eval-{model}-{cfg.task.name}", None


def settings_of(cfg: Config, source: str | None) -> dict:
    """Everything that changes a record; records made under other settings are not reused."""
    model = source or cfg.model.name_or_path
    if Path(model).exists():
        model = str(Path(model).resolve())
    t = cfg.task
    return {
        "model": model,
        "revision": cfg.model.revision,
        "gguf_file": cfg.model.gguf_file,
        "task": {"name": t.name, "path": t.path, "split": t.eval_split, "options": dict(t.options)},
        "lenient": cfg.reward.lenient,
        "experts": [[e.name, e.system_prompt] for e in cfg.experts],
        "max_new_tokens": cfg.eval.max_new_tokens,
        "samples": cfg.eval.samples,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "seed": cfg.seed,
    }


def check_settings(out: Path, settings: dict) -> None:
    path = out / "eval_settings.json"
    if (out / "records.jsonl").exists() and path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise ConfigError(
                f"{out / 'records.jsonl'} holds records made with other settings ({', '.join(changed)} changed). "
                "Delete that directory to start over, or set output_dir=<a new directory>."
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def read_records(path: Path) -> dict:
    """Records already written, by question id; a line cut by a kill is dropped from the file."""
    from meml.eval.evaluate import QuestionRecord

    if not path.exists():
        return {}
    done, good = {}, []
    for line in path.read_text().splitlines():
        try:
            rec = QuestionRecord.from_dict(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        done[rec.question_id] = rec
        good.append(line)
    path.write_text("".join(line + "\n" for line in good))
    return done


def run_eval(target: str | None, overrides: list[str], preset: str | None = None, task: str | None = None) -> int:
    from tqdm.auto import tqdm

    from meml.eval.evaluate import (
        batch_seed,
        batches,
        diversity_verdict,
        evaluate_batch,
        records_as_dicts,
        summarize,
    )
    from meml.train.session import attach_model, open_workload

    cfg, out, source = resolve(target, overrides, preset, task)
    cfg.sft.enabled = False  # no traces needed
    cfg.output_dir = str(out)
    cfg.log.backends = ["jsonl"]
    work = open_workload(cfg, preset)
    settings = settings_of(cfg, source)
    check_settings(out, settings)
    records_path = out / "records.jsonl"
    done = read_records(records_path)
    chunks = batches(work.eval_examples, cfg.eval.questions_per_batch)
    todo = [(b, [ex for ex in chunk if ex.id not in done]) for b, chunk in enumerate(chunks)]
    todo = [(b, missing) for b, missing in todo if missing]
    if done:
        log.info(
            "resuming: %d of %d questions already in %s",
            sum(ex.id in done for ex in work.eval_examples),
            len(work.eval_examples),
            records_path,
        )
    evaluator = attach_model(work, source=source).evaluator() if todo else None
    bar = tqdm(
        total=len(chunks), initial=len(chunks) - len(todo), desc="eval", unit="batch", disable=not cfg.log.progress
    )
    for b, missing in todo:
        records = evaluate_batch(evaluator, missing, cfg.eval.max_new_tokens, cfg.eval.samples, batch_seed(cfg.seed, b))
        with records_path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records_as_dicts(records)))
        done.update((r.question_id, r) for r in records)
        bar.update(1)
    bar.close()
    records = [done[ex.id] for ex in work.eval_examples]
    summary = summarize(records, [e.name for e in work.experts], cfg.eval, cfg.rollout.num_generations_per_expert)
    (out / "summary.json").write_text(json.dumps({**summary, "settings": settings}, indent=1))
    for k, v in summary.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    verdict = diversity_verdict(summary)
    if verdict:
        print(verdict)
    print(f"wrote {out / 'summary.json'} and {records_path}")
    return 0


def _as_overrides(cfg: Config, drop_task: bool = False) -> list[str]:
    """A saved run's whole config as overrides (JSON is valid YAML), so the eval matches it."""
    from meml.core.load import to_dict

    skip = {"output_dir", *(["task"] if drop_task else [])}
    return [f"{key}={json.dumps(value)}" for key, value in to_dict(cfg).items() if key not in skip]
