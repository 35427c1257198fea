"""The lab: what only benchmarks, link emulation, CPU caps, random-model builders and tests need.

mlx-dp's product is the ``trainer`` package (what ``pip install`` gives). This
package is the rest, kept in the repository only: the product never imports
it (``tests/test_package.py`` checks), and it may import the product freely.

* ``bench/``: ``comm`` (gradient communication), ``memory`` (memory per rank),
  ``profile`` (where an update's time goes), ``attention`` (attention per row
  width) and ``scaling``: the product's ``mlx-dp bench scaling`` with the
  lab's extra runs (communication skipped, mlx_lm.lora on the same work,
  stock ``mlx.launch``, emulated links and slower ranks, one epoch side by side),
  ``faults`` (what one failure costs under ``--restarts``), ``preference``
  (DPO against mlx-lm-lora's on the same work, through ``preference_peer.py``
  in the peer's own environment), ``grpo`` (GRPO against mlx-lm-lora's, through
  ``grpo_peer.py``; the peer's environment is made by ``peer_env.py`` when
  missing) and ``rollouts`` (what uneven generation between ranks costs GRPO,
  and whether ``parallel.balance`` pays);
* ``launch``: ranks started through the product's launcher code, with a CPU
  cap per rank (``cpulimit``) or inside network namespaces behind shaped
  links (``netem``);
* ``rank``: the body of one benchmark rank (mlx-dp with a baseline reducer, or
  mlx_lm.lora with timestamps); ``reducers``: those baselines;
* ``synth`` and ``textsets``: random-weight models of real shapes, text sets of
  chosen lengths.

Run it from a clone, with the project's environment::

    .venv/bin/python scripts/lab bench comm -n 2
    .venv/bin/python scripts/lab bench scaling recipes/tiny-lora.yaml -n 2 --vs-mlx-lm
    sudo .venv/bin/python scripts/lab bench scaling recipes/tiny-lora.yaml -n 2 --link 10gbe
"""

import os
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent  # the folder to put on sys.path for `import lab`


def pythonpath() -> str:
    """``PYTHONPATH`` for a process that imports the lab (a benchmark's ranks)."""
    return os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
