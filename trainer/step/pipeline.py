"""One optimizer update of a pipeline: micro-batches through the stages, gradients back by hand, a local update.

``parallel.pipeline`` (one replica, every rank a stage: ``trainer.model.stages``).
Each micro-batch of the update is cut into ``parallel.pipeline_microbatches``
parts, scheduled as GPipe schedules them: every part's forward, stage after
stage, then every part's backward, in reverse. A stage keeps only what it
received for each part, and recomputes its forward inside the backward
(``mx.value_and_grad`` of its own blocks against the gradient received from
the stage after): the memory of a part's activations is never held across
the schedule, which is what 1F1B would otherwise buy, at the cost of one more
forward on every stage but the last. MLX's ``send`` and ``recv`` have no
gradient, so the backward across stages is written here: the last stage
differentiates the objective's loss with respect to its parameters and to the
activations it received, and every earlier stage the dot product of its output
with the gradient it received.

The loss, normalised over the whole update as every objective here, is exactly
what one process computes on the same batch, to float rounding (the parts are
summed as accumulation sums micro-batches). The parameters are each stage's
own, so the update is local: only a short vector crosses the stages (the
loss's sums from the last stage, the stop and save flags, each stage's sum of
squared gradients for the global norm), in one small sum per update.
"""

import hashlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..parallel.pipeline import StageLink
from .optimizer import BucketedOptimizer, clip_scale


class PipelineUpdate:
    """This stage's optimizer over its own parameters; the norm and the flags summed over every stage.

    Args:
        model (nn.Module): This stage (``trainer.model.stages.cut``).
        optimizer: The optimizer (its state becomes this stage's).
        world: The group (every rank a stage).
        max_grad_norm (float | None): Clip the global norm (over every stage) to this.
        everyone (dict): ``name -> (shape, dtype)`` of every stage's trainable parameters (a checkpoint's names).
        saved_state (dict | None): A checkpoint's optimizer state (every stage's, flat); this stage takes its own.
    """

    def __init__(self, model: nn.Module, optimizer, world, max_grad_norm, everyone: dict, saved_state=None):
        self.model, self.optimizer, self.world, self.max_grad_norm = model, optimizer, world, max_grad_norm
        self.everyone = everyone
        own = dict(tree_flatten(model.trainable_parameters()))
        if saved_state is not None:
            optimizer.state = _own_state(saved_state, own)
        optimizer.init(model.trainable_parameters())
        self.names = sorted(own)
        self._bucketed = BucketedOptimizer(optimizer, [self.names])

    def describe(self) -> str:
        return "kept on their stage"

    def apply(self, grads: dict, extra: mx.array, loss_terms: int) -> tuple:
        """Sum ``extra`` and the squared gradients over stages, then clip and apply this stage's update."""
        square = sum((mx.square(g.astype(mx.float32)).sum() for g in grads.values()), mx.array(0.0))
        summed = mx.distributed.all_sum(mx.concatenate([extra, square.reshape(1)]), group=self.world.group) \
            if self.world.size > 1 else mx.concatenate([extra, square.reshape(1)])
        mx.eval(summed)  # note: sync point; the one collective of an update besides the stages' transfers
        norm = mx.sqrt(summed[-1])
        finite = mx.logical_and(mx.isfinite(norm), mx.isfinite(summed[:loss_terms].sum()))
        if not finite.item():  # note: sync point; every stage skips alike
            return summed[:-1], norm, finite
        self._bucketed.advance()
        params = dict(tree_flatten(self.model.trainable_parameters()))
        new = self._bucketed.apply(0, {n: grads[n] for n in self.names}, {n: params[n] for n in self.names},
                                   clip_scale(norm, self.max_grad_norm))
        self.model.load_weights(list(new.items()), strict=False)
        mx.eval(new)  # note: sync point
        return summed[:-1], norm, finite

    def state_bytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.optimizer.state))

    def full_state(self) -> dict:
        """Every stage's optimizer state, flat by parameter name (a checkpoint's layout). A collective."""
        own = dict(tree_flatten(self.optimizer.state))
        kinds = sorted({k.rsplit(".", 1)[1] for k in own if "." in k})
        wanted = {f"{name}.{kind}": spec for name, spec in self.everyone.items() for kind in kinds}
        out = gather(self.world, own, wanted)
        out.update({k: v for k, v in own.items() if "." not in k})  # step and learning rate: every stage's alike
        return out

    def full_weights(self) -> dict:
        """Every stage's trainable weights by name (mlx-lm's adapters of the whole model). A collective."""
        return gather(self.world, dict(tree_flatten(self.model.trainable_parameters())), self.everyone)


