"""A run directory is ours, or it is refused: nothing lands where it should not, nothing is written through a link."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import mlx_dp, one_error_line, read_metrics, read_status, tiny_recipe
from trainer.state.rundir import RUN_FILES
from trainer.tools import fastblas

pytestmark = pytest.mark.e2e  # every test here starts real processes


def _snapshot(folder) -> dict:
    """Every file under ``folder`` (links as their target text), byte for byte."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = ("link", os.readlink(path)) if os.path.islink(path) else \
                open(path, "rb").read()
    return out


def test_the_root_and_a_home_directory_are_refused_whatever_the_flags(tmp_path):
    recipe = str(tiny_recipe(tmp_path))
    root = mlx_dp("train", recipe, "checkpoint.dir=/", "--overwrite")
    assert root.returncode == 2
    assert "checkpoint.dir / is the root of the file system" in one_error_line(root)
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("mine")
    before = _snapshot(home)
    # (mlx-dp's own cache stays where it was: with MLX_DP_BLAS=openblas it holds the shim, ~/.cache/mlx-dp by design)
    cache = {"MLX_DP_CACHE": str(fastblas.cache_dir())}
    refused = mlx_dp("train", recipe, "checkpoint.dir=~/", "--overwrite",  # (YAML: a bare ~ is null)
                     env={"HOME": str(home), **cache})
    assert refused.returncode == 2
    assert "is a home directory; give a folder of its own inside it" in one_error_line(refused)
    assert _snapshot(home) == before, "nothing was written into the home directory"


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 1}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = _snapshot(mine)
    refused = mlx_dp("train", recipe, f"checkpoint.dir={mine}")
    assert refused.returncode == 2
    line = one_error_line(refused)
    assert f"checkpoint.dir {mine} already holds files that are not an mlx-dp run (config.yaml, metrics.jsonl)" in line
    assert "--overwrite" in line
    assert _snapshot(mine) == before
    forced = mlx_dp("train", recipe, f"checkpoint.dir={mine}", "--overwrite")  # the user says so
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert read_status(mine)["state"] == "completed"


def test_a_folder_others_can_write_or_another_user_owns_is_refused(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 1}))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused = mlx_dp("train", recipe, f"checkpoint.dir={shared}")
    assert refused.returncode == 2
    assert "can be written by other users (mode 777)" in one_error_line(refused)
    assert list(shared.iterdir()) == []
    if os.geteuid() != 0:
        pytest.skip("a folder owned by another user needs root to make")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    refused = mlx_dp("train", recipe, f"checkpoint.dir={theirs}")
    assert refused.returncode == 2
    assert "not to you; a run writes only into a folder of your own" in one_error_line(refused)
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_link_planted_at_a_file_of_the_run_leaves_its_target_unchanged(tmp_path, name):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 1}))
    run_dir, target = tmp_path / "run", tmp_path / "precious"
    run_dir.mkdir()
    target.mkdir()
    (target / "keep.txt").write_text("keep me\n")
    victim = target / "keep.txt"
    (run_dir / name).symlink_to(target if name == "checkpoints" else victim)
    before = _snapshot(target)
    refused = mlx_dp("train", recipe)
    assert refused.returncode == 2
    assert f"holds {name} as a symbolic link" in one_error_line(refused)
    assert _snapshot(target) == before, "the link's target is unchanged"


def test_a_link_planted_at_a_rank_timing_file_is_not_written_through(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 1}, logging={"per_rank_timings": True}))
    run_dir, victim = tmp_path / "run", tmp_path / "victim.txt"
    run_dir.mkdir()
    victim.write_text("keep me\n")
    (run_dir / "status.json").write_text(json.dumps({"state": "failed", "step": 0}))  # a run folder
    (run_dir / "metrics.rank0.jsonl").symlink_to(victim)
    refused = mlx_dp("train", recipe)
    assert refused.returncode == 2
    assert "holds metrics.rank0.jsonl as a symbolic link" in one_error_line(refused)
    assert victim.read_text() == "keep me\n"


def test_appends_and_whole_writes_never_follow_a_link(tmp_path):
    """Planted after the check (by the owner, say): the write refuses the link or replaces it, never its target."""
    from trainer.errors import CheckpointError
    from trainer.state.rundir import open_append, write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(CheckpointError, match="metrics.jsonl is a symbolic link; mlx-dp writes no file"):
        open_append(tmp_path / "metrics.jsonl")
    (tmp_path / "config.yaml").symlink_to(victim)
    (tmp_path / f".config.yaml.tmp{os.getpid()}").symlink_to(victim)  # even at the temporary's name
    write_atomic(tmp_path / "config.yaml", b"recipe\n")
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "config.yaml").is_symlink() and (tmp_path / "config.yaml").read_text() == "recipe\n"


def test_a_finished_run_is_continued_with_resume_or_refused_never_replaced(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"steps": 2}))
    first = mlx_dp("train", recipe)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "run"
    before = _snapshot(run_dir)
    again = mlx_dp("train", recipe)
    assert again.returncode == 2
    line = one_error_line(again)
    assert f"checkpoint.dir {run_dir} holds a run (completed at update 2; 1 checkpoint(s), the newest " \
           "step_0000002); continue it with --resume" in line
    assert _snapshot(run_dir) == before, "the finished run's adapters, metrics and status are untouched"
    longer = mlx_dp("train", recipe, "training.steps=3", "--resume")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert read_status(run_dir)["step"] == 3
    over = mlx_dp("train", recipe, "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    assert "--overwrite: removed the earlier run's" in over.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert steps == [1, 2], "one run's records, not the earlier ones and a second step 1"


def test_overwrite_and_resume_together_are_one_sentence(tmp_path):
    result = mlx_dp("train", str(tiny_recipe(tmp_path)), "--resume", "--overwrite")
    assert result.returncode == 2
    assert "--overwrite starts over and --resume continues: give one of them" in one_error_line(result)
