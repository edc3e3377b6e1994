"""GPU check: a few training steps at the paper's model sizes, with throughput and memory.

    python bench/gpu_check.py                      # both models, on the GPU (about 5 minutes on an H100)
    python bench/gpu_check.py --models llama3.2-1b --steps 2
    python bench/gpu_check.py --device cpu --scale 0.02 --steps 1   # a smoke run of the script itself

Model weights cannot travel to a lent GPU machine (no network, 64 MiB of files), and
throughput and memory do not need trained weights: each model is built randomly
initialised from its published shape (Qwen2.5-1.5B, Llama-3.2-1B). Prompts are random
token ids. Each step runs meml's own pieces as the trainer does: the rollout engine's
batched generate from a bf16 copy, then forward/backward in micro-batches with bf16
autocast over fp32 master weights, an AdamW step and the weight sync. Prints tokens/s,
the step-time breakdown and peak memory, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

SHAPES = {
    # published configs (hidden, intermediate, layers, heads, kv heads, vocab, rope theta)
    "qwen2.5-1.5b": dict(
        arch="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
    ),
}


def build_model(name: str, scale: float, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    if scale < 1:  # shrink width and depth for a smoke run, keep the head structure valid
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        head_dim = shape["hidden_size"] // heads
        shape["num_hidden_layers"] = max(1, int(shape["num_hidden_layers"] * scale))
        shape["num_attention_heads"] = max(kv, int(heads * scale) // kv * kv)
        shape["hidden_size"] = shape["num_attention_heads"] * head_dim
        shape["intermediate_size"] = max(64, int(shape["intermediate_size"] * scale))
        shape["vocab_size"] = max(1024, int(shape["vocab_size"] * scale))
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = model_cls(config).to(device=device, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


class RandomTokenizer:
    """Just what the engine needs: pad/eos ids and a decode."""

    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return ""


class OneProcess:
    """The parts of an accelerate.Accelerator that update.accumulate_gradients uses."""

    num_processes = 1

    def __init__(self, device, dtype):
        self.device = device
        self.dtype = dtype

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def no_sync(self, model):
        return nullcontext()

    def backward(self, loss):
        loss.backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(name: str, args, device: torch.device) -> dict:
    from meml.algo.losses import sequence_weights
    from meml.algo.objective import LossSettings, TrainItem
    from meml.engines.base import SamplingParams
    from meml.engines.hf import HFEngine
    from meml.engines.model import compute_dtype
    from meml.train.update import accumulate_gradients

    dtype = compute_dtype("auto", device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(name, args.scale, device)
    params = sum(p.numel() for p in model.parameters())
    engine = HFEngine(model, RandomTokenizer(), dtype, batch_size=args.rollout_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    acc = OneProcess(device, dtype)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    n_prompts = args.questions * args.experts
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(n_prompts)]
    sampling = SamplingParams(num_samples=args.group, temperature=1.0, max_new_tokens=args.new_tokens)
    rows = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        groups = engine.generate(prompts, sampling, seeds=[step * 100_000 + i for i in range(n_prompts)])
        sync(device)
        t1 = time.perf_counter()
        completions = [g.token_ids for group in groups for g in group]
        lengths = torch.tensor([len(c) for c in completions])
        weights = sequence_weights(lengths, "token_mean", args.new_tokens)
        items = [
            TrainItem("pg", prompts[i // args.group], c, weight=float(w), advantage=1.0)
            for i, (c, w) in enumerate(zip(completions, weights))
        ]
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, items, LossSettings(), args.micro_batch_tokens, 0, acc)
        sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(device)
        t3 = time.perf_counter()
        engine.sync_weights(model)
        sync(device)
        t4 = time.perf_counter()
        generated = int(lengths.sum())
        trained = sum(len(it.prompt_ids) + len(it.response_ids) for it in items)
        row = {
            "step": step,
            "generate_s": t1 - t0,
            "forward_backward_s": t2 - t1,
            "optimizer_s": t3 - t2,
            "sync_s": t4 - t3,
            "step_s": t4 - t0,
            "generated_tokens": generated,
            "gen_tokens_per_s": generated / (t1 - t0),
            "train_tokens_per_s": trained / (t2 - t1),
            "tokens_per_s": generated / (t4 - t0),
        }
        rows.append(row)
        print(f"{name} step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "step"), flush=True)
    last = rows[-1]  # the first step includes CUDA/cuBLAS warm-up
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {
        "model": name,
        "parameters": params,
        "dtype": str(dtype),
        "device": str(device),
        "peak_memory_gib": peak,
        "config": vars(args),
        "steps": rows,
        "last": last,
    }
    del model, engine, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the models (smoke runs only)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--group", type=int, default=8, help="answers per (question, expert), the paper's G")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rollout-batch", type=int, default=384)
    parser.add_argument("--micro-batch-tokens", type=int, default=32768)
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA GPU here: run this on a GPU machine, or pass --device cpu --scale 0.02 for a smoke run"
        )
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = [check(name, args, device) for name in args.models.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for r in results:
        last = r["last"]
        print(
            f"{r['model']}: {r['parameters'] / 1e9:.2f}B params, step {last['step_s']:.1f}s "
            f"(generate {last['generate_s']:.1f}, fwd+bwd {last['forward_backward_s']:.1f}, optim "
            f"{last['optimizer_s']:.2f}, "
            f"sync {last['sync_s']:.2f}), {last['gen_tokens_per_s']:.0f} generated tok/s, "
            f"{last['train_tokens_per_s']:.0f} "
            "trained tok/s, peak memory "
            f"{r['peak_memory_gib'] if r['peak_memory_gib'] is None else round(r['peak_memory_gib'], 1)} GiB"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
