"""Peak RSS of three stage-1 steps of the default job under settings that might lower it.

    python bench/sft_peak.py                     # the default variants, ~3 min each on 2 cores
    python bench/sft_peak.py --variants micro1024,checkpointing

bench/memory.py shows that the peak of the default run is inside a stage-1 step (a step of 16
traces). This probe asks what that peak is made of. It runs `meml train` with
sft.max_examples=16 (48 traces: three steps), no RL and no evaluation, once per variant, each
in a fresh process, and reads the process's ru_maxrss:
  default        the default settings (train.micro_batch_tokens=2048)
  micro1024      train.micro_batch_tokens=1024: half the tokens per forward/backward
  checkpointing  model.gradient_checkpointing=true: the layers' activations recomputed
  micro2048      train.micro_batch_tokens=2048 (the default since the scaling study)
  checkpointing_micro2048   both
  fused_adamw    AdamW with fused=True: no foreach temporaries the size of the weights
  loop_adamw     AdamW with foreach=False: one parameter at a time
  mmap1m         MALLOC_MMAP_THRESHOLD_=1048576 (glibc maps every block of 1 MiB or more on
                 its own and unmaps it on free); its wall time shows what the page faults cost
A variant that lowers the peak shows what the peak is made of. Peak RSS does not depend on
the machine's load, so this can run on a busy machine. The step times it prints do depend
on load, so they are not figures. Writes bench/results/sft_peak.json.
"""

from __future__ import annotations

import argparse
import functools
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, run_child, write_json  # noqa: E402

VARIANTS = {
    "default": [],
    "micro1024": ["train.micro_batch_tokens=1024"],
    "checkpointing": ["model.gradient_checkpointing=true"],
    "micro2048": ["train.micro_batch_tokens=2048"],
    "checkpointing_micro2048": ["model.gradient_checkpointing=true", "train.micro_batch_tokens=2048"],
    "fused_adamw": [],
    "loop_adamw": [],
    "mmap1m": [],
}
# environment of a variant's child process: glibc's mmap threshold fixed at 1 MiB, so freed
# activation-sized blocks go back to the OS instead of staying in the arenas
VARIANT_ENV = {"mmap1m": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}
JOB = [
    "sft.max_examples=16",
    "train.steps=0",
    "eval.before=false",
    "eval.after=false",
    "eval.after_mef=false",
    "log.progress=false",
]


def child(variant: str) -> dict:
    import torch

    from meml.core.load import load_config
    from meml.train.loop import train

    if variant in ("fused_adamw", "loop_adamw"):
        option = {"fused": True} if variant == "fused_adamw" else {"foreach": False}
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, **option)
    cfg = load_config(None, [*JOB, f"output_dir={tempfile.mkdtemp(prefix='sft-peak-')}", *VARIANTS[variant]])
    t0 = time.time()
    train(cfg)
    return {
        "variant": variant,
        "overrides": VARIANTS[variant],
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="sft_peak.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(child(args.child))
        return 0
    results = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        r = run_child(
            [sys.executable, __file__, "--child", name],
            env={"HF_HUB_OFFLINE": "1", **VARIANT_ENV.get(name, {})},
            label=name,
        )
        results[name] = r
        print(f"{name:14s} peak RSS {r['maxrss_mb']:7.0f} MB  ({' '.join(r['overrides']) or 'as is'})", flush=True)
    write_json(args.out, {"job": JOB, "machine": machine(), "variants": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
