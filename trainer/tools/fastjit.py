"""Vector instructions for the kernels MLX compiles at run time on Linux x86-64.

Why this exists: ``mx.compile`` fuses chains of elementwise ops into C++ kernels
that MLX builds with ``g++`` the first time it needs them, into
``$TMPDIR/mlx/<version>/cpu``. MLX adds ``-mavx2 -mfma -mf16c`` to that command
only when MLX itself was built for AVX2 (``mlx/backend/cpu/jit_compiler.cpp``);
the PyPI ``mlx[cpu]`` wheel is built for baseline x86-64, so its fused kernels
run scalar code, and every ``exp`` in them (a Cephes polynomial) makes six calls
to glibc's ``fmaf``. With the flags a fused ``exp`` or softmax costs a fraction
of that per element (measured: docs/RESULTS.md, "Exps in fused kernels").
:mod:`trainer.model.fused` writes the training step's exp-heavy ops so that
their ``exp`` lands in such kernels.

The results do not change: there is no ``-ffast-math``, and
``-ffp-contract=off`` stops g++ from turning ``a * b + c`` into one rounding
(it would, with ``-mfma``: the check below caught it), so the same operations
run in the same order, only in vector registers and with MLX's explicit
``fma`` as one instruction. :func:`enable` checks that bit for bit against
MLX's own ``exp``, ``sigmoid`` and ``multiply``/``add`` before anything trains.

How: a ``g++`` wrapper that appends the flags goes first on ``PATH`` (MLX runs
``g++`` through the shell), and ``TMPDIR`` points at a kernel cache of its own,
so that kernels built without the flags (MLX's default ``/tmp/mlx``) are never
loaded in their place. Python's own temporary files stay where they were.
Both are changes to the whole process and its children, which a library must
not make unasked, so this is opt-in and said at start.

``MLX_DP_JIT``: ``mlx`` (default) leaves MLX's compiler as it is; ``avx2`` uses
the flags on Linux x86-64 when the CPU has AVX2, FMA and F16C and ``g++`` is
installed (and refuses in one sentence where it cannot). The lab's benchmarks
give mlx_lm.lora the same setting (``lab.rank``).
"""

import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from ..env import use_kernel_toolchain
from ..errors import UserError
from .fastblas import cache_dir

ENV_VAR = "MLX_DP_JIT"
FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
_CPU_FEATURES = ("avx2", "fma", "f16c")

_state = {"active": False}


class FastJitError(UserError):
    """``MLX_DP_JIT`` is invalid, or the flagged kernels disagree with MLX's."""


def requested() -> bool:
    """True when ``MLX_DP_JIT=avx2``; raises on a value that is neither ``mlx`` nor ``avx2``."""
    value = os.environ.get(ENV_VAR, "mlx").strip().lower()
    if value not in ("avx2", "mlx", ""):
        raise FastJitError(f"{ENV_VAR}={value!r} is not one of 'mlx' (the default) or 'avx2'")
    return value == "avx2"


def active_setting() -> str:
    """What compiles MLX's fused kernels in a process started with this environment: ``avx2`` or ``mlx``."""
    return "avx2" if requested() and why_not() is None else "mlx"


def active() -> str:
    """What compiles MLX's fused kernels here: ``"avx2"`` (this module) or ``"mlx"`` (unchanged)."""
    return "avx2" if _state["active"] else "mlx"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def why_not() -> str | None:
    """Why this machine cannot use it (one sentence), or ``None`` when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "only Linux x86-64 needs it (MLX builds its own kernels for the CPU it runs on elsewhere)"
    missing = [f for f in _CPU_FEATURES if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if shutil.which("g++") is None:
        return "g++ is not installed (MLX then runs without fused kernels)"
    return None


def _wrapper(bin_dir: Path, gxx: str) -> None:
    """Write ``bin_dir/g++`` (atomically: ranks may race) calling ``gxx`` with :data:`FLAGS` appended.

    The wrapper also builds the library under a private name and renames it into
    place: MLX loads a kernel's library as soon as the file exists, so a rank
    must never see another rank's half-written one.
    """
    text = f"""#!/bin/sh
out= prev=
for a do
  shift
  if [ "$prev" = "-o" ]; then out=$a; set -- "$@" "$a.$$.tmp"; else set -- "$@" "$a"; fi
  prev=$a
done
"{gxx}" "$@" {" ".join(FLAGS)} || exit $?
if [ -n "$out" ]; then mv -f "$out.$$.tmp" "$out"; fi
"""
    target = bin_dir / "g++"
    if target.is_file() and target.read_text() == text:
        return
    bin_dir.mkdir(parents=True, exist_ok=True)
    tmp = bin_dir / f".g++.{os.getpid()}"
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, target)


def enable() -> None:
    """Route MLX's kernel compiler through the wrapper; check that results are unchanged.

    Must run before MLX compiles its first fused kernel in this process (it may
    run after ``mlx.core`` is imported).
    """
    reason = why_not()
    if reason:
        raise FastJitError(reason)
    from .trusted import private_dir

    root = private_dir(cache_dir() / "jit-avx2", "MLX's compiled kernels")
    private_dir(root / "mlx", "MLX's compiled kernels")  # where MLX will compile and load them
    bin_dir = private_dir(root / "bin", "the g++ wrapper")
    gxx = shutil.which("g++")
    if Path(gxx).resolve() != (bin_dir / "g++").resolve():
        _wrapper(bin_dir, gxx)
    tempfile.tempdir = tempfile.gettempdir()  # Python's temporary files stay where they were
    use_kernel_toolchain(bin_dir, root)
    _state["active"] = True
    _check_against_mlx()


def _check_against_mlx() -> None:
    """Fused (vectorised) kernels must give MLX's unfused results bit for bit."""
    import mlx.core as mx

    x = mx.random.normal((4099,), key=mx.random.key(7)) * 30.0
    y = mx.random.normal((4099,), key=mx.random.key(8))
    special = mx.array([0.0, -0.0, 88.5, -88.5, -1e30, 1e30, float("inf"), float("-inf"), float("nan")])
    x = mx.concatenate([x, special])
    y = mx.concatenate([y, mx.zeros(special.shape)])
    fused = mx.compile(lambda a, b: (mx.exp(a - b), a * b + a, mx.sigmoid(a) * 1.0))(x, y)
    plain = (mx.exp(x - y), x * y + x, mx.sigmoid(x))
    for got, want, name in zip(fused, plain, ("exp", "multiply-add", "sigmoid")):
        mx.eval(got, want)
        same = mx.logical_or(got == want, mx.logical_and(mx.isnan(got), mx.isnan(want))).all().item()
        if not same:
            raise FastJitError(f"MLX's fused {name} compiled with {' '.join(FLAGS)} differs from its "
                               f"unfused one; set {ENV_VAR}=mlx to leave MLX's compiler alone")


def maybe_enable() -> str | None:
    """Enable when asked (``MLX_DP_JIT=avx2``); returns a line to print when it did, else ``None``.

    Raises:
        FastJitError: It was asked for where it cannot work (the reason in one sentence).
    """
    if _state["active"] or not requested():
        return None
    enable()
    return (f"{ENV_VAR}=avx2: MLX's fused kernels are compiled with {' '.join(FLAGS)} (this process's PATH starts "
            f"with a g++ wrapper and its TMPDIR is {os.environ['TMPDIR']})")


if __name__ == "__main__":  # python -m trainer.tools.fastjit: what this machine would get
    print(why_not() or f"with {ENV_VAR}=avx2, MLX's fused kernels are compiled with {' '.join(FLAGS)} here",
          file=sys.stdout)
