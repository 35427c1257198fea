"""Optional fast fp32 matmul for MLX's CPU backend on Linux.

Why this exists: the Linux ``mlx[cpu]`` wheel links a single-threaded reference
BLAS, so fp32 matmul runs an order of magnitude slower than on the OpenBLAS
that numpy already ships, on one core of the same machine (measured:
docs/RESULTS.md, "The machine"). MLX resolves ``cblas_sgemm`` dynamically, so
a tiny shim that forwards it to numpy's OpenBLAS and is loaded ``RTLD_GLOBAL``
before ``mlx.core`` makes every fp32 matmul use OpenBLAS. Nothing else changes.

It is strictly opt-in (``MLX_DP_BLAS=openblas``), never used on macOS (Metal
does the maths there), checked against MLX's float64 matmul (which still runs
on the reference BLAS) when it is enabled, and reported by every benchmark via
:func:`active`.

Usage::

    MLX_DP_BLAS=openblas mlx-dp train recipes/tiny-lora.yaml
    MLX_DP_BLAS=openblas MLX_DP_BLAS_THREADS=1 mlx-dp train ...   # pin threads per process

The shim is compiled once with the system C compiler into
``~/.cache/mlx-dp/`` (or ``$MLX_DP_CACHE``), a folder only this user may write:
a shim found there is loaded only when nobody else could have put it there
(``trainer.tools.trusted``).
"""

import ctypes
import glob
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..env import note_runtime

ENV_VAR = "MLX_DP_BLAS"
THREADS_ENV = "MLX_DP_BLAS_THREADS"  # OpenBLAS threads per process; default: cores / local ranks

_SHIM_SOURCE = r"""
#include <stdint.h>
/* numpy's OpenBLAS is built with 64-bit integers and a scipy_ symbol prefix. */
extern void scipy_cblas_sgemm64_(int order, int ta, int tb, int64_t M, int64_t N,
    int64_t K, float alpha, const float *A, int64_t lda, const float *B,
    int64_t ldb, float beta, float *C, int64_t ldc);
extern void scipy_openblas_set_num_threads64_(int n);

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc) {
  scipy_cblas_sgemm64_(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void mlx_dp_set_threads(int n) { scipy_openblas_set_num_threads64_(n); }
"""

_state = {"active": False, "threads": None}


class FastBlasError(RuntimeError):
    """The OpenBLAS route was asked for but cannot be used here."""


def requested() -> bool:
    """True when the environment asks for the OpenBLAS route."""
    value = os.environ.get(ENV_VAR, "mlx").strip().lower()
    if value not in ("mlx", "openblas", ""):
        raise FastBlasError(f"{ENV_VAR}={value!r} is not one of 'mlx' or 'openblas'")
    return value == "openblas"


def active() -> str:
    """Name of the fp32 CPU BLAS in use: ``"openblas"`` or ``"mlx"``."""
    return "openblas" if _state["active"] else "mlx"


def _openblas_library() -> str:
    import numpy  # noqa: F401  (only to locate numpy.libs next to it)

    libs = Path(numpy.__file__).parent.parent / "numpy.libs"
    found = sorted(glob.glob(str(libs / "libscipy_openblas64_*.so")))
    if not found:
        raise FastBlasError(f"numpy's OpenBLAS was not found in {libs}")
    return found[0]


def cache_dir() -> Path:
    """mlx-dp's own cache: ``$MLX_DP_CACHE``, else ``~/.cache/mlx-dp``."""
    root = os.environ.get("MLX_DP_CACHE") or Path.home() / ".cache" / "mlx-dp"
    return Path(root)


