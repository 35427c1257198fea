"""Where every collective runs: the one place that decides, for a CPU, a Mac's GPU (Metal) and CUDA.

What MLX does (mlx 0.32, read from its sources):

* A collective (``all_sum``, ``all_gather``, ``send``, ``recv``,
  ``sum_scatter``) runs on the stream its group's ``communication_stream(s)``
  returns (``mlx/distributed/ops.cpp``). Ring, JACCL and MPI return
  ``to_stream(s, Device::cpu)``, NCCL ``to_stream(s, Device::gpu)``
  (``mlx/distributed/{ring,jaccl,mpi,nccl}/*.cpp``): with no stream given,
  the backend's own device; a stream given passes through unchanged, even one
  on the other device.
* Metal has no GPU collectives: ``AllReduce``, ``AllGather``, ``Send``,
  ``Recv`` and ``ReduceScatter::eval_gpu`` throw "has no GPU implementation"
  (``mlx/backend/metal/distributed.cpp``). NCCL has no CPU ones.

So the rule, applied by every collective of the trainer:

1. Give no stream. The backend then picks its own device: the CPU for ring,
   JACCL and MPI (on a Mac too), the GPU for NCCL.
2. Where a separate stream is needed, make it here (:meth:`Placement.new_stream`),
   on the backend's communication device (:attr:`Placement.comm_device`),
   never on ``mx.default_device()``, which is the GPU on a Mac.

A separate stream is needed only where the communication device is also the
compute device and work should overlap: NCCL on CUDA (its default stream
would be the compute stream). On a Mac the ring's CPU stream is already apart
from the GPU's. On a CPU, a second stream's thread only competes for the same
busy cores (measured slower: docs/RESULTS.md, "Choosing the default bucket
size"), so ``parallel.comm_stream: auto`` gives none (:meth:`Placement.resolve`).

**The Metal watchdog.** macOS ends a GPU command buffer that waits about 5 s
("Caused GPU Timeout Error"), and a GPU kernel that consumes a collective's
output waits for it inside its command buffer: MLX encodes a wait on the
collective's event, or a fence, when the input is not evaluated yet
(``mlx/transforms.cpp``, ``eval_impl``). A slow peer or a long ``all_sum``
over Ethernet then kills the job (mlx-examples #1185; mlx-vlm #2179, fixed by
#2191 the same way as here). So no GPU work of ours is dispatched on a
collective's output before the host has waited for it: :func:`settle` is
called on every collective result before anything consumes it, and the few
elementwise ops between collectives (the ring reduce-scatter's additions) run
on the communication stream (:meth:`Placement.host_ops`). Costs nothing on a
CPU: the consumers wait for the same results anyway.

``float64`` in collectives (the exact scalar sums of ``World.all_sum``) is
fine on every device: ring and MPI sum it on the CPU, NCCL as ``ncclDouble``;
Metal, which has no float64, never sees it. docs/DEVICES.md lists every
choice that depends on the device or the backend.
"""

from dataclasses import dataclass

import mlx.core as mx

GPU_COMM_BACKENDS = ("nccl",)  # communication_stream(s) is to_stream(s, Device::gpu); every other one uses the CPU


def compute_device() -> str:
    """``"gpu"`` or ``"cpu"``: where MLX computes by default (a Mac's or CUDA's GPU, else the CPU)."""
    return "gpu" if mx.default_device().type == mx.gpu else "cpu"


def gpu_kind() -> str | None:
    """``"metal"``, ``"cuda"`` or ``None`` (no GPU backend in this MLX)."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


@dataclass(frozen=True)
class Placement:
    """Where this process computes and where its backend communicates.

    Attributes:
        compute: ``"cpu"`` or ``"gpu"`` (``mx.default_device()``).
        backend: ``"ring"``, ``"jaccl"``, ``"mpi"``, ``"nccl"``, or ``None`` for one process.
        gpu: ``"metal"``, ``"cuda"`` or ``None``.
    """

    compute: str
    backend: str | None
    gpu: str | None = None

    @classmethod
    def detect(cls, backend: str | None) -> "Placement":
        """This process's placement with ``backend`` (from ``trainer.parallel.world.resolve_backend``)."""
        return cls(compute=compute_device(), backend=backend, gpu=gpu_kind())

    @property
    def comm_device(self) -> str:
        """The device the backend's collectives run on: ``"gpu"`` for NCCL, ``"cpu"`` otherwise."""
        return "gpu" if self.backend in GPU_COMM_BACKENDS else "cpu"

    def _device(self) -> "mx.Device":
        return mx.Device(mx.gpu if self.comm_device == "gpu" else mx.cpu)

    def resolve(self, choice: str) -> str:
        """``parallel.comm_stream`` as ``"separate"`` or ``"default"``.

        ``auto`` is ``separate`` only where the backend communicates on the
        compute device, a GPU (NCCL): its default stream is the compute stream.
        """
        if choice != "auto":
            return choice
        return "separate" if self.compute == "gpu" and self.comm_device == "gpu" else "default"

    def new_stream(self) -> "mx.Stream":
        """A new stream on the communication device: for collectives that must not share one."""
        return mx.new_stream(self._device())

    def stream(self, choice: str) -> "mx.Stream | None":
        """The stream to give collectives under ``choice``: ``None`` (the backend's) or a new one."""
        return self.new_stream() if self.resolve(choice) == "separate" else None

    def host_ops(self, stream: "mx.Stream | None") -> "mx.Stream":
        """Where to run elementwise work between collectives that share ``stream`` (``None``: the backend's).

        On the communication device, so that no GPU kernel of a Mac waits on a
        receive (see the module docstring).
        """
        return stream if stream is not None else mx.default_stream(self._device())

    def describe(self) -> str:
        """One line for people: where compute and collectives run."""
        where = {"metal": "a Mac's GPU (Metal)", "cuda": "a CUDA GPU", None: "the GPU"}[self.gpu] \
            if self.compute == "gpu" else "the CPU"
        return f"compute on {where}; {self.backend or 'no'} collectives on the {self.comm_device.upper()}"


def settle(arrays) -> None:
    """Wait on the host for collective results before anything on a GPU consumes them (the Metal watchdog).

    A sync point. On a CPU it costs nothing: the update waits for the same
    results anyway.
    """
    mx.eval(arrays)
