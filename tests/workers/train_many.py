"""Run several recipes one after another in one process (one rank of a job).

Usage: python tests/workers/train_many.py SPEC.json, where SPEC.json is a list
of [recipe_path, override, ...] lists. Saves process start-up time in tests
that compare many runs.
"""

import json
import sys

from trainer.config import load_config
from trainer.loop import train

for recipe, *overrides in json.load(open(sys.argv[1])):
    train(load_config(recipe, overrides))
