"""``python scripts/lab bench faults``: what one failure costs a job under ``mlx-dp launch --restarts``.

On the emulated two-host cluster over real ssh (``lab.sshcluster``), a tiny job
trains with ``--restarts 1`` and one fault is injected into host 1 after update
``--at``:

* ``kill``: its trainer is SIGKILLed (a crash, the OOM killer);
* ``stop``: its trainer is SIGSTOPped (a Mac asleep: its process stops answering);
* ``link``: its link goes down for good (a cable, the Wi-Fi); with ``--min-ranks 1``
  the job goes on with host 0 standing in for host 1.

The cost is the time from the fault until the job is back where it was, split
into what happens on the way, each measured from lines as they arrive and rows
of metrics.jsonl as they are written (this process stamps both):

* detect: the fault, until the launcher names a failed rank;
* stop: until every rank is stopped (the launcher's "restart 1 of 1" line);
* restart: backoff, probing the hosts, ssh and starting Python, forming the group,
  until rank 0 prints its resolved recipe;
* load: model, data, checkpoint, agreement, until "resumed from";
* first update: compile and the first update after the resume;
* replay: the updates between the checkpoint and the fault, done again.

Fault kinds take turns, round after round; each figure is the median over
rounds, with its range. A JSON file holds every round. Needs root, iproute2 and
sshd (as the ssh tests).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from lab import sshcluster

KINDS = ("kill", "stop", "link")
PHASES = ("detect", "stop", "restart", "load", "first update", "replay")
ROOT = Path(__file__).resolve().parents[3]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds; each injects every fault once (default 2)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"faults to inject (default {','.join(KINDS)})")
    p.add_argument("--at", type=int, default=25, help="inject after this update (default 25)")
    p.add_argument("--every", type=int, default=20, help="checkpoint.every (default 20)")
    p.add_argument("--silence", type=float, default=None,
                   help="parallel.peer_silence_s (default: the recipe default)")
    p.add_argument("--grace", type=float, default=None, help="mlx-dp launch --grace (default: its default)")
    p.add_argument("--probe-timeout", type=float, default=None, help="--probe-timeout (default: its default)")
    p.add_argument("--out", default="fault-cost.json", help="JSON result (default fault-cost.json)")
    return p.parse_args(argv)


class Stamped:
    """Lines of a stream, each with the time it arrived (a reader thread)."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.time(), line.rstrip("\r\n")))

    def first(self, pattern: str, after: float = 0.0) -> float | None:
        return next((t for t, line in self.lines if t >= after and re.search(pattern, line)), None)


def _metric_times(run_dir: Path, seen: dict, stop: threading.Event) -> None:
    """Stamp each metrics.jsonl row when it appears: (time, row)."""
    path, offset = run_dir / "metrics.jsonl", 0
    while not stop.is_set():
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                data = f.read()
            complete = data[:data.rfind("\n") + 1]
            offset += len(complete)
            now = time.time()
            for line in complete.splitlines():
                if line.strip():
                    seen.setdefault("rows", []).append((now, json.loads(line)))
        time.sleep(0.02)


def _trainer_in(ssh, host: int) -> int | None:
    space = ssh.emulated.namespaces[host]
    for pid in subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True).stdout.split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"mlx-dp") for part in command) and b"train" in command:
            return int(pid)
    return None


