"""Where the update's time goes: torch.profiler over one RL update, top ops by self CPU time.

    python bench/profile_update.py                            # the default MEML job's shapes, ~3 min
    python bench/profile_update.py --trace /tmp/update.json   # + a Chrome trace (chrome://tracing, Perfetto)
    python bench/profile_update.py --steps 2 --questions 1 --generations 2 --max-new-tokens 16 \\
        --max-load 99 --out /tmp/profile_update.json          # smoke run (figures meaningless)

What it measures: meml's RL steps run as the trainer runs them (bench/common.py:meml_steps),
the default MEML job (3 experts x --generations answers to --questions questions, IML and
HSFT on) with lengths forced to --max-new-tokens (every completion that long) and every
sequence trained, zero-advantage ones included, so that the update has the same work on
every run. The update of the last step (train/update.py:optimizer_step: forward passes,
backward, clipping, AdamW) runs under torch.profiler (CPU activity, input shapes recorded);
earlier steps warm up. Printed and written to bench/results/profile_update.json:
  top ops      the --top ops by self CPU time (time inside the op, not its children), with
               calls, total time and the input shapes that took the most
  categories   self time summed into matmul, attention, softmax / log-softmax, other
               elementwise and reductions, copies and casts, optimizer, embedding, other
  wall         the update's wall time with and without the profiler (its overhead)
How to read it: the categories say where effort pays: matmuls are what an MFU figure counts;
everything else is time the model FLOPs do not buy (bench/mfu.py's MFU is their ratio). The
profiler adds per-op overhead, so read shares, not absolute times, and compare runs made with
the same settings. Self times of one op add up over every call and shape.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import force_lengths, machine, meml_steps, rl_only_overrides, wait_for_quiet, write_json  # noqa: E402

CATEGORIES = (  # first match wins; names are aten op names
    ("attention", ("attention", "sdpa", "_flash", "_efficient")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("softmax", ("softmax", "logsumexp")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "Optimizer", "clip_grad")),
    ("copies and casts", ("copy_", "aten::to", "_to_copy", "contiguous", "clone", "cat", "index", "gather", "scatter")),
    ("embedding", ("embedding",)),
    (
        "elementwise and reductions",
        (
            "mul",
            "add",
            "sub",
            "div",
            "silu",
            "exp",
            "log",
            "pow",
            "rsqrt",
            "mean",
            "sum",
            "neg",
            "where",
            "fill",
            "max",
        ),
    ),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def profile_last_update(steps: int, record: dict, trace: str | None):
    """on_session hook: wrap the RL step's optimizer_step so that its `steps`-th call runs
    under the profiler; the others are timed."""

    def hook(s) -> None:
        force_lengths(s)
        from meml.train import rl_step

        step_fn = rl_step.optimizer_step
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(None)
            if len(calls) < steps:
                t = time.perf_counter()
                out = step_fn(*args, **kwargs)
                record.setdefault("unprofiled_s", []).append(time.perf_counter() - t)
                return out
            from torch.profiler import ProfilerActivity, profile

            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                out = step_fn(*args, **kwargs)
            record["profiled_s"] = time.perf_counter() - t
            record["items"] = len(args[1]) if len(args) > 1 else None
            record["prof"] = prof
            if trace:
                prof.export_chrome_trace(trace)
            return out

        rl_step.optimizer_step = wrapped

    return hook


def tables(prof, top: int) -> dict:
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    rows = sorted(averages, key=lambda e: -e.self_cpu_time_total)
    by_shape = defaultdict(list)
    for e in prof.key_averages(group_by_input_shape=True):
        by_shape[e.key].append(e)
    top_ops = []
    for e in rows[:top]:
        shapes = sorted(by_shape[e.key], key=lambda x: -x.self_cpu_time_total)[:2]
        top_ops.append(
            {
                "op": e.key,
                "category": category(e.key),
                "self_s": e.self_cpu_time_total / 1e6,
                "self_share": e.self_cpu_time_total / max(1, total),
                "total_s": e.cpu_time_total / 1e6,
                "calls": e.count,
                "top_shapes": [
                    {"shapes": str(x.input_shapes)[:160], "self_s": x.self_cpu_time_total / 1e6} for x in shapes
                ],
            }
        )
    cats: dict[str, float] = defaultdict(float)
    for e in averages:
        cats[category(e.key)] += e.self_cpu_time_total
    return {
        "self_total_s": total / 1e6,
        "top_ops": top_ops,
        "categories": {
            k: {"self_s": v / 1e6, "share": v / max(1, total)} for k, v in sorted(cats.items(), key=lambda kv: -kv[1])
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="meml")
    parser.add_argument("--model", default="", help="model.name_or_path (default: the base model)")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="G per (question, expert)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="RL steps; the last one's update is profiled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", help="also write a Chrome trace of the profiled update here")
    parser.add_argument("--override", action="append", default=[], help="key=value for the job, repeatable")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--wait-s", type=float, default=900)
    parser.add_argument("--out", default="profile_update.json")
    args = parser.parse_args()
    load = wait_for_quiet(args.max_load, args.wait_s)
    overrides = rl_only_overrides(
        tempfile.mkdtemp(prefix="profile-update-"),
        args.seed,
        args.steps,
        args.questions,
        args.generations,
        args.max_new_tokens,
    )
    overrides += [f"model.name_or_path={args.model}"] if args.model else []
    overrides += args.override
    record: dict = {}
    run = meml_steps(
        args.preset, overrides, skip_zero=False, on_session=profile_last_update(args.steps, record, args.trace)
    )
    if "prof" not in record:
        raise SystemExit("no update was profiled (fewer RL steps ran than --steps?)")
    result = tables(record.pop("prof"), args.top)
    last = run["steps"][-1]
    result.update(
        config=vars(args),
        machine=machine(),
        load_1m=[load, __import__("os").getloadavg()[0]],
        profiled_update_s=record["profiled_s"],
        unprofiled_update_s=record.get("unprofiled_s", []),
        trained_rows=last["counts"],
        step_metrics=last["metrics"],
    )
    print(
        f"update of step {args.steps}: {record['profiled_s']:.2f} s under the profiler "
        f"(unprofiled updates: {', '.join(f'{x:.2f}' for x in record.get('unprofiled_s', []))} s); "
        f"self time {result['self_total_s']:.2f} s"
    )
    print(f"{'category':28s} {'self s':>8s} {'share':>7s}")
    for cat, v in result["categories"].items():
        print(f"{cat:28s} {v['self_s']:8.2f} {100 * v['share']:6.1f}%")
    print(f"\n{'op':40s} {'category':18s} {'self s':>8s} {'share':>7s} {'calls':>7s}")
    for op in result["top_ops"]:
        print(
            f"{op['op'][:40]:40s} {op['category'][:18]:18s} {op['self_s']:8.3f} {100 * op['self_share']:6.1f}% "
            f"{op['calls']:7d}"
        )
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
