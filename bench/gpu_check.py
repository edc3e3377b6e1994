"""Every GPU check in one run: the paper's model sizes, transformers and vLLM rollouts, tokens/s, MFU, memory.

    python bench/gpu_check.py --out bench/results/gpu_check.json      # all checks, under 8 min on one H200
    python bench/gpu_check.py --models llama3.2-1b --skip-vllm        # a subset
    python bench/gpu_check.py --device cpu --scale 0.02 --steps 1 --out /tmp/gpu_check.json   # smoke run
    .venv-vllm/bin/python bench/gpu_check.py --device cpu --scale 0.02 --steps 1 --out /tmp/g.json  # + vLLM smoke

Runs from a fresh checkout with `pip install torch transformers accelerate peft` (meml need
not be installed: src/ is put on the path) and, where it imports, vllm. Model weights cannot
travel to a lent GPU machine, and speed and memory do not need trained weights: each model is
built randomly initialised from its published shape (Qwen2.5-1.5B, Llama-3.2-1B), saved once
in bf16 to a temporary directory and loaded from there as the fp32 policy (vLLM loads the same
files). Prompts are random token ids; lengths are forced (stop tokens masked until
--new-tokens), so every completion is exactly that long and the figures do not depend on what
a random model happens to emit.

What is measured, in this order (the JSON is rewritten after each check, so a run cut short
keeps what it finished; checks left when --budget-s runs out are recorded as skipped):
  peak       the best of a few timed bf16 matmuls (8192^3 on a GPU): the MFU denominator
  hf         per model, --steps RL steps with meml's own pieces as the trainer runs them: the
             transformers engine's batched generate from its bf16 copy (questions x experts
             prompts, G samples each), then forward/backward in micro-batches with bf16 autocast
             over fp32 master weights (log-probs a chunk of positions at a time where the update
             offers it), clipping, an AdamW step and the weight sync. Per step: generation and
             update seconds, tokens/s, MFU (model FLOPs as bench/common.py counts them: 2 per
             weight per token, the LM head where logits are taken, causal attention; update =
             3 forwards), and peak memory per phase (torch's max allocated and reserved, and
             the device's used memory). The last step is the figure (the first warms up).
  vllm       per model, where vllm imports: meml's VLLMEngine colocated with the policy and its
             AdamW state: start-up, generate tok/s and MFU over the same prompts after a
             warm-up call, weight sync after a step on every weight and after changing two
             layers, peak memory.
How to read it: MFU is achieved model FLOP/s over the measured matmul peak; generation at
these batch sizes is memory-bound, so its MFU sits far below the update's. Peak memory is
what one GPU needs for full fine-tuning at that size with this batch (fp32 master weights,
gradients and AdamW state are 16 bytes a parameter before activations).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # a fresh checkout: meml need not be installed
sys.path.insert(0, str(HERE))
from common import causal_pairs, forward_flops, model_shape  # noqa: E402

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
EOS, PAD = 2, 0


class StubTokenizer:
    """What the engines need from a tokenizer when prompts are token ids."""

    pad_token_id = PAD
    eos_token_id = EOS

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


def save_random_model(name: str, scale: float, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    if scale < 1:  # narrower and shallower, with the same head size and head structure
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        head_dim = shape["hidden_size"] // heads
        shape["num_hidden_layers"] = max(2, int(shape["num_hidden_layers"] * scale))
        shape["num_attention_heads"] = max(kv, int(heads * scale) // kv * kv)
        shape["hidden_size"] = shape["num_attention_heads"] * head_dim
        shape["intermediate_size"] = max(128, int(shape["intermediate_size"] * scale))
        shape["vocab_size"] = max(1024, int(shape["vocab_size"] * scale))
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.5B weights on a CPU is slow
        model = model_cls(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(directory)  # bf16 on disk: the fp32 policy loads it exactly
    del model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Memory:
    """Peak device memory of a phase: torch's allocator peaks (reset at the start) and the
    device's used memory at the end (what other allocators, vLLM's included, hold too)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        if self.device.type != "cuda":
            return {}
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "device_used_gib": (total - free) / 2**30,
        }


def matmul_peak(device: torch.device, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) bf16 product over a few timed batches."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t))
    return best


