"""``lab bench pipeline``: memory per pipeline stage, speed and idle share, and a memory cap one process cannot fit.

Three parts, each with the real trainer (``mlx-dp train``, ``mlx-dp launch -n N``)
on random-weight models of a real layer shape (Qwen3-0.6B's by default, built
locally, fp32, the tiny tokenizer's vocabulary, LoRA):

* **memory**: a model whose weights dominate memory (28 layers, 441M
  parameters, 1.77 GB of fp32 weights; batch 2 x ~34 tokens, so activations are
  small) trains as one process and as an N-stage pipeline
  (``parallel.pipeline=true``). Every rank runs under ``/usr/bin/time -v``
  (its "Maximum resident set size"), and a sampler reads each rank's
  ``/proc/PID/status`` (VmHWM, and RssAnon/RssFile at the highest VmRSS seen)
  and ``/proc/PID/io`` (rchar: bytes read, the weights among them). Reported:
  each stage's peak RSS, and largest stage / one process.
* **speed**: a smaller model of the same layer shape (8 layers), the same
  global batch and data, one process vs the pipeline at each
  ``parallel.pipeline_microbatches`` in ``--microbatches``, in alternating
  rounds (every variant once per round, the order reversed every other round).
  tokens/s over the measured updates (the first ``--warmup`` skipped), each
  stage's idle share (median over measured updates), medians and min-max over
  rounds, ratios against one process. On this machine one process may use every
  core for its OpenBLAS matmuls (``MLX_DP_BLAS_THREADS`` unset: cores / local
  ranks), each stage one; ``--one-threads`` adds one process pinned to fewer
  BLAS threads.
* **cap**: every rank in its own cgroup v1 memory group
  (``/sys/fs/cgroup/memory``, ``memory.limit_in_bytes`` and
  ``memory.memsw.limit_in_bytes``) capped between the largest stage's peak and
  one process's peak (``--cap-gb``; default their midpoint): one process under
  the cap, then the pipeline with each stage under the same cap. How each
  ended (exit status, signal, the cgroup's failcnt and OOM kills,
  ``status.json``'s state) is recorded; the groups are removed afterwards.

The JSON (``--json``) holds every raw figure, the command line, the git
commit and ``git status --short``, the mlx version, and the load average
before and after each launch.

Usage::

    MLX_DP_BLAS=openblas python scripts/lab bench pipeline --json results/pipeline.json
    MLX_DP_BLAS=openblas python scripts/lab bench pipeline --quick            # a look in a few minutes
    python scripts/lab bench pipeline --parts memory,cap --cap-gb 1.8
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

PARTS = ("memory", "speed", "cap")
TARGET_RATIO = 0.65  # the target: largest stage <= 0.65 x one process
TAG_VAR = "MLX_DP_PIPEBENCH_TAG"
MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
QUICK = {"layers": 4, "speed_layers": 2, "width_divisor": 4, "steps": 2, "warmup": 1, "rounds": 1,
         "microbatches": "1,2", "memory_steps": 1}
DEFAULTS = {"layers": 28, "speed_layers": 8, "width_divisor": 1, "steps": 4, "warmup": 2, "rounds": 2,
            "microbatches": "1,2,4,8", "memory_steps": 2}

# Each rank: into its memory cgroup (when capped), then under /usr/bin/time -v, its output to a file.
RANK_WRAPPER = r'''r=${MLX_RANK:-0}
if [ -n "$MLX_DP_PIPEBENCH_CGROUP" ]; then echo $$ > "$MLX_DP_PIPEBENCH_CGROUP-rank$r/cgroup.procs" || exit 97; fi
exec /usr/bin/time -v -o "$MLX_DP_PIPEBENCH_DIR/time.rank$r.txt" "$@" >>"$MLX_DP_PIPEBENCH_DIR/rank$r.log" 2>&1'''


# ---------------------------------------------------------------------------- arguments


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2, help="pipeline stages = local ranks (default 2)")
    p.add_argument("--arch", default="qwen3-0.6b", help="architecture in data/archs (default qwen3-0.6b)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the memory model (default 28: "
                   "1.77 GB of fp32 weights)")
    p.add_argument("--speed-layers", type=int, default=None, help="decoder layers of the speed model (default 8)")
    p.add_argument("--width-divisor", type=int, default=None, help="divide hidden sizes (default 1; quick: 4)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--batch", type=int, default=2, help="sequences per update in the memory and cap runs (default 2)")
    p.add_argument("--seq", type=int, default=32, help="mean tokens per sequence (default 32; rows are 32-36)")
    p.add_argument("--memory-steps", type=int, default=None, help="updates per memory and cap launch (default 2)")
    p.add_argument("--memory-microbatches", type=int, default=2, help="pipeline parts in the memory and cap runs "
                   "(default 2)")
    p.add_argument("--memory-rounds", type=int, default=1, help="launches per memory variant (default 1)")
    p.add_argument("--speed-batch", type=int, default=8, help="sequences per update in the speed runs (default 8)")
    p.add_argument("--microbatches", default=None, help="pipeline parts to time, comma-separated (default "
                   "1,2,4,8; those above --speed-batch are dropped)")
    p.add_argument("--one-threads", default="default,1", help="one-process variants by OpenBLAS threads: "
                   "'default' (cores / local ranks) and/or numbers (default: default,1)")
    p.add_argument("--steps", type=int, default=None, help="measured updates per speed launch (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured first updates per speed launch (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of the speed variants (default 2)")
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap per process in GB (default: midway "
                   "between the largest stage's and one process's peak RSS from the memory part)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (default {','.join(PARTS)})")
    p.add_argument("--quick", action="store_true", help="small everything: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (explicit options win)")
    p.add_argument("--timeout", type=float, default=1200, help="give up on one launch after this many seconds "
                   "(default 1200)")
    p.add_argument("--json", default=None, help="write every raw figure here")
    p.add_argument("--keep", default=None, help="keep the work folder (recipes, logs, run dirs) here")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    args.microbatches = parse_microbatches(args.microbatches, args.speed_batch)
    if not args.microbatches:
        p.error("--microbatches: none fits --speed-batch")
    args.one_threads = parse_threads(args.one_threads)
    if args.n < 2:
        p.error("-n: a pipeline needs at least 2 stages")
    if min(args.layers, args.speed_layers) < args.n:
        p.error(f"--layers and --speed-layers must be at least the {args.n} stages")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.memory_steps < 1 or args.memory_rounds < 1:
        p.error("--steps, --rounds, --memory-steps and --memory-rounds must be >= 1, --warmup >= 0")
    if args.memory_microbatches > args.batch:
        p.error("--memory-microbatches cannot exceed --batch")
    return args


def parse_microbatches(text: str, batch: int) -> list[int]:
    """``"1,2,4,8"`` -> the distinct part counts that a batch of ``batch`` rows can be cut into, in order."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        m = int(item)
        if m < 1:
            raise ValueError(f"--microbatches: {m} is not a positive count")
        if m <= batch and m not in out:
            out.append(m)
    return out


