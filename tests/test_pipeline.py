"""A pipeline (``parallel.pipeline``) trains what one process trains, on stages that each hold part of the model.

Reference comparison: the same recipe on one process and on 2 or 3 stages
(real processes under ``mlx-dp launch``), compared weight by weight. SGD
matches to float rounding (the parts of a micro-batch are summed as
accumulation sums micro-batches). A stopped and resumed pipeline run is
bit-identical to one never stopped, adapter dropout included. A stage that
dies ends the job within its timeout with a true status.
"""

import json
import time

import numpy as np
import pytest

from conftest import (MLX_DP, PYTHON, ROOT, launched, mlx_dp, one_error_line, read_metrics, read_status,
                      read_weights, run, start_ranks, tiny_recipe, wait_for_step)

pytestmark = pytest.mark.e2e  # every test here starts real processes

WORKER = str(ROOT / "tests" / "workers" / "train_many.py")
SGD = ["training.optimizer=sgd", "training.momentum=0.9", "training.learning_rate=0.05", "training.steps=4",
       "training.grad_accumulation=2", "training.batch_size=4", "eval.every=2", "eval.at_start=true"]
PIPE = ["parallel.pipeline=true", "parallel.pipeline_microbatches=3"]  # 4 rows in 3 parts: uneven parts too


