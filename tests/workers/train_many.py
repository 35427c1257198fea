"""Run several recipes one after another in one process (one rank of a job).

Usage: python tests/workers/train_many.py SPEC.json. SPEC.json is a list;
each entry is either ``[recipe_path, override, ...]`` or a dict
``{"recipe": ..., "overrides": [...], "resume": false, "faults": "stop:step=3"}``
(faults as in ``faults.py``). Saves process start-up time in tests that
compare many runs.
"""

import json
import sys

from faults import FaultHooks

from trainer.config.load import load_config
from trainer.run.hooks import RunOptions
from trainer.run.loop import train

for entry in json.load(open(sys.argv[1])):
    if isinstance(entry, list):
        entry = {"recipe": entry[0], "overrides": entry[1:]}
    options = RunOptions(hooks=FaultHooks(entry.get("faults", "")))
    train(load_config(entry["recipe"], entry.get("overrides", [])), resume=entry.get("resume") or None,
          options=options)
