"""Where collectives run on a CPU, a Mac's GPU and CUDA: the contract of docs/DEVICES.md.

Two real ranks train over the ring backend while MLX reports the device as this
machine, a Mac or a CUDA box would (``tests/workers/placement_check.py``); every
collective's stream is recorded and checked against the table in docs/DEVICES.md.
On a Mac a GPU stream given to a collective fails at its first evaluation
("[AllReduce::eval_gpu] has no GPU implementation"); here making one raises, so
the pretend-Mac run fails as a real Mac would. The other device-dependent choices
are checked in-process.
"""

import ast
import json
import re

import mlx.core as mx
import pytest

from conftest import MLX_DP, PYTHON, ROOT, run, tiny_recipe, worker_result

WORKER = str(ROOT / "tests" / "workers" / "placement_check.py")
COLUMNS = {"cpu": 2, "mac": 3, "cuda": 4}  # the table's columns, after site and what


def table() -> dict:
    """docs/DEVICES.md's collectives table: {(site, kind): {as: stream}}; kind is send/recv for the ring's."""
    rows = {}
    for line in (ROOT / "docs" / "DEVICES.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`") or not cells[2].startswith("`"):
            continue
        site = cells[0].strip("`")
        kind = "send" if "sends" in cells[1] else "recv" if "receives" in cells[1] else "any"
        rows[(site, kind)] = {name: cells[i].strip("`") for name, i in COLUMNS.items()}
    return rows


def expected(rows: dict, record: dict, kind: str) -> str:
    site = record["site"]
    op = {"send": "send", "recv_like": "recv", "recv": "recv"}.get(record["collective"], "any")
    return (rows.get((site, op)) or rows[(site, "any")])[kind]


@pytest.fixture(scope="module", params=["cpu", "mac", "cuda"])
def recorded(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"placement-{kind}")
    recipe = str(tiny_recipe(tmp, training={"steps": 3, "batch_size": 2},
                             eval={"every": 2, "at_start": True, "max_batches": 1}, checkpoint={"every": 2}))
    spec = [[recipe, f"checkpoint.dir={tmp}/lora"],
            [recipe, "method.type=full", "parallel.shard_optimizer=true", "parallel.bucket_mb=0.5",
             "parallel.first_bucket_mb=0.1", f"checkpoint.dir={tmp}/zero1"]]
    if kind != "cuda":  # MLX's NCCL backend has no send or recv: a pipeline is refused there (test_pipeline.py)
        spec.append([recipe, "parallel.pipeline=true", "parallel.pipeline_microbatches=2",
                     f"checkpoint.dir={tmp}/pipeline"])
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": "1"} if kind == "cuda" else None
    result = run([MLX_DP, "launch", "-n", "2", "--", PYTHON, WORKER, kind, str(tmp / "log"), str(tmp / "spec.json")],
                 timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r: [json.loads(line) for line in (tmp / f"log.rank{r}").read_text().splitlines()] for r in (0, 1)}
    return kind, tmp, records, result.stdout


@pytest.mark.e2e
def test_every_collective_runs_where_the_table_says(recorded):
    kind, _, records, _ = recorded
    rows = table()
    sites = {(s, k) for s, k in rows}
    seen = set()
    for rank, lines in records.items():
        calls = [r for r in lines if "collective" in r]
        assert calls, "the recorder saw no collective"
        for record in calls:
            assert any(site == record["site"] for site, _ in sites), f"a collective outside the table: {record}"
            assert record["stream"] == expected(rows, record, kind), (kind, rank, record)
            seen.add(record["site"])
    # the reducer, ZeRO-1's pieces and the agreement checks all ran
    zero1 = "ShardedReducer._scatter" if kind == "cuda" else "ring_reduce_scatter"  # NCCL has sum_scatter
    assert {"GradientReducer._sum", "World.all_sum", "World.all_gather_bytes", zero1,
            "ShardedReducer.sum_small", "all_gather_shards"} <= seen, seen
    if kind != "cuda":
        assert {"StageLink.send", "StageLink.recv", "PipelineUpdate.apply", "gather"} <= seen, seen


@pytest.mark.e2e
def test_both_trainings_completed_with_the_gpu_defaults(recorded):
    kind, tmp, records, stdout = recorded
    for name in ("lora", "zero1") + (("pipeline",) if kind != "cuda" else ()):
        status = json.loads((tmp / name / "status.json").read_text())
        assert status["state"] == "completed" and status["step"] == 3, status
        assert (tmp / name / "adapters.safetensors").is_file()
    on_gpu = kind != "cpu"
    assert ("fused exp" in stdout) != on_gpu, "fused exps are the CPU's default only"
    assert ("queries at a time" in stdout) != on_gpu, "attention blocks are the CPU's default only"
    stream = "a stream of their own" if kind == "cuda" else "the backend's stream"
    assert f"on {stream}" in stdout, stdout[-2000:]
    wired = [r["wired_limit"] for r in records[0] if "wired_limit" in r]
    # mlx-lm's recommended working set, set as each training starts and restored when it ends
    assert wired == ([12 << 30, 0] * 3 if kind == "mac" else []), wired  # lora, zero1, pipeline


