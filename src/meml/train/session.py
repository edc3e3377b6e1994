"""What a run holds, built in an order that fails fast.

`open_workload` validates the config (and each setting that names an implementation),
checks that the rollout backend can run here, loads and checks the data (rows, and that
the verifier can read the gold answers) and the reward functions: a `Workload`, with no
model (a typo or a malformed dataset row never costs a model load). `attach_model` then
loads the tokenizer, checks every prompt against the model's context, loads the weights
and builds the rollout engine: a `Session`, which both stages and evaluation use.
`open_session` does both.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from meml.algo.budget import ExpertBudget
from meml.algo.hsft import HardExampleBuffer
from meml.core.config import Config
from meml.core.errors import ModelLoadError
from meml.core.load import to_dict, to_yaml
from meml.core.types import Example, Expert
from meml.engines import model as model_lib
from meml.engines.base import Engine
from meml.engines.factory import make_engine
from meml.eval.evaluate import Evaluator
from meml.tasks.base import Task, load_split
from meml.tasks.experts import experts_from_config, prompt_ids
from meml.tasks.registry import build_task
from meml.tasks.rewards import RewardFn, load_reward_function
from meml.tasks.traces import load_expert_traces
from meml.train import checkpoint as ckpt
from meml.train.logger import MetricsLogger
from meml.train.preflight import (
    check_choices,
    check_gold_answers,
    check_prompt_lengths,
    check_rollout_backend,
)

log = logging.getLogger("meml")


@dataclass
class Workload:
    """What a run works on, loaded and checked before any model."""

    cfg: Config
    run_dir: Path
    task: Task
    experts: list[Expert]
    train_examples: list[Example]
    eval_examples: list[Example]
    examples_by_id: dict[str, Example]
    traces: dict[tuple[str, int], str]  # (question id, expert index) -> stage-1 trace
    trace_report: dict
    reward_functions: list[tuple[str, RewardFn, float]]


@dataclass
class Session(Workload):
    """A Workload with its model: the policy as accelerate prepared it (maybe DDP/FSDP-
    wrapped), its tokenizer, the rollout engine, the logger, the HSFT buffer, the counters,
    the adaptive expert budget's state."""

    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    policy: torch.nn.Module
    engine: Engine
    logger: MetricsLogger
    buffer: HardExampleBuffer
    counters: dict[str, int] = field(
        default_factory=lambda: {"bad_streak": 0, "skipped_updates": 0, "reward_failures": 0}
    )
    stop_requested: bool = False  # set by SIGTERM/SIGINT: save at the end of the step and exit
    budget: ExpertBudget | None = None  # the adaptive expert budget's state (rollout.budget); None when off
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prompt(self, example: Example, expert: int) -> list[int]:
        """The token ids of (expert, question): the same for sampling and training (cached)."""
        key = (example.id, expert)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = prompt_ids(
                self.tokenizer, self.experts[expert], example, self.task.format_instruction
            )
        return self._prompt_cache[key]

    def evaluator(self) -> Evaluator:
        r = self.cfg.rollout
        return Evaluator(self.engine, self.tokenizer, self.experts, self.task, self.prompt, r.temperature, r.top_p)


def default_run_dir(preset: str | None) -> Path:
    return Path("runs") / f"{preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_workload(cfg: Config, preset: str | None = None) -> Workload:
    """Config, data and reward functions: everything that can be checked without the model."""
    seed_everything(cfg.seed)
    check_choices(cfg)
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
    return Workload(
        cfg, run_dir, task, experts, train, evals, {e.id: e for e in train + evals}, traces, trace_report, functions
    )


def open_session(cfg: Config, preset: str | None = None) -> Session:
    return attach_model(open_workload(cfg, preset))


