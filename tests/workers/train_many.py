"""Run several recipes one after another in one process (one rank of a job).

Usage: python tests/workers/train_many.py SPEC.json. SPEC.json is a list;
each entry is either ``[recipe_path, override, ...]`` or a dict
``{"recipe": ..., "overrides": [...], "resume": false, "env": {...}}``.
Saves process start-up time in tests that compare many runs.
"""

import json
import os
import sys

from trainer.config import load_config
from trainer.loop import train

for entry in json.load(open(sys.argv[1])):
    if isinstance(entry, list):
        entry = {"recipe": entry[0], "overrides": entry[1:]}
    saved = dict(os.environ)
    os.environ.update(entry.get("env", {}))
    try:
        train(load_config(entry["recipe"], entry.get("overrides", [])), resume=entry.get("resume") or None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
