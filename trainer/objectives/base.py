"""What the loss teaches (``method.objective``): next tokens (SFT), or preferences (DPO, ORPO).

Every objective is written as *sums* over this rank's rows, each divided by a
count of the whole update, summed over every rank and micro-batch: tokens for
a token term, pairs for a per-pair term. Those counts are known to every rank
from the data plan (``trainer.data.batches``, ``trainer.data.pair_batches``),
so the gradients summed over ranks are the gradient of the global objective,
and N ranks at batch b train exactly what one process trains at batch N*b,
with accumulation and with any split of the rows (``trainer.data.balance``):

* SFT: ``sum(token NLL) / T`` (T: loss tokens of the update);
* DPO (Rafailov et al., 2023), sigmoid loss with label smoothing ``eps``
  (conservative DPO): per pair ``z = beta * ((pi_c - pi_r) - (ref_c - ref_r))``
  with ``pi``, ``ref`` the sequence log-probs of the answers under the policy
  and the reference, ``loss = -(1 - eps) log s(z) - eps log s(-z)``, summed and
  divided by P (pairs of the update);
* ORPO (Hong et al., 2024): ``sum(chosen token NLL) / T_chosen + lambda *
  sum(-log s(log odds ratio)) / P``, with the odds of each answer taken from its
  mean token log-prob, as in the paper and TRL.

Beside the loss, each objective returns a short vector of *statistics*, also
sums (summed over ranks with the gradients, at no extra collective), that the
metrics divide by the same counts: reward accuracy, margin, log-probs.
A pair's accuracy counts a tie as half, so a model that cannot tell the two
answers apart scores 50%.
"""

import mlx.core as mx
import mlx.nn as nn

from ..model import fused


def token_loss_sum(model: nn.Module, inputs, targets, mask, segments=None) -> mx.array:
    """Sum of masked next-token cross-entropies, in float32.

    ``segments`` (packed rows) keeps attention within each sample; see
    ``trainer.data.packing.SegmentMask``. The cross-entropy is
    ``trainer.model.fused``'s where ``training.fused_exp`` routes it there.
    """
    if segments is None:
        logits = model(inputs)
    else:
        from ..data.packing import SegmentMask

        logits = model(inputs, cache=[SegmentMask(segments)] * len(model.layers))
    ce = (fused.cross_entropy if fused.enabled() else nn.losses.cross_entropy)(logits, targets) * mask
    return ce.astype(mx.float32).sum()


def sequence_logps(model: nn.Module, inputs, targets, mask) -> mx.array:
    """Per row, the summed log-prob of the masked targets (the answer), in float32."""
    logits = model(inputs)
    ce = (fused.cross_entropy if fused.enabled() else nn.losses.cross_entropy)(logits, targets) * mask
    return -ce.astype(mx.float32).sum(axis=-1)


def wins(a: mx.array, b: mx.array) -> mx.array:
    """1 where ``a > b``, 0.5 on a tie, 0 otherwise."""
    return (a > b).astype(mx.float32) + 0.5 * (a == b).astype(mx.float32)


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler, 2012)."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


class SFT:
    """Next-token cross-entropy, normalised by the update's loss tokens (``trainer.step.grads``).

    The interface every objective has (``trainer.step.grads`` and ``trainer.objectives.evaluate`` call it):

    * ``stats``: names of the summed statistics ``loss`` returns (the first is the loss sum);
    * ``arrays(batch)``: the batch's arrays that ``loss`` takes after ``model`` and ``scales``;
    * ``scales(micro_batches, ranks)``: what each sum is multiplied by (``ranks`` / a global count of
      the update, so the gradients summed and averaged over ranks are the global objective's);
    * ``loss(model, scales, *arrays)``: ``(scaled loss, stats)`` for this rank's rows;
    * ``counts(micro_batches)``: the global counts ``summary`` divides by;
    * ``summary(stats, tokens, counts)``: the metrics of summed ``stats``.
    """

    name = "sft"
    stats = ("loss_sum",)
    preference = False

    def arrays(self, batch) -> tuple:
        arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        return arrays if batch.segments is None else (*arrays, mx.array(batch.segments))

    def scales(self, micro_batches, ranks: int) -> mx.array:
        return mx.array(ranks / sum(b.global_tokens for b in micro_batches), mx.float32)

    def loss(self, model, scale, inputs, targets, mask, *segments):
        loss_sum = token_loss_sum(model, inputs, targets, mask, *segments)
        return loss_sum * scale, loss_sum.reshape(1)

    def counts(self, micro_batches) -> dict:
        return {}

    def summary(self, stats: list[float], tokens: int, counts: dict) -> dict:
        return {"train_loss": stats[0] / max(tokens, 1)}