def attach_model(work: Workload, source: str | None = None) -> Session:
    """Load tokenizer and policy, wrap them with accelerate, build the rollout engine."""
    from accelerate.state import AcceleratorState

    cfg = work.cfg
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_lib.compute_dtype(cfg.model.dtype, torch.device(device_type))
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # accelerate keeps the first mixed precision a process asked for; a second run in the
    # same process (a notebook, a test) must get its own. The process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=precision, cpu=device_type == "cpu")  # cpu=True enables gloo multi-CPU
    if accelerator.is_main_process:
        work.run_dir.mkdir(parents=True, exist_ok=True)
        (work.run_dir / "config.yaml").write_text(to_yaml(cfg))
    source = source or model_source(cfg)
    tokenizer = model_lib.load_tokenizer(cfg.model, source)
    fmt = work.task.format_instruction
    check_prompt_lengths(
        cfg,
        work.task,
        work.experts,
        work.train_examples + work.eval_examples,
        lambda example, e: prompt_ids(tokenizer, work.experts[e], example, fmt),
        model_lib.context_length(cfg.model, source),
    )  # before the weights load
    policy = model_lib.load_policy(cfg.model, source)
    # The engine copies the weights before accelerate wraps (and, under FSDP/ZeRO-3, shards) them.
    engine = make_engine(
        cfg.rollout.backend,
        policy,
        tokenizer,
        dtype,
        cfg.rollout.sequences_per_generate,
        share_weights=not sharded(accelerator),
        vllm=dataclasses.asdict(cfg.rollout.vllm),
        tokens_per_generate=cfg.rollout.tokens_per_generate,
    )
    logger = MetricsLogger(
        work.run_dir,
        cfg.log.backends,
        to_dict(cfg),
        enabled=accelerator.is_main_process,
        wandb_project=cfg.log.wandb_project,
        wandb_mode=cfg.log.wandb_mode,
    )
    log.info(
        "model %s: %.1fM parameters (%.1fM trainable), compute dtype %s, %d process(es)",
        cfg.model.name_or_path,
        _count(policy) / 1e6,
        _count(policy, trainable=True) / 1e6,
        dtype,
        accelerator.num_processes,
    )
    fields = {f.name: getattr(work, f.name) for f in dataclasses.fields(Workload)}
    return Session(
        **fields,
        accelerator=accelerator,
        tokenizer=tokenizer,
        policy=accelerator.prepare_model(policy),
        engine=engine,
        logger=logger,
        buffer=HardExampleBuffer(cfg.algo.hsft.buffer_size),
        budget=ExpertBudget(len(work.experts)) if cfg.rollout.budget.enabled else None,
    )


def model_source(cfg: Config) -> str:
    """What to load: model.name_or_path, where a run directory (it holds checkpoints/ and no
    config.json) means the model of its newest valid checkpoint (`meml train
    model.name_or_path=runs/sft-1 sft.enabled=false` continues from a stage-1 run)."""
    path = Path(cfg.model.name_or_path).expanduser()
    if (path / "checkpoints").is_dir() and not (path / "config.json").exists():
        latest = ckpt.find_latest(path)
        if latest is None:
            raise ModelLoadError(f"model.name_or_path: run directory {path} has no valid checkpoint")
        if not (latest / "model" / "config.json").exists():
            raise ModelLoadError(
                f"model.name_or_path: {latest / 'model'} holds a LoRA adapter, not a whole model; "
                "start from the base model with the adapter's run resumed instead"
            )
        log.info("model.name_or_path: run directory %s, checkpoint %s", path, latest.name)
        return str(latest / "model")
    return model_lib.resolve_model_source(cfg.model)


def sharded(accelerator: Accelerator) -> bool:
    """Whether accelerate shards the policy (FSDP, DeepSpeed): full weights must be gathered."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def sync_rollout_weights(s: Session) -> None:
    """Make the rollout engine sample from the policy's current weights.

    Under FSDP or DeepSpeed the full weights are gathered first (a collective call)."""
    if sharded(s.accelerator):
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
