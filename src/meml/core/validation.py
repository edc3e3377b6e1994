"""Config validation: the one place that checks values types cannot, with messages that
name the field and say how to fix it. Settings that name an implementation (task.name,
rollout.backend, algo.loss, algo.aggregation) are checked against their registries
(train/preflight.py: check_choices), which hold the only list of valid names."""

from __future__ import annotations

import difflib
import math

from meml.core.config import Config
from meml.core.errors import ConfigError


def _choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{field_name}='{value}' is not valid.{hint} Choose one of: {', '.join(choices)}")


def _positive(field_name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field_name}={value} must be {bound}")


def _in_range(field_name: str, value: float, low: float, high: float, high_open: bool = True) -> None:
    """low <= value < high (or <= high when not high_open), and finite."""
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{field_name}={value} must be in [{low:g}, {high:g}{')' if high_open else ']'}")


def _count_or_null(field_name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{field_name}={value} must be >= 1, or null for no limit")


def _check_dynamic_and_budget(cfg: Config) -> None:
    """rollout.dynamic (dynamic sampling) and rollout.budget (the adaptive expert budget)."""
    d, b, n = cfg.rollout.dynamic, cfg.rollout.budget, len(cfg.experts)
    _choice("rollout.dynamic.refill", d.refill, ("questions", "experts"))
    _positive("rollout.dynamic.max_rounds", d.max_rounds, allow_zero=True)
    if d.enabled and d.refill == "experts" and (n < 2 or cfg.algo.advantage_grouping != "expert"):
        raise ConfigError(
            "rollout.dynamic.refill=experts refills a dead (question, expert) group under another expert: it needs "
            f"at least two experts (this run has {n}) and algo.advantage_grouping=expert "
            f"(is '{cfg.algo.advantage_grouping}'); or set rollout.dynamic.refill=questions"
        )
    _positive("rollout.budget.answers_per_question", b.answers_per_question)
    _positive("rollout.budget.min_per_expert", b.min_per_expert)
    _positive("rollout.budget.temperature", b.temperature)
    _choice("rollout.budget.scale", b.scale, ("linear", "log"))
    _in_range("rollout.budget.smoothing", b.smoothing, 0.0, 1.0, high_open=False)
    if b.smoothing == 0:
        raise ConfigError("rollout.budget.smoothing=0 would never update the success averages: use (0, 1]")
    if b.answers_per_question < n * b.min_per_expert:
        raise ConfigError(
            f"rollout.budget.answers_per_question={b.answers_per_question} cannot give each of the {n} experts "
            f"rollout.budget.min_per_expert={b.min_per_expert} answers: raise it to at least {n * b.min_per_expert}"
        )


def validate(cfg: Config) -> None:
    """Check values that types cannot; every message names the field to fix."""
    _choice("model.dtype", cfg.model.dtype, ("auto", "bf16", "fp16", "fp32"))
    a = cfg.algo
    _choice("algo.advantage_grouping", a.advantage_grouping, ("expert", "question"))
    _choice("algo.iml.form", a.iml.form, ("nll", "kl"))
    _choice("algo.iml.answer_choice", a.iml.answer_choice, ("shortest", "first"))
    _choice("algo.iml.normalize", a.iml.normalize, ("batch", "fired"))
    _choice("optim.schedule", cfg.optim.schedule, ("constant", "cosine", "linear"))
    _choice("distill.teacher", cfg.distill.teacher, ("self", "hf", "openai"))
    _positive("distill.samples_per_question", cfg.distill.samples_per_question)
    _positive("distill.concurrency", cfg.distill.concurrency)
    e = cfg.eval
    for name in ("max_new_tokens", "questions_per_batch", "bootstrap_resamples"):
        _positive(f"eval.{name}", getattr(e, name))
    for name in ("samples", "coverage_k", "every_steps"):
        _positive(f"eval.{name}", getattr(e, name), allow_zero=True)
    if any(k < 1 for k in e.pass_k):
        raise ConfigError(f"eval.pass_k={list(e.pass_k)}: every k must be >= 1")
    if e.coverage_split:
        if any(k < 0 for k in e.coverage_split) or sum(e.coverage_split) < 1:
            raise ConfigError(f"eval.coverage_split={list(e.coverage_split)}: answers per expert, >= 0, not all 0")
        if len(e.coverage_split) != len(cfg.experts):
            raise ConfigError(
                f"eval.coverage_split={list(e.coverage_split)} gives {len(e.coverage_split)} experts answers; "
                f"there are {len(cfg.experts)} ({', '.join(x.name for x in cfg.experts)})"
            )
        if sum(e.coverage_split) > e.samples:
            raise ConfigError(
                f"eval.coverage_split={list(e.coverage_split)} needs eval.samples >= {sum(e.coverage_split)} "
                f"(have {e.samples})"
            )
    _choice("log.wandb_mode", cfg.log.wandb_mode, ("offline", "online", "disabled"))
    for backend in cfg.log.backends:
        _choice("log.backends[]", backend, ("jsonl", "tensorboard", "wandb"))

    if not cfg.experts:
        raise ConfigError("experts is empty: give at least one expert (name, system_prompt)")
    names = [e.name for e in cfg.experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"experts: names must be unique, repeated: {', '.join(dupes)}")
    for name in cfg.sft.experts:
        if name not in names:
            raise ConfigError(f"sft.experts names '{name}', which is not an expert ({', '.join(names)})")

    r = cfg.rollout
    _positive("rollout.num_generations_per_expert", r.num_generations_per_expert)
    _positive("rollout.max_new_tokens", r.max_new_tokens)
    _positive("rollout.sequences_per_generate", r.sequences_per_generate)
    _positive("rollout.tokens_per_generate", r.tokens_per_generate, allow_zero=True)
    _positive("rollout.temperature", r.temperature, allow_zero=True)
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    if not 0 <= a.clip_eps_low <= 1:  # 1: no lower clip (the ratio's floor is 0)
        raise ConfigError(f"algo.clip_eps_low={a.clip_eps_low} must be in [0, 1]")
    _positive("algo.clip_eps_high", a.clip_eps_high, allow_zero=True)
    _positive("algo.ppo_epochs", a.ppo_epochs)
    _positive("algo.mini_batches", a.mini_batches)
    _positive("algo.kl_coef", a.kl_coef, allow_zero=True)
    _positive("algo.tis_cap", a.tis_cap, allow_zero=True)
    _positive("algo.entropy.coef", a.entropy.coef, allow_zero=True)
    if not 0 < a.entropy.top_quantile <= 1:
        raise ConfigError(f"algo.entropy.top_quantile={a.entropy.top_quantile} must be in (0, 1] (1: every token)")
    _positive("reward.overlong_buffer", cfg.reward.overlong_buffer, allow_zero=True)
    if cfg.reward.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"reward.overlong_buffer={cfg.reward.overlong_buffer} must be below rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens} (the ramp ends at the limit)"
        )
    if a.loss == "reinforce" and (a.ppo_epochs > 1 or a.mini_batches > 1):  # the others take a ratio
        raise ConfigError(
            "algo.loss=reinforce is on-policy: it takes one update per rollout batch. "
            "Set algo.loss=ppo_clip to use algo.ppo_epochs/algo.mini_batches > 1."
        )
    _positive("algo.iml.weight", a.iml.weight, allow_zero=True)
    _positive("algo.hsft.weight", a.hsft.weight, allow_zero=True)
    _positive("algo.hsft.buffer_size", a.hsft.buffer_size)
    if not 0 <= a.hsft.max_wrong < r.num_generations_per_expert:
        raise ConfigError(
            f"algo.hsft.max_wrong={a.hsft.max_wrong} must be in [0, G) with "
            f"G=rollout.num_generations_per_expert={r.num_generations_per_expert}"
        )
    if a.hsft.push_prob is not None and not 0 <= a.hsft.push_prob <= 1:
        raise ConfigError(f"algo.hsft.push_prob={a.hsft.push_prob} must be in [0, 1]")
    if a.iml.enabled and len(cfg.experts) < 2:
        raise ConfigError("algo.iml.enabled needs at least two experts; set algo.iml.enabled=false")
    _check_dynamic_and_budget(cfg)

    if (
        r.temperature == 0
        and r.num_generations_per_expert > 1
        and cfg.train.steps > 0
        and (a.advantage_grouping == "expert" or len(cfg.experts) == 1)
    ):
        raise ConfigError(
            f"rollout.temperature=0 decodes greedily, so the G=rollout.num_generations_per_expert="
            f"{r.num_generations_per_expert} answers of each (question, expert) group are identical: every "
            "group would have zero reward variance and give no learning signal. Set rollout.temperature > 0 "
            "(e.g. 1.0) for training"
        )

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.eps", o.eps)
    _in_range("optim.beta1", o.beta1, 0.0, 1.0)
    _in_range("optim.beta2", o.beta2, 0.0, 1.0)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("reward.timeout_s", cfg.reward.timeout_s)
    _count_or_null("task.max_train_examples", cfg.task.max_train_examples)
    _count_or_null("task.max_eval_examples", cfg.task.max_eval_examples)
    _positive("train.steps", cfg.train.steps, allow_zero=True)
    _positive("train.questions_per_step", cfg.train.questions_per_step)
    _positive("train.micro_batch_tokens", cfg.train.micro_batch_tokens)
    _positive("train.logit_chunk_tokens", cfg.train.logit_chunk_tokens, allow_zero=True)
    _positive("task.validation_holdout", cfg.task.validation_holdout, allow_zero=True)
    _positive("sft.lr", cfg.sft.lr)
    _positive("sft.epochs", cfg.sft.epochs)
    _positive("sft.sequences_per_step", cfg.sft.sequences_per_step)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    if len(cfg.reward.weights) not in (0, len(cfg.reward.functions)):
        raise ConfigError(
            f"reward.weights has {len(cfg.reward.weights)} entries for {len(cfg.reward.functions)} "
            "reward.functions: give one weight per function, or none (all 1.0)"
        )
    if not cfg.reward.use_verifier and not cfg.reward.functions:
        raise ConfigError("reward.use_verifier=false and no reward.functions: nothing gives a reward")
    lora = cfg.model.lora
    if lora.enabled:
        _positive("model.lora.r", lora.r)
        _in_range("model.lora.dropout", lora.dropout, 0.0, 1.0)
        modules = list(lora.target_modules)
        if not modules or not all(isinstance(m, str) and m.strip() for m in modules):
            raise ConfigError(
                f"model.lora.target_modules={modules} must be a non-empty list of module names, "
                "e.g. [q_proj, k_proj, v_proj, o_proj]"
            )
