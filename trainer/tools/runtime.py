"""What every entry point that trains does first and last: prepare the process, report errors.

Shared by ``trainer.cli`` and the lab's benchmarks that build a training run
(``scripts/lab/bench/profile.py``), so neither imports the other.
"""

import sys

from .. import log
from ..env import launch_env, set_library_defaults
from ..errors import Stopped, UserError

MAX_ERROR_CHARS = 1000


def prepare_runtime() -> None:
    """Things that must happen before mlx.core is imported: the opt-in Linux CPU speed-ups, said on rank 0,
    and the check that MLX's kernel folder is this user's (``trainer.tools.trusted``)."""
    from . import fastblas, fastjit, trusted

    env = launch_env()
    notes = [fastblas.maybe_enable(local_ranks=env.local_ranks()), fastjit.maybe_enable()]
    if not fastjit.active() == "avx2":  # fastjit keeps MLX's kernels in mlx-dp's own private cache
        check_mlx_kernels(trusted)
    for note in filter(None, notes):
        log.info(note)
    set_library_defaults()


def check_mlx_kernels(trusted) -> None:
    """MLX compiles its CPU kernels into ``$TMPDIR/mlx`` and loads them back: that folder (made here,
    private, when missing) and what it holds must be this user's, or someone else's code would run.

    Raises:
        trainer.tools.trusted.UntrustedPath: One sentence naming the path.
    """
    root = trusted.private_dir(trusted.mlx_kernel_dir(), "MLX's compiled kernels")
    for path in root.rglob("*"):
        reason = trusted.why_untrusted(path)
        if reason:
            raise trusted.UntrustedPath(f"refusing to let MLX load its compiled kernels from {root}: {reason}; "
                                        "remove it, or set TMPDIR to a folder of your own")


def print_error(error: UserError) -> None:
    """One line on stderr, on every rank: a recipe error on one machine (a stale
    override, a stale checkout) must be seen even while rank 0 waits for it."""
    rank = launch_env().rank
    prefix = f"[rank {rank}] " if rank else ""
    text = " ".join(str(error).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    kind = "stopped" if isinstance(error, Stopped) else "error"
    print(f"mlx-dp: {kind}: {prefix}{text}", file=sys.stderr, flush=True)
