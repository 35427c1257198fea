"""`mlx-dp`: train, evaluate, export, benchmark, list recipes, launch ranks.

    mlx-dp train RECIPE [section.key=value ...] [--resume [PATH] [--allow-changes]]
    mlx-dp eval RECIPE [--checkpoint PATH] [section.key=value ...]
    mlx-dp export RECIPE [--out DIR] [--gguf FILE] [--upload-repo NAME [--adapters-only] [--dry-run]]
    mlx-dp bench scaling RECIPE -n N ...
    mlx-dp recipes list | cp NAME DEST | keys | memory [NAME]
    mlx-dp status RUN_DIR
    mlx-dp hostfile check HOSTFILE
    mlx-dp launch [-n N | --hostfile HOSTFILE] [mlx.launch's options] -- COMMAND ...

Under a launcher every rank runs the same command:
``mlx-dp launch -n 2 -- .venv/bin/mlx-dp train recipes/tiny-lora.yaml``
(``mlx.launch`` takes the same arguments and works too).

Problems a user can fix end with one line on stderr and exit code 2 (3 for
a lost, missing or disagreeing peer, 4 when the watchdog ends a hung job),
never a traceback. A run stopped by SIGINT, SIGTERM or SIGHUP exits
``128 + signal`` once its checkpoint is saved.
"""

import argparse
import json
import os
import re
import signal
import sys

from . import log
from .env import launch_env, set_library_defaults
from .errors import ConfigError, UserError
from .tools.runtime import prepare_runtime, print_error


def _load(args, say: bool = False):
    """The recipe a command names: a file or a library recipe, or an mlx_lm.lora config (translated).

    ``say``: print, on rank 0, how an mlx-lm config maps onto a recipe (or, when ``mlx-dp train``
    trains nothing with it, what it does instead).

    The recipe is checked first, in pure Python: a mistake in it ends the command before the runtime
    is prepared (``prepare_runtime``, which must come before MLX is imported) or anything loads.

    Returns:
        tuple: The ``Config`` and the ``Translation`` of an mlx-lm config (``None`` for a recipe).
    """
    from .config.load import blame
    from .config.mlx_lm import load_any
    from .tools.recipes import find_recipe

    env = launch_env()
    path = find_recipe(args.recipe)
    cfg, translation = load_any(path, args.overrides, world_size=env.world_size or 1)
    prepare_runtime()
    from .objectives.registry import make_objective

    try:
        make_objective(cfg)  # keys that do not apply to the objective stop here, before anything starts
    except ConfigError as e:
        raise blame(e, args.overrides, str(path)) from None
    if translation is not None and say and translation.plan == "train":
        log.info(f"{path} is an mlx_lm.lora config; it trains as this recipe (mlx-dp recipes cp {path} recipe.yaml "
                 "writes it out for editing):")
        for note in translation.notes:
            log.info(f"  {note}")
    elif translation is not None and say and translation.plan != "nothing":
        log.info(f"{path} is an mlx_lm.lora config: {translation.plan_note}")
    return cfg, translation


def _cmd_train(args, options=None) -> int:
    if args.resume and re.match(r"^\w+\.\w+=", args.resume):
        # `--resume training.steps=200`: the value is an override, not a path
        args.overrides.append(args.resume)
        args.resume = ""
    cfg, translation = _load(args, say=True)
    if args.allow_changes and args.resume is None:
        raise ConfigError("--allow-changes applies to --resume only")
    if translation is not None and translation.plan != "train":
        return _train_nothing(args, cfg, translation)
    from .run.loop import train

    resume = None
    if args.resume is not None:
        resume = True if args.resume == "" else args.resume
    if args.overwrite and resume is not None:
        raise ConfigError("--overwrite starts over and --resume continues: give one of them")
    result = train(cfg, resume=resume, options=options, allow_changes=args.allow_changes, overwrite=args.overwrite)
    if result["stopped"]:  # saved and resumable, but not finished: a script must not take it for done
        return 128 + (result.get("signal") or signal.SIGTERM)
    return 0


def _train_nothing(args, cfg, translation) -> int:
    """``mlx-dp train`` of an mlx-lm config that trains nothing, as under ``mlx_lm.lora -c``: score the test
    split where it asks (``test: true``) and write nothing, above all not at its ``adapter_path``."""
    if translation.plan == "nothing":
        raise ConfigError(f"{translation.source}: {translation.plan_note}")
    if args.resume is not None:
        raise ConfigError(f"--resume: {translation.source} trains nothing, so there is nothing to resume")
    if not translation.test:
        return 0
    from .tools.evaluation import run_eval

    # The model as it starts is the base model: a fresh LoRA's B is 0, a fresh DoRA's magnitude is the weights'
    # own norm, and a full fine-tune starts from the base weights.
    fresh = translation.plan == "idle" or translation.adapter_path == ""  # mlx-lm: an empty path tests the base
    _print_eval(run_eval(cfg, checkpoint="none" if fresh else None, split_name="test"))
    return 0


