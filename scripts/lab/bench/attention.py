"""``lab bench attention``: the training step with attention in query blocks, against whole rows.

For each row width it times the trainer's own compiled forward+backward
(``trainer.step.step.Gradient``, the recipe's model and method) with MLX's own ops
(its attention kernel over whole rows, mlx-lm's SwiGLU, MLX's cross-entropy:
``training.attention_block: 0``, ``training.fused_exp: false``) and with each
block size asked for, under the recipe's ``training.fused_exp`` (``auto``: on
a CPU, see ``trainer.model.fused``). Variants take turns within a round, in an order that rotates
every round; a ratio is taken within a round, then the median and range over
rounds are reported, so that a noisy machine cannot fake a speed-up. Use it to
choose ``attention_block`` on a machine whose default was not measured (a Mac's
GPU, say).

    MLX_DP_BLAS=openblas python scripts/lab bench attention RECIPE [--widths 96,160,224,320,512] [--blocks 32,64,128]
        [--batch 8] [--rounds 3] [--json out.json] [key=value ...]
"""

import argparse
import sys
import time

from trainer.errors import UserError
from .recipe_args import parse_with_overrides, write_json
from trainer.bench.stats import median

PROG = "lab bench attention"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Attention in query blocks against whole rows, per width.")
    p.add_argument("recipe")
    p.add_argument("--widths", type=_ints, default=[96, 160, 224, 320, 512], help="row widths (tokens)")
    p.add_argument("--blocks", type=_ints, default=[32, 64, 128], help="query block sizes to compare with 0")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: training.batch_size)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per width (default 3)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parse_with_overrides(p, argv)
    if args.rounds < 1 or (args.batch is not None and args.batch < 1):
        p.error("--rounds and --batch must be positive")
    return args


def compare(rounds: list[dict], variants: list[int]) -> dict:
    """Median seconds per variant, and each variant's speed-up over block 0 (median, min, max over rounds)."""
    out = {}
    for v in variants:
        ratios = [r[0] / r[v] for r in rounds]
        out[v] = {"seconds": median([r[v] for r in rounds]), "speedup": median(ratios),
                  "speedup_min": min(ratios), "speedup_max": max(ratios)}
    return out


def main(argv: list[str]) -> int:
    """``lab bench attention ...``; returns the exit status."""
    from trainer.config.load import load_config
    from trainer.tools.runtime import prepare_runtime, print_error

    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        prepare_runtime()
        import mlx.core as mx
        import mlx.optimizers as optim

        from trainer.model import fused
        from trainer.model.attention import use_blocks
        from trainer.model.load import apply_method, load_base
        from trainer.objectives.base import TokenLoss
        from trainer.objectives.sft import SFT
        from trainer.step.step import Gradient
        from trainer.tools import fastjit
        from trainer.tools.fastblas import active

        model, _, _ = load_base(cfg.model)
        apply_method(model, cfg.method, cfg.training.seed)
        variants = [0] + [b for b in args.blocks if b != 0]
        fused_on = fused.resolve(cfg.training.fused_exp)
        if not use_blocks(model, variants[-1]):
            raise UserError(f"{cfg.model.path}: its attention does not go through mlx-lm's "
                            "scaled_dot_product_attention, so blocks do not apply to it")
        # One compiled gradient function per variant: a trace keeps the block size (and loss) it was traced with.
        grads = {v: Gradient(model, SFT(cfg.method, TokenLoss(fused=fused_on and v > 0))) for v in variants}
        batch = args.batch or cfg.training.batch_size
        vocab = int(model.args.vocab_size) if hasattr(model, "args") else 1000
        results = []
        after = " + fused exp" if fused_on else ""
        print(f"[bench] MLX's ops (whole rows) against blocks{after}; MLX's fused kernels: {fastjit.active()}")
        print(f"{'width':>6} " + " ".join(f"{'block ' + str(v) if v else 'whole rows':>22}" for v in variants))
        for width in args.widths:
            key = mx.random.key(width)
            inputs = mx.random.randint(0, vocab, (batch, width), key=key)
            arrays = (inputs, mx.roll(inputs, -1, axis=1), mx.ones((batch, width), mx.float32))
            scale = mx.array(1.0 / inputs.size, mx.float32)

            def step(v):
                # A new width retraces: route before every call, as that variant was first traced.
                use_blocks(model, v, fused=fused_on and v > 0)
                fused.use_fused(model, fused_on and v > 0)
                start = time.perf_counter()
                mx.eval(grads[v](scale, *arrays))
                return time.perf_counter() - start

            for v in variants:
                step(v)  # trace and compile this width
            rounds = []
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                rounds.append({v: step(v) for v in order})
            row = compare(rounds, variants)
            cells = [f"{1000 * row[0]['seconds']:>9.0f} ms{'':>11}"] + [
                f"{1000 * row[v]['seconds']:>6.0f} ms {row[v]['speedup']:.2f}x "
                f"({row[v]['speedup_min']:.2f}-{row[v]['speedup_max']:.2f})" for v in variants[1:]]
            print(f"{width:>6} " + " ".join(f"{c:>22}" for c in cells), flush=True)
            results.append({"width": width, "batch": batch, "rounds": [{str(k): s for k, s in r.items()} for r in rounds],
                            "variants": {str(v): s for v, s in row.items()}})
        use_blocks(model, 0)
        fused.use_fused(model, False)
        if args.json:
            doc = {"benchmark": "attention", "recipe": args.recipe, "overrides": args.overrides,
                   "device": str(mx.default_device()), "blas": active(), "jit": fastjit.active(),
                   "fused_exp": fused_on, "widths": results,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json(args.json, doc)
        return 0
    except UserError as e:
        print_error(e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