def build_shim() -> Path:
    """Compile the shim if needed and return its path.

    The file name carries a hash of the source and of the OpenBLAS path, so a
    new numpy or a new shim rebuilds it. Concurrent ranks race safely: each
    compiles to a private temporary name and renames into place.
    """
    from .trusted import check_file, private_dir

    openblas = _openblas_library()
    key = hashlib.sha1((_SHIM_SOURCE + openblas).encode()).hexdigest()[:12]
    out = private_dir(cache_dir(), "the OpenBLAS shim") / f"mlx_dp_blas_{key}.so"
    if out.exists():
        return check_file(out, "the OpenBLAS shim")
    src = out.with_suffix(f".{os.getpid()}.c")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    src.write_text(_SHIM_SOURCE)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp), openblas,
           f"-Wl,-rpath,{Path(openblas).parent}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise FastBlasError(f"{ENV_VAR}=openblas needs a C compiler ({cc} not found)") from e
    except subprocess.CalledProcessError as e:
        raise FastBlasError(f"compiling the OpenBLAS shim failed: {e.stderr.strip()}") from e
    finally:
        src.unlink(missing_ok=True)
    os.replace(tmp, out)
    return out


def enable(threads: int = 1) -> None:
    """Route MLX's fp32 CPU matmul to OpenBLAS. Must run before ``mlx.core`` loads.

    Args:
        threads (int): OpenBLAS threads for this process. Default: ``1``, the
            right value when one rank runs per core.
    """
    if platform.system() != "Linux":
        raise FastBlasError(f"{ENV_VAR}=openblas is only for Linux CPU; Metal needs no help")
    if "mlx.core" in sys.modules:
        raise FastBlasError("the OpenBLAS shim must be loaded before mlx.core is imported")
    lib = ctypes.CDLL(str(build_shim()), mode=ctypes.RTLD_GLOBAL)
    lib.mlx_dp_set_threads(int(threads))
    _check_against_mlx()
    _state.update(active=True, threads=threads)
    note_runtime("blas", "openblas")  # what the lower layers may ask (a cache key's numerics)


def _check_against_mlx() -> None:
    """Compare fp32 matmuls (now via the shim) with float64 ones (reference BLAS)."""
    import mlx.core as mx

    key = mx.random.key(0)
    for m, k, n, ta, tb in [(33, 17, 9, False, False), (64, 48, 80, True, False),
                            (7, 128, 31, False, True), (96, 40, 24, True, True)]:
        ka, kb = mx.random.split(key)
        a = mx.random.normal((k, m) if ta else (m, k), key=ka)
        b = mx.random.normal((n, k) if tb else (k, n), key=kb)
        a = a.T if ta else a
        b = b.T if tb else b
        got = a @ b
        ref = (a.astype(mx.float64) @ b.astype(mx.float64)).astype(mx.float32)
        err = mx.abs(got - ref).max().item()
        if not err < 1e-3:
            raise FastBlasError(
                f"the OpenBLAS shim disagrees with MLX's own matmul (max error {err:.3g} "
                f"at {m}x{k}x{n}); unset {ENV_VAR} to use MLX's BLAS")


def threads_per_rank(local_ranks: int = 1) -> int:
    """OpenBLAS threads for one rank: ``MLX_DP_BLAS_THREADS`` if set, else this machine's cores
    divided among the ranks that share it.

    Args:
        local_ranks (int): Ranks sharing this machine. Default: ``1``.
    """
    if os.environ.get(THREADS_ENV, "").strip():
        try:
            return int(os.environ[THREADS_ENV])
        except ValueError:
            raise FastBlasError(f"{THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a number of threads") from None
    return max(1, (os.cpu_count() or 1) // max(1, local_ranks))


def maybe_enable(local_ranks: int = 1) -> str | None:
    """Enable the shim when ``MLX_DP_BLAS=openblas``; returns a line to print when it did, else ``None``.

    Args:
        local_ranks (int): Ranks sharing this machine (see :func:`threads_per_rank`). Default: ``1``.
    """
    if requested() and not _state["active"]:
        threads = threads_per_rank(local_ranks)
        enable(threads=threads)
        return (f"{ENV_VAR}=openblas: MLX's fp32 CPU matmuls go to numpy's OpenBLAS ({threads} thread(s) per rank), "
                "checked against MLX's own at start")
    return None