def flops_of(shape: dict, prompts: list[list[int]], completions: list[list[int]], samples: int) -> tuple[float, float]:
    """Model FLOPs of generating `completions` (the prompt prefilled once per row) and of
    training them (3 forwards over prompt + completion)."""
    gen = train = 0.0
    for i, c in enumerate(completions):
        p = len(prompts[i // samples])
        gen += forward_flops(shape, p + len(c) - 1, len(c), causal_pairs(p + len(c) - 1))
        train += 3 * forward_flops(shape, p + len(c), len(c), causal_pairs(p + len(c)))
    return gen, train


def random_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(count)]


def forced_generate(engine, max_new: int) -> None:
    """Stop tokens masked until max_new tokens (transformers' min_new_tokens)."""
    generate_ids = engine.model.generate

    def forced(*a, generation_config, **k):
        config = copy.copy(generation_config)
        config.min_new_tokens = max_new
        return generate_ids(*a, generation_config=config, **k)

    engine.model.generate = forced


def hf_check(policy, args, device: torch.device, peak: float) -> dict:
    from meml.algo import objective
    from meml.algo.objective import LossSettings, TrainItem
    from meml.engines.base import SamplingParams
    from meml.engines.hf import HFEngine
    from meml.train.update import accumulate_gradients

    sequence_weights = getattr(objective, "sequence_weights", None)
    if sequence_weights is None:  # before it moved to algo/objective.py
        from meml.algo.losses import sequence_weights
    from meml.engines.model import compute_dtype

    dtype = compute_dtype("auto", device)
    mem = Memory(device)
    shape = model_shape(policy)
    rows = args.questions * args.experts * args.group
    engine = HFEngine(policy, StubTokenizer(), dtype, sequences_per_generate=rows)
    forced_generate(engine, args.new_tokens)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    acc = OneProcess(device, dtype)
    prompts = random_prompts(policy.config.vocab_size, args.questions * args.experts, args.prompt_len)
    sampling = SamplingParams(num_samples=args.group, temperature=1.0, max_new_tokens=args.new_tokens)
    chunk = (
        {"chunk_tokens": args.logit_chunk_tokens}
        if "chunk_tokens" in inspect.signature(accumulate_gradients).parameters
        else {}
    )
    steps = []
    for step in range(args.steps):
        mem.start()
        t0 = time.perf_counter()
        groups = engine.generate(prompts, sampling, seeds=[step * 100_000 + i for i in range(len(prompts))])
        sync(device)
        t1 = time.perf_counter()
        gen_mem = mem.read()
        completions = [g.token_ids for group in groups for g in group]
        lengths = torch.tensor([len(c) for c in completions])
        weights = sequence_weights(lengths, "token_mean", args.new_tokens)
        items = [
            TrainItem("pg", prompts[i // args.group], c, weight=float(w), advantage=1.0)
            for i, (c, w) in enumerate(zip(completions, weights))
        ]
        mem.start()
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(policy, items, LossSettings(), args.micro_batch_tokens, PAD, acc, **chunk)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        sync(device)
        t3 = time.perf_counter()
        engine.sync_weights(policy)
        sync(device)
        t4 = time.perf_counter()
        update_mem = mem.read()
        gen_flops, train_flops = flops_of(shape, prompts, completions, args.group)
        generated = int(lengths.sum())
        trained = sum(len(it.prompt_ids) + len(it.response_ids) for it in items)
        row = {
            "step": step,
            "generate_s": t1 - t0,
            "update_s": t3 - t2,
            "sync_s": t4 - t3,
            "step_s": (t1 - t0) + (t4 - t2),
            "sequences": len(completions),
            "generated_tokens": generated,
            "all_forced_length": bool((lengths == args.new_tokens).all()),
            "gen_tokens_per_s": generated / (t1 - t0),
            "train_tokens_per_s": trained / (t3 - t2),
            "mfu_generate": gen_flops / (t1 - t0) / peak,
            "mfu_update": train_flops / (t3 - t2) / peak,
            "memory_generate": gen_mem,
            "memory_update": update_mem,
        }
        steps.append(row)
        print(
            f"   hf step {step}: generate {row['generate_s']:.1f}s ({row['gen_tokens_per_s']:.0f} tok/s, MFU "
            f"{100 * row['mfu_generate']:.1f}%), update {row['update_s']:.1f}s ({row['train_tokens_per_s']:.0f} "
            f"tok/s, MFU {100 * row['mfu_update']:.1f}%), peak "
            + (f"{update_mem['max_allocated_gib']:.1f} GiB" if update_mem else "n/a on CPU"),
            flush=True,
        )
    del engine, optimizer
    policy.zero_grad(set_to_none=True)
    return {"dtype": str(dtype), "steps": steps, "last": steps[-1]}


def vllm_check(policy, args, device: torch.device, peak: float) -> dict:
    from meml.engines.base import SamplingParams
    from meml.engines.vllm import VLLMEngine

    mem = Memory(device)
    shape = model_shape(policy)
    prompts = random_prompts(policy.config.vocab_size, args.questions * args.experts, args.prompt_len)
    params = SamplingParams(args.group, 1.0, 1.0, args.new_tokens, 0)
    import msgspec
    import vllm

    mem.start()
    t0 = time.perf_counter()
    engine = VLLMEngine(policy, StubTokenizer(), torch.bfloat16, sequences_per_generate=len(prompts) * args.group)
    startup = time.perf_counter() - t0
    request = engine._request  # forced lengths: each request's SamplingParams gets min_tokens = max_tokens

    def forced_request(sampling, seed):
        r = request(sampling, seed)
        return msgspec.structs.replace(r, min_tokens=r.max_tokens)

    engine._request = forced_request
    engine.generate(prompts[:2], SamplingParams(1, 1.0, 1.0, 8, 0))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    gen_s = time.perf_counter() - t0
    completions = [x.token_ids for group in out for x in group]
    tokens = sum(len(c) for c in completions)
    gen_flops, _ = flops_of(shape, prompts, completions, args.group)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    batch = torch.tensor(prompts[:4], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = policy(batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    sync(device)
    t0 = time.perf_counter()
    engine.sync_weights(policy)
    sync_all = time.perf_counter() - t0
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".layers.0." in n or ".layers.1." in n:
                p.add_(1e-4)
    t0 = time.perf_counter()
    engine.sync_weights(policy)
    sync_two = time.perf_counter() - t0
    memory = mem.read()
    engine.close()
    del optimizer
    policy.zero_grad(set_to_none=True)
    result = {
        "vllm": vllm.__version__,
        "startup_s": startup,
        "sequences": len(completions),
        "generated_tokens": tokens,
        "all_forced_length": all(len(c) == args.new_tokens for c in completions),
        "generate_s": gen_s,
        "tokens_per_s": tokens / gen_s,
        "mfu_generate": gen_flops / gen_s / peak,
        "sync_all_s": sync_all,
        "sync_two_layers_s": sync_two,
        "memory": memory,
    }
    print(
        f"   vllm: start-up {startup:.1f}s, {result['tokens_per_s']:.0f} tok/s (MFU "
        f"{100 * result['mfu_generate']:.1f}%), sync all {sync_all:.2f}s, two layers {sync_two:.3f}s",
        flush=True,
    )
    return result


def vllm_status(skip: bool) -> str | None:
    """None when vLLM can run here, else why not."""
    if skip:
        return "--skip-vllm"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import means: not here
        return f"vllm does not import ({type(exc).__name__}: {exc})"
    return None


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the models (smoke runs only)")
    parser.add_argument("--steps", type=int, default=2, help="RL steps per model on the transformers path")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--group", type=int, default=8, help="answers per (question, expert), the paper's G")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch-tokens", type=int, default=32768)
    parser.add_argument("--logit-chunk-tokens", type=int, default=1024)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450, help="start no check after this many seconds")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    args = parser.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA GPU here: run this on a GPU machine, or pass --device cpu --scale 0.02 for a smoke run"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": vars(args), "environment": environment(device), "models": {}, "skipped": []}

    def write() -> None:
        report["elapsed_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(report, indent=1))

    print(f"environment: {report['environment']}", flush=True)
    n = 8192 if device.type == "cuda" else 1024
    peak = matmul_peak(device, n)
    report["peak"] = {"matmul": f"bf16 {n}^3", "tflops": peak / 1e12}
    print(f"bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s", flush=True)
    no_vllm = vllm_status(args.skip_vllm)
    if no_vllm:
        report["skipped"].append({"check": "vllm", "why": no_vllm})
    write()
    for name in args.models.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"].append({"check": f"{name}", "why": f"time budget {args.budget_s:.0f} s spent"})
            continue
        from transformers import AutoModelForCausalLM

        directory = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
        try:
            t0 = time.perf_counter()
            save_random_model(name, args.scale, directory)
            policy = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
            entry = {
                "parameters": sum(p.numel() for p in policy.parameters()),
                "shape": model_shape(policy),
                "build_s": time.perf_counter() - t0,
            }
            report["models"][name] = entry
            print(f"{name}: {entry['parameters'] / 1e9:.2f}B parameters, built in {entry['build_s']:.1f}s", flush=True)
            entry["hf"] = hf_check(policy, args, device, peak)
            write()
            if not no_vllm:
                if time.perf_counter() - t_start > args.budget_s:
                    report["skipped"].append({"check": f"{name}/vllm", "why": "time budget spent"})
                else:
                    try:
                        entry["vllm"] = vllm_check(policy, args, device, peak)
                    except Exception as exc:  # noqa: BLE001 - a failed vLLM check leaves the others' figures
                        entry["vllm"] = {"error": f"{type(exc).__name__}: {exc}"}
                        print(f"   vllm failed: {entry['vllm']['error']}", flush=True)
                write()
            del policy
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    write()
    for name, entry in report["models"].items():
        last = entry["hf"]["last"]
        line = (
            f"{name}: step {last['step_s']:.1f}s (generate {last['generate_s']:.1f}, update {last['update_s']:.1f}), "
            f"{last['gen_tokens_per_s']:.0f} generated tok/s, MFU generate {100 * last['mfu_generate']:.1f}% / update "
            f"{100 * last['mfu_update']:.1f}%"
        )
        if last["memory_update"]:
            line += f", peak {last['memory_update']['max_allocated_gib']:.1f} GiB allocated"
        if "tokens_per_s" in entry.get("vllm", {}):
            line += f"; vLLM {entry['vllm']['tokens_per_s']:.0f} tok/s"
        print(line)
    print(f"wrote {out} after {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