@pytest.mark.e2e
def test_reducers_return_only_once_a_slow_peers_data_arrived():
    """No GPU work can wait on a peer: the reducers wait on the host before handing results on."""
    out = worker_result(2, "reduce_check.py", "settle", timeout=300)
    for name, seconds in out["seconds"].items():
        assert seconds >= 0.8 * out["late_s"], (name, out)


# ---------------------------------------------------------------------------- in process


def _pretend_gpu(monkeypatch, cuda=False):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    if cuda:
        monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    else:
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)


@pytest.mark.parametrize("where,backend,auto", [
    ("cpu", "ring", "default"), ("mac", "ring", "default"), ("mac", "jaccl", "default"),
    ("cuda", "nccl", "separate"), ("cuda", "ring", "default")])
def test_placement_resolves_comm_stream_per_device_and_backend(monkeypatch, where, backend, auto):
    from trainer.parallel import Placement

    if where != "cpu":
        _pretend_gpu(monkeypatch, cuda=where == "cuda")
    placement = Placement.detect(backend)
    assert placement.gpu == {"cpu": None, "mac": "metal", "cuda": "cuda"}[where]
    assert placement.resolve("auto") == auto
    assert placement.comm_device == ("gpu" if backend == "nccl" else "cpu")
    assert placement.resolve("separate") == "separate" and placement.resolve("default") == "default"
    assert placement.stream("default") is None
    if placement.comm_device == "cpu":  # a GPU stream cannot be made here: this one is the CPU's
        assert placement.stream("separate").device == mx.Device(mx.cpu)
        assert placement.host_ops(None) == mx.default_stream(mx.cpu)


@pytest.mark.parametrize("cuda,prepared,requested,want", [
    (False, "ring", "any", "ring"), (True, "ring", "any", "ring"), (True, "ring+nccl", "any", "nccl"),
    (False, "ring+nccl", "any", "ring"), (False, "ring", "jaccl", "jaccl")])
def test_backend_any_follows_mlx_order(monkeypatch, tmp_path, cuda, prepared, requested, want):
    from trainer.parallel import resolve_backend

    if cuda:
        monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    (tmp_path / "hosts.json").write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    if "nccl" in prepared:
        monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")
    assert resolve_backend(requested, 2) == want
    assert resolve_backend(requested, 1) is None


def test_cpu_speedups_are_off_on_a_gpu(monkeypatch):
    from trainer.model import fused
    from trainer.model.attention import DEFAULT_CPU_BLOCK, resolve_block

    assert fused.resolve("auto") is True and resolve_block("auto") == DEFAULT_CPU_BLOCK
    _pretend_gpu(monkeypatch)
    assert fused.resolve("auto") is False and resolve_block("auto") == 0
    assert fused.resolve(True) is True and resolve_block(32) == 32  # an explicit setting stands


def test_linux_cpu_speedups_refuse_or_stand_aside_on_a_mac(monkeypatch):
    import platform

    from trainer.tools import fastblas, fastjit

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    with pytest.raises(fastblas.FastBlasError, match="only for Linux"):
        fastblas.enable()
    assert "only Linux x86-64" in fastjit.why_not()


def test_cache_is_emptied_after_an_update_as_mlx_lm_does():
    from trainer.run.loop import _clear_cache

    a = mx.ones((1 << 18,))
    mx.eval(a)
    del a
    assert mx.get_cache_memory() > 0
    _clear_cache(-1)
    assert mx.get_cache_memory() > 0, "-1 never empties it"
    _clear_cache(1 << 30)
    assert mx.get_cache_memory() > 0, "below the threshold it stays"
    _clear_cache(0)
    assert mx.get_cache_memory() == 0


def test_auto_keeps_the_cache_on_a_cpu_and_empties_it_on_a_gpu(monkeypatch):
    from trainer.run.loop import _clear_cache

    def cached():
        a = mx.ones((1 << 18,))
        mx.eval(a)
        del a
        return mx.get_cache_memory()

    assert cached() > 0
    _clear_cache("auto")
    assert mx.get_cache_memory() > 0, "a CPU keeps its buffers for the next update"
    _pretend_gpu(monkeypatch)
    _clear_cache("auto")
    assert mx.get_cache_memory() == 0, "a Mac's memory goes back to macOS after every update, as mlx-lm does"


# ---------------------------------------------------------------------------- in the code


DEVICE_PINS = re.compile(r"^(mx\.(cpu|gpu)|mx\.Device\(.*\)|mx\.(default_stream|new_stream|default_device)\(.*\))$")


def test_no_collective_outside_placement_names_a_device():
    collectives = {"all_sum", "all_gather", "all_max", "all_min", "send", "recv", "recv_like", "sum_scatter"}
    pinned, streams = [], []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name, owner = node.func.attr, ast.unparse(node.func.value)
            if name in collectives and owner.endswith("distributed"):
                for kw in node.keywords:
                    if kw.arg == "stream" and DEVICE_PINS.match(ast.unparse(kw.value)):
                        pinned.append(f"{where}:{node.lineno} {ast.unparse(node)}")
            if owner == "mx" and name in ("new_stream", "default_stream") and where.name != "placement.py":
                streams.append(f"{where}:{node.lineno}")
    assert not pinned, pinned
    assert not streams, f"streams are made in parallel/placement.py only: {streams}"


def test_metal_fast_synch_is_never_set():
    for folder in ("trainer", "scripts", "recipes"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".yaml"):
                assert "MLX_METAL_FAST_SYNCH" not in path.read_text(), path
