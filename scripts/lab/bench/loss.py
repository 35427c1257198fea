"""``lab bench loss``: peak memory and speed of one LoRA step with a Qwen3-sized vocabulary, by loss.

One step is what mlx-lm's trainer compiles (``nn.value_and_grad`` of the loss, then
Adam on the adapters, in one ``mx.compile``), on a random float32 Qwen3 (vocabulary
151,936, tied embedding as in Qwen3 0.6B; hidden size and layers from the flags) with
mlx-lm's own LoRA (rank 8, every layer), at ``--batch x --length`` tokens. Only the
loss differs:

* ``mlx_lm``: ``mlx_lm.tuner.trainer.default_loss``, what ``mlx_lm.lora`` trains with;
* ``plain``: the product's loss with ``training.chunked_loss: false``
  (``TokenLoss(fused=...)``: the whole logits);
* ``chunked``: the product's loss as it trains by default (``TokenLoss(chunked=True)``).

``fused`` follows ``training.fused_exp: auto`` (on a CPU: on). Two measurements, each
in alternating order (A B C, C B A, ...):

* **memory**: each variant in its own process (a warm-up step and ``--steps`` more)
  under ``/usr/bin/time -v``: its peak RSS, ``--memory-rounds`` times;
* **speed**: every variant in one process, ``--rounds`` rounds of one step each:
  tokens/s (median, min-max) and MLX's peak memory above the step's start;
* **cli** (``--cli``): the two programs themselves, each in its own process under
  ``/usr/bin/time -v``, in alternating order: ``mlx_lm.lora --train`` and
  ``mlx-dp train`` (chunked loss on, and off) on a saved random Qwen3 of
  Qwen3-0.6B's width (2 of its 28 layers, its 151,936-word vocabulary, float32)
  and rows of 512 tokens, batch 4, ``--cli-steps`` updates, LoRA rank 8 on both
  layers. Peak RSS of each, and the tokens/s each reports. mlx_lm.lora runs with
  the same OpenBLAS matmuls and compiled kernels (``MLX_DP_BLAS``, ``MLX_DP_JIT``).

Usage::

    MLX_DP_BLAS=openblas MLX_DP_JIT=avx2 python scripts/lab bench loss --json results/chunked-loss.json
    python scripts/lab bench loss --hidden 256 --length 128 --rounds 2 --memory-rounds 1   # a quick look
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

VARIANTS = ("mlx_lm", "plain", "chunked")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab bench loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["all", "rounds", "one"], default="all")
    p.add_argument("--variant", choices=VARIANTS, help="--mode one: the variant")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--memory-rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="memory: steps after the warm-up one")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--cli", action="store_true", help="also the cli part (mlx_lm.lora against mlx-dp train)")
    p.add_argument("--cli-rounds", type=int, default=2)
    p.add_argument("--cli-steps", type=int, default=3)
    p.add_argument("--json", help="write every figure here")
    return p.parse_args(argv)


def rss_kb(text: str) -> int:
    """``Maximum resident set size (kbytes)`` of ``/usr/bin/time -v``'s report (``bench pipeline``'s parser)."""
    from lab.bench.pipeline import parse_time_v

    rss = parse_time_v(text)["max_rss_bytes"]
    if rss is None:
        raise ValueError("no 'Maximum resident set size' line in /usr/bin/time -v's output")
    return rss // 1024


def alternating(variants, rounds: int) -> list:
    """Each round's order: as given, then reversed, and so on."""
    return [list(variants) if r % 2 == 0 else list(variants)[::-1] for r in range(rounds)]


def spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------- in one process


def _build(args):
    import mlx.core as mx
    from mlx_lm.models import qwen3
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    config = qwen3.ModelArgs(
        model_type="qwen3", hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=3 * args.hidden,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
        rms_norm_eps=1e-6, vocab_size=args.vocab, max_position_embeddings=4096, rope_theta=1e6,
        tie_word_embeddings=True)
    model = qwen3.Model(config)
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, args.layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    model.train()
    tokens = mx.random.randint(0, args.vocab, (args.batch, args.length + 1))
    mx.eval(tokens)
    return model, tokens


