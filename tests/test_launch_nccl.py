"""``mlx-dp launch`` under NCCL: every launch form's rank environments, and bad forms as one line.

MLX's ``launch_nccl`` exports ``CUDA_VISIBLE_DEVICES=rank % repeat_hosts``
(``mlx/_distributed_utils/launch.py``), which failed outright when ``-n`` was
not given and put every rank of a hostfile on GPU 0. These tests run
``launch.main`` with the Supervisor replaced by a recorder, so every rank's
spec comes from the same path a real launch takes and nothing is started; the
environment checked is what each rank's bash script exports (MLX's own
``make_launch_script``). No GPU and no processes are needed.
"""

import json
import re
import shlex

import mlx.core as mx
import pytest

from trainer.cluster import launch, mlx_launcher

EXPORT = re.compile(r"export (\w+)=((?:'[^']*'|[^;'])*);")
NCCL_KEYS = ("MLX_RANK", "MLX_WORLD_SIZE", "NCCL_HOST_IP", "NCCL_PORT", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def _no_gpu_list_in_this_shell(monkeypatch):
    """Local ranks honour the launcher's own CUDA_VISIBLE_DEVICES; keep the machine's out of these tests."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


class Recorder:
    """Stands in for the Supervisor: keeps the specs ``launch.main`` hands it and starts nothing."""

    runs: list = []

    def __init__(self, specs, output, **kwargs):
        self.specs = specs

    def run(self) -> int:
        Recorder.runs.append(self.specs)
        return 0


@pytest.fixture
def recorded(monkeypatch):
    """``recorded(argv)``: the rank specs ``mlx-dp launch argv -- true`` would start."""
    from trainer.cluster import supervisor

    Recorder.runs = []
    monkeypatch.setattr(supervisor, "Supervisor", Recorder)

    def run(argv: list[str]) -> list:
        assert launch.main([*argv, "--", "true"]) == 0
        assert len(Recorder.runs) == 1
        return Recorder.runs.pop()

    return run


def exported(spec) -> dict:
    """What a rank's bash script exports, the last value of each name (as bash would leave it)."""
    env = {}
    for key, value in EXPORT.findall(spec.script()):
        env[key] = shlex.split(value)[0] if value else ""
    return env


def nccl_env(specs) -> list[dict]:
    return [{k: exported(s).get(k) for k in NCCL_KEYS} for s in specs]


def write_hostfile(tmp_path, hosts: list, backend: str | None = None) -> str:
    path = tmp_path / "hosts.json"
    data = {"hosts": [{"ssh": ssh, "ips": [ip]} for ssh, ip in hosts]}
    if backend:
        data["backend"] = backend
    path.write_text(json.dumps(data))
    return str(path)


def expect(rank, world, host_ip, gpu, port="12345") -> dict:
    return {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(world), "NCCL_HOST_IP": host_ip, "NCCL_PORT": port,
            "CUDA_VISIBLE_DEVICES": str(gpu)}


# ---------------------------------------------------------------------------- each launch form


def test_n_ranks_on_this_machine_get_one_gpu_each(recorded):
    specs = recorded(["--backend", "nccl", "-n", "2"])
    assert [s.host for s in specs] == ["127.0.0.1"] * 2 and all(s.argv()[0] == "/bin/bash" for s in specs)
    assert nccl_env(specs) == [expect(0, 2, "127.0.0.1", 0), expect(1, 2, "127.0.0.1", 1)]


def test_hosts_without_n_launch_one_rank_per_host_on_gpu_0(recorded):
    """This form ended in "unsupported operand type(s) for %: 'int' and 'NoneType'" inside MLX."""
    specs = recorded(["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2", "--nccl-port", "4000"])
    assert [s.host for s in specs] == ["10.0.0.1", "10.0.0.2"]
    assert nccl_env(specs) == [expect(0, 2, "10.0.0.1", 0, "4000"), expect(1, 2, "10.0.0.1", 0, "4000")]


def test_hosts_with_n_number_the_gpus_of_each_host_from_0(recorded):
    specs = recorded(["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2", "-n", "2"])
    assert [s.host for s in specs] == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]
    assert nccl_env(specs) == [expect(r, 4, "10.0.0.1", gpu) for r, gpu in enumerate((0, 1, 0, 1))]


