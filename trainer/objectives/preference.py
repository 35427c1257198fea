"""Preference tuning: DPO (Rafailov et al., 2023) and ORPO (Hong et al., 2024) on pairs of answers.

* DPO, sigmoid loss with label smoothing ``eps`` (conservative DPO): per pair
  ``z = beta * ((pi_c - pi_r) - (ref_c - ref_r))`` with ``pi``, ``ref`` the
  sequence log-probs of the answers under the policy and the reference,
  ``loss = -(1 - eps) log s(z) - eps log s(-z)``, summed and divided by P
  (pairs of the update). The reference values are computed once before
  training (``trainer.objectives.reference``).
* ORPO: ``sum(chosen token NLL) / T_chosen + lambda * sum(-log s(log odds
  ratio)) / P``, with the odds of each answer taken from its mean token
  log-prob, as in the paper and TRL.

``training.batch_size`` counts pairs; a pair's two answers stay on one rank
(``trainer.data.pair_batches``). A pair's accuracy counts a tie as half, so a
model that cannot tell the two answers apart scores 50%.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.pair_batches import PairStream, make_pair_batch
from ..data.pairs import load_pair_splits
from .. import log
from ..errors import ConfigError
from ..parallel import digest
from .base import ObjectiveBase, _cuts, sequence_logps, wins
from .evaluate import evaluate_pairs, through


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler, 2012)."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


class Preference(ObjectiveBase):
    """What DPO and ORPO share: pair rows, pair batches, pair counts and the metrics users look for."""

    items = "pairs"
    unit = "pairs"
    packing = False
    stats: tuple = ()

    @classmethod
    def rows_per_item(cls, method) -> int:
        return 2

    def check(self, cfg) -> None:
        if cfg.data.format != "auto":
            raise ConfigError(f"data.format={cfg.data.format} names a next-token format; with method.objective="
                              f"{self.name} rows are preference pairs (keep data.format=auto)")
        if cfg.data.packing:
            raise ConfigError(f"data.packing packs samples of next-token data; method.objective={self.name} "
                              "trains on whole pairs, so set data.packing=false")

    def load(self, data, tokenizer, splits: tuple, show_progress: bool) -> dict:
        if data.streaming:
            raise ConfigError(f"data.streaming streams next-token rows (method.objective=sft); {self.name} trains "
                              "on pairs whose batches and reference values are planned over the whole set, so set "
                              "data.streaming=false")
        return load_pair_splits(data, tokenizer, splits, show_progress=show_progress)

    def stream(self, split, per_rank: int, rank: int, world_size: int, seed: int, pad_multiple: int, **options):
        return PairStream(split, per_rank, rank, world_size, seed, pad_multiple, **options)

    def batch(self, split, indices, rank: int, world_size: int, rows: int, pad_multiple: int):
        return make_pair_batch(split, indices, rank, world_size, rows, pad_multiple)

    def arrays(self, batch) -> tuple:
        return (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask), mx.array(batch.reference),
                mx.array(batch.valid))

    def split(self, batch, parts: int) -> list:
        """Whole pairs: each part keeps its pairs' chosen rows first and their rejected rows after, as a batch."""
        from dataclasses import replace

        rows, out = batch.inputs.shape[0] // 2, []
        for a, b in _cuts(rows, parts):
            pick = np.r_[a:b, rows + a:rows + b]
            out.append(replace(batch, inputs=batch.inputs[pick], targets=batch.targets[pick], mask=batch.mask[pick],
                               reference=batch.reference[pick], valid=batch.valid[a:b], pairs=int(batch.valid[a:b].sum()),
                               tokens=int(batch.mask[pick].sum())))
        return out

    def counts(self, micro_batches: list) -> dict:
        return {"pairs": sum(b.global_pairs for b in micro_batches),
                "chosen_tokens": sum(b.global_chosen_tokens for b in micro_batches)}

    def summary(self, stats: list, tokens: int, counts: dict) -> dict:
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
            "pairs": counts.get("pairs", 0),
        })
        return out

    def losses(self, named: dict, counts: dict) -> dict:
        raise NotImplementedError

    def progress(self, record: dict) -> dict:
        return {"acc": f"{record['reward_accuracy']:.0%}", "margin": f"{record['reward_margin']:.2f}"}

    def validation_note(self, record: dict) -> str:
        return f", preference accuracy {record['val_preference_accuracy']:.1%}"

    def validate(self, world, model, split, per_rank: int, pad_multiple: int, max_batches, members,
                 score=None) -> dict:
        result = evaluate_pairs(world, model, split, self, per_rank, pad_multiple, max_batches, members=members,
                                score=score)
        return {f"val_{k}": v for k, v in result.items() if k not in ("pairs", "batches")}

    def evaluate(self, world, model, tokenizer, split, cfg, stage=None) -> dict:
        result = evaluate_pairs(world, model, split, self, cfg.eval.batch_size or cfg.training.batch_size,
                                cfg.data.pad_multiple, cfg.eval.max_batches, **through(stage, self))
        return {"objective": self.name, **result}

    def describe(self, result: dict) -> str:
        return (f"{result['split']}: preference accuracy {result['preference_accuracy']:.0%} (chosen answer likelier "
                f"than the rejected one) on {result['pairs']} held-out pairs; {result['objective']} loss "
                f"{result['loss']:.4f}, reward accuracy {result['reward_accuracy']:.0%}, reward margin "
                f"{result['reward_margin']:.3f} on {result['world_size']} rank(s)")

    def _pairs(self, model, inputs, targets, mask):
        logps = sequence_logps(model, inputs, targets, mask, nll=self.nll)
        rows = logps.shape[0] // 2
        return logps[:rows], logps[rows:], rows


class DPO(Preference):
    """Sigmoid DPO with label smoothing; the reference log-probs come with the batch (a cache)."""

    name = "dpo"
    needs_reference = True
    stats = ("loss_sum", "reward_wins", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
             "preference_wins")

    def check(self, cfg) -> None:
        super().check(cfg)
        if not self.method.beta > 0:
            raise ConfigError(f"method.beta must be positive with method.objective=dpo (it scales the reward "
                              f"margin; 0 would teach nothing), got {self.method.beta}")

    def prepare(self, world, model, tokenizer, splits: dict, cache_dir, settings: dict, stage=None) -> dict:
        """Every split's reference log-probs (the model before tuning), cached; agreed on by every rank."""
        from . import reference

        found = reference.attach(world, model, splits, cache_dir, settings, nll=self.nll, stage=stage)
        for name, how in found.items():
            log.info(f"reference log-probs of the {name} pairs: {how['reference']} ({how['file']})")
        return {"reference log-probs": digest(*[splits[name].reference.tobytes() for name in sorted(found)])}

    def scales(self, micro_batches: list, ranks: int) -> mx.array:
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

    def scales(self, micro_batches: list, ranks: int) -> mx.array:
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
