"""Shared test helpers, the one place for them: the shipped tiny model, recipes in tmp dirs, CLI runners,
the files a run writes, small synthetic data.

Two tiers. Tests marked ``e2e`` start real processes (``mlx-dp`` commands,
``mlx-dp launch`` or mlx.launch on loopback, network namespaces); nothing of
MLX is mocked there. Every other test runs in this process, in about a
minute: ``pytest -m "not e2e"``. ``./scripts/test.sh`` (CI) runs both, the
fast tier two at a time, the e2e tier in three parts:

- the tests that time nothing, two at a time (pytest-xdist, a file per worker);
- then the tests marked ``serial``, which time a deadline (a watchdog, a peer's
  silence, a bound on how long a stop takes), or run a benchmark whose figures
  they check for shape, never for speed: every test of :data:`SERIAL_FILES`
  but those marked ``untimed``, and any other marked ``@pytest.mark.serial``.
  They run two at a time too, but only beside each other: such a test mostly
  waits (about 1.1 cores of 2 alone), so its neighbour is never the CPU-bound
  parallel part, and every bound they assert is seconds wide;
- then the tests marked ``alone``, which run with nothing beside them: a test
  that measures a speed ratio, a CPU cap or share, or a launcher's CPU, or that
  shapes the links of network namespaces (:data:`ALONE_FILES`, and any other
  marked ``@pytest.mark.alone``). A neighbour's load could decide what
  they measure.
The lab (``scripts/lab``) is importable as ``lab``.
"""

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the lab: `import lab`
PYTHON = sys.executable
BIN = Path(PYTHON).parent
MLX_DP = str(BIN / "mlx-dp")
LAB = [PYTHON, str(ROOT / "scripts" / "lab")]  # `python scripts/lab ...`
TINY_MODEL = ROOT / "data" / "tiny-llama"
TINY_DATA = ROOT / "data" / "tiny-task"
WORKERS = ROOT / "tests" / "workers"
FAULTS = str(WORKERS / "faults.py")