def _step(variant, model):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    from trainer.model import fused
    from trainer.objectives.base import TokenLoss

    if variant == "mlx_lm":
        loss = partial(default_loss, model)
    else:
        nll = TokenLoss(fused=fused.resolve("auto"), chunked=variant == "chunked")

        def loss(batch, lengths):
            inputs, targets = batch[:, :-1], batch[:, 1:]
            steps = mx.arange(1, targets.shape[1] + 1)
            mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
            tokens = mask.sum()
            return (nll(model, inputs, targets) * mask).sum() / tokens, tokens

    optimizer = optim.Adam(learning_rate=0.0)  # the whole update runs, the weights stay: every variant sees one model
    value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (value, tokens), grad = value_and_grad(batch, lengths)
        optimizer.update(model, grad)
        return value, tokens

    def run(tokens, lengths):
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        start, cpu = time.perf_counter(), time.process_time()
        value, _ = step(tokens, lengths)
        mx.eval(value, state)
        return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                "peak_mib": (mx.get_peak_memory() - before) / 2**20, "loss": value.item()}

    return run


def _in_process(args) -> dict:
    from trainer.tools import fastblas, fastjit

    fastblas.maybe_enable()
    fastjit.maybe_enable()
    import mlx.core as mx

    model, tokens = _build(args)
    lengths = mx.array([[0, args.length]] * args.batch)
    variants = [args.variant] if args.mode == "one" else list(VARIANTS)
    steps = {v: _step(v, model) for v in variants}
    if args.mode == "one":
        runs = [steps[args.variant](tokens, lengths) for _ in range(1 + args.steps)]
        return {"variant": args.variant, "steps": runs}
    for v in variants:  # warm-up: trace and compile each once
        steps[v](tokens, lengths)
    rounds = []
    for r, order in enumerate(alternating(variants, args.rounds)):
        for v in order:
            rounds.append(dict(steps[v](tokens, lengths), round=r, variant=v))
            print(json.dumps(rounds[-1]), flush=True)
    per_step = args.batch * args.length
    summary = {}
    for v in variants:
        mine = [x for x in rounds if x["variant"] == v]
        summary[v] = {"tokens_per_s": spread([per_step / x["seconds"] for x in mine]),
                      "tokens_per_cpu_s": spread([per_step / x["cpu_s"] for x in mine]),
                      "mlx_peak_mib": max(x["peak_mib"] for x in mine), "loss": mine[0]["loss"]}
    return {"rounds": rounds, "summary": summary}


# ---------------------------------------------------------------------------- the two programs

WORDS = ("alpha", "bravo", "coffee", "delta", "echo", "camel", "lion", "likes", "which", "drink", "pet", "owns")


def _cli_inputs(work, args) -> tuple:
    """(model folder, data folder): Qwen3-0.6B's shape at 2 layers, random float32; rows over 512 tokens."""
    import random
    from pathlib import Path

    from lab import synth
    from trainer.library import resolve

    work = Path(work)
    tokenizer = Path(resolve("builtin:tiny-llama"))
    config = synth.reduce_config(synth.load_arch("qwen3-0.6b"), num_layers=args.layers)
    config["vocab_size"] = args.vocab
    model = synth.make_random_model(config, work / "model", tokenizer, seed=0)
    data = work / "data"
    data.mkdir()
    rng = random.Random(0)
    for split, rows in (("train", 64), ("valid", 8)):  # 200 words: about 700 tokens, cut at max_seq_length
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(200))}) for _ in range(rows)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return model, data


def _cli_command(variant: str, model, data, out, args) -> list:
    if variant == "mlx_lm.lora":
        lora = ["--train", "--model", str(model), "--data", str(data), "--batch-size", str(args.batch),
                "--max-seq-length", str(args.length), "--iters", str(args.cli_steps), "--num-layers", str(args.layers),
                "--val-batches", "1", "--steps-per-report", "1", "--steps-per-eval", "100000",
                "--save-every", "100000", "--adapter-path", str(out), "--learning-rate", "1e-5"]
        # mlx_lm.lora's own main(), its reports recorded by its own callback hook (lab.rank)
        code = ("import sys; from trainer.tools import fastblas; fastblas.maybe_enable(); "
                "from lab.rank import mlx_lm_worker; sys.exit(mlx_lm_worker(sys.argv[1], sys.argv[2:]))")
        return [sys.executable, "-c", code, f"{out}.reports.jsonl", *lora]
    recipe = {"model": {"path": str(model)}, "method": {"type": "lora", "rank": 8, "scale": 20.0, "num_layers": -1},
              "data": {"path": str(data), "max_seq_length": args.length, "packing": False,
                       "long_samples": "truncate"},
              "training": {"batch_size": args.batch, "steps": args.cli_steps, "learning_rate": 1e-5,
                           "optimizer": "adam", "chunked_loss": variant == "mlx-dp"},
              "eval": {"every": 0, "at_start": False}, "checkpoint": {"dir": str(out), "every": 0},
              "logging": {"every": 1, "progress_bar": False}}
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(recipe))
    return [sys.executable, "-m", "trainer", "train", str(path)]