@pytest.mark.parametrize("where", ["flag", "hostfile"])
def test_a_hostfile_with_two_hosts_launches(recorded, tmp_path, where):
    """The hostfile form also hit MLX's `rank % None`; the backend may come from --backend or the file."""
    path = write_hostfile(tmp_path, [("gpu1", "10.0.0.1"), ("gpu2", "10.0.0.2")],
                          backend="nccl" if where == "hostfile" else None)
    specs = recorded(["--hostfile", path] + (["--backend", "nccl"] if where == "flag" else []))
    assert [s.host for s in specs] == ["gpu1", "gpu2"]
    assert [s.argv()[:3] for s in specs] == [["ssh", "-tt", "-o"]] * 2  # remote: ssh (not run here)
    assert nccl_env(specs) == [expect(0, 2, "10.0.0.1", 0), expect(1, 2, "10.0.0.1", 0)]


def test_a_host_listed_twice_gets_distinct_gpus_in_rank_order(tmp_path):
    """Ranks sharing a host take local indices in rank order, wherever they stand in the list.

    ``mlx-dp launch`` itself refuses such a hostfile (next test), so this calls
    ``rank_specs``, the function ``launch.main`` hands MLX's parsed hosts to,
    directly with MLX's parse of the file; stock ``mlx.launch`` gives all three GPU 0.
    """
    from mlx._distributed_utils.common import Hostfile

    path = write_hostfile(tmp_path, [("gpu1", "10.0.0.1"), ("gpu2", "10.0.0.2"), ("gpu1", "10.0.0.1")])
    parser, args, command = launch.parse_args(["--hostfile", path, "--backend", "nccl", "--", "true"])
    hostfile = Hostfile.from_file(path)
    launch._complete_args(args, hostfile)
    specs = mlx_launcher.rank_specs(parser, hostfile.hosts, args, command, launcher_env={})
    assert [s.host for s in specs] == ["gpu1", "gpu2", "gpu1"]
    assert nccl_env(specs) == [expect(0, 3, "10.0.0.1", 0), expect(1, 3, "10.0.0.1", 0),
                               expect(2, 3, "10.0.0.1", 1)]


@pytest.mark.parametrize("argv", [["-n", "2"], ["--hosts", "10.0.0.1,10.0.0.2"]])
def test_the_default_backend_on_a_cuda_machine_is_nccl_and_launches(recorded, monkeypatch, argv):
    ring = recorded(argv)  # this machine has no CUDA: the ring, and no GPU is chosen
    assert all("MLX_HOSTFILE" in s.files and "NCCL_HOST_IP" not in exported(s) for s in ring)
    assert all("CUDA_VISIBLE_DEVICES" not in exported(s) for s in ring)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    specs = recorded(argv)
    first = "127.0.0.1" if argv[0] == "-n" else "10.0.0.1"
    gpus = (0, 1) if argv[0] == "-n" else (0, 0)
    assert nccl_env(specs) == [expect(r, 2, first, gpu) for r, gpu in enumerate(gpus)]


# ---------------------------------------------------------------------------- a GPU list the user gave


def test_a_gpu_list_in_env_is_shared_out_per_host(recorded):
    specs = recorded(["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2", "-n", "2",
                      "--env", "CUDA_VISIBLE_DEVICES=4, 5"])
    assert [exported(s)["CUDA_VISIBLE_DEVICES"] for s in specs] == ["4", "5", "4", "5"]
    assert all(s.script().count("export CUDA_VISIBLE_DEVICES=") == 1 for s in specs)  # MLX's rank % n is gone