def worker(n: int, tmp, name: str, entries: list) -> None:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(entries))
    command = [PYTHON, WORKER, str(spec)]
    result = run(command if n == 1 else [MLX_DP, "launch", "-n", str(n), "--", *command], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = tmp / "data"  # 20 training rows: 4 updates of 8 cross an epoch edge
    data.mkdir()
    for split, rows in (("train", 20), ("valid", 8)):
        lines = (ROOT / "data" / "tiny-task" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (data / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    recipe = str(tiny_recipe(tmp, data={"path": str(data)}, checkpoint={"every": 2}))
    dpo = str(tiny_recipe(tmp, "dpo.yaml", data={"path": str(ROOT / "data" / "tiny-preference"), "max_seq_length": 64},
                          method={"type": "lora", "rank": 4, "scale": 4.0, "objective": "dpo", "beta": 0.5},
                          eval={"every": 2, "at_start": False, "max_batches": 2}, checkpoint={"every": 0}))
    adam = ["training.steps=6", "training.lr_schedule=cosine", "training.warmup_steps=2", "method.dropout=0.1",
            "training.grad_accumulation=2", "training.batch_size=4", "checkpoint.every=2"]
    worker(1, tmp, "one", [
        [recipe, *SGD, f"checkpoint.dir={tmp}/one-sgd"],
        [dpo, *SGD, "training.batch_size=2", f"data.cache_dir={tmp}/cache-one", f"checkpoint.dir={tmp}/one-dpo"],
    ])
    worker(2, tmp, "two", [
        [recipe, *SGD, *PIPE, f"checkpoint.dir={tmp}/two-sgd"],
        [dpo, *SGD, *PIPE, "training.batch_size=2", f"data.cache_dir={tmp}/cache-two", f"checkpoint.dir={tmp}/two-dpo"],
        {"recipe": recipe, "overrides": [*adam, *PIPE, f"checkpoint.dir={tmp}/two-straight"]},
        {"recipe": recipe, "overrides": [*adam, *PIPE, f"checkpoint.dir={tmp}/two-resumed"], "faults": "stop:step=3"},
        {"recipe": recipe, "overrides": [*adam, *PIPE, f"checkpoint.dir={tmp}/two-resumed"], "resume": True},
    ])
    worker(3, tmp, "three", [[recipe, *SGD, *PIPE, f"checkpoint.dir={tmp}/three-sgd"]])
    return tmp


def close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= atol, f"largest difference {worst}"
    return worst


@pytest.mark.parametrize("stages,case", [(2, "sgd"), (3, "sgd"), (2, "dpo")])
def test_stages_train_what_one_process_trains(runs, stages, case):
    one, many = runs / f"one-{case}", runs / f"{'two' if stages == 2 else 'three'}-{case}"
    a, b = read_weights(one), read_weights(many)
    moved = max(float(np.abs(a[k]).max()) for k in a)
    assert moved > 1e-3, "the weights must have moved for the comparison to mean anything"
    close(a, b, atol=1e-5)
    # validation goes through the stages too: the same losses at the same updates
    va = [(m["step"], m["val_loss"]) for m in read_metrics(one) if "val_loss" in m]
    vb = [(m["step"], m["val_loss"]) for m in read_metrics(many) if "val_loss" in m]
    assert [s for s, _ in va] == [s for s, _ in vb] and len(va) >= 2
    assert np.allclose([v for _, v in va], [v for _, v in vb], atol=1e-5)
    ta = [m["train_loss"] for m in read_metrics(one) if "train_loss" in m]
    tb = [m["train_loss"] for m in read_metrics(many) if "train_loss" in m]
    assert np.allclose(ta, tb, atol=1e-5)
    assert read_status(many)["state"] == "completed"


def test_each_stage_reports_its_idle_share(runs):
    shares = [m["stage_idle_share"] for m in read_metrics(runs / "three-sgd") if "stage_idle_share" in m]
    assert shares and all(len(s) == 3 and all(0 <= x <= 1 for x in s) for s in shares)


def test_stopped_and_resumed_pipeline_is_bit_identical(runs):
    straight, resumed = runs / "two-straight", runs / "two-resumed"
    assert read_status(resumed)["state"] == "completed" and read_status(resumed)["step"] == 6
    assert (resumed / "checkpoints" / "step_0000003").is_dir(), "the stop must have saved update 3"
    a, b = read_weights(straight), read_weights(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    la = [m["train_loss"] for m in read_metrics(straight) if "train_loss" in m]
    lb = [m["train_loss"] for m in read_metrics(resumed) if "train_loss" in m]
    assert la == lb, "the loss curve of the resumed run must continue exactly"


def test_pipeline_checkpoint_is_the_whole_model_and_resumes_on_one_process(runs, tmp_path):
    """A stage checkpoint holds every stage's adapters (mlx-lm loads them) and its optimizer state; one process
    resumes it and finishes as the 2-stage run did (SGD: to float rounding)."""
    import mlx.core as mx

    ckpt = runs / "two-straight" / "checkpoints" / "step_0000006"
    weights = mx.load(str(ckpt / "adapters.safetensors"))
    layers = {int(k.split(".")[2]) for k in weights if k.startswith("model.layers.")}
    assert layers == {0, 1, 2, 3}
    optimizer = mx.load(str(ckpt / "optimizer.safetensors"))
    assert {k.rsplit(".", 1)[0] for k in optimizer if k.endswith(".m")} == set(weights)


@pytest.mark.serial  # times a 10 s watchdog: beside another deadline test at most
def test_a_dead_stage_ends_the_job_with_a_true_status(tmp_path):
    recipe = str(tiny_recipe(tmp_path, training={"batch_size": 2, "steps": 100000},
                             checkpoint={"every": 5}, parallel={"timeout_s": 10.0, "pipeline": True}))
    procs = start_ranks(tmp_path, [["train", recipe]] * 2)
    wait_for_step(tmp_path / "run", 7, procs)
    start = time.monotonic()
    procs[1].kill()
    code = procs[0].wait(timeout=60)
    assert time.monotonic() - start < 60
    for p in procs:
        p.wait(timeout=60)
    assert code == 3
    log = (tmp_path / "rank0.log").read_text()
    assert "Traceback" not in log and "lost rank 1" in log
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and "lost rank 1" in status["reason"]


@pytest.mark.parametrize("extra,key", [
    (["parallel.shard_optimizer=true"], "parallel.shard_optimizer"),
    (["method.type=full"], "method.type"),
    (["data.packing=true"], "data.packing"),
    (["training.grad_checkpoint=true"], "training.grad_checkpoint"),
    (["parallel.stage_layers=[1, 1]"], "parallel.stage_layers"),
])
def test_what_a_pipeline_cannot_do_is_one_sentence(tmp_path, extra, key):
    recipe = str(tiny_recipe(tmp_path, parallel={"pipeline": True}))
    result = mlx_dp("train", recipe, *extra, timeout=120)
    assert result.returncode == 2
    assert key in one_error_line(result)


@pytest.mark.parametrize("case", ["sgd", "dpo"])
def test_eval_goes_through_the_stages(runs, case):
    """``mlx-dp eval`` on 2 stages scores what one process scores (DPO: its reference through the stages too)."""
    recipe = str(runs / ("recipe.yaml" if case == "sgd" else "dpo.yaml"))
    common = ["--split", "valid", f"checkpoint.dir={runs}/two-{case}", "eval.max_batches=2"]
    one = mlx_dp("eval", recipe, *common, "--json", str(runs / f"eval-one-{case}.json"), f"data.cache_dir={runs}/e1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launched(2, "eval", recipe, *common, "--json", str(runs / f"eval-two-{case}.json"), "parallel.pipeline=true",
                   f"data.cache_dir={runs}/e2")
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((runs / f"eval-one-{case}.json").read_text())
    b = json.loads((runs / f"eval-two-{case}.json").read_text())
    assert a["samples"] == b["samples"] and abs(a["loss"] - b["loss"]) < 1e-5
    if case == "dpo":
        assert a["preference_accuracy"] == b["preference_accuracy"]


def test_nccl_has_no_send_so_a_pipeline_is_refused_there(tmp_path):
    """MLX's NCCL group throws on send and recv (mlx/distributed/nccl/nccl.cpp): one sentence at start instead."""
    from trainer.config.load import load_config
    from trainer.errors import ConfigError
    from trainer.parallel.placement import Placement
    from trainer.parallel.world import World
    from trainer.run.stages import make_stage

    cfg = load_config(str(tiny_recipe(tmp_path, parallel={"pipeline": True})), [])
    world = World(group=None, rank=0, size=2, host="box", placement=Placement(compute="gpu", backend="nccl",
                                                                             gpu="cuda"))
    with pytest.raises(ConfigError, match="--backend ring"):
        make_stage(cfg, world, model=None)


def test_export_says_so_where_the_fused_model_does_not_fit(tmp_path):
    """Fusing holds the whole model: a machine with less memory gets one sentence that names the adapters."""
    from trainer.config.load import load_config
    from trainer.errors import ModelError
    from trainer.tools.export import check_fits

    cfg = load_config(str(tiny_recipe(tmp_path)), [])
    check_fits(cfg, tmp_path / "run", dequantize=False, memory=1 << 30)  # the tiny model fits 1 GB
    with pytest.raises(ModelError, match="--adapter-path"):
        check_fits(cfg, tmp_path / "run", dequantize=False, memory=100_000)