def parse_threads(text: str) -> list:
    """``"default,1"`` -> ``[None, 1]``: the one-process variants' OpenBLAS threads (None: the trainer's default)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        value = None if item == "default" else int(item)
        if value is not None and value < 1:
            raise ValueError(f"--one-threads: {value} threads")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("--one-threads: give at least one variant")
    return out


def speed_variants(one_threads: list, microbatches: list) -> list[str]:
    """The speed part's variants: one process per thread setting, then the pipeline per part count."""
    ones = ["one" if t is None else f"one-{t}thread" for t in one_threads]
    return ones + [f"pipeline-m{m}" for m in microbatches]


def round_order(variants: list, i: int) -> list:
    """Round ``i``'s order: as listed on even rounds, reversed on odd ones (so drift hits every variant alike)."""
    return list(variants) if i % 2 == 0 else list(reversed(variants))


# ---------------------------------------------------------------------------- parsing


def parse_time_v(text: str) -> dict:
    """The figures of GNU ``/usr/bin/time -v`` output that this bench uses (sizes in bytes, times in seconds)."""
    out = {"max_rss_bytes": None, "exit_status": None, "signal": None, "elapsed_s": None,
           "user_s": None, "system_s": None, "fs_inputs": None, "major_faults": None}
    for line in text.splitlines():
        line = line.strip()
        key, _, value = line.rpartition(": ")
        if line.startswith("Command terminated by signal"):
            out["signal"] = int(line.rsplit(" ", 1)[1])
        elif key == "Maximum resident set size (kbytes)":
            out["max_rss_bytes"] = int(value) * 1024
        elif key == "Exit status":
            out["exit_status"] = int(value)
        elif key == "User time (seconds)":
            out["user_s"] = float(value)
        elif key == "System time (seconds)":
            out["system_s"] = float(value)
        elif key == "File system inputs":
            out["fs_inputs"] = int(value)
        elif key == "Major (requiring I/O) page faults":
            out["major_faults"] = int(value)
        elif key.startswith("Elapsed (wall clock) time"):
            # "h:mm:ss" or "m:ss.ss"; the key itself holds a colon ("(h:mm:ss or m:ss)")
            parts = line.rsplit(" ", 1)[1].split(":")
            seconds = 0.0
            for part in parts:
                seconds = seconds * 60 + float(part)
            out["elapsed_s"] = seconds
    return out


