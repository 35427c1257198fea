"""Distributed evaluation: an objective's sums over a split, sharded across ranks; greedy exact match.

Each rank scores its rows of fixed, length-sorted global batches with the
objective's own loss; the sums are summed over ranks and divided by the
global counts, so the result is what one process scoring the whole split
would report.
"""

import math

import mlx.core as mx

from ..data.batches import epoch_batches


def eval_batches(split, per_rank_batch: int, world_size: int, max_batches: int | None = None):
    """Global batches of a split in a fixed order (no shuffling), optionally capped."""
    batches = epoch_batches(split.lengths, per_rank_batch * world_size, seed=0, epoch=0, shuffle=False)
    return batches if max_batches is None else batches[:max_batches]


def evaluate_sums(world, model, split, objective, per_rank_batch: int, pad_multiple: int,
                  max_batches: int | None = None, progress=None, members=None, score=None) -> tuple[list, list]:
    """The objective's statistics summed over a split and over ranks, and this rank's batches.

    The global batches are made for the nominal ranks (``members``), so a run that stands in for
    missing ranks (``trainer.data.membership``) scores the same rows, also under ``max_batches``.

    Args:
        world (trainer.parallel.World): The group; every rank must call this.
        model: The model (switched to eval mode for the duration).
        split: Validation or test data the objective batches (``objective.batch``).
        objective (trainer.objectives.base.Objective): Whose loss is scored.
        per_rank_batch (int): Items per rank per batch.
        pad_multiple (int): Padding granularity.
        max_batches (int | None): Score only the first N global batches. Default: ``None``.
        progress (callable | None): Called once per batch (e.g. a tqdm update). Default: ``None``.
        members (trainer.data.membership.Membership | None): The nominal ranks this process
            computes. Default: ``None`` (every rank runs).
        score (callable | None): ``arrays -> statistics`` where the model is not whole here (a pipeline
            stage: ``trainer.step.pipeline``). Default: ``None`` (this rank's compiled loss).

    Returns:
        tuple: ``(sums, batches)``: the statistics summed over ranks, and this rank's
        batches (their global counts are every rank's).
    """
    nominal, hosted = (world.size, (world.rank,)) if members is None else (members.nominal, members.hosted)
    was_training = model.training
    model.eval()
    # The loss's statistics, unscaled: its first is the loss sum.
    stats_fn = score or mx.compile(lambda *arrays: objective.loss(model, mx.ones(2), *arrays)[1],
                                   inputs=[model.state], outputs=[model.state])
    total = mx.zeros(len(objective.stats), mx.float32)
    batches = []
    with objective.nll.scoring():  # values only: traced here, so no gradient work in the loss
        for indices in eval_batches(split, per_rank_batch, nominal, max_batches):
            for rank in hosted:
                batch = objective.batch(split, indices, rank, nominal, per_rank_batch, pad_multiple)
                arrays = objective.arrays(batch)
                total = total + (score(arrays) if score else stats_fn(*arrays))
            batches.append(batch)  # one per global batch: its global counts are what the metrics divide by
            mx.eval(total)  # note: sync point per batch keeps memory at one batch
            if progress is not None:
                progress()
    sums = world.all_sum(total.tolist(), phase="eval")  # note: sync point (already evaluated), then a collective
    if was_training:
        model.train()
    return sums, batches


def through(stage, objective) -> dict:
    """:func:`evaluate_sums`' keywords on a pipeline's ``stage`` (``trainer.run.stages.Stage``): every stage
    scores every row (one replica), the forward going through the stages; none without a stage."""
    if stage is None:
        return {}
    from ..data.membership import Membership

    return {"members": Membership.of(0, 1), "score": stage.runner.scorer(objective)}


def evaluate_loss(world, model, split, objective, per_rank_batch: int, pad_multiple: int,
                  max_batches: int | None = None, progress=None, members=None, score=None) -> dict:
    """Token-weighted loss and perplexity of ``model`` on ``split`` (next-token objectives).

    Returns:
        dict: ``loss``, ``perplexity``, ``tokens`` (global) and ``batches``.
    """
    sums, batches = evaluate_sums(world, model, split, objective, per_rank_batch, pad_multiple, max_batches, progress,
                                  members, score)
    tokens = sum(b.global_tokens for b in batches)
    loss = sums[0] / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "batches": len(batches)}


def evaluate_pairs(world, model, split, objective, per_rank_batch: int, pad_multiple: int,
                   max_batches: int | None = None, progress=None, members=None, score=None) -> dict:
    """A preference objective's loss and metrics of ``model`` on a split of pairs.

    Returns:
        dict: ``loss`` and the objective's metrics (``preference_accuracy``:
        the share of pairs whose chosen answer the model finds likelier than
        the rejected one, a tie counting half; ``reward_accuracy``,
        ``reward_margin``, ``chosen_logp``, ...), plus ``pairs`` and ``batches``.
    """
    sums, batches = evaluate_sums(world, model, split, objective, per_rank_batch, pad_multiple, max_batches, progress,
                                  members, score)
    metrics = objective.summary(sums, 0, objective.counts(batches))
    metrics["loss"] = metrics.pop("train_loss")
    return {**metrics, "batches": len(batches)}


def exact_match(world, model, tokenizer, split, max_new_tokens: int, max_samples: int | None = None,
                progress=None) -> dict:
    """Greedy generations of completion samples compared with their references.

    Each rank generates for every world_size-th sample; the counts are summed
    over ranks, so the score is the one a single process would report.

    Args:
        world (trainer.parallel.World): The group; every rank must call this.
        model: The model (adapters applied).
        tokenizer: mlx-lm's tokenizer wrapper.
        split (trainer.data.tokenized.TokenizedSplit): Samples with a prompt (prompt_lengths > 0).
        max_new_tokens (int): Generation limit per sample.
        max_samples (int | None): Score only the first N samples. Default: ``None``.
        progress (callable | None): Called after each sample. Default: ``None``.

    Returns:
        dict: ``exact_match`` (fraction), ``matches`` and ``samples``.
    """
    from mlx_lm.generate import generate

    model.eval()
    indices = [i for i in range(len(split)) if split.prompt_lengths[i] > 0]
    if max_samples is not None:
        indices = indices[:max_samples]
    matches = 0
    for i in indices[world.rank::world.size]:
        tokens = split.sample(i).tolist()
        prompt, reference = tokens[:split.prompt_lengths[i]], tokens[split.prompt_lengths[i]:]
        expected = tokenizer.decode(reference, skip_special_tokens=True).strip()
        limit = max(max_new_tokens, len(reference) + 1)
        got = generate(model, tokenizer, prompt, max_tokens=limit).strip()  # greedy: mlx-lm's default sampler
        matches += int(got == expected)
        if progress is not None:
            progress()
    total = world.all_sum([float(matches)], phase="eval")[0]
    return {"exact_match": total / max(len(indices), 1), "matches": int(total), "samples": len(indices)}