def _reported_tokens_per_s(variant: str, text: str, out) -> float | None:
    """The last update's tokens/s as the program reports it (mlx_lm.lora's console, mlx-dp's metrics.jsonl)."""
    metrics = out.parent / f"{out.name}.reports.jsonl" if variant == "mlx_lm.lora" else out / "metrics.jsonl"
    values = [json.loads(line).get("tokens_per_s", json.loads(line).get("tokens_per_second")) for line in metrics.read_text().splitlines()] if metrics.is_file() \
        else []
    values = [v for v in values if v]
    return values[-1] if values else None


def _cli(args) -> dict:
    import tempfile
    from pathlib import Path

    from lab import pythonpath

    variants = ("mlx_lm.lora", "mlx-dp", "mlx-dp unchunked")
    runs = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-loss-") as work:
        model, data = _cli_inputs(work, args)
        env = dict(os.environ, PYTHONPATH=pythonpath())
        for r, order in enumerate(alternating(variants, args.cli_rounds)):
            for v in order:
                out = Path(work) / f"{v.replace(' ', '-')}-{r}"
                done = subprocess.run(["/usr/bin/time", "-v", *_cli_command(v, model, data, out, args)],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"lab bench loss: {v} failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
                runs[v].append({"peak_rss_mib": rss_kb(done.stderr) * 1024 / 2**20,
                                "tokens_per_s": _reported_tokens_per_s(v, done.stdout + done.stderr, out)})
                print(json.dumps({"cli": v, "round": r, **runs[v][-1]}), flush=True)
                if runs[v][-1]["tokens_per_s"] is None:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
    base = min(x["peak_rss_mib"] for x in runs["mlx_lm.lora"])
    return {v: {"runs": x, "peak_rss_mib": spread([y["peak_rss_mib"] for y in x]),
                "rss_ratio_to_mlx_lm_lora": max(y["peak_rss_mib"] for y in x) / base} for v, x in runs.items()}


# ---------------------------------------------------------------------------- the driver


def _sizes(args) -> list:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--batch", str(args.batch), "--length", str(args.length)]


def _memory(args) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/
    peaks = {v: [] for v in VARIANTS}
    for order in alternating(VARIANTS, args.memory_rounds):
        for v in order:
            command = ["/usr/bin/time", "-v", sys.executable, os.path.join(here, "lab"), "bench", "loss", "--mode",
                       "one", "--variant", v, "--steps", str(args.steps), *_sizes(args)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"lab bench loss: {v} failed:\n{done.stderr[-2000:]}")
            peaks[v].append(rss_kb(done.stderr) * 1024 / 2**20)
            print(json.dumps({"memory": v, "peak_rss_mib": round(peaks[v][-1])}), flush=True)
    return {v: {"peak_rss_mib": spread(p), "ratio_to_mlx_lm": max(p) / min(peaks["mlx_lm"])} for v, p in peaks.items()}


def main(argv) -> int:
    args = parse_args(argv)
    if args.mode != "all":
        print(json.dumps(_in_process(args)))
        return 0
    from trainer.tools import fastblas

    fastblas.maybe_enable()
    import mlx.core as mx

    result = {"command": "python scripts/lab bench loss " + " ".join(argv), "mlx": mx.__version__,
              "blas": fastblas.active(), "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_DP_")},
              "config": vars(args), "load_before": os.getloadavg()}
    if args.cli:
        result["cli"] = _cli(args)
    result["memory"] = _memory(args)
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "lab"), "bench", "loss", "--mode", "rounds", "--rounds", str(args.rounds),
        *_sizes(args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lab bench loss: the speed rounds failed:\n{done.stderr[-2000:]}")
    speed = json.loads(done.stdout.strip().splitlines()[-1])
    result["speed"] = speed
    base = speed["summary"]["mlx_lm"]["tokens_per_s"]["median"]
    result["speed_ratio_to_mlx_lm"] = {v: s["tokens_per_s"]["median"] / base for v, s in speed["summary"].items()}
    result["load_after"] = os.getloadavg()
    print(json.dumps({"cli": result.get("cli"), "memory": result["memory"], "speed": speed["summary"],
                      "speed_ratio_to_mlx_lm": result["speed_ratio_to_mlx_lm"]}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
