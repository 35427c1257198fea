"""One rank of the placement contract test: train as a Mac or a CUDA box would see it, recording every collective.

Usage: python tests/workers/placement_check.py AS LOG SPEC.json

SPEC.json lists trainings as ``train_many.py`` takes them (each ``[recipe, override, ...]``).

``AS`` says what MLX reports to the trainer; the maths still runs on this
machine's CPU over the real ring backend (2 real processes):

* ``cpu``: as it is.
* ``mac``: ``mx.default_device()`` is the GPU and Metal is available, as on
  Apple silicon. MLX here has no GPU backend, so any GPU stream the trainer
  tries to make raises ("Cannot make gpu stream without gpu backend"): on a
  Mac such a stream would carry a collective Metal cannot run.
* ``cuda``: the GPU is a CUDA one and the launcher prepared NCCL
  (``NCCL_HOST_IP``, set by the test). A GPU stream the trainer asks for is
  recorded as such and stands in as a CPU stream, so the (ring) job runs on;
  ``sum_scatter``, which NCCL has and the ring lacks, is an ``all_sum`` and a slice.

Every call of ``mx.distributed.<collective>`` is recorded with where its
stream points, ``backend`` (no stream: the backend decides), ``cpu`` or
``gpu``, and the trainer function that made it (its "site"). Each rank appends one JSON line per call to ``LOG.rank<R>``, plus
``{"wired_limit": bytes}`` when the trainer sets Metal's wired limit.
"""

import json
import os
import sys

import mlx.core as mx
import mlx_lm.generate  # noqa: F401  (it makes a stream on the default device at import: before the pretence)
import mlx_lm.utils  # noqa: F401

COLLECTIVES = ("all_sum", "all_gather", "all_max", "all_min", "send", "recv", "recv_like", "sum_scatter")
stand_ins: list = []  # CPU streams standing in for GPU streams (cuda); kept alive, so their ids stay theirs


def where(stream) -> str:
    if stream is None:
        return "backend"
    if isinstance(stream, mx.Stream):
        return "gpu" if any(s is stream for s in stand_ins) or stream.device.type == mx.gpu else "cpu"
    device = stream if isinstance(stream, mx.Device) else mx.Device(stream)  # a Device or a DeviceType
    return "gpu" if device.type == mx.gpu else "cpu"


def pretend(kind: str, log) -> None:
    if kind == "cpu":
        return
    gpu = mx.Device(mx.gpu)
    mx.default_device = lambda: gpu
    if kind == "mac":
        mx.metal.is_available = lambda: True
        mx.device_info = lambda: {"max_recommended_working_set_size": 12 << 30, "architecture": "applegpu_g15s"}
        mx.set_wired_limit = lambda limit: log({"wired_limit": limit}) or 0
        return
    mx.cuda.is_available = lambda: True

    def standing_in(real):
        def make(device):
            device = device if isinstance(device, mx.Device) else mx.Device(device)
            if device.type != mx.gpu:
                return real(device)
            stream = real(mx.Device(mx.cpu))
            stand_ins.append(stream)
            return stream
        return make

    mx.new_stream, mx.default_stream = standing_in(mx.new_stream), standing_in(mx.default_stream)
    # NCCL has sum_scatter and the ring does not: an all_sum and a slice stand in for it, so ZeRO-1 takes
    # the path real NCCL takes (ShardedReducer._scatter), not the ring's sends and receives.
    all_sum = mx.distributed.all_sum

    def sum_scatter(x, group=None, stream=None):
        width = x.shape[0] // group.size()
        return all_sum(x, group=group, stream=stream)[group.rank() * width:(group.rank() + 1) * width]

    mx.distributed.sum_scatter = sum_scatter


def record_collectives(log) -> None:
    for name in COLLECTIVES:
        real = getattr(mx.distributed, name)

        def call(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            log({"collective": _name, "stream": where(kwargs.get("stream")), "site": caller.co_qualname,
                 "file": caller.co_filename})
            return _real(*args, **kwargs)

        setattr(mx.distributed, name, call)


def main() -> None:
    kind, log_path, spec = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = os.environ.get("MLX_RANK", "0")
    out = open(f"{log_path}.rank{rank}", "a")

    def log(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    pretend(kind, log)
    record_collectives(log)
    from trainer.config.load import load_config
    from trainer.run.loop import train

    for recipe, *overrides in json.load(open(spec)):
        log({"training": overrides})
        train(load_config(recipe, overrides))


if __name__ == "__main__":
    main()