def _own_state(saved: dict, own: dict) -> dict:
    """The entries of a (flat or nested) checkpoint optimizer state that belong to this stage's parameters."""
    from mlx.utils import tree_unflatten

    flat = dict(tree_flatten(saved)) if any(isinstance(v, dict) for v in saved.values()) else dict(saved)
    mine = {k: v for k, v in flat.items() if "." not in k or k.rsplit(".", 1)[0] in own}
    return tree_unflatten(list(mine.items()))


def gather(world, own: dict, wanted: dict) -> dict:
    """Every array of ``wanted`` (``name -> (shape, dtype)``) on every rank: its owner's value, summed with the
    others' zeros (exact), one array at a time so the extra memory is one array. A collective."""
    out = {}
    for name in sorted(wanted):
        shape, dtype = wanted[name]
        mine = own.get(name)
        x = mine if mine is not None else mx.zeros(shape, dtype)
        if world.size > 1:
            world.waiting("gather")
            x = mx.distributed.all_sum(x, group=world.group)
        mx.eval(x)  # note: sync point per array
        out[name] = x
    return out


class StageRunner:
    """This stage's forward through the pipeline: receive, run its blocks, send (or score, on the last stage).

    Args:
        model (nn.Module): This stage.
        io (trainer.model.stages.StageIO): Its input and output hooks.
        plan (trainer.model.stages.StagePlan): The stages.
        world: The group.
        hidden (int): The activations' last axis.
        dtype: The activations' dtype.
    """

    def __init__(self, model, io, plan, world, hidden: int, dtype):
        self.model, self.io, self.plan, self.hidden, self.dtype = model, io, plan, hidden, dtype
        self.link = StageLink(world)

    def shape(self, arrays) -> tuple:
        return (*arrays[0].shape, self.hidden)

    def receive(self, arrays, phase: str):
        """What the stage before sends for this batch (``None`` on the first stage)."""
        return None if self.plan.first else self.link.recv(self.shape(arrays), self.dtype, self.link.previous, phase)

    def forward(self, arrays, received) -> mx.array:
        """This stage's output for the next one, evaluated."""
        self.io.received = received
        self.model(arrays[0])
        out = self.io.sent
        mx.eval(out)  # note: sync point: sent now
        return out

    def scorer(self, objective):
        """How validation scores a batch here: the objective's statistics through the stages
        (``trainer.objectives.evaluate``)."""
        size = len(objective.stats)
        return lambda arrays: self.score(lambda model, a: objective.loss(model, mx.ones(2), *a)[1], arrays, size)

    def score(self, fn, arrays, size: int) -> mx.array:
        """``fn(model, arrays)`` (a vector of ``size`` sums) computed on the last stage from the stages before,
        zeros on the others: summed over stages, it is one process's value. Forward only."""
        received = self.receive(arrays, "pipeline eval")
        if self.plan.last:
            self.io.received = received
            out = fn(self.model, arrays)
            mx.eval(out)  # note: sync point
            return out
        self.link.send(self.forward(arrays, received), self.link.following, "pipeline eval")
        return mx.zeros(size, mx.float32)