def mlx_dp_command(faults: str | None = None) -> list[str]:
    """``mlx-dp``, or with fault injection installed (``tests/workers/faults.py`` SPEC)."""
    return [PYTHON, FAULTS, faults, "--"] if faults else [MLX_DP]


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory):
    """Keep caches in a temp dir and never reach for the network."""
    cache = tmp_path_factory.mktemp("hf-cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The processes an e2e test starts multiply fp32 matrices on OpenBLAS where its shim builds: the same
    maths, about 2.5x less time per tiny run on this CPU (CI's parallel part: 11.9 -> 10.1 minutes), and 5x
    less CPU for a 2-rank run of 30 updates, which the serial tests run many of. (Before its fixtures, so a
    module's shared runs get it too; the ssh cluster passes it on to its hosts, lab.sshcluster.PASSED_ON.)
    MLX's own BLAS, the product's default, stays under test: the fast tier runs in this process on it, and
    an e2e test that needs it says so (MLX_DP_BLAS=mlx)."""
    if item.get_closest_marker("e2e"):
        os.environ.update(_openblas_env())  # (a test that passes env= of its own still wins)
    else:  # an in-process test loads the recipe's runtime itself, after MLX was imported: never the shim
        for key in ("MLX_DP_BLAS", "MLX_DP_BLAS_THREADS"):
            os.environ.pop(key, None)


@functools.lru_cache(maxsize=1)
def _openblas_env() -> dict:
    from trainer.tools import fastblas

    try:
        fastblas.build_shim()
        return {"MLX_DP_BLAS": "openblas", "MLX_DP_BLAS_THREADS": "1"}
    except fastblas.FastBlasError:
        return {}


HIDE_MATPLOTLIB = """import sys
class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, _Hidden())
"""


def pytest_configure(config):
    # The BLAS of the processes a test starts is the tests' choice (pytest_runtest_setup), never the caller's.
    # (Not in a session fixture: that runs after the first test's setup hook and undid its choice.)
    for key in ("MLX_DP_BLAS", "MLX_DP_BLAS_THREADS"):
        os.environ.pop(key, None)
    config.addinivalue_line("markers", "e2e: starts real processes (the end-to-end tier; -m 'not e2e' skips it)")
    config.addinivalue_line("markers", "serial: times a deadline, so runs only beside another such test (scripts/test.sh)")
    config.addinivalue_line("markers", "alone: measures a speed or a CPU share, or shapes a link, so "
                                       "never runs beside another test (scripts/test.sh)")
    config.addinivalue_line("markers", "untimed: times nothing, though its file's tests are serial")


# Files whose tests time a deadline (watchdogs, peer silence, how long a stop takes), or run a benchmark whose
# figures they only check for shape (a bench end to end): serial, but for a test marked untimed (it times
# nothing and may run beside anything) or alone.
SERIAL_FILES = {"test_bench_scaling.py", "test_connect.py", "test_elastic.py", "test_failures.py", "test_hardening.py",
                "test_lab_bench.py", "test_launch.py", "test_launch_ssh.py"}
# Files whose tests measure speeds, CPU shares and caps, or shape the namespaces' links (netem): alone. (The ssh
# cluster's namespaces, named by pid on a subnet of their own, live beside anything; its bounds are deadlines.)
ALONE_FILES = {"test_lab_netem.py", "test_lab_scaling.py"}


# The e2e files that take longest on two xdist workers (seconds of a worker, --durations on 2 cores), run
# first: under --dist loadfile a worker takes the next file as it frees up, so a long file taken last would
# leave the other worker idle at the end.
LONGEST_FIRST = {"test_recipes_shape.py": 152, "test_preference_train.py": 72, "test_sharded.py": 61,
                 "test_pipeline.py": 61, "test_grpo.py": 54, "test_elastic.py": 47, "test_eval_export.py": 47,
                 "test_inputs.py": 46, "test_run_dir_safety.py": 41, "test_train.py": 38}
# The same for the serial part's files (seconds of their serial tests, run one at a time on 2 cores).
LONGEST_FIRST_SERIAL = {"test_elastic.py": 89, "test_launch_ssh.py": 65, "test_failures.py": 64,
                        "test_hardening.py": 37, "test_launch.py": 30, "test_connect.py": 24,
                        "test_bench_scaling.py": 19, "test_lab_scaling.py": 16, "test_lab_bench.py": 12}


def _longest_first(item) -> int:
    if not item.get_closest_marker("e2e"):
        return 0
    return -(LONGEST_FIRST_SERIAL if item.get_closest_marker("serial") else LONGEST_FIRST).get(item.path.name, 0)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in ("untimed", "serial", "alone")):
            continue  # the test's own marker wins over its file's
        if item.path.name in ALONE_FILES:
            item.add_marker(pytest.mark.alone)
        elif item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
    items.sort(key=_longest_first)


@pytest.fixture(scope="session", autouse=True)
def _kernels_of_its_own_per_worker():
    """Under pytest-xdist, each worker's processes get a TMPDIR of their own, kept between runs.

    MLX compiles its CPU kernels into ``$TMPDIR/mlx``, and a process that starts checks every file there
    (``trainer.tools.runtime.check_mlx_kernels``): a kernel another worker's job is compiling right then
    can vanish under that check. A worker's own jobs start one test at a time.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        import tempfile

        own = Path(tempfile.gettempdir()) / f"mlx-dp-tests-{os.geteuid()}-{worker}"
        own.mkdir(mode=0o700, exist_ok=True)
        os.environ["TMPDIR"] = str(own)
    yield


def without_matplotlib(tmp_path: Path) -> dict:
    """Environment in which no process can import matplotlib, as after a plain install without it."""
    site = tmp_path / "hide-matplotlib"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_MATPLOTLIB)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def tiny_recipe(tmp_path: Path, name: str = "recipe.yaml", **sections) -> Path:
    """A small LoRA recipe on the shipped tiny model, with section overrides.

    ``tiny_recipe(tmp, training={"steps": 3})`` merges into the defaults.
    """
    recipe = {
        "model": {"path": str(TINY_MODEL)},
        "data": {"path": str(TINY_DATA), "max_seq_length": 128},
        "method": {"type": "lora", "rank": 4, "scale": 4.0},
        "training": {"batch_size": 4, "steps": 4, "learning_rate": 1e-3, "seed": 0},
        "eval": {"every": 0, "at_start": False, "max_batches": 2},
        "checkpoint": {"dir": str(tmp_path / "run"), "every": 2},
        "logging": {"every": 1, "progress_bar": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing text output."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=ROOT)


def lab(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python scripts/lab ARGS`` (the lab's benchmarks and tools)."""
    return run([*LAB, *args], timeout=timeout, env=env)


def mlx_dp(*args: str, timeout: float = 300, env: dict | None = None,
           faults: str | None = None) -> subprocess.CompletedProcess:
    """``mlx-dp ARGS`` in one process (with fault injection if ``faults`` is given)."""
    return run([*mlx_dp_command(faults), *args], timeout=timeout, env=env)


def launched(n: int, *args: str, timeout: float = 300, env: dict | None = None,
             faults: str | None = None) -> subprocess.CompletedProcess:
    """``mlx-dp ARGS`` on n local ranks through ``mlx-dp launch``."""
    return run([MLX_DP, "launch", "-n", str(n), "--", *mlx_dp_command(faults), *args], timeout=timeout, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed run; fails the test if there is a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mlx-dp: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def start_ranks(tmp_path: Path, args_per_rank: list[list[str]], env: dict | None = None,
                faults: str | None = None, env_per_rank: list[dict] | None = None) -> list[subprocess.Popen]:
    """Start one ``mlx-dp`` process per entry by hand (no launcher), each with its rank.

    ``env`` goes to every rank, ``env_per_rank[r]`` to rank r only (a ``HOME`` of
    its own, say, to give each rank its own ``~``). Output goes to
    ``tmp_path / f"rank{r}.log"``.
    """
    from trainer.cluster.ports import write_ring_hostfile

    hostfile = write_ring_hostfile(tmp_path / "hosts.json", len(args_per_rank))
    procs = []
    for rank, args in enumerate(args_per_rank):
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([*mlx_dp_command(faults), *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, **(env or {}), **(env_per_rank or [{}] * (rank + 1))[rank],
                                           "MLX_RANK": str(rank),
                                           "MLX_HOSTFILE": str(hostfile)}))
    return procs


def wait_for_step(run_dir: Path, step: int, procs, timeout: float = 120) -> None:
    """Block until metrics.jsonl reports ``step`` (fails if a rank exits first)."""
    import json
    import time

    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"a rank exited early with {dead}"
        time.sleep(0.2)
    raise AssertionError(f"update {step} not reached in {timeout}s")


# ---------------------------------------------------------------------------- what runs write


def read_status(run_dir: Path) -> dict:
    """A run directory's ``status.json``."""
    return json.loads((Path(run_dir) / "status.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """A run directory's ``metrics.jsonl`` records."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_weights(run_dir: Path) -> dict:
    """The trained weights a run wrote (``adapters.safetensors``), as numpy arrays."""
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v) for k, v in mx.load(str(Path(run_dir) / "adapters.safetensors")).items()}


def worker_result(n: int, worker: str, *args: str, timeout: float = 600) -> dict:
    """Run ``tests/workers/WORKER ARGS`` on n ranks under mlx-dp launch; its ``RESULT {json}`` line on rank 0."""
    result = run([MLX_DP, "launch", "-n", str(n), "--", PYTHON, str(ROOT / "tests" / "workers" / worker), *args],
                 timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------- small synthetic data


def fake_split(n: int, seed: int = 0, max_len: int = 60):
    """A tokenized split of ``n`` random samples (lengths 5 to ``max_len``), no file behind it."""
    import numpy as np

    from trainer.data.tokenized import TokenizedSplit

    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, max_len, n)
    prompt = rng.integers(0, 4, n)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.integers(3, 100, int(lengths.sum())).astype(np.int32)
    return TokenizedSplit("train", "fake", tokens, starts, lengths, prompt)


def packed_mask(length: int, cuts: list[int], rows: int = 1):
    """The attention mask of packed rows whose samples start at ``cuts``; a second row is the first reversed."""
    import mlx.core as mx

    from trainer.data.packing import SegmentMask

    ids = [sum(p >= c for c in cuts) for p in range(length)]
    return SegmentMask(mx.array([ids, ids[::-1]][:rows])).make_mask(length)


@pytest.fixture
def tiny_model():
    """The shipped tiny model, loaded with mlx-lm; its attention and SwiGLU routes are reset afterwards."""
    from mlx_lm import load

    from trainer.model import attention, fused

    model, _ = load(str(TINY_MODEL))
    yield model
    attention.use_blocks(model, 0)
    fused.use_fused(model, False)


# ---------------------------------------------------------------------------- processes of a job


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent:
                out.append(int(entry.name))
                todo.append(int(entry.name))
    return out


def trainer_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the trainer processes under a launcher."""
    ranks = {}
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"MLX_RANK=")), None)
        if rank is not None and b"train" in cmdline:
            ranks[int(rank)] = pid
    return ranks


# ---------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def blas_env():
    """The OpenBLAS route where it builds here (about 8x faster on this CPU): the same maths, a shorter test."""
    return dict(_openblas_env())


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in tiny model's tokenizer."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(TINY_MODEL)


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows (dicts, or raw lines as strings) as a JSONL file."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def train_one_and_two(tmp: Path, single: list, multi: list, timeout: float = 600) -> None:
    """The equivalence tests' runs: ``single``'s entries in one process, ``multi``'s on 2 ranks under
    mlx-dp launch (each list in one process per rank: ``tests/workers/train_many.py``)."""
    worker = str(ROOT / "tests" / "workers" / "train_many.py")
    (tmp / "single.json").write_text(json.dumps(single))
    (tmp / "multi.json").write_text(json.dumps(multi))
    one = run([PYTHON, worker, str(tmp / "single.json")], timeout=timeout)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([MLX_DP, "launch", "-n", "2", "--", PYTHON, worker, str(tmp / "multi.json")], timeout=timeout)
    assert two.returncode == 0, two.stderr[-3000:]


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str):
    """A tmpfs of ``size`` (e.g. ``"2m"``) at ``tmp_path / "disk"``, unmounted after; the test skips where
    mounting is not permitted (it needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'not permitted'}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