def parse_status_kb(text: str) -> dict:
    """``/proc/PID/status`` memory lines (``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem``) in bytes."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def blas_threads(log_text: str):
    """The OpenBLAS threads per rank the trainer says it uses, or None (no MLX_DP_BLAS)."""
    found = re.search(r"\((\d+) thread\(s\) per rank\)", log_text)
    return int(found.group(1)) if found else None


def fill_blas_threads(ranks: list[dict]) -> None:
    """Only rank 0 prints the BLAS line; every rank gets the same threads (``MLX_DP_BLAS_THREADS``, else
    cores / local ranks), so a rank whose log lacks it takes rank 0's (``blas_threads_from`` says so)."""
    first = ranks[0].get("blas_threads") if ranks else None
    for r in ranks:
        if r.get("blas_threads") is None and first is not None:
            r["blas_threads"], r["blas_threads_from"] = first, "rank 0's log"


# ---------------------------------------------------------------------------- maths


def launch_figures(records: list[dict], warmup: int, stages: int = 1) -> dict:
    """One launch from its metrics.jsonl: tokens/s over the measured updates (total tokens / total seconds),
    the median update time, and each stage's idle share (median over measured updates)."""
    measured = [r for r in records if "step_time_s" in r and r.get("step", 0) > warmup]
    if not measured:
        raise ValueError(f"no training record after the {warmup} warm-up update(s)")
    seconds = sum(r["step_time_s"] for r in measured)
    out = {"updates": len(measured), "tokens": sum(r["tokens"] for r in measured),
           "tokens_per_s": sum(r["tokens"] for r in measured) / seconds,
           "step_time_s": statistics.median(r["step_time_s"] for r in measured),
           "step_times_s": [r["step_time_s"] for r in measured]}
    idle = [r["stage_idle_share"] for r in measured if "stage_idle_share" in r]
    if idle:
        out["stage_idle_share"] = [statistics.median(row[s] for row in idle) for s in range(stages)]
        out["stage_idle_share_per_update"] = idle
    return out


def spread(values: list) -> dict:
    """Median and min-max of a variant's per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise_speed(raw: dict, stages: int) -> dict:
    """Per variant: tokens/s median and range over rounds, idle share per stage (median of the rounds' medians,
    with its range); then every variant's tokens/s against each one-process variant."""
    out = {}
    for variant, runs in raw.items():
        ok = [r for r in runs if r.get("figures")]
        if not ok:
            out[variant] = {"failed": len(runs)}
            continue
        tps = [r["figures"]["tokens_per_s"] for r in ok]
        row = {"tokens_per_s": spread(tps), "step_time_s": spread([r["figures"]["step_time_s"] for r in ok]),
               "failed": len(runs) - len(ok)}
        idles = [r["figures"]["stage_idle_share"] for r in ok if "stage_idle_share" in r["figures"]]
        if idles:
            row["stage_idle_share"] = [spread([i[s] for i in idles]) for s in range(stages)]
        cpu = [cpu_seconds(r) for r in ok if r.get("ranks")]
        if cpu and all(cpu):
            row["cpu_s_per_rank"] = {k: [statistics.median(c[i][k] for c in cpu) for i in range(len(cpu[0]))]
                                     for k in ("user_s", "system_s")}
        out[variant] = row
    ones = [v for v in out if v.startswith("one") and "tokens_per_s" in out[v]]
    for variant, row in out.items():
        if "tokens_per_s" in row:
            row["vs"] = {one: row["tokens_per_s"]["median"] / out[one]["tokens_per_s"]["median"] for one in ones}
    return out


def cpu_seconds(launch: dict) -> list | None:
    """Each rank's user and system CPU seconds over the whole launch (loading included), from time -v."""
    out = []
    for r in launch["ranks"]:
        t = r.get("time_v") or {}
        if t.get("user_s") is None:
            return None
        out.append({"user_s": t["user_s"], "system_s": t["system_s"]})
    return out


