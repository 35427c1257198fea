"""``mlx_lm.lora -c config.yaml`` configs, read as they are and trained as the same work.

An mlx-lm config is recognised by its keys: a flat mapping with ``model: <str>``
(a recipe's ``model`` is a section), or keys only mlx-lm has (``iters``,
``adapter_path``, ``lora_parameters``...). :func:`translate` maps it onto a
recipe with mlx-lm's own defaults for every key it leaves out (mlx-lm 0.32's
``CONFIG_DEFAULTS``), and says in a few lines where a meaning differs:

* ``batch_size`` is the global batch in mlx-lm (split over ranks); a recipe's
  ``training.batch_size`` is per rank, so it becomes ``batch_size / ranks``;
* ``iters`` counts micro-batches in mlx-lm; ``training.steps`` counts optimizer
  updates: ``iters / grad_accumulation_steps`` (so do the report, eval and save
  cadences);
* mlx-lm truncates samples over ``max_seq_length`` (``data.long_samples:
  truncate``), masks no prompt unless asked (``data.mask_prompt: false``) and
  uses mlx's AdamW default weight decay of 0.01;
* its warmup schedule is the same curve as a recipe's written one step apart
  (``warmup`` w from ``warmup_init`` is ``warmup_steps`` w + 1 from a value
  below it); a decay length other than the updates left after warmup is said.

The adapters go where ``adapter_path`` says (``checkpoint.dir``), as
``adapters.safetensors`` + ``adapter_config.json``. Anything mlx-dp cannot
train alike (a ``resume_adapter_file``, the Muon optimizer, a schedule other
than cosine or linear decay, a ``report_to`` other than wandb) is refused in
one sentence naming the key.

``mlx-dp train config.yaml`` does what ``mlx_lm.lora -c config.yaml`` does
(mlx-lm's ``lora.py`` ``run``) and writes at ``adapter_path`` only when it
trains (:class:`Translation` ``plan``): ``train: false`` trains nothing and,
with ``test: true``, scores the adapters at ``adapter_path`` on the test split
(as ``mlx-dp eval``); ``train: false`` without ``test`` is refused, as mlx-lm
refuses it; ``iters`` that add up to no optimizer update train nothing (where
mlx-lm writes its untrained adapters). A config that leaves ``train`` out
trains: the command stands for ``mlx_lm.lora --train``. With ``train`` and
``test`` both true, the test is left to ``mlx-dp eval`` afterwards (a note says so).

Pure Python: nothing here imports MLX.
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError, short
from ..library import resolve as resolve_builtin
from .load import SECTION_CLASSES, build_config, read_recipe

# mlx_lm.lora's CONFIG_DEFAULTS (mlx-lm 0.32): what a config that leaves a key out trains with.
DEFAULTS = {
    "model": "Qwen/Qwen3-0.6b", "train": False, "fine_tune_type": "lora", "optimizer": "adam",
    "optimizer_config": {}, "data": "mlx-community/WikiSQL", "seed": 0, "num_layers": 16, "batch_size": 4,
    "iters": 1000, "val_batches": 25, "learning_rate": 1e-5, "steps_per_report": 10, "steps_per_eval": 200,
    "resume_adapter_file": None, "adapter_path": "adapters", "save_every": 100, "test": False,
    "test_batches": 500, "max_seq_length": 2048, "config": None, "grad_checkpoint": False,
    "grad_accumulation_steps": 1, "clear_cache_threshold": 0, "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}, "mask_prompt": False, "report_to": None,
    "project_name": None, "trust_remote_code": False,
    "hf_dataset": None, "text_feature": "text", "prompt_feature": "prompt", "completion_feature": "completion",
    "chat_feature": "messages",
}
ONLY_MLX_LM = set(DEFAULTS) - set(SECTION_CLASSES)
# mlx.optimizers' own defaults where they differ from a recipe's
OPTIMIZER_KEYS = {"adam": {"betas", "eps", "bias_correction"}, "adamw": {"betas", "eps", "weight_decay",
                                                                          "bias_correction"},
                  "sgd": {"momentum", "weight_decay", "dampening", "nesterov"},
                  "adafactor": {"eps", "clip_threshold", "decay_rate", "beta_1", "weight_decay", "scale_parameter",
                                "relative_step", "warmup_init"}}


def is_mlx_lm_config(data) -> bool:
    """Whether parsed YAML is an ``mlx_lm.lora`` config rather than a recipe."""
    if not isinstance(data, dict):
        return False
    if isinstance(data.get("model"), str) or isinstance(data.get("data"), str):
        return True
    return bool(set(data) & ONLY_MLX_LM) and not any(isinstance(data.get(s), dict) for s in SECTION_CLASSES)


# mlx-lm's reporters (tuner/callbacks.py SUPPORT_CALLBACK); mlx-dp reports to wandb only.
REPORTERS = ("wandb", "swanlab")
KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass
class Translation:
    """An mlx-lm config as a recipe: the recipe's sections, what a person should know, and what
    ``mlx-dp train`` does with it, as ``mlx_lm.lora -c`` would.

    ``plan``: ``train``; ``test`` (``train: false``, ``test: true``: score the adapters at
    ``adapter_path`` on the test split, train nothing); ``idle`` (``iters`` make no optimizer
    update: train nothing, and with ``test: true`` score the model as it starts); ``nothing``
    (``train: false``, ``test: false``, which mlx-lm refuses). Only ``train`` writes anything.
    """

    source: str
    recipe: dict
    notes: list[str] = field(default_factory=list)  # how it maps, where meanings differ
    plan: str = "train"
    plan_note: str = ""  # one sentence on what mlx-dp train does, when it does not train
    test: bool = False  # mlx-lm's `test`: score the test split (after training, or instead of it)
    adapter_path: str = "adapters"

    def recipe_yaml(self) -> str:
        """The recipe as YAML for editing, headed by where it came from and how it maps."""
        head = [f"# Translated from the mlx_lm.lora config {self.source} by mlx-dp.", "#"]
        if self.plan != "train":
            head += [f"# {self.plan_note}", f"# {self.as_recipe()}", "#"]
        head += [f"# {line}" for line in self.notes]
        return "\n".join(head) + "\n\n" + yaml.safe_dump(self.recipe, sort_keys=False)

    def as_recipe(self) -> str:
        """What the written recipe does that the config does not (``mlx-dp recipes cp``), when it does not train."""
        if self.plan == "idle":
            return ("the recipe trains: its training.steps is 1, the fewest a recipe runs; set the length you mean"
                    + ("; mlx-dp eval with it and --checkpoint none scores the model as it starts" if self.test
                       else ""))
        return (f"the recipe trains when given to mlx-dp train (writing over {self.adapter_path}); mlx-dp eval "
                f"with it scores the adapters at {self.adapter_path} on the test split")


def _updates(count: int, accumulation: int) -> int:
    return max(1, count // accumulation)


def _typed(c: dict, key: str, kind, source: str):
    """``c[key]`` checked to be ``kind`` (an int is a number too; a bool is no number), naming the key."""
    value = c[key]
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {KINDS[kind]}, got {short(value)}")
    if kind is not float:
        return value
    try:
        return float(value)
    except OverflowError:  # an integer past the largest float
        raise ConfigError(f"{source}: {key} must be a finite number, got {short(value)}") from None


def _positive(c: dict, key: str, source: str) -> int:
    value = _typed(c, key, int, source)
    if value < 1:
        raise ConfigError(f"{source}: {key} must be at least 1, got {value}")
    return value


def _batches(c: dict, key: str, source: str) -> int | None:
    """``val_batches`` or ``test_batches`` as ``eval.max_batches``: -1 (the whole split) is ``None``."""
    value = _typed(c, key, int, source)
    if value == 0 or value < -1:
        raise ConfigError(f"{source}: {key} must be -1 (the whole split) or a positive count, got {value}")
    return None if value == -1 else value


def _schedule(entry, iters_updates: int, where: str) -> tuple[dict, list[str]]:
    """mlx-lm's ``lr_schedule`` as the training keys of a recipe, and notes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("arguments"), list) or not entry.get("name"):
        raise ConfigError(f"{where}: lr_schedule must hold a name and a list of arguments, as mlx-lm's does")
    name, args = entry["name"], entry["arguments"]
    extra = set(entry) - {"name", "arguments", "warmup", "warmup_init"}
    if extra:
        raise ConfigError(f"{where}: lr_schedule has keys mlx-lm does not read: {', '.join(sorted(extra))}")
    kinds = {"cosine_decay": "cosine", "linear_schedule": "linear"}
    if name not in kinds:
        raise ConfigError(f"{where}: lr_schedule {short(name)} has no recipe equivalent; mlx-dp trains "
                          "cosine_decay or linear_schedule (with warmup)")
    try:
        peak = float(args[0])
        if name == "cosine_decay":
            decay, floor = int(args[1]), float(args[2]) if len(args) > 2 else 0.0
        else:
            floor, decay = float(args[1]), int(args[2])
        warmup, start = int(entry.get("warmup", 0)), float(entry.get("warmup_init", 0.0))
    except (TypeError, ValueError, IndexError, OverflowError):
        raise ConfigError(f"{where}: lr_schedule {name} takes numbers as mlx.optimizers.{name} does, got arguments "
                          f"{short(args)}" + (f", warmup {short(entry.get('warmup'))}" if "warmup" in entry else "")
                          ) from None
    if warmup < 0:
        raise ConfigError(f"{where}: lr_schedule warmup must be >= 0, got {warmup}")
    out = {"learning_rate": peak, "lr_schedule": kinds[name], "min_learning_rate": floor}
    notes = []
    if warmup:
        # mlx-lm's warmup of w updates from start reaches the peak at update w and joins the decay at
        # w + 1; a recipe's warmup of W updates gives update s init + (s + 1)(peak - init) / W.
        out.update(warmup_steps=warmup + 1, warmup_init=(start * (warmup + 1) - peak) / warmup)
        notes.append(f"lr_schedule warmup {warmup} from {start:g} is training.warmup_steps {warmup + 1} from "
                     f"{out['warmup_init']:.3g}: the same learning rate at every update")
    left = iters_updates - out.get("warmup_steps", 0)
    if decay != left:
        notes.append(f"differs: mlx-lm decays over {decay} updates; a recipe decays over the updates left after "
                     f"warmup ({left})")
    return out, notes