def _print_eval(result: dict, json_path: str | None = None) -> None:
    """``mlx-dp eval``'s line on rank 0, and its result as JSON to ``json_path`` where given."""
    line = result.pop("line")
    if launch_env().rank == 0:
        print(line, flush=True)
    if launch_env().rank == 0 and json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)


def _cmd_eval(args) -> int:
    cfg, _ = _load(args)
    from .tools.evaluation import run_eval

    _print_eval(run_eval(cfg, checkpoint=args.checkpoint, split_name=args.split), args.json)
    return 0


def _cmd_export(args) -> int:
    cfg, _ = _load(args)
    from .tools.export import ExportRequest, run_export

    run_export(cfg, ExportRequest(out=args.out, gguf=args.gguf, upload_repo=args.upload_repo,
                                  adapters_only=args.adapters_only, private=args.private, dry_run=args.dry_run,
                                  checkpoint=args.checkpoint, dequantize=args.dequantize))
    return 0


def _cmd_recipes(args) -> int:
    from .tools import recipes

    if args.action == "list":
        for name, summary in recipes.list_recipes():
            print(f"{name:28s} {summary}")
        return 0
    if args.action == "memory":
        from .tools.memory_plan import __doc__ as how, table

        paths = [recipes.find_recipe(n) for n in ([args.name] if args.name else [])] or recipes.all_recipes()
        if args.macs:  # one recipe on the user's Macs: data parallel, or the pipeline that fits
            from .config.load import load_config
            from .tools.stage_plan import parse_macs, plan

            macs = parse_macs(args.macs)
            if not args.name:
                raise ConfigError("--macs plans one recipe: mlx-dp recipes memory NAME --macs 4x64GB")
            print(f"{args.name} {plan(load_config(paths[0]), macs)}")
            return 0
        print(table(paths))
        print("\n" + how.split("\n\n", 2)[2].strip())
        return 0
    if args.action == "cp":
        if not args.name or not args.dest:
            raise ConfigError("usage: mlx-dp recipes cp NAME DEST (NAME: a library recipe, or an mlx_lm.lora "
                              "config to translate)")
        print(recipes.copy_recipe(args.name, args.dest, ranks=args.ranks))
        from .config.mlx_lm import translation_of

        translation = translation_of(recipes.find_recipe(args.name), world_size=args.ranks)
        if translation is not None and translation.plan != "train":  # the header says it too
            print(f"note: {translation.plan_note}; {translation.as_recipe()}")
        return 0
    from .config.load import describe_keys

    for key, default, doc in describe_keys():
        print(f"{key:32s} {default:14s} {doc}")
    return 0


def _cmd_status(args) -> int:
    from .cluster import status

    record = status.read(args.run_dir)
    print(status.describe(args.run_dir, record))
    if record is None:
        return 2
    return status.EXIT_CODES.get(record.get("state"), 1)


def _cmd_hostfile(args) -> int:
    from .cluster.hostfile import check_launch_hostfile

    hosts = check_launch_hostfile(args.path)
    print(f"{args.path}: {len(hosts)} hosts, each listed once: "
          + ", ".join(f"{h['ssh']} ({', '.join(h.get('ips') or ['no ip'])})" for h in hosts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-dp", description="Data-parallel fine-tuning on MLX from YAML recipes.",
        epilog="also: mlx-dp launch (start ranks as mlx.launch does, without its busy relay; see mlx-dp launch "
        "--help) and mlx-dp bench scaling (how much faster N ranks are than one; see mlx-dp bench scaling --help)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_tools(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune from a recipe (run under a launcher for several ranks)")
    p.add_argument("recipe", help="recipe YAML file, a library recipe's name (mlx-dp recipes list), or an "
                   "mlx_lm.lora config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from the newest intact checkpoint in checkpoint.dir, or from PATH")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although the recipe or the data changed since the checkpoint "
                        "(recorded in metrics.jsonl)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a checkpoint.dir that holds other files, or start an earlier run there over "
                        "(its checkpoints, adapters and metrics are removed); never / or a home directory")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="token-weighted loss (and exact match) of a trained run, sharded over ranks")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--checkpoint", default=None, help="run dir or checkpoints/step_* (default checkpoint.dir; "
                   "'none' for the base model)")
    p.add_argument("--split", choices=["test", "valid"], default=None, help="default: eval.split")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=_cmd_eval)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="fuse adapters into the base model (mlx-lm loads the result), write a GGUF "
                       "file for llama.cpp, push to the Hugging Face Hub",
                       description="Give --out, --gguf or --upload-repo, or several: the model is fused once. "
                       "Without --out, an upload of the fused model is staged in a temporary folder.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--out", default=None, help="directory for the fused model (new or empty)")
    p.add_argument("--gguf", default=None, metavar="FILE", help="write the fused model as one GGUF file "
                   "(llama, mistral and mixtral models, as mlx-lm's writer; a new file)")
    p.add_argument("--upload-repo", default=None, metavar="NAME", help="push the fused model (and the GGUF file) "
                   "to this Hub repository, owner/name, with a model card; needs a token (hf auth login)")
    p.add_argument("--adapters-only", action="store_true", help="with --upload-repo: push the adapters "
                   "(adapters.safetensors, adapter_config.json), not the fused model")
    p.add_argument("--private", action="store_true", help="with --upload-repo: create the repository private "
                   "(the Hub's default, and mlx-lm's and unsloth's, is public)")
    p.add_argument("--dry-run", action="store_true", help="with --upload-repo: write what was asked locally, then "
                   "print the files that would be uploaded and the model card instead of uploading (no network)")
    p.add_argument("--checkpoint", default=None, help="run dir or checkpoints/step_* (default checkpoint.dir)")
    p.add_argument("--dequantize", action="store_true", help="full-precision output from a quantized base "
                   "(needed for --gguf)")
    p.set_defaults(func=_cmd_export)