class Preference:
    """What DPO and ORPO share: pair batches, pair counts and the metrics users look for."""

    preference = True
    stats: tuple = ()

    def __init__(self, method):
        self.method = method

    def arrays(self, batch) -> tuple:
        return (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask), mx.array(batch.reference),
                mx.array(batch.valid))

    def counts(self, micro_batches) -> dict:
        return {"pairs": sum(b.global_pairs for b in micro_batches),
                "chosen_tokens": sum(b.global_chosen_tokens for b in micro_batches)}

    def summary(self, stats: list[float], tokens: int, counts: dict) -> dict:
        """Means per pair (token terms per token) of summed statistics over ``counts``."""
        pairs = max(counts.get("pairs", 0), 1)
        named = dict(zip(self.stats, stats))
        out = self.losses(named, counts)
        out.update({
            "reward_accuracy": named["reward_wins"] / pairs,
            "reward_margin": (named["chosen_reward"] - named["rejected_reward"]) / pairs,
            "chosen_reward": named["chosen_reward"] / pairs,
            "rejected_reward": named["rejected_reward"] / pairs,
            "chosen_logp": named["chosen_logp"] / pairs,
            "rejected_logp": named["rejected_logp"] / pairs,
            "preference_accuracy": named["preference_wins"] / pairs,
        })
        return out

    @staticmethod
    def _pairs(model, inputs, targets, mask):
        logps = sequence_logps(model, inputs, targets, mask)
        rows = logps.shape[0] // 2
        return logps[:rows], logps[rows:], rows


class DPO(Preference):
    """Sigmoid DPO with label smoothing; the reference log-probs come with the batch (a cache)."""

    name = "dpo"
    stats = ("loss_sum", "reward_wins", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
             "preference_wins")

    def scales(self, micro_batches, ranks: int) -> mx.array:
        return mx.array([ranks / sum(b.global_pairs for b in micro_batches)], mx.float32)

    def loss(self, model, scales, inputs, targets, mask, reference, valid):
        chosen, rejected, rows = self._pairs(model, inputs, targets, mask)
        beta, eps = self.method.beta, self.method.label_smoothing
        chosen_reward = beta * (chosen - reference[:rows])
        rejected_reward = beta * (rejected - reference[rows:])
        z = chosen_reward - rejected_reward
        losses = -nn.log_sigmoid(z) if eps == 0 else -(1 - eps) * nn.log_sigmoid(z) - eps * nn.log_sigmoid(-z)
        loss_sum = (losses * valid).sum()
        stats = mx.stack([loss_sum, (wins(chosen_reward, rejected_reward) * valid).sum(),
                          (chosen_reward * valid).sum(), (rejected_reward * valid).sum(), (chosen * valid).sum(),
                          (rejected * valid).sum(), (wins(chosen, rejected) * valid).sum()])
        return loss_sum * scales[0], stats

    def losses(self, named: dict, counts: dict) -> dict:
        return {"train_loss": named["loss_sum"] / max(counts.get("pairs", 0), 1)}


class ORPO(Preference):
    """NLL of the chosen answers per token, plus ``orpo_lambda`` times the odds-ratio term per pair."""

    name = "orpo"
    stats = ("nll_sum", "odds_ratio_sum", "reward_wins", "chosen_reward", "rejected_reward", "log_odds_sum",
             "chosen_logp", "rejected_logp", "preference_wins")

    def scales(self, micro_batches, ranks: int) -> mx.array:
        tokens = sum(b.global_chosen_tokens for b in micro_batches)
        pairs = sum(b.global_pairs for b in micro_batches)
        return mx.array([ranks / tokens, ranks * self.method.orpo_lambda / pairs], mx.float32)

    def loss(self, model, scales, inputs, targets, mask, reference, valid):
        chosen, rejected, rows = self._pairs(model, inputs, targets, mask)
        counts = mx.maximum(mask.sum(axis=-1), 1.0)
        # the reward is the mean token log-prob (TRL's ORPO logs beta times it)
        mean_chosen, mean_rejected = chosen / counts[:rows], rejected / counts[rows:]
        log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
        nll_sum = -(chosen * valid).sum()  # padding pairs have no answer tokens: their log-prob is 0 anyway
        odds_sum = (-nn.log_sigmoid(log_odds) * valid).sum()
        stats = mx.stack([nll_sum, odds_sum, (wins(mean_chosen, mean_rejected) * valid).sum(),
                          (mean_chosen * valid).sum(), (mean_rejected * valid).sum(), (log_odds * valid).sum(),
                          (chosen * valid).sum(), (rejected * valid).sum(), (wins(chosen, rejected) * valid).sum()])
        return nll_sum * scales[0] + odds_sum * scales[1], stats

    def losses(self, named: dict, counts: dict) -> dict:
        nll = named["nll_sum"] / max(counts.get("chosen_tokens", 0), 1)
        odds = named["odds_ratio_sum"] / max(counts.get("pairs", 0), 1)
        return {"train_loss": nll + self.method.orpo_lambda * odds, "nll_loss": nll, "odds_ratio_loss": odds,
                "log_odds_ratio": named["log_odds_sum"] / max(counts.get("pairs", 0), 1)}


def make_objective(method):
    """The objective of ``method.objective`` (``trainer.config.load.MethodConfig``)."""
    if method.objective == "dpo":
        return DPO(method)
    if method.objective == "orpo":
        return ORPO(method)
    return SFT()
