"""Peak resident memory (RSS) of a `meml train` run, phase by phase.

    python bench/memory.py                       # the default job, shortened (see below), ~10 min on 2 cores
    python bench/memory.py --full                # exactly `meml train` with no arguments
    python bench/memory.py --variants baseline,arena2,trim   # allocator settings side by side
    python bench/memory.py --commit 3bc0250      # the same for an earlier commit's src/
    python bench/memory.py --profile rl_update   # + torch's per-op CPU memory profile of one phase
    python bench/memory.py --quick               # a smoke run of the script (tiny sizes; figures meaningless)

What it measures. The job runs in a child process (one per variant) through the trainer's own
`meml.train.loop.train`, with functions of the trainer wrapped from outside to mark phases:
  startup        imports, config, data (everything before the weights load)
  model_load     the fp32 policy from disk (engines/model.load_policy)
  rollout_copy   the rollout engine: its bf16 copy of the weights (make_engine)
  prepare        the rest of attaching the model (accelerate)
  eval           each held-out evaluation (before, after stage 1, after)
  sft_step       each stage-1 optimizer step (forward, backward, AdamW)
  rl_generate    each RL step's rollouts (engine.generate)
  rl_update      each RL step's optimizer step (forward, backward, AdamW)
  rl_other       the rest of an RL step (rewards, advantages, IML, HSFT, metrics)
  checkpoint     each checkpoint save
  other          anything between them
A phase's peak is exact, not sampled: at every phase boundary the child reads VmHWM from
/proc/self/status (the kernel's high-water mark of RSS) and resets it by writing 5 to
/proc/self/clear_refs. RSS counts what torch allocates on CPU (tracemalloc does not) and what
the C allocator keeps after a free. A sampler thread also reads VmRSS every 50 ms for a
timeline, and at each phase's end the RSS left behind is recorded (what the phase kept).
The overall peak is the largest phase peak (os.wait4's ru_maxrss would be wrong here: the
resets lower the high-water mark the kernel reports at exit).

Variants (each a fresh process; the same job):
  baseline   the allocator as it comes (glibc malloc, torch's defaults)
  arena2     MALLOC_ARENA_MAX=2 (fewer per-thread arenas holding freed memory)
  trim       malloc_trim(0) at every phase boundary (gives freed heap pages back)
  trimthr    glibc tunables: M_TRIM_THRESHOLD / M_MMAP_THRESHOLD at 64 MiB-free trimming

The shortened job (default): `meml train` with no arguments except sft.max_examples=16 (3
stage-1 steps instead of 18), train.steps=2 (instead of 8), task.max_eval_examples=16
(instead of 64) and a temporary output_dir. Every phase keeps its shape: an evaluation's
generate calls are of rollout.sequences_per_generate = 48 rows either way (64 questions x 3
experts make four such calls, 16 questions one), 160 new tokens; 16 traces a stage-1 step;
4 questions x 3 experts x 4 answers of up to 128 tokens an RL step; the checkpoints. So each
phase's peak is the default job's; only repetitions are dropped. --full runs the default job
as it is.

The code measured is a snapshot: the driver copies src/ (or, with --commit REV, that
commit's src/) to a temporary directory and runs the child with it first on PYTHONPATH, so
edits made to the tree during a long run do not mix versions. A child that fails still
reports the phases it finished (and the error).

Reading it: the table lists each phase's peak RSS (max over its occurrences) and the RSS it
left behind; the overall peak is the largest phase peak. Peak RSS does not depend on the
machine's load, so it can be taken on a busy machine (times in the JSON are not figures).
Writes bench/results/memory.json (and, with --profile PHASE, the top ops by CPU memory).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit, machine, run_child, write_json  # noqa: E402

PHASES = (
    "startup",
    "model_load",
    "rollout_copy",
    "prepare",
    "eval",
    "sft_step",
    "rl_generate",
    "rl_update",
    "rl_other",
    "checkpoint",
    "other",
)
VARIANTS = {
    "baseline": {},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "trim": {"MEML_BENCH_TRIM": "1"},
    "trimthr": {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
}
SHORT = ["sft.max_examples=16", "train.steps=2", "task.max_eval_examples=16"]
QUICK = [
    "sft.max_examples=4",
    "sft.sequences_per_step=4",
    "train.steps=1",
    "train.questions_per_step=1",
    "rollout.num_generations_per_expert=2",
    "algo.hsft.max_wrong=1",
    "rollout.max_new_tokens=8",
    "eval.max_new_tokens=8",
    "task.max_eval_examples=4",
]


def live_tensor_mb() -> float:
    """MB of CPU tensor storage reachable from Python objects (each storage once): what
    torch holds, against RSS, which also counts what the allocator kept after frees."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (meta, sparse, functional)
            continue
    return total / 2**20


def _status_mb(*keys: str) -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in keys}