def bubble(stages: int, parts: int) -> float:
    """GPipe's idle share per stage with equal stages and free transfers: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (parts + stages - 1)


def summarise_memory(one: list[int], stages: list[list[int]]) -> dict:
    """Peak RSS (bytes) of one process over its launches and of each stage over the pipeline's launches:
    medians, the largest stage, and largest stage / one process against the target."""
    one_peak = statistics.median(one)
    per_stage = [statistics.median(launch[s] for launch in stages) for s in range(len(stages[0]))]
    largest = max(per_stage)
    ratio = largest / one_peak
    return {"one_process_bytes": one_peak, "one_process_range_bytes": [min(one), max(one)],
            "stage_bytes": per_stage, "largest_stage_bytes": largest,
            "stage_ratios": [s / one_peak for s in per_stage], "largest_over_one": ratio,
            "target": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO}


def choose_cap(one_peak: float, largest_stage: float) -> int:
    """The cap between the two peaks: their midpoint, in bytes (a whole MiB)."""
    if largest_stage >= one_peak:
        raise ValueError("the largest stage peaks at or above one process: no cap separates them")
    return int((one_peak + largest_stage) / 2) // (1 << 20) * (1 << 20)


# ---------------------------------------------------------------------------- /proc sampler


class ProcSampler(threading.Thread):
    """Watches every process whose environment holds ``TAG_VAR=tag``: per rank (``MLX_RANK``, else 0), the
    highest VmHWM and VmRSS seen, RssAnon/RssFile at that highest VmRSS, and the last rchar/read_bytes."""

    def __init__(self, tag: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.marker = f"{TAG_VAR}={tag}".encode()
        self.interval = interval
        self.halt = threading.Event()
        self.known = {}  # pid -> (comm, rank or None)
        self.procs = {}  # pid -> figures

    def run(self):
        while not self.halt.wait(self.interval):
            self.poll()

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        return self.by_rank()

    def poll(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                if self.known.get(pid, (None,))[0] != comm:  # new, or exec'd since: look again
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    rank = None
                    if self.marker in env:
                        rank = next((int(e[9:]) for e in env if e.startswith(b"MLX_RANK=")), 0)
                    self.known[pid] = (comm, rank)
                rank = self.known[pid][1]
                if rank is None:
                    continue
                mem = parse_status_kb(Path(f"/proc/{pid}/status").read_text())
                io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
            except (OSError, ValueError):
                continue  # gone meanwhile
            row = self.procs.setdefault(pid, {"pid": pid, "rank": rank, "comm": comm, "vm_hwm_bytes": 0,
                                               "vm_rss_max_bytes": 0})
            row["comm"] = comm
            row["vm_hwm_bytes"] = max(row["vm_hwm_bytes"], mem.get("VmHWM", 0))
            if mem.get("VmRSS", 0) >= row["vm_rss_max_bytes"]:
                row["vm_rss_max_bytes"] = mem.get("VmRSS", 0)
                row["at_rss_max"] = {k: mem[k] for k in ("RssAnon", "RssFile", "RssShmem") if k in mem}
            row["rchar_bytes"] = int(io.get("rchar", 0))
            row["read_bytes"] = int(io.get("read_bytes", 0))

    def by_rank(self) -> dict:
        """Per rank, the process with the highest VmHWM (the trainer, not its ``sh`` or ``time`` wrappers)."""
        out = {}
        for row in self.procs.values():
            best = out.get(row["rank"])
            if best is None or row["vm_hwm_bytes"] > best["vm_hwm_bytes"]:
                out[row["rank"]] = row
        return {str(k): v for k, v in sorted(out.items())}


# ---------------------------------------------------------------------------- cgroups (v1 memory)


def memory_cgroup_problem() -> str | None:
    """None when this process can cap memory with cgroup v1, else one sentence why not."""
    if not (MEMORY_ROOT / "memory.limit_in_bytes").is_file():
        return "the cgroup v1 memory controller is not mounted at /sys/fs/cgroup/memory"
    if os.geteuid() != 0:
        return "capping memory with cgroups needs root"
    return None


class MemoryCaps:
    """One memory cgroup per rank (``<prefix>-rank<r>``) limited to ``cap`` bytes (and memsw, where present);
    read back and removed on exit."""

    def __init__(self, prefix: str, ranks: int, cap: int):
        self.prefix, self.cap = MEMORY_ROOT / prefix, cap
        self.groups = [Path(f"{self.prefix}-rank{r}") for r in range(ranks)]

    def __enter__(self):
        try:
            for group in self.groups:
                group.mkdir()
                (group / "memory.limit_in_bytes").write_text(str(self.cap))
                if (group / "memory.memsw.limit_in_bytes").exists():
                    (group / "memory.memsw.limit_in_bytes").write_text(str(self.cap))
        except OSError:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self) -> list[dict]:
        out = []
        for group in self.groups:
            row = {"group": group.name}
            for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.max_usage_in_bytes",
                         "memory.memsw.max_usage_in_bytes", "memory.failcnt"):
                try:
                    row[name] = int((group / name).read_text())
                except (OSError, ValueError):
                    pass
            try:
                row["oom_control"] = dict(line.split() for line in (group / "memory.oom_control").read_text()
                                          .splitlines())
            except OSError:
                pass
            out.append(row)
        return out

    def close(self) -> None:
        for group in self.groups:
            if not group.is_dir():
                continue
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    try:
                        (MEMORY_ROOT / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
            except OSError:
                pass
            for _ in range(100):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


# ---------------------------------------------------------------------------- launches


def write_data(work: Path, seq: int, rows: int) -> Path:
    from lab.textsets import make_text_set

    out = work / "data"
    make_text_set(out, rows=rows, valid_rows=8, kind="fixed", mean=seq, max_tokens=seq + 4)
    return out


def write_recipe(path: Path, model: Path, data: Path, seq: int, batch: int, steps: int, lora_rank: int) -> Path:
    """A LoRA recipe (lr 1e-5: the weights barely move) that logs every update and every rank's memory."""
    recipe = {
        "model": {"path": str(model)},
        "method": {"type": "lora", "rank": lora_rank, "scale": 10.0, "dropout": 0.0, "num_layers": -1},
        "data": {"path": str(data), "max_seq_length": seq + 16},
        "training": {"batch_size": batch, "steps": steps, "learning_rate": 1e-5, "optimizer": "adamw",
                     "max_grad_norm": 1.0, "warmup_steps": 0},
        "eval": {"every": 0, "at_start": False, "max_batches": 1},
        "checkpoint": {"dir": str(path.parent / "run"), "every": 0},
        "logging": {"every": 1, "progress_bar": False, "per_rank_timings": True},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def trainer_command() -> list[str]:
    python = os.path.normpath(os.path.abspath(sys.executable))  # not resolved: a venv's python is a link
    script = Path(python).parent / "mlx-dp"
    return [str(script)] if script.is_file() else [python, "-m", "trainer"]


def run_launch(args, label: str, recipe: Path, work: Path, stages: int, parts: int | None = None,
               threads: int | None = None, cgroup: str | None = None) -> dict:
    """One launch: one process (``stages`` 1) or an N-stage pipeline, every rank wrapped (time -v, cgroup);
    every figure it left behind."""
    from trainer.bench.scaling_report import read_jsonl

    out_dir = work / f"{label}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir.mkdir(parents=True)
    run_dir = out_dir / "run"
    train = [*trainer_command(), "train", str(recipe), f"checkpoint.dir={run_dir}"]
    if parts is not None:
        train += ["parallel.pipeline=true", f"parallel.pipeline_microbatches={parts}"]
    tag = uuid.uuid4().hex
    env = {"PYTHONUNBUFFERED": "1", TAG_VAR: tag, "MLX_DP_PIPEBENCH_DIR": str(out_dir)}
    if threads is not None:
        env["MLX_DP_BLAS_THREADS"] = str(threads)
    if cgroup:
        env["MLX_DP_PIPEBENCH_CGROUP"] = str(MEMORY_ROOT / cgroup)
    wrapped = ["/bin/sh", "-c", RANK_WRAPPER, "pipebench-rank", *train]
    sampler = ProcSampler(tag)
    load_before = os.getloadavg()
    start = time.monotonic()
    sampler.start()
    timed_out = False
    try:
        if stages == 1:
            command = wrapped
            try:
                code = subprocess.run(wrapped, env={**os.environ, **env}, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                code, timed_out = None, True
        else:
            from trainer.cluster.launch import launch

            command = [*trainer_command(), "launch", "-n", str(stages), "--", *wrapped]
            code = launch(wrapped, stages, env=env, timeout=args.timeout, grace_s=10.0)
    finally:
        procs = sampler.stop()
    wall = time.monotonic() - start
    ranks = []
    for r in range(stages):
        timing = out_dir / f"time.rank{r}.txt"
        log = out_dir / f"rank{r}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        per_rank = read_jsonl(run_dir / f"metrics.rank{r}.jsonl")
        ranks.append({"rank": r, "time_v": parse_time_v(timing.read_text()) if timing.is_file() else None,
                      "proc": procs.get(str(r)), "blas_threads": blas_threads(text),
                      "mlx_peak_memory_gb": max((x["peak_memory_gb"] for x in per_rank), default=None),
                      "log_tail": text.splitlines()[-8:]})
    fill_blas_threads(ranks)
    status = None
    if (run_dir / "status.json").is_file():
        try:
            status = json.loads((run_dir / "status.json").read_text())
        except json.JSONDecodeError:
            status = {"unreadable": True}
    records = read_jsonl(run_dir / "metrics.jsonl")
    result = {"label": label, "stages": stages, "parts": parts, "blas_threads_env": threads, "cgroup": cgroup,
              "command": shlex.join(command), "exit_code": code, "timed_out": timed_out, "wall_s": wall,
              "load_before": load_before, "load_after": os.getloadavg(), "ranks": ranks,
              "status_state": (status or {}).get("state"), "status": status,
              "records": [r for r in records if "step_time_s" in r]}
    return result


def peak_rss(launch: dict) -> list:
    """Each rank's peak RSS in bytes: /usr/bin/time's maximum, else the sampler's VmHWM."""
    out = []
    for r in launch["ranks"]:
        value = (r["time_v"] or {}).get("max_rss_bytes") or (r["proc"] or {}).get("vm_hwm_bytes")
        out.append(value)
    return out


def describe_launch(launch: dict) -> str:
    rss = ", ".join(f"{x / 1e9:.2f}" if x else "?" for x in peak_rss(launch))
    state = launch["status_state"] if launch["status"] is not None else "none (no status.json)"
    load = launch["load_before"][0]
    return (f"exit {launch['exit_code']}, state {state}, peak RSS {rss} GB, {launch['wall_s']:.0f} s, "
            f"load {load:.1f}")


def failed(launch: dict) -> bool:
    return launch["exit_code"] != 0 or launch["status_state"] != "completed"


# ---------------------------------------------------------------------------- parts


def memory_part(args, recipe: Path, work: Path, doc: dict) -> dict | None:
    raw = {"one": [], "pipeline": []}
    for i in range(args.memory_rounds):
        for variant in round_order(list(raw), i):
            print(f"[bench] memory {i + 1}/{args.memory_rounds}: {variant} ...", end="", flush=True)
            launch = run_launch(args, f"memory-{variant}", recipe, work, 1 if variant == "one" else args.n,
                                parts=None if variant == "one" else args.memory_microbatches)
            raw[variant].append(launch)
            print(" " + describe_launch(launch), flush=True)
            if failed(launch):
                print(f"lab bench pipeline: the memory {variant} launch failed:\n  "
                      + "\n  ".join(sum((r["log_tail"] for r in launch["ranks"]), [])), file=sys.stderr)
                doc["memory"] = {"raw": raw}
                return None
    summary = summarise_memory([peak_rss(x)[0] for x in raw["one"]], [peak_rss(x) for x in raw["pipeline"]])
    doc["memory"] = {"raw": raw, "summary": summary}
    return summary


def speed_part(args, recipe: Path, work: Path, doc: dict) -> dict:
    variants = speed_variants(args.one_threads, args.microbatches)
    threads = dict(zip(variants, args.one_threads))
    raw = {v: [] for v in variants}
    total = args.rounds * len(variants)
    done = 0
    for i in range(args.rounds):
        for variant in round_order(variants, i):
            done += 1
            print(f"[bench] speed {done}/{total}: {variant} ...", end="", flush=True)
            one = variant.startswith("one")
            launch = run_launch(args, f"speed-{variant}", recipe, work, 1 if one else args.n,
                                parts=None if one else int(variant.rsplit("m", 1)[1]), threads=threads.get(variant))
            try:
                launch["figures"] = launch_figures(launch["records"], args.warmup, 1 if one else args.n)
            except ValueError as e:
                launch["figures"] = None
                print(f" no figures ({e})", end="")
            raw[variant].append(launch)
            f = launch["figures"]
            idle = f" idle {', '.join(f'{x:.2f}' for x in f['stage_idle_share'])}" if f and "stage_idle_share" in f \
                else ""
            print(f" {f['tokens_per_s']:.1f} tokens/s{idle}; " if f else " ", end="")
            print(describe_launch(launch), flush=True)
    summary = summarise_speed(raw, args.n)
    doc["speed"] = {"variants": variants, "raw": raw, "summary": summary}
    return summary


def cap_part(args, recipe: Path, work: Path, doc: dict, cap: int) -> dict | None:
    problem = memory_cgroup_problem()
    if problem:
        print(f"[bench] cap: skipped: {problem}", flush=True)
        doc["cap"] = {"skipped": problem}
        return None
    out = {"cap_bytes": cap, "runs": {}}
    for variant in ("one", "pipeline"):
        stages = 1 if variant == "one" else args.n
        prefix = f"mlx-dp-pipebench-{os.getpid()}-{variant}"
        print(f"[bench] cap {cap / 1e9:.2f} GB per process: {variant} ...", end="", flush=True)
        with MemoryCaps(prefix, stages, cap) as caps:
            launch = run_launch(args, f"cap-{variant}", recipe, work, stages,
                                parts=None if variant == "one" else args.memory_microbatches, cgroup=prefix)
            launch["cgroups"] = caps.read()
        launch["cgroups_removed"] = not any(g.exists() for g in caps.groups)
        out["runs"][variant] = launch
        kills = [int(g.get("oom_control", {}).get("oom_kill", 0)) for g in launch["cgroups"]]
        signals = [(r["time_v"] or {}).get("signal") for r in launch["ranks"]]
        print(f" {describe_launch(launch)}, OOM kills {kills}, signals {signals}", flush=True)
    one, pipe = out["runs"]["one"], out["runs"]["pipeline"]
    out["one_failed"] = failed(one)
    out["pipeline_completed"] = not failed(pipe)
    doc["cap"] = out
    return out


# ---------------------------------------------------------------------------- report


def git_info() -> dict:
    root = Path(__file__).resolve().parents[3]

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(), "status_short": git("status", "--short").splitlines()}


def gb(x) -> str:
    return f"{x / 1e9:.2f}"


def print_report(doc: dict) -> None:
    print(f"\nlab bench pipeline: {doc['stages']} stages vs one process, {doc['arch']} layer shape, LoRA rank "
          f"{doc['lora_rank']}, BLAS {doc['blas']}, {os.cpu_count()} CPU cores")
    m = (doc.get("memory") or {}).get("summary")
    if m:
        mm = doc["models"]["memory"]
        print(f"\nmemory: {mm['layers']} layers, {mm['params'] / 1e6:.1f}M parameters, {gb(mm['weights_bytes'])} GB "
              f"of weights; batch {doc['batch']} x ~{doc['seq']} tokens, {doc['memory_microbatches']} part(s)")
        raw = doc["memory"]["raw"]
        read = [[(r["proc"] or {}).get("rchar_bytes") for r in raw["one"][-1]["ranks"]],
                [(r["proc"] or {}).get("rchar_bytes") for r in raw["pipeline"][-1]["ranks"]]]
        print(f"{'':22s} {'peak RSS':>10s} {'/ one process':>14s} {'bytes read (rchar)':>19s}")
        print(f"{'one process':22s} {gb(m['one_process_bytes']):>7s} GB {1:14.3f} {gb(read[0][0] or 0):>16s} GB")
        for s, (b, q) in enumerate(zip(m["stage_bytes"], m["stage_ratios"])):
            print(f"{f'stage {s}':22s} {gb(b):>7s} GB {q:14.3f} {gb(read[1][s] or 0):>16s} GB")
        print(f"largest stage / one process: {m['largest_over_one']:.3f} (target <= {m['target']}: "
              f"{'met' if m['meets_target'] else 'NOT met'})")
    s = (doc.get("speed") or {}).get("summary")
    if s:
        sm = doc["models"]["speed"]
        print(f"\nspeed: {sm['layers']} layers, {sm['params'] / 1e6:.1f}M parameters; batch {doc['speed_batch']} x "
              f"~{doc['seq']} tokens per update; {doc['rounds']} round(s); median (min-max)")
        ones = [v for v in s if v.startswith("one") and "tokens_per_s" in s[v]]
        head = f"{'variant':16s} {'tokens/s':>22s} " + " ".join(f"{'vs ' + o:>16s}" for o in ones)
        print(head + "  CPU s/rank (user+sys)  idle share per stage (bubble (p-1)/(m+p-1))")
        for v, row in s.items():
            if "tokens_per_s" not in row:
                print(f"{v:16s} failed")
                continue
            t = row["tokens_per_s"]
            line = f"{v:16s} {t['median']:8.2f} ({t['min']:.2f}-{t['max']:.2f}) " + \
                " ".join(f"{row['vs'][o]:16.3f}" for o in ones)
            if "cpu_s_per_rank" in row:
                c = row["cpu_s_per_rank"]
                line += "  " + ", ".join(f"{u:.0f}+{y:.0f}" for u, y in zip(c["user_s"], c["system_s"]))
            if "stage_idle_share" in row:
                m_parts = int(v.rsplit("m", 1)[1])
                line += "  " + ", ".join(f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"
                                         for x in row["stage_idle_share"]) + f" ({bubble(doc['stages'], m_parts):.2f})"
            print(line)
    c = doc.get("cap")
    if c and "runs" in c:
        print(f"\ncap: {gb(c['cap_bytes'])} GB per process")
        for v, r in c["runs"].items():
            print(f"  {v:9s} {describe_launch(r)}")
        print(f"  one process failed: {c['one_failed']}; pipeline completed: {c['pipeline_completed']}")
    elif c:
        print(f"\ncap: skipped: {c['skipped']}")


def model_facts(model: Path, layers: int) -> dict:
    from .comm import parameter_count

    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    return {"path": str(model), "layers": layers, "params": parameter_count(model), "weights_bytes": weights,
            "config": json.loads((model / "config.json").read_text())}


def main(argv: list[str]) -> int:
    import mlx.core as mx

    from trainer.tools.fastblas import requested

    from .comm import build_bench_model

    args = parse_args(argv)
    if not requested():
        print("[bench] MLX_DP_BLAS is not set: fp32 matmuls run on MLX's slow reference BLAS on Linux; "
              "MLX_DP_BLAS=openblas is much faster", flush=True)
    cache = Path(os.environ.get("MLX_DP_CACHE") or Path.home() / ".cache" / "mlx-dp") / "bench-models"
    cache.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "pipeline", "argv": sys.argv, "command": shlex.join(["python", "scripts/lab", "bench",
                                                                             "pipeline", *argv]),
           "git": git_info(), "mlx_version": mx.__version__, "cpu_count": os.cpu_count(),
           "blas": "openblas" if requested() else "mlx", "blas_threads_env": os.environ.get("MLX_DP_BLAS_THREADS"),
           "stages": args.n, "arch": args.arch, "lora_rank": args.lora_rank, "batch": args.batch, "seq": args.seq,
           "memory_steps": args.memory_steps, "memory_microbatches": args.memory_microbatches,
           "speed_batch": args.speed_batch, "microbatches": args.microbatches, "steps": args.steps,
           "warmup": args.warmup, "rounds": args.rounds, "parts": args.parts, "models": {},
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_at_start": os.getloadavg()}
    tmp = tempfile.mkdtemp(prefix="mlx-dp-pipeline-", dir=args.keep) if args.keep else None
    ctx = tempfile.TemporaryDirectory(prefix="mlx-dp-pipeline-") if tmp is None else None
    work = Path(tmp or ctx.name)
    code = 0
    try:
        data = write_data(work, args.seq, rows=max(64, 2 * args.speed_batch * (args.warmup + args.steps)))
        if "memory" in args.parts or "cap" in args.parts:
            big = build_bench_model(args.arch, args.layers, args.width_divisor, cache)
            doc["models"]["memory"] = model_facts(big, args.layers)
            (work / "memory").mkdir()
            recipe = write_recipe(work / "memory" / "recipe.yaml", big, data, args.seq, args.batch,
                                  args.memory_steps, args.lora_rank)
        if "speed" in args.parts:
            small = build_bench_model(args.arch, args.speed_layers, args.width_divisor, cache)
            doc["models"]["speed"] = model_facts(small, args.speed_layers)
            (work / "speed").mkdir()
            speed_recipe = write_recipe(work / "speed" / "recipe.yaml", small, data, args.seq, args.speed_batch,
                                        args.warmup + args.steps, args.lora_rank)
        memory = None
        if "memory" in args.parts:
            memory = memory_part(args, recipe, work, doc)
            if memory is None:
                code = 1
        if "speed" in args.parts:
            speed_part(args, speed_recipe, work, doc)
        if "cap" in args.parts:
            if args.cap_gb is not None:
                cap = int(args.cap_gb * 1e9)
            elif memory is not None and memory["largest_stage_bytes"] < memory["one_process_bytes"]:
                cap = choose_cap(memory["one_process_bytes"], memory["largest_stage_bytes"])
            elif memory is not None:
                cap = None
                doc["cap"] = {"skipped": "the largest stage peaked at or above one process: no cap separates them"}
            else:
                cap = None
                doc["cap"] = {"skipped": "no cap: give --cap-gb, or run the memory part"}
            if cap is not None:
                cap_part(args, recipe, work, doc, cap)
    finally:
        doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        doc["load_at_end"] = os.getloadavg()
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
            print(f"[bench] wrote {args.json}")
        if ctx is not None:
            ctx.cleanup()
    print_report(doc)
    return code
