"""Shared fixtures: a tiny random Llama with a small trained BPE tokenizer, saved to disk
so tests go through the same loading code as real runs (no network, a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# The tiny model's matmuls are too small to gain from threads, and on a shared 2-core
# machine extra OpenMP threads spin against other work (10x slower measured). Tests on
# the real model set their own thread count.
torch.set_num_threads(int(os.environ.get("MEML_TEST_THREADS", "1")))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _corpus() -> list[str]:
    from meml.tasks.arithmetic import generate

    lines = []
    for ex in generate("train", 200, 2, 0):
        lines.append(ex.question)
        lines.extend(ex.rationales.values())
    lines.append("You are a patient math tutor. You are an algebraist. You are a careful checker. The answer is")
    return lines


def build_tiny_model(path: Path, vocab_size: int = 512) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tiny_overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    """Overrides that make any preset run in seconds on the tiny model."""
    base = {
        "model.name_or_path": str(model_dir),
        "output_dir": str(out),
        "task.options": "{train_size: 40, test_size: 8, difficulty: 1}",
        "task.max_eval_examples": 4,
        "train.steps": 2,
        "train.questions_per_step": 2,
        "rollout.num_generations_per_expert": 2,
        "rollout.max_new_tokens": 12,
        "algo.hsft.max_wrong": 1,
        "algo.hsft.buffer_size": 2,
        "sft.max_examples": 8,
        "sft.sequences_per_step": 8,
        "eval.max_new_tokens": 8,
        "eval.before": "false",
        "eval.after": "false",
        "log.progress": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (the ../shared/data checkout beside the repo)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state (the first mixed precision set wins): each test
    starts from none, so tests do not depend on the order they run in."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


OPT_IN = ("slow", "vllm")  # markers whose tests run only when `-m` names them: pytest -m slow


def pytest_collection_modifyitems(config, items):
    """Leave out slow and vllm tests unless the -m expression names them, so that any other
    selection (`pytest`, `pytest -m "not e2e"`) never starts them by accident."""
    expression = config.getoption("markexpr") or ""
    wanted = [m for m in OPT_IN if m in expression]
    keep, drop = [], []
    for item in items:
        opt_in = [m for m in OPT_IN if item.get_closest_marker(m)]
        (drop if opt_in and not any(m in wanted for m in opt_in) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