def _optimizer(name: str, settings: dict, where: str) -> tuple[dict, list[str]]:
    if name == "muon":
        raise ConfigError(f"{where}: optimizer muon has no recipe equivalent; use adam, adamw, sgd or adafactor")
    if name not in OPTIMIZER_KEYS:
        raise ConfigError(f"{where}: optimizer {short(name)} is not one of mlx-lm's (adam, adamw, sgd, adafactor)")
    unknown = set(settings) - OPTIMIZER_KEYS[name]
    if unknown:
        raise ConfigError(f"{where}: optimizer_config.{name} has keys mlx.optimizers.{name} does not take: "
                          + ", ".join(sorted(unknown)))
    out, notes = {"optimizer": name}, []
    try:
        if "betas" in settings:
            out["betas"] = [float(b) for b in settings["betas"]]
        if "eps" in settings and name != "adafactor":
            out["eps"] = float(settings["eps"])
        if name == "adamw":
            out["weight_decay"] = float(settings.get("weight_decay", 0.01))  # mlx's AdamW default
        if name == "sgd":
            out["momentum"] = float(settings.get("momentum", 0.0))
            out["weight_decay"] = float(settings.get("weight_decay", 0.0))
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: optimizer_config.{name} takes numbers, got {short(settings)}") from None
    if name == "sgd" and (settings.get("dampening", 0.0) or settings.get("nesterov", False)):
        raise ConfigError(f"{where}: optimizer_config.sgd dampening and nesterov have no recipe equivalent")
    if settings.get("bias_correction"):
        raise ConfigError(f"{where}: optimizer_config.{name}.bias_correction has no recipe equivalent")
    if name == "adafactor" and (settings.get("relative_step", True) or settings.get("scale_parameter", True)):
        notes.append("differs: mlx-lm's adafactor scales its steps itself (relative_step, scale_parameter); "
                     "mlx-dp's uses the learning rate as given")
    return out, notes