def _add_tools(sub) -> None:
    p = sub.add_parser("status", help="what a run directory's run is doing, or how it ended (a run killed "
                       "outright shows as lost)", description="Exit status: 0 completed, 1 failed or lost, "
                       "2 no status.json, 3 running, 4 stopped (resumable).")
    p.add_argument("run_dir", help="the run's checkpoint.dir")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("hostfile", help="check an mlx.launch hostfile before a long job")
    p.add_argument("action", choices=["check"])
    p.add_argument("path", help="the JSON hostfile given to mlx.launch --hostfile")
    p.set_defaults(func=_cmd_hostfile)

    p = sub.add_parser("recipes", help="list, copy or explain recipes; memory: what fits on a 16/32/64 GB Mac")
    p.add_argument("action", choices=["list", "cp", "keys", "memory"])
    p.add_argument("name", nargs="?", help="cp, memory: a library recipe's name (or a file; cp also translates "
                   "an mlx_lm.lora config)")
    p.add_argument("dest", nargs="?", help="cp: where to write it")
    p.add_argument("--ranks", type=int, default=1, help="cp of an mlx_lm.lora config: ranks its global batch_size "
                   "is split over (default 1)")
    p.add_argument("--macs", help="memory: your Macs, e.g. 4x64GB or 64GB,32GB; says whether data parallelism fits "
                   "and otherwise the pipeline (stages and blocks per stage) that does")
    p.set_defaults(func=_cmd_recipes)


def _recipe_after_resume(argv: list[str]) -> list[str]:
    """``train --resume recipe.yaml ...``: the YAML file is the recipe, not the checkpoint to resume.

    A checkpoint is a directory, so a ``.yaml`` file (or any existing file)
    after ``--resume`` means a bare ``--resume``; it moves to the end.
    """
    if argv[:1] != ["train"] or "--resume" not in argv:
        return argv
    i = argv.index("--resume")
    following = argv[i + 1] if i + 1 < len(argv) else None
    if following is None or not (following.endswith((".yaml", ".yml")) or os.path.isfile(following)):
        return argv
    return argv[:i] + argv[i + 1:] + ["--resume"]


def main(argv: list[str] | None = None, options=None) -> None:
    """The ``mlx-dp`` command; exits the process.

    Args:
        argv (list[str] | None): Arguments; default ``sys.argv[1:]``.
        options (trainer.run.hooks.RunOptions | None): For ``train``: hooks
            and switches that tests and benchmarks install (not reachable from
            the command line). Default: ``None``.
    """
    argv = sys.argv[1:] if argv is None else argv
    set_library_defaults()
    if argv[:1] == ["launch"]:
        from .cluster.launch import main as launch_main

        sys.exit(launch_main(argv[1:]))
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        sys.exit(bench_main(argv[1:]))
    parser = build_parser()
    args, extra = parser.parse_known_args(_recipe_after_resume(argv))
    # overrides may follow options (`eval R --split test eval.batch_size=4`), which argparse
    # leaves over; anything else left over is a mistake
    stray = [a for a in extra if not re.match(r"^\w+\.\w+=", a)]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides.extend(extra)
    try:
        code = _cmd_train(args, options) if args.command == "train" else args.func(args)
    except UserError as e:
        print_error(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("mlx-dp: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `mlx-dp recipes keys | head`
        sys.exit(0)
    if args.command == "train" and code > 128:
        _settled(code)  # (stopped by a signal, saved)
    sys.exit(code)


def _settled(code: int) -> None:
    """A run stopped by a signal is saved and its status final: another Ctrl-C, SIGTERM or SIGHUP while the
    interpreter shuts down is ignored, so the process ends with ``code`` (``128 + signal``). The run's own
    handlers are gone by then; Python's would raise a KeyboardInterrupt, and late in shutdown, where Python has
    put back the system's default, the process would die by SIGINT instead. (An ignored signal stays ignored
    through shutdown, which takes a moment.)
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