class PipelineStep:
    """One update of this stage: the GPipe schedule over every micro-batch's parts, then the local update.

    Args:
        runner (StageRunner): This stage's forward and transfers.
        objective: What the loss teaches (its ``split`` cuts a micro-batch into parts).
        update (PipelineUpdate): The stage's update.
        parts (int): ``parallel.pipeline_microbatches``.
    """

    def __init__(self, runner: StageRunner, objective, update: PipelineUpdate, parts: int, seed: int = 0,
                 done: int = 0):
        self.runner, self.objective, self.update, self.parts = runner, objective, update, parts
        self.model, self.io, self.plan, self.link = runner.model, runner.io, runner.plan, runner.link
        self.seed, self.done = seed, done  # updates done (a resumed run's count): the random keys follow it

    def scorer(self, objective, size: int):
        """How validation scores a batch here: through the stages (``trainer.objectives.evaluate``)."""
        return self.runner.scorer(objective)

    def __call__(self, micro_batches: list, stop: bool = False, measure=None, save: bool = False,
                 hosted: int = 1) -> dict:
        waited = self.link.waited
        scales = self.objective.scales(micro_batches, 1)  # one replica: the whole batch is this "rank"'s
        grads, stats = None, mx.zeros(len(self.objective.stats), mx.float32)
        self.done += 1
        for m, batch in enumerate(micro_batches):
            g, s = self._schedule(self.objective.split(batch, self.parts), scales, m)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            stats = stats + s
            mx.eval(grads, stats)  # note: sync point per micro-batch
        k = len(self.objective.stats)
        world = self.update.world
        # Every transfer of the update is done: each stage's seconds spent waiting on its neighbours ride along.
        waits = [self.link.waited - waited if r == world.rank else 0.0 for r in range(world.size)]
        extra = mx.concatenate([stats, mx.array([float(stop), float(save), *waits], mx.float32)])
        extra, norm, finite = self.update.apply(dict(tree_flatten(grads)), extra, k)
        return {"loss_sum": extra[0], "stats": extra[:k], "grad_norm": norm, "finite": finite, "stop": extra[k],
                "save": extra[k + 1], "compute_s": mx.zeros(world.size), "stage_wait_s": extra[k + 2:],
                "tokens": sum(b.global_tokens for b in micro_batches),
                "counts": self.objective.counts(micro_batches), "objective": self.objective}

    def state_bytes(self) -> int:
        return self.update.state_bytes()

    def _key(self, micro: int, part: int) -> None:
        """Seed MLX's random key for one part of one micro-batch of this update, alike on every stage: a stage's
        forward and its recomputation in the backward draw the same dropout masks, and a resumed run the same
        masks as one never stopped (no stage's random state needs saving)."""
        text = f"{self.seed}:{self.done}:{micro}:{part}".encode()
        mx.random.seed(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1)

    def _schedule(self, parts: list, scales, micro: int) -> tuple:
        """GPipe over ``parts``: every forward, then every backward in reverse; this stage's gradients and sums.

        The last stage only receives in the forward phase, and runs each part's forward and backward in the
        backward phase, sending that part's input gradient at once: the stage before then works on part i
        while the last stage works on part i - 1. (Run in the forward phase instead, the last stage's work
        would all come before the first gradient went back, and no backward would overlap.) The order of
        every send and receive stays: activations forward in the forward phase, gradients back in the
        backward phase, so two neighbours never send to each other at once.
        """
        p, link = self.plan, self.link
        kept, grads, stats = [], None, mx.zeros(len(self.objective.stats), mx.float32)
        for index, part in enumerate(parts):  # forward phase
            arrays = self.objective.arrays(part)
            received = self.runner.receive(arrays, "pipeline")
            if not p.last:
                self._key(micro, index)
                link.send(self.runner.forward(arrays, received), link.following, "pipeline")
            kept.append((arrays, received))
        for index in reversed(range(len(parts))):  # backward phase
            arrays, received = kept[index]
            self._key(micro, index)
            if p.last:
                (_, s), (g, g_in) = self._last(arrays, received, scales)
                grads, stats = _add(grads, g), stats + s
                mx.eval(grads, stats, g_in)  # note: sync point per part
            else:
                cotangent = link.recv(self.runner.shape(arrays), self.runner.dtype, link.following,
                                      "pipeline backward")
                g, g_in = self._backward(arrays, received, cotangent)
                grads = _add(grads, g)
                mx.eval(grads, g_in)  # note: sync point per part
            if not p.first:
                link.send(g_in, link.previous, "pipeline backward")
        return grads, stats

    def _restored(self, fn):
        """``fn`` with the model's parameters put back after it traced them."""
        def run(*args):
            params = self.model.trainable_parameters()
            try:
                return fn(*args)
            finally:
                self.model.update(params)

        return run

    def _last(self, arrays, received, scales):
        """The last stage: the objective's loss, its gradient for this stage and for what it received."""
        def loss(params, h):
            self.model.update(params)
            self.io.received = h
            return self.objective.loss(self.model, scales, *arrays)

        argnums = 0 if self.plan.first else (0, 1)
        value, grads = self._restored(mx.value_and_grad(loss, argnums=argnums))(
            self.model.trainable_parameters(), received)
        return value, (grads if self.plan.first else grads[0], None if self.plan.first else grads[1])

    def _backward(self, arrays, received, cotangent):
        """An earlier stage: its forward again, differentiated against the gradient the next stage sent."""
        def dot(params, h):
            self.model.update(params)
            self.io.received = h
            self.model(arrays[0])
            return (self.io.sent.astype(mx.float32) * cotangent.astype(mx.float32)).sum()

        argnums = 0 if self.plan.first else (0, 1)
        grads = self._restored(mx.grad(dot, argnums=argnums))(self.model.trainable_parameters(), received)
        return (grads, None) if self.plan.first else (grads[0], grads[1])


def _add(total, grads):
    return grads if total is None else tree_map(mx.add, total, grads)