def test_the_launching_shells_gpu_list_holds_for_local_ranks_only(recorded, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa,GPU-bb")
    local = recorded(["--backend", "nccl", "-n", "2"])
    assert [exported(s)["CUDA_VISIBLE_DEVICES"] for s in local] == ["GPU-aa", "GPU-bb"]
    remote = recorded(["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2", "-n", "2"])
    assert [exported(s)["CUDA_VISIBLE_DEVICES"] for s in remote] == ["0", "1", "0", "1"]  # not this shell's


def test_ring_ranks_get_no_gpu_choice(recorded):
    """Two ranks sharing one GPU need the ring (NCCL refuses), so it is left as MLX leaves it."""
    specs = recorded(["--backend", "ring", "-n", "2", "--env", "CUDA_VISIBLE_DEVICES=3"])
    assert [exported(s)["CUDA_VISIBLE_DEVICES"] for s in specs] == ["3", "3"]


# ---------------------------------------------------------------------------- the path main takes


def test_main_with_nccl_hosts_reaches_the_supervisor_without_running_ssh(recorded, monkeypatch):
    import subprocess

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    specs = recorded(["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2"])
    assert [s.rank for s in specs] == [0, 1]
    assert specs[1].argv()[:5] == ["ssh", "-tt", "-o", "LogLevel=QUIET", "--"]


def test_rank_specs_leaves_the_callers_arguments_as_they_were():
    """MLX appends to ``args.env`` in place; the elastic launcher builds specs again from the same args."""
    from mlx._distributed_utils.common import Hostfile

    parser, args, command = launch.parse_args(["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2", "--", "true"])
    hostfile = Hostfile.from_list(args.hosts, 1)
    launch._complete_args(args, hostfile)
    env_before = list(args.env)
    first = mlx_launcher.rank_specs(parser, hostfile.hosts, args, command, launcher_env={})
    assert args.env == env_before and args.repeat_hosts is None
    assert mlx_launcher.rank_specs(parser, hostfile.hosts, args, command, launcher_env={}) == first


def test_an_error_inside_mlxs_launcher_becomes_a_runtime_error(monkeypatch):
    """``launch.main`` answers a RuntimeError from ``rank_specs`` with one line and stock mlx.launch."""
    import mlx._distributed_utils.launch as mlx_launch
    from mlx._distributed_utils.common import Hostfile

    def broken(parser, hosts, args, command):
        return None % args.repeat_hosts  # as a changed MLX might fail

    monkeypatch.setattr(mlx_launch, "launch_nccl", broken)
    parser, args, command = launch.parse_args(["--backend", "nccl", "-n", "2", "--", "true"])
    hostfile = Hostfile.from_list(args.hosts, 2)
    launch._complete_args(args, hostfile)
    with pytest.raises(RuntimeError, match=r"MLX's broken failed \(TypeError: "):
        mlx_launcher.rank_specs(parser, hostfile.hosts, args, command)


# ---------------------------------------------------------------------------- bad forms: one line, status 2


@pytest.mark.parametrize("argv,says", [
    (["--backend", "nccl", "--hosts", "a,b"], "rank 0's host 'a' has none; give --hosts as IP addresses"),
    (["--backend", "nccl", "--hosts", "127.0.0.1,10.0.0.2"], "127.0.0.1 is loopback, which the ranks on 10.0.0.2"),
    (["--backend", "nccl", "-n", "3", "--env", "CUDA_VISIBLE_DEVICES=0,1"],
     "host 127.0.0.1 runs 3 ranks but CUDA_VISIBLE_DEVICES='0,1' lists 2 GPU(s)"),
    (["--backend", "nccl", "--hostfile", "{twice}"], "lists host gpu1 twice"),
    (["--backend", "nccl", "--hostfile", "{two}", "-n", "2"], "give either --hostfile"),
])
def test_bad_nccl_launches_end_in_one_line(recorded, capsys, tmp_path, argv, says):
    (tmp_path / "twice").mkdir()
    twice = write_hostfile(tmp_path / "twice", [("gpu1", "10.0.0.1"), ("gpu1", "10.0.0.2")])
    two = write_hostfile(tmp_path, [("gpu1", "10.0.0.1"), ("gpu2", "10.0.0.2")])
    argv = [a.format(twice=twice, two=two) for a in argv]
    with pytest.raises(SystemExit) as ended:
        recorded(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlx-dp launch: error: ") and says in last, err
