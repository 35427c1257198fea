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
than cosine or linear decay) is refused in one sentence naming the key.

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


@dataclass
class Translation:
    """An mlx-lm config as a recipe: the recipe's sections and what a person should know."""

    source: str
    recipe: dict
    notes: list[str] = field(default_factory=list)  # how it maps, where meanings differ

    def recipe_yaml(self) -> str:
        """The recipe as YAML for editing, headed by where it came from and how it maps."""
        head = [f"# Translated from the mlx_lm.lora config {self.source} by mlx-dp.", "#"]
        head += [f"# {line}" for line in self.notes]
        return "\n".join(head) + "\n\n" + yaml.safe_dump(self.recipe, sort_keys=False)


def _updates(count: int, accumulation: int) -> int:
    return max(1, count // accumulation)


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
    peak = float(args[0])
    if name == "cosine_decay":
        decay, floor = int(args[1]), float(args[2]) if len(args) > 2 else 0.0
    else:
        floor, decay = float(args[1]), int(args[2])
    warmup, start = int(entry.get("warmup", 0)), float(entry.get("warmup_init", 0.0))
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
    if "betas" in settings:
        out["betas"] = [float(b) for b in settings["betas"]]
    if "eps" in settings and name != "adafactor":
        out["eps"] = float(settings["eps"])
    if name == "adamw":
        out["weight_decay"] = float(settings.get("weight_decay", 0.01))  # mlx's AdamW default
    if name == "sgd":
        out["momentum"] = float(settings.get("momentum", 0.0))
        out["weight_decay"] = float(settings.get("weight_decay", 0.0))
        if settings.get("dampening", 0.0) or settings.get("nesterov", False):
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


def translate(data: dict, source: str = "<config>", world_size: int = 1) -> Translation:
    """An ``mlx_lm.lora`` config as a recipe for ``world_size`` ranks.

    Raises:
        ConfigError: A key mlx-lm does not have, a value mlx-dp cannot train alike, or a
            global batch that does not split over the ranks; each names the key and the file.
    """
    unknown = sorted(set(data) - set(DEFAULTS))
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
    global_batch, accumulation = int(c["batch_size"]), int(c["grad_accumulation_steps"])
    if global_batch % world_size:
        raise ConfigError(f"{source}: batch_size {global_batch} is mlx-lm's global batch, which must split evenly "
                          f"over the {world_size} ranks here")
    per_rank = global_batch // world_size
    updates = _updates(int(c["iters"]), accumulation)
    notes = [f"model {c['model']}, {c['fine_tune_type']} on "
             + ("every layer" if int(c["num_layers"]) == -1 else f"the last {c['num_layers']} layers")]

    lora = {**DEFAULTS["lora_parameters"], **(c["lora_parameters"] or {})}
    odd = set(lora) - {"rank", "scale", "dropout", "keys"}
    if odd:
        raise ConfigError(f"{source}: lora_parameters has keys mlx-lm does not read: {', '.join(sorted(odd))}")
    num_layers = int(c["num_layers"])
    layers = _model_layers(c["model"])
    if layers is not None and num_layers > layers:
        notes.append(f"num_layers {num_layers} on a model of {layers} layers: all of them, as mlx-lm does")
        num_layers = -1
    method = {"type": c["fine_tune_type"], "num_layers": num_layers}
    if c["fine_tune_type"] != "full":
        method.update(rank=int(lora["rank"]), scale=float(lora["scale"]), dropout=float(lora["dropout"]))
        if lora.get("keys") is not None:
            method["keys"] = list(lora["keys"])

    data_section = {"mask_prompt": bool(c["mask_prompt"]), "max_seq_length": int(c["max_seq_length"]),
                    "long_samples": "truncate"}
    if c.get("hf_dataset"):
        data_section["hf_dataset"] = c["hf_dataset"]
    else:
        data_section["path"] = c["data"]
    for key in ("text_feature", "prompt_feature", "completion_feature", "chat_feature"):
        if data.get(key) is not None:
            data_section[key] = data[key]

    training = {"batch_size": per_rank, "grad_accumulation": accumulation, "steps": updates,
                "learning_rate": float(c["learning_rate"]), "seed": int(c["seed"]),
                "grad_checkpoint": bool(c["grad_checkpoint"]),
                "clear_cache_threshold": int(c["clear_cache_threshold"])}
    optimizer, more = _optimizer(c["optimizer"], (c.get("optimizer_config") or {}).get(c["optimizer"]) or {},
                                 source)
    training.update(optimizer)
    notes += more
    if c.get("lr_schedule"):
        schedule, more = _schedule(c["lr_schedule"], updates, source)
        training.update(schedule)
        notes += more
    val_batches = int(c["val_batches"])
    recipe = {
        "model": {"path": c["model"], "trust_remote_code": bool(c["trust_remote_code"])},
        "method": method, "data": data_section, "training": training,
        "eval": {"every": _updates(int(c["steps_per_eval"]), accumulation), "at_start": True,
                 "max_batches": None if val_batches == -1 else val_batches, "batch_size": per_rank},
        "checkpoint": {"dir": str(c["adapter_path"]), "every": _updates(int(c["save_every"]), accumulation)},
        "logging": {"every": _updates(int(c["steps_per_report"]), accumulation)},
    }
    report = c.get("report_to") or ""
    if "wandb" in str(report):
        recipe["logging"].update(wandb=True, **({"wandb_project": c["project_name"]} if c.get("project_name") else {}))
    ranks = f"{world_size} ranks" if world_size > 1 else "one process"
    notes.append(f"batch_size {global_batch} is mlx-lm's global batch: training.batch_size {per_rank} per rank "
                 f"on {ranks}")
    notes.append(f"iters {c['iters']} are micro-batches in mlx-lm: training.steps {updates} optimizer updates of "
                 f"{accumulation} micro-batch(es) (report, eval and save cadences likewise)"
                 + (f"; the last {int(c['iters']) % accumulation} micro-batch(es) never reach an update there "
                    "either" if int(c["iters"]) % accumulation else ""))
    notes.append(f"adapters.safetensors + adapter_config.json go to {c['adapter_path']} (checkpoint.dir), with "
                 "resumable checkpoints in its checkpoints/ folder")
    notes.append("as mlx-lm: samples over max_seq_length are truncated, the prompt is "
                 + ("masked" if c["mask_prompt"] else "not masked")
                 + ("" if c["optimizer"] != "adamw" else f", AdamW's weight decay is {training['weight_decay']:g}"))
    if c.get("test"):
        notes.append(f"test: mlx-lm scores the test set after training; here run mlx-dp eval {source} "
                     f"(eval.max_batches {val_batches} stands in for test_batches)")
    return Translation(source=source, recipe=recipe, notes=notes)


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
