"""`meml distill`: write stage-1 (MEF) traces for experts from a teacher.

    meml distill [PRESET] [key=value ...]
    meml distill distill.teacher=openai distill.model=deepseek-r1 \
        distill.base_url=http://localhost:8000/v1 distill.output=traces/r1.jsonl

For each question of the train split (the first distill.max_examples, by default the
sft.max_examples that stage 1 trains on) and each chosen expert, the teacher answers
under the expert's system prompt, with the task's format instruction, up to
distill.samples_per_question times; the first answer the task verifies is kept.
Teachers: self (the policy, model.name_or_path), hf (another local or hub model,
distill.model) or openai (an OpenAI-compatible endpoint). Each finished pair is appended
to the output as {"question_id", "expert", "response", "teacher", "verified", "attempt"};
pairs whose tries all failed verification are written too, with verified=false, so a
rerun does not pay for them again (`meml.tasks.traces` re-verifies every row and drops them).
Pairs already in the output are skipped: rerunning the same command resumes.
Point an expert at the file with experts.N.trace_source=file:PATH. See docs/DISTILL.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from meml.core.config import Config
from meml.core.errors import ConfigError
from meml.distill.http_client import ChatClient, check_endpoint
from meml.distill.output import TraceWriter
from meml.distill.teachers import Pair, PairResult, http_results, local_results
from meml.engines.base import SamplingParams

log = logging.getLogger("meml")

REPORT_KEYS = ("pairs", "verified", "unverified", "failed", "attempts", "skipped")


def _chosen_experts(s, names: list[str]) -> list[int]:
    all_names = [e.name for e in s.experts]
    for name in names:
        if name not in all_names:
            raise ConfigError(f"distill.experts names '{name}', which is not an expert ({', '.join(all_names)})")
    return [i for i, name in enumerate(all_names) if not names or name in names]


def teacher_label(cfg: Config) -> str:
    d = cfg.distill
    return f"self:{cfg.model.name_or_path}" if d.teacher == "self" else f"{d.teacher}:{d.model}"


def run_distill(cfg: Config, preset: str | None = None) -> dict:
    """Distil traces into the output file; returns the report per expert."""
    from meml.train.session import open_workload

    cfg = copy.deepcopy(cfg)
    d = cfg.distill
    if d.teacher in ("hf", "openai") and not d.model:
        what = "a model path or hub id" if d.teacher == "hf" else "the served model's name"
        raise ConfigError(f"distill.teacher={d.teacher} needs distill.model=<{what}>")
    check_endpoint(d.base_url if d.teacher == "openai" else None, d.api_key_env)  # before the config is logged or saved
    limit = d.max_examples or cfg.sft.max_examples
    cfg.sft.enabled = False  # an expert's file: source may be the very file this run writes
    s = open_workload(cfg, preset)
    experts = _chosen_experts(s, d.experts)
    examples = s.train_examples[:limit] if limit else s.train_examples
    path = Path(d.output) if d.output else s.run_dir / "traces.jsonl"
    label = teacher_label(cfg)
    log.info("distill config (task %s):\n%s", cfg.task.name, OmegaConf.to_yaml(OmegaConf.structured(d)).rstrip())

    def verify(text, example, finished) -> bool:
        return s.task.verify(text, example, finished).score == 1.0

    with TraceWriter(path) as writer:
        report = {s.experts[i].name: dict.fromkeys(REPORT_KEYS, 0) for i in experts}
        pairs = []
        for ex in examples:
            for i in experts:
                if (ex.id, s.experts[i].name) in writer.done:
                    report[s.experts[i].name]["skipped"] += 1
                else:
                    pairs.append(Pair(ex, i, s.experts[i]))
        log.info(
            "distill: teacher %s, %d questions x %d experts, %d pairs to do (%d already in %s)",
            label,
            len(examples),
            len(experts),
            len(pairs),
            len(examples) * len(experts) - len(pairs),
            path,
        )
        with contextlib.closing(_results(cfg, s, pairs, verify)) if pairs else contextlib.nullcontext(()) as results:
            for result in results:
                _count(report[result.pair.expert.name], result)
                if result.response is None:
                    log.warning(
                        "question %s, expert %s: %s", result.pair.example.id, result.pair.expert.name, result.error
                    )
                    continue
                writer.write(_row(result, label))
    _log_report(report, path)
    return report


def _results(cfg: Config, s, pairs: list[Pair], verify):
    d = cfg.distill
    if d.teacher == "openai":
        key = os.environ.get(d.api_key_env, "") if d.api_key_env else ""
        if not key:
            log.info("distill: $%s is not set; sending requests without an API key", d.api_key_env)
        client = ChatClient(d.base_url, d.model, key, d.request_timeout_s, d.max_retries, seed=cfg.seed)
        sampling = {"temperature": d.temperature, "top_p": d.top_p, "max_tokens": d.max_new_tokens}
        return http_results(
            pairs, client, s.task.format_instruction, verify, d.samples_per_question, sampling, d.concurrency
        )
    engine, prompt_of = _local_teacher(cfg, s)
    params = SamplingParams(d.samples_per_question, d.temperature, d.top_p, d.max_new_tokens, cfg.seed)
    pairs_per_call = max(1, cfg.rollout.sequences_per_generate // d.samples_per_question)
    return local_results(pairs, engine, prompt_of, verify, params, pairs_per_call)


def _local_teacher(cfg: Config, s):
    """A rollout engine and a prompt renderer: the policy's own (self) or another model's (hf)."""
    if cfg.distill.teacher == "self":
        from meml.train.session import attach_model

        session = attach_model(s)
        return session.engine, lambda pair: session.prompt(pair.example, pair.expert_index)

    import dataclasses

    import torch

    from meml.core.config import LoraConfig
    from meml.engines import model as model_lib
    from meml.engines.factory import make_engine
    from meml.tasks.experts import prompt_ids

    teacher_cfg = dataclasses.replace(
        cfg.model, name_or_path=cfg.distill.model, gguf_file=None, revision=None, lora=LoraConfig(enabled=False)
    )
    tokenizer = model_lib.load_tokenizer(teacher_cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = model_lib.load_policy(teacher_cfg).requires_grad_(False).to(device)
    dtype = model_lib.compute_dtype(cfg.model.dtype, device)
    engine = make_engine(
        cfg.rollout.backend,
        policy,
        tokenizer,
        dtype,
        cfg.rollout.sequences_per_generate,
        tokens_per_generate=cfg.rollout.tokens_per_generate,
    )
    fmt = s.task.format_instruction
    return engine, lambda pair: prompt_ids(tokenizer, pair.expert, pair.example, fmt)


def _count(counts: dict, result: PairResult) -> None:
    counts["pairs"] += 1
    counts["attempts"] += result.attempts
    if result.response is None:
        counts["failed"] += 1
    elif result.verified:
        counts["verified"] += 1
    else:
        counts["unverified"] += 1


def _row(result: PairResult, teacher: str) -> dict:
    row = {
        "question_id": result.pair.example.id,
        "expert": result.pair.expert.name,
        "response": result.response,
        "teacher": teacher,
        "verified": result.verified,
        "attempt": result.attempts,
    }
    row.update({k: v for k, v in result.extra.items() if v is not None})
    return row


def _log_report(report: dict, path: Path) -> None:
    log.info("distill report (this run; skipped = already in the file):")
    log.info(
        "  %-16s %6s %8s %10s %6s %8s %7s", "expert", "pairs", "verified", "unverified", "failed", "attempts", "skipped"
    )
    for name, c in report.items():
        log.info(
            "  %-16s %6d %8d %10d %6d %8d %7d",
            name,
            c["pairs"],
            c["verified"],
            c["unverified"],
            c["failed"],
            c["attempts"],
            c["skipped"],
        )
    log.info("wrote %s; train on it with experts.N.trace_source=file:%s", path, path)