def _model_layers(model_path: str) -> int | None:
    """Transformer blocks of a local (or built-in) model, from its config.json; ``None`` for a hub id."""
    try:
        config = json.loads((Path(resolve_builtin(model_path)).expanduser() / "config.json").read_text())
    except (OSError, ValueError, ConfigError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = text.get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def _with_defaults(data: dict, source: str) -> dict:
    """The config with mlx-lm's defaults for what it leaves out; keys mlx-dp cannot take are refused."""
    unknown = sorted(set(data) - set(DEFAULTS), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(DEFAULTS), n=1)
        raise ConfigError(f"{source}: unknown mlx_lm.lora config key {str(unknown[0])[:40]}"
                          + (f"; did you mean {close[0]}?" if close else ""))
    c = {**DEFAULTS, **{k: v for k, v in data.items() if v is not None or k in ("lr_schedule", "hf_dataset")}}
    if c.get("resume_adapter_file"):
        raise ConfigError(f"{source}: resume_adapter_file has no recipe equivalent; mlx-dp resumes its own "
                          "checkpoints with --resume, or start from fresh adapters")
    if not isinstance(c["model"], str):
        raise ConfigError(f"{source}: model must be a path or hub id")
    for key in ("optimizer", "fine_tune_type", "adapter_path", "data"):
        _typed(c, key, str, source)
    mappings = {key: c[key] for key in ("optimizer_config", "lora_parameters")}
    if isinstance(c["optimizer_config"], dict):
        mappings.update({f"optimizer_config.{k}": v for k, v in c["optimizer_config"].items()})
    for key, value in mappings.items():
        if not isinstance(value or {}, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, as mlx-lm's is, got {short(value)}")
    for key in ("train", "test", "mask_prompt", "grad_checkpoint", "trust_remote_code"):
        _typed(c, key, bool, source)
    for key in ("num_layers", "seed", "clear_cache_threshold", "max_seq_length"):
        _typed(c, key, int, source)
    for key in ("val_batches", "test_batches"):
        _batches(c, key, source)
    if _typed(c, "iters", int, source) < 0:
        raise ConfigError(f"{source}: iters must be >= 0, got {c['iters']}")
    return c


def _method(c: dict, source: str) -> tuple[dict, list[str]]:
    """``fine_tune_type``, ``num_layers`` and ``lora_parameters`` as the recipe's method section, and notes."""
    lora = {**DEFAULTS["lora_parameters"], **(c["lora_parameters"] or {})}
    odd = set(lora) - {"rank", "scale", "dropout", "keys"}
    if odd:
        raise ConfigError(f"{source}: lora_parameters has keys mlx-lm does not read: {', '.join(sorted(odd))}")
    num_layers, notes = c["num_layers"], []
    layers = _model_layers(c["model"])
    if layers is not None and num_layers > layers:
        notes.append(f"num_layers {num_layers} on a model of {layers} layers: all of them, as mlx-lm does")
        num_layers = -1
    method = {"type": c["fine_tune_type"], "num_layers": num_layers}
    if c["fine_tune_type"] != "full":
        where = f"{source}: lora_parameters"
        method.update(rank=_typed(lora, "rank", int, where), scale=_typed(lora, "scale", float, where),
                      dropout=_typed(lora, "dropout", float, where))
        if lora.get("keys") is not None:
            method["keys"] = lora["keys"]
    return method, notes


def _data(c: dict, data: dict) -> dict:
    """The recipe's data section: mlx-lm truncates long samples and masks no prompt unless asked."""
    section = {"mask_prompt": c["mask_prompt"], "max_seq_length": c["max_seq_length"], "long_samples": "truncate"}
    if c.get("hf_dataset"):
        section["hf_dataset"] = c["hf_dataset"]
    else:
        section["path"] = c["data"]
    for key in ("text_feature", "prompt_feature", "completion_feature", "chat_feature"):
        if data.get(key) is not None:
            section[key] = data[key]
    return section


def _training(c: dict, per_rank: int, accumulation: int, updates: int, source: str) -> tuple[dict, list[str]]:
    """The recipe's training section (optimizer and schedule included), and notes."""
    training = {"batch_size": per_rank, "grad_accumulation": accumulation, "steps": max(1, updates),
                "learning_rate": _typed(c, "learning_rate", float, source), "seed": c["seed"],
                "grad_checkpoint": c["grad_checkpoint"], "clear_cache_threshold": c["clear_cache_threshold"]}
    optimizer, notes = _optimizer(c["optimizer"], (c.get("optimizer_config") or {}).get(c["optimizer"]) or {},
                                  source)
    training.update(optimizer)
    if c.get("lr_schedule"):
        schedule, more = _schedule(c["lr_schedule"], updates, source)
        training.update(schedule)
        notes += more
    return training, notes


def _reporting(c: dict, source: str) -> dict:
    """``report_to`` and ``project_name`` as the recipe's logging keys; a reporter mlx-dp lacks is refused."""
    report = c.get("report_to")
    if report is None:
        return {}
    if not isinstance(report, str):
        raise ConfigError(f"{source}: report_to must be a string such as wandb, got {short(report)}")
    names = [item.strip().lower() for item in report.split(",") if item.strip()]  # as mlx-lm splits it
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"{source}: report_to {short(report)} names {short(name)}, which is not a reporter "
                              f"of mlx-lm ({', '.join(REPORTERS)})")
        if name != "wandb":
            raise ConfigError(f"{source}: report_to {short(report)} names {name}, which mlx-dp does not report to; "
                              "it reports to wandb (report_to: wandb) and to metrics.jsonl in adapter_path")
    if not names:
        return {}
    return {"wandb": True, **({"wandb_project": c["project_name"]} if c.get("project_name") else {})}


def _plan(data: dict, c: dict, updates: int, source: str) -> tuple[str, str]:
    """What ``mlx-dp train`` does with the config, as mlx_lm.lora does (lora.py ``run``), and one sentence.

    A config that leaves ``train`` out trains: ``mlx-dp train`` stands for ``mlx_lm.lora --train``.
    """
    where = c["adapter_path"]
    if data.get("train") is False and c["test"]:
        return "test", (f"train: false, test: true: as mlx_lm.lora does, mlx-dp train trains nothing and scores "
                        f"the adapters at {where} on the test split (as mlx-dp eval {source} does), writing nothing")
    if data.get("train") is False:
        return "nothing", (f"train: false and test: false: the config does nothing, which mlx_lm.lora refuses too "
                           f"(\"Must provide at least one of --train or --test\"); set train: true to train, or "
                           f"test: true to score the adapters at {where}")
    if updates == 0:
        return "idle", (f"iters {c['iters']} add up to no optimizer update (grad_accumulation_steps "
                        f"{c['grad_accumulation_steps']}): mlx-dp train trains nothing and writes nothing to {where} "
                        "(mlx_lm.lora writes its untrained adapters there)"
                        + ("; test: true scores the model as it starts (fresh adapters change nothing) on the "
                           "test split" if c["test"] else ""))
    return "train", ""


def _notes(c: dict, global_batch: int, per_rank: int, updates: int, world_size: int, source: str) -> list[str]:
    """How the config's batch, iterations and files map onto the recipe."""
    accumulation, iters = c["grad_accumulation_steps"], c["iters"]
    ranks = f"{world_size} ranks" if world_size > 1 else "one process"
    notes = [f"batch_size {global_batch} is mlx-lm's global batch: training.batch_size {per_rank} per rank "
             f"on {ranks}",
             f"iters {iters} are micro-batches in mlx-lm: "
             + (f"training.steps {updates} optimizer updates of {accumulation} micro-batch(es) (report, eval and "
                "save cadences likewise)" if updates else f"no optimizer update of {accumulation} micro-batch(es)")
             + (f"; the last {iters % accumulation} micro-batch(es) never reach an update there either"
                if updates and iters % accumulation else ""),
             f"adapters.safetensors + adapter_config.json go to {c['adapter_path']} (checkpoint.dir), with "
             "resumable checkpoints in its checkpoints/ folder"]
    if c["test"]:
        batches = "null" if c["test_batches"] == -1 else c["test_batches"]
        notes.append(f"test: mlx-lm scores the test set after training; here run mlx-dp eval {source} "
                     f"eval.max_batches={batches} afterwards (its test_batches)")
    return notes


def translate(data: dict, source: str = "<config>", world_size: int = 1) -> Translation:
    """An ``mlx_lm.lora`` config as a recipe for ``world_size`` ranks, and what ``mlx-dp train`` does with it.

    Raises:
        ConfigError: A key mlx-lm does not have, a value mlx-dp cannot train alike, or a
            global batch that does not split over the ranks; each names the key and the file.
    """
    c = _with_defaults(data, source)
    global_batch, accumulation = _positive(c, "batch_size", source), _positive(c, "grad_accumulation_steps", source)
    if global_batch % world_size:
        raise ConfigError(f"{source}: batch_size {global_batch} is mlx-lm's global batch, which must split evenly "
                          f"over the {world_size} ranks here")
    per_rank, updates = global_batch // world_size, c["iters"] // accumulation
    method, notes = _method(c, source)
    training, more = _training(c, per_rank, accumulation, updates, source)
    plan, plan_note = _plan(data, c, updates, source)
    testing = plan in ("test", "idle") and c["test"]  # the eval section scores the test split as mlx-lm's test
    recipe = {
        "model": {"path": c["model"], "trust_remote_code": c["trust_remote_code"]},
        "method": method, "data": _data(c, data), "training": training,
        "eval": {"every": _updates(_positive(c, "steps_per_eval", source), accumulation), "at_start": True,
                 "max_batches": _batches(c, "test_batches" if testing else "val_batches", source),
                 "batch_size": per_rank, **({"exact_match": False} if testing else {})},
        "checkpoint": {"dir": c["adapter_path"] or ".",  # mlx-lm: an empty path is the working directory
                       "every": _updates(_positive(c, "save_every", source), accumulation)},
        "logging": {"every": _updates(_positive(c, "steps_per_report", source), accumulation), **_reporting(c, source)},
    }
    notes = [f"model {c['model']}, {c['fine_tune_type']} on "
             + ("every layer" if c["num_layers"] == -1 else f"the last {c['num_layers']} layers")] + notes + more
    notes += _notes(c, global_batch, per_rank, updates, world_size, source)
    notes.append("as mlx-lm: samples over max_seq_length are truncated, the prompt is "
                 + ("masked" if c["mask_prompt"] else "not masked")
                 + ("" if c["optimizer"] != "adamw" else f", AdamW's weight decay is {training['weight_decay']:g}"))
    return Translation(source=source, recipe=recipe, notes=notes, plan=plan, plan_note=plan_note, test=c["test"],
                       adapter_path=c["adapter_path"])


def translation_of(path, world_size: int = 1) -> Translation | None:
    """The translation of the YAML file ``path`` when it is an mlx-lm config, else ``None``."""
    data = read_recipe(path)
    return translate(data, str(path), world_size) if is_mlx_lm_config(data) else None


def load_any(path, overrides=(), world_size: int = 1):
    """A recipe file, or an mlx-lm config trained as the same work: ``(Config, Translation or None)``."""
    translation = translation_of(path, world_size)
    if translation is None:
        return build_config(read_recipe(path), overrides, source=str(path)), None
    return build_config(translation.recipe, overrides, source=str(path)), translation