def one_round(ssh, kind: str, args, workdir: Path) -> dict:
    """Inject ``kind`` once; the phases' seconds and the updates replayed."""
    run_dir = workdir / f"run-{kind}-{time.monotonic_ns()}"
    recipe = workdir / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["checkpoint"]["dir"] = str(run_dir)
    job_recipe = run_dir.with_suffix(".yaml")
    job_recipe.write_text(yaml.safe_dump(data))
    extra = ["--restarts", "1"] + (["--min-ranks", "1"] if kind == "link" else [])
    extra += ["--grace", str(args.grace)] if args.grace is not None else []
    extra += ["--probe-timeout", str(args.probe_timeout)] if args.probe_timeout is not None else []
    mlx_dp = str(Path(sys.executable).parent / "mlx-dp")
    proc = subprocess.Popen([*ssh.launch_args(mlx_dp, str(ROOT)), *extra, "--", mlx_dp, "train", str(job_recipe)],
                            env=ssh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    out, err, seen, stop = Stamped(proc.stdout), Stamped(proc.stderr), {}, threading.Event()
    watcher = threading.Thread(target=_metric_times, args=(run_dir, seen, stop), daemon=True)
    watcher.start()
    try:
        while not any(r.get("step", 0) >= args.at and "train_loss" in r for _, r in seen.get("rows", [])):
            if proc.poll() is not None:
                raise RuntimeError(f"the job ended before update {args.at}: {err.lines[-5:]}")
            time.sleep(0.01)
        fault_step = max(r["step"] for _, r in seen["rows"] if "train_loss" in r)
        t0 = time.time()
        if kind == "link":
            ssh.link(1, up=False)
        else:
            os.kill(_trainer_in(ssh, 1), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        while True:  # back where it was: the fault's update done again
            rows = [(t, r) for t, r in seen.get("rows", []) if t > t0]
            restarted = [r for _, r in rows if r.get("event") == "restarted"]
            if restarted and any("train_loss" in r and r["step"] >= fault_step for t, r in rows
                                 if t > min(t for t, x in rows if x.get("event") == "restarted")):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the job ended before it recovered: {err.lines[-5:]}")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop.set()
        if kind == "link":
            ssh.link(1, up=True)
        subprocess.run(["pkill", "-9", "-f", str(job_recipe)], capture_output=True)
    rows = [(t, r) for t, r in seen["rows"] if t > t0]
    t_restarted = min(t for t, r in rows if r.get("event") == "restarted")
    resumed_step = next(r["step"] for _, r in rows if r.get("event") == "restarted")
    after = [(t, r) for t, r in rows if t >= t_restarted and "train_loss" in r]
    marks = {"fault": t0,
             "detect": err.first(r"mlx-dp launch: rank \d+ .*(exited|was killed)", t0),
             "stop": err.first(r"mlx-dp launch: restart 1 of 1", t0),
             "restart": out.first(r"\[mlx-dp\] resolved recipe", t0),
             "load": out.first(r"\[mlx-dp\] resumed from", t0),
             "first update": min(t for t, _ in after),
             "replay": min(t for t, r in after if r["step"] >= fault_step)}
    times, previous, phases = list(marks.items()), t0, {}
    for name, stamp in times[1:]:
        if stamp is None:
            raise RuntimeError(f"{kind}: no sign of '{name}' in the output")
        phases[name] = round(stamp - previous, 3)
        previous = stamp
    launcher = [f"{t - t0:7.2f} {line}" for t, line in err.lines if t >= t0 and line.startswith("mlx-dp launch")]
    return {"kind": kind, "phases": phases, "total_s": round(previous - t0, 3), "fault_step": fault_step,
            "resumed_step": resumed_step, "replayed_updates": fault_step - resumed_step, "launcher": launcher}


def report(results: list[dict], kinds: list[str]) -> str:
    lines = ["| fault | " + " | ".join(PHASES) + " | total | updates replayed |",
             "| --- |" + " --- |" * (len(PHASES) + 2)]
    for kind in kinds:
        rounds = [r for r in results if r["kind"] == kind]
        cells = []
        for phase in PHASES:
            values = [r["phases"][phase] for r in rounds]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})")
        totals = [r["total_s"] for r in rounds]
        cells.append(f"**{statistics.median(totals):.1f}** ({min(totals):.1f}–{max(totals):.1f})")
        cells.append(", ".join(str(r["replayed_updates"]) for r in rounds))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        print(f"lab bench faults: unknown fault {', '.join(unknown)} (choose from {', '.join(KINDS)})", file=sys.stderr)
        return 2
    reason = sshcluster.check_permitted()
    if reason:
        print(f"lab bench faults: {reason}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_DATA, TINY_MODEL  # the shipped tiny model and task

    results = []
    with tempfile.TemporaryDirectory(prefix="mlx-dp-faults-") as tmp, sshcluster.SshCluster(2, Path(tmp)) as ssh:
        parallel = {"timeout_s": 120.0} | ({"peer_silence_s": args.silence} if args.silence else {})
        recipe = {"model": {"path": str(TINY_MODEL)}, "data": {"path": str(TINY_DATA), "max_seq_length": 128},
                  "method": {"type": "lora", "rank": 4, "scale": 4.0},
                  "training": {"batch_size": 2, "steps": 100000, "learning_rate": 1e-3},
                  "eval": {"every": 0, "at_start": False}, "checkpoint": {"every": args.every, "keep_last": 3},
                  "logging": {"every": 1, "progress_bar": False}, "parallel": parallel}
        (Path(tmp) / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        for round_index in range(args.rounds):
            for kind in kinds:
                result = one_round(ssh, kind, args, Path(tmp))
                result["round"] = round_index
                results.append(result)
                print(f"[bench] round {round_index + 1} {kind}: {result['total_s']:.1f} s "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in result['phases'].items())}); "
                      f"{result['replayed_updates']} updates replayed", flush=True)
    table = report(results, kinds)
    print(table)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rounds": results}, indent=2))
    print(f"[bench] wrote {args.out}")
    return 0