class PhaseMeter:
    """Exact peak RSS per phase: VmHWM read and reset (clear_refs) at every boundary."""

    def __init__(self, trim: bool = False):
        self.stack: list[str] = ["startup"]
        self.peak_mb: dict[str, float] = {}
        self.after_mb: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.events: list[dict] = []
        self.timeline: list[tuple[float, float, str]] = []
        self.t0 = time.perf_counter()
        self.mark = self.t0
        self.trim = trim
        self.libc = ctypes.CDLL("libc.so.6") if trim else None
        self.reset_ok = self._reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:  # not Linux, or not allowed: peaks become cumulative (noted in the JSON)
            return False

    def _close_segment(self) -> None:
        """Attribute the peak since the last boundary to the phase on top of the stack."""
        phase = self.stack[-1]
        now = time.perf_counter()
        m = _status_mb("VmHWM", "VmRSS")
        self.peak_mb[phase] = max(self.peak_mb.get(phase, 0.0), m["VmHWM"])
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.mark
        self.mark = now
        if self.trim:
            self.libc.malloc_trim(0)
        self._reset()

    @contextmanager
    def phase(self, name: str):
        self._close_segment()
        self.stack.append(name)
        self.count[name] = self.count.get(name, 0) + 1
        try:
            yield
        finally:
            peak_before = self.peak_mb.get(name, 0.0)
            self._close_segment()
            self.stack.pop()
            rss = _status_mb("VmRSS")["VmRSS"]
            self.after_mb[name] = rss
            self.events.append(
                {
                    "phase": name,
                    "n": self.count[name],
                    "t_end_s": round(time.perf_counter() - self.t0, 2),
                    "peak_mb": round(max(peak_before, self.peak_mb[name]), 1),
                    "rss_after_mb": round(rss, 1),
                    "tensors_after_mb": round(live_tensor_mb(), 1),
                }
            )

    def relabel(self, name: str) -> None:
        """Close the current segment and call what follows `name` (the bottom of the stack)."""
        self._close_segment()
        self.stack[0] = name

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            if self.stack[-1] == name:  # re-entrant: already inside this phase
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = _status_mb("VmRSS")["VmRSS"]
            except (OSError, AttributeError):
                continue
            self.timeline.append((round(time.perf_counter() - self.t0, 2), round(rss, 1), self.stack[-1]))

    def finish(self) -> dict:
        self._close_segment()
        self._stop.set()
        self._thread.join()
        step = max(1, len(self.timeline) // 2000)  # keep the JSON small
        return {
            "peak_mb": self.peak_mb,
            "rss_after_mb": self.after_mb,
            "occurrences": self.count,
            "seconds": self.seconds,
            "events": self.events,
            "timeline": self.timeline[::step],
            "exact_phase_peaks": self.reset_ok,
        }


def instrument(meter: PhaseMeter, profile: str | None) -> None:
    """Wrap the trainer's functions so that each call runs inside its phase."""
    from meml.engines import model as model_lib
    from meml.train import loop, rl_step, session

    meter.wrap(model_lib, "load_policy", "model_load")
    meter.wrap(session, "make_engine", "rollout_copy")
    meter.wrap(loop, "attach_model", "prepare")
    meter.wrap(loop, "evaluate", "eval")
    meter.wrap(loop, "optimizer_step", "sft_step")  # stage 1's step (the RL step imports its own)
    sampling = sys.modules.get("meml.train.sampling") or _try_import("meml.train.sampling") or rl_step
    meter.wrap(sampling, "roll_out", "rl_generate")  # train/sampling.py since the sparse-reward toolkit
    meter.wrap(rl_step, "optimizer_step", "rl_update")
    meter.wrap(loop, "rl_step", "rl_other")  # the whole RL step; generate and update are carved out of it
    meter.wrap(loop, "save", "checkpoint")
    if profile:
        _profile_one(meter, profile)


def _try_import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _profile_one(meter: PhaseMeter, phase: str) -> None:
    """torch's CPU memory profile of the first occurrence of `phase` (top ops by memory)."""
    targets = {
        "eval": ("meml.train.loop", "evaluate"),
        "sft_step": ("meml.train.loop", "optimizer_step"),
        "rl_generate": (
            "meml.train.sampling" if _try_import("meml.train.sampling") else "meml.train.rl_step",
            "roll_out",
        ),
        "rl_update": ("meml.train.rl_step", "optimizer_step"),
        "checkpoint": ("meml.train.loop", "save"),
    }
    module_name, attr = targets[phase]
    module = sys.modules[module_name]
    fn = getattr(module, attr)
    done = []

    def profiled(*args, **kwargs):
        if done:
            return fn(*args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            out = fn(*args, **kwargs)
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_memory_usage", row_limit=25)
        print(f"memory profile of {phase}:\n{table}", flush=True)
        done.append(
            [
                {
                    "op": e.key,
                    "shapes": str(e.input_shapes)[:200],
                    "self_cpu_memory_mb": e.self_cpu_memory_usage / 2**20,
                    "cpu_memory_mb": e.cpu_memory_usage / 2**20,
                    "calls": e.count,
                }
                for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_memory_usage)[
                    :25
                ]
            ]
        )
        return out

    setattr(module, attr, profiled)
    meter.profile = done


def child(args) -> dict:
    meter = PhaseMeter(trim=os.environ.get("MEML_BENCH_TRIM") == "1")
    import torch

    import meml
    from meml.core.load import load_config
    from meml.train import loop

    instrument(meter, args.profile)
    out = tempfile.mkdtemp(prefix="memory-")
    overrides = [f"output_dir={out}", "log.progress=false"]
    overrides += [] if args.full else QUICK if args.quick else SHORT
    overrides += args.override
    cfg = load_config(args.preset or None, overrides)
    meter.relabel("other")
    error = None
    try:
        loop.train(cfg, args.preset or None)
    except Exception as exc:  # noqa: BLE001 - the phases measured so far still count
        error = f"{type(exc).__name__}: {exc}"[:2000]
    result = meter.finish()
    result["error"] = error
    result["overall_peak_mb"] = max(result["peak_mb"].values())
    result.update(
        overrides=overrides,
        preset=args.preset,
        torch_threads=torch.get_num_threads(),
        env={k: os.environ[k] for k in os.environ if k.startswith(("MALLOC", "MEML_BENCH"))},
        profile=getattr(meter, "profile", [None])[0] if args.profile else None,
        meml_source=str(Path(meml.__file__).parent),
    )
    return result


def snapshot(commit: str | None) -> tuple[str, Path]:
    """A copy of src/ to measure: the working tree's, or a commit's. Returns a description of
    it (the commit, '+ changes' when the tree differs) and the copy's src directory."""
    import subprocess

    def git(*a) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()

    target = Path(tempfile.mkdtemp(prefix="memory-src-"))
    if commit:
        archive = subprocess.run(["git", "archive", commit, "src"], capture_output=True, cwd=REPO, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        return git("rev-parse", "--short", commit), target / "src"
    shutil.copytree(REPO / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dirty = git("status", "--porcelain", "--", "src")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in src/" if dirty else ""), target / "src"


def report(name: str, r: dict) -> None:
    peaks = r["peak_mb"]
    top = max(peaks, key=lambda p: peaks[p])
    print(
        f"\n{name}: overall peak {r['overall_peak_mb']:.0f} MB in {top}"
        + (f"; FAILED: {r['error']}" if r.get("error") else "")
    )
    print(f"  {'phase':14s} {'peak MB':>9s} {'left MB':>9s} {'times':>6s}")
    for phase in PHASES:
        if phase in peaks:
            print(
                f"  {phase:14s} {peaks[phase]:9.0f} {r['rss_after_mb'].get(phase, float('nan')):9.0f} "
                f"{r['occurrences'].get(phase, 1):6d}"
            )
    print("  in order (peak / RSS after / live tensors after, MB):")
    for e in r["events"]:
        figures = f"{e['peak_mb']:7.0f} {e['rss_after_mb']:7.0f} {e['tensors_after_mb']:7.0f}"
        print(f"    {e['phase']:12s} #{e['n']:<3d} {figures}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="", help="a preset for `meml train` (default: none, the default job)")
    parser.add_argument("--full", action="store_true", help="the default job unshortened")
    parser.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes")
    parser.add_argument("--override", action="append", default=[], help="key=value, repeatable")
    parser.add_argument("--variants", default="baseline", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", choices=("eval", "sft_step", "rl_generate", "rl_update", "checkpoint"))
    parser.add_argument("--commit", help="measure this commit's src/ (default: the working tree's, copied)")
    parser.add_argument("--out", default="memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(child(args))
        return 0
    argv = ["--preset", args.preset] + (["--full"] if args.full else []) + (["--quick"] if args.quick else [])
    argv += [a for o in args.override for a in ("--override", o)]
    argv += ["--profile", args.profile] if args.profile else []
    commit, source = snapshot(args.commit)
    results = {}
    for name in args.variants.split(","):
        env = {**VARIANTS[name], "PYTHONPATH": str(source)}
        r = run_child([sys.executable, __file__, "--child", *argv], env=env, label=f"memory/{name}")
        report(name, r)
        results[name] = r
    shutil.rmtree(source.parent, ignore_errors=True)
    write_json(
        args.out,
        {
            "config": {k: v for k, v in vars(args).items() if k != "child"},
            "commit": commit,
            "machine": machine(),
            "variants": results,
            "summary": {
                name: {"overall_peak_mb": r["overall_peak_mb"], "phase_peak_mb": r["peak_mb"]}
                for name, r in results.items()
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
