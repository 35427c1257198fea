"""GRPO (Shao et al., 2024): sample a group of completions per prompt, score them, favour the better ones.

Each update, every rank completes its own prompts (``training.batch_size``
prompts per rank; a prompt's whole group stays on its rank), with the policy as
it is (:meth:`GRPO.rollout`, the loop's on-policy seam). Completions are keyed
by (seed, generation, prompt, sample) and sampled one prompt's group at a time
(``trainer.model.rollout``), so they do not depend on the world size. Rewards
(``trainer.objectives.rewards``) give each completion a score; its advantage is
its reward minus its group's mean, divided by the group's standard deviation
(``grpo``, ``dapo``; Dr. GRPO divides by nothing). Per completion token:

    l = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta KL,   KL = exp(ref - logp) - (ref - logp) - 1

with ``r`` the ratio of the policy's probability to the one that sampled
(1 with one update per generation; ``method.updates_per_generation`` reuses a
generation for more updates) and ``ref`` the reference's log-prob (the base
with adapters off; ``beta: 0`` skips it). Normalised over the whole update,
summed over ranks and micro-batches, as every objective here:

* ``grpo``: each completion's mean token loss, summed and divided by M, the completions of the update;
* ``dr_grpo`` (Liu et al., 2025): token losses summed, divided by M times ``max_completion_tokens``;
* ``dapo`` (Yu et al., 2025): token losses summed, divided by T, the completion tokens of the whole update
  (the one count ranks must exchange: one small sum per update).

So N ranks at b prompts train exactly what one process trains at N*b.
"""

import math
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .. import log
from ..data.batches import Batch, padded_width
from ..data.prompts import PromptStream, load_prompt_splits
from ..errors import ConfigError
from ..model.load import has_adapters
from ..model.rollout import generate_group, sample_keys
from .base import ObjectiveBase
from .rewards import build_rewards, check_rows


@dataclass(frozen=True)
class GRPOBatch(Batch):
    """One rank's completions of one global micro-batch of prompts, as rows ready for the loss.

    Attributes:
        advantages: ``(rows,)`` each completion's advantage (0 for padding rows).
        old_logps: ``(rows, width - 1)`` the log-probs that sampled (with ``updates_per_generation`` > 1).
        ref_logps: ``(rows, width - 1)`` the reference's log-probs (``beta`` > 0), else zeros.
        global_items: prompts of the global micro-batch.
        rollout: the update's rollout record, summed over ranks (the same object on every micro-batch).
    """

    advantages: np.ndarray | None = None
    old_logps: np.ndarray | None = None
    ref_logps: np.ndarray | None = None
    global_items: int = 0
    rollout: dict | None = None


class GRPO(ObjectiveBase):
    """Group relative policy optimisation over prompt rows, with built-in or user rewards."""

    name = "grpo"
    items = "prompts"
    unit = "prompts"
    packing = False
    on_policy = True
    stats = ("loss_sum", "kl_sum", "clipped_tokens", "completion_tokens")

    def __init__(self, method, nll=None):
        super().__init__(method, nll)
        self.rewards, self.world, self.tokenizer, self.split, self.seed, self.pad = None, None, None, None, 0, 16
        self._cache, self._reference = None, None

    @classmethod
    def rows_per_item(cls, method) -> int:
        return method.group_size

    @classmethod
    def row_length(cls, cfg) -> int:
        return cfg.data.max_seq_length + cfg.method.max_completion_tokens

    def check(self, cfg) -> None:
        m = self.method
        if cfg.data.packing:
            raise ConfigError("data.packing packs samples of next-token data; method.objective=grpo trains on "
                              "completions it generates, so set data.packing=false")
        if cfg.data.format not in ("auto", "text"):
            raise ConfigError(f"data.format={cfg.data.format} names a next-token format; with method.objective=grpo "
                              "rows are prompts: data.format=auto (a string prompt through the chat template) or text "
                              "(the prompt as it is)")
        if cfg.parallel.pipeline:
            raise ConfigError("method.objective=grpo generates its completions on each rank and does not run on a "
                              "pipeline; set parallel.pipeline=false")
        if m.updates_per_generation > 1 and (cfg.checkpoint.every % m.updates_per_generation
                                             or (cfg.training.steps or 0) % m.updates_per_generation):
            raise ConfigError(f"method.updates_per_generation={m.updates_per_generation} reuses each generation for "
                              "that many updates, and a checkpoint resumes exactly only between generations: make "
                              "checkpoint.every and training.steps multiples of it")
        self.rewards = build_rewards(m.rewards)
        self.seed, self.pad = cfg.training.seed, cfg.data.pad_multiple

    def load(self, data, tokenizer, splits: tuple, show_progress: bool) -> dict:
        loaded = load_prompt_splits(data, tokenizer, splits, show_progress=show_progress)
        for split in loaded.values():
            check_rows(self.rewards, split)
        return loaded

    def stream(self, split, per_rank: int, rank: int, world_size: int, seed: int, pad_multiple: int, **options):
        return PromptStream(split, per_rank, rank, world_size, seed, pad_multiple, **options)

    def batch(self, split, indices, rank: int, world_size: int, rows: int, pad_multiple: int):
        raise NotImplementedError("GRPO validates by generating (GRPO.validate), not by scoring fixed rows")

    def prepare(self, world, model, tokenizer, splits: dict, cache_dir, settings: dict, stage=None) -> dict:
        """Remember what rollouts need; with ``beta`` > 0 on a full fine-tune, keep the base weights as the
        reference (one more copy of the trained weights in memory; LoRA turns its adapters off instead)."""
        self.world, self.tokenizer, self.split = world, tokenizer, splits.get("train")
        loaded = [r.name for r in self.rewards if ":" in r.name]
        if loaded:
            log.info(f"rewards: running your function(s) {', '.join(loaded)} on every completion")
        if self.method.beta > 0 and not has_adapters(model):
            from mlx.utils import tree_flatten

            self._reference = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
            log.info("grpo: method.beta > 0 on a full fine-tune keeps a copy of the base weights as the reference")
        return {"rewards": ",".join(f"{r.name}*{r.weight:g}" for r in self.rewards)}

    # ------------------------------------------------------------------ rollouts (the loop's on-policy seam)

    def rollout(self, model, take, step: int, hosted: int = 1) -> list:
        """This update's rows: at the first update of each generation, the stream's prompts completed now."""
        per = self.method.updates_per_generation
        self.rollout_seconds = 0.0  # a cached generation costs nothing this update
        if self._cache is None or (step - 1) % per == 0:
            self._cache = self._generate(model, take(), (step - 1) // per, hosted)
        return self._cache

    def resumable_after(self, step: int) -> bool:
        return step % self.method.updates_per_generation == 0

    def _generate(self, model, prompts: list, generation: int, hosted: int) -> list:
        """Complete, score and lay out every micro-batch's prompts; one small sum over ranks per update."""
        start, was_training = time.perf_counter(), model.training
        model.eval()  # no dropout while sampling: the completions are the policy's, exactly
        try:
            groups = [[self._complete(model, int(i), generation) for i in batch.indices] for batch in prompts]
            rows = [self._rows(batch, done) for batch, done in zip(prompts, groups)]
            extra = [self._side_logps(model, r) for r in rows]
        finally:
            model.train(was_training)
        # This rank's own work, timed before the sum below makes it wait for the slowest: parallel.balance
        # counts it with the gradients' compute (generation is about half of an update).
        self.rollout_seconds = time.perf_counter() - start
        record, tokens = self._record(prompts, groups, hosted)
        return [GRPOBatch(inputs=r["inputs"], targets=r["targets"], mask=r["mask"], tokens=int(r["mask"].sum()),
                          global_tokens=tokens[i // hosted] if i % hosted == 0 else 0, indices=batch.indices,
                          real_tokens=r["real"], advantages=r["advantages"], old_logps=old, ref_logps=ref,
                          global_items=batch.global_items, rollout=record)
                for i, (batch, r, (old, ref)) in enumerate(zip(prompts, rows, extra))]

    def _complete(self, model, index: int, generation: int) -> dict:
        """One prompt's group: completions, their rewards (weighted and per reward) and advantages."""
        m, split = self.method, self.split
        keys = sample_keys(self.seed, generation, index, m.group_size)
        done = generate_group(model, split.prompt(index), keys, m.max_completion_tokens, m.temperature, self._eos())
        per_reward, rewards = self._score(split, index, done)
        spread = rewards.std(ddof=1) if len(rewards) > 1 else 0.0  # TRL's: the unbiased standard deviation
        centred = rewards - rewards.mean()
        advantages = centred if m.loss_type == "dr_grpo" else centred / (spread + 1e-4)
        truncated = [len(t) == m.max_completion_tokens and t[-1] not in self._eos() for t in done]
        return {"prompt": split.prompt(index), "completions": done, "rewards": rewards, "per_reward": per_reward,
                "advantages": advantages, "truncated": truncated, "zero_spread": spread == 0.0}

    def _eos(self) -> set:
        return set(int(t) for t in self.tokenizer.eos_token_ids)

    def _score(self, split, index: int, completions: list) -> tuple:
        """Each completion's rewards, one column per reward, and their weighted sums."""
        eos, row, where = self._eos(), split.row(index), split.locations[index]
        per_reward = np.zeros((len(completions), len(self.rewards)))
        for j, tokens in enumerate(completions):
            text = self.tokenizer.decode([t for t in tokens if t not in eos])
            per_reward[j] = [r(split.texts[index], text, row, len(tokens), where) for r in self.rewards]
        return per_reward, per_reward @ np.array([r.weight for r in self.rewards])

    def _rows(self, batch, groups: list) -> dict:
        """Prompt + completion rows of this rank's share (padding prompts become empty rows)."""
        g = self.method.group_size
        rows = batch.inputs.shape[0] * g
        longest = max([len(d["prompt"]) + len(c) for d in groups for c in d["completions"]] or [2])
        width = padded_width(longest, self.pad)
        tokens = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width - 1), np.float32)
        advantages = np.zeros(rows, np.float32)
        for k, done in enumerate(groups):
            for j, completion in enumerate(done["completions"]):
                r, sequence = k * g + j, done["prompt"] + completion
                tokens[r, :len(sequence)] = sequence
                mask[r, len(done["prompt"]) - 1:len(sequence) - 1] = 1.0  # the completion's tokens, EOS included
                advantages[r] = done["advantages"][j]
        real = sum(len(d["prompt"]) + len(c) for d in groups for c in d["completions"])
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "advantages": advantages,
                "real": real}

    def _side_logps(self, model, rows: dict) -> tuple:
        """The log-probs that sampled (several updates per generation) and the reference's (``beta`` > 0)."""
        shape = rows["mask"].shape
        old = np.zeros(shape, np.float32)
        ref = np.zeros(shape, np.float32)
        arrays = (mx.array(rows["inputs"]), mx.array(rows["targets"]))
        with self.nll.scoring():  # values only: no gradient work in the loss
            if self.method.updates_per_generation > 1:
                old = np.array(-self.nll(model, *arrays, scale=1.0 / self._temperature()))  # note: sync point
            if self.method.beta > 0:
                with self._reference_model(model):
                    ref = np.array(-self.nll(model, *arrays, scale=1.0 / self._temperature()))  # note: sync point
        return old, ref

    def _temperature(self) -> float:
        """The sampling temperature the log-probs are taken at, as TRL does (greedy sampling: 1)."""
        return self.method.temperature or 1.0

    def _reference_model(self, model):
        """The model as the reference: LoRA's adapters off, or a full fine-tune's base weights put back."""
        from contextlib import contextmanager

        from .reference import adapters_off

        if self._reference is None:
            return adapters_off(model)

        @contextmanager
        def swapped():
            from mlx.utils import tree_flatten

            current = dict(tree_flatten(model.trainable_parameters()))
            model.load_weights(list(self._reference.items()), strict=False)
            try:
                yield model
            finally:
                model.load_weights(list(current.items()), strict=False)

        return swapped()

    def _record(self, prompts: list, groups: list, hosted: int) -> tuple[dict, list]:
        """The update's rollout sums over every rank (one small collective), and each global micro-batch's
        completion tokens."""
        m, names = self.method, [r.name for r in self.rewards]
        micro = len(prompts) // hosted
        done = [d for batch in groups for d in batch]
        tokens = [sum(len(c) for k in range(i * hosted, (i + 1) * hosted) for d in groups[k] for c in d["completions"])
                  for i in range(micro)]
        rewards = np.concatenate([d["rewards"] for d in done]) if done else np.zeros(0)
        per_reward = np.concatenate([d["per_reward"] for d in done]) if done else np.zeros((0, len(names)))
        lengths = np.bincount([len(c) for d in done for c in d["completions"]], minlength=m.max_completion_tokens + 1)
        local = tokens + [len(rewards), rewards.sum(), np.square(rewards).sum(), *per_reward.sum(axis=0),
                          sum(sum(d["truncated"]) for d in done), sum(d["zero_spread"] for d in done), len(done),
                          *lengths]
        summed = self.world.all_sum([float(v) for v in local], phase="rollout")  # note: a collective per update
        total = summed[micro:]
        record = {"completions": total[0], "reward_sum": total[1], "reward_sq_sum": total[2],
                  **{f"reward_{n}_sum": v for n, v in zip(names, total[3:3 + len(names)])},
                  "truncated": total[3 + len(names)], "zero_spread_groups": total[4 + len(names)],
                  "groups": total[5 + len(names)],
                  "completion_length_max": max([i for i, c in enumerate(total[6 + len(names):]) if c > 0] or [0]),
                  "completion_tokens": sum(summed[:micro]), "samples": self._samples(groups)}
        return record, [int(v) for v in summed[:micro]]

    def _samples(self, groups: list, count: int = 2) -> list:
        """A few of this rank's completions, as text, for metrics.jsonl and wandb (rank 0's are the ones logged)."""
        out = []
        eos = self._eos()
        for d in [d for batch in groups for d in batch][:count]:
            text = self.tokenizer.decode([t for t in d["completions"][0] if t not in eos])
            out.append({"prompt": self.tokenizer.decode(d["prompt"])[-200:], "completion": text[:400],
                        "reward": float(d["rewards"][0])})
        return out

    # ------------------------------------------------------------------ the loss

    def arrays(self, batch) -> tuple:
        use_old = mx.array(1.0 if self.method.updates_per_generation > 1 else 0.0)
        return (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask), mx.array(batch.advantages),
                mx.array(batch.old_logps), mx.array(batch.ref_logps), use_old)

    def scales(self, micro_batches: list, ranks: int) -> mx.array:
        m = self.method
        completions = sum(b.global_items for b in micro_batches) * m.group_size
        count = {"grpo": completions, "dr_grpo": completions * m.max_completion_tokens,
                 "dapo": max(sum(b.global_tokens for b in micro_batches), 1)}[m.loss_type]
        return mx.array([ranks / count], mx.float32)

    def loss(self, model, scales, inputs, targets, mask, advantages, old_logps, ref_logps, use_old):
        m = self.method
        logps = -self.nll(model, inputs, targets, scale=1.0 / self._temperature())
        # One update per generation: the ratio is 1 and its gradient is the policy gradient (TRL's detach).
        old = mx.where(use_old > 0, old_logps, mx.stop_gradient(logps))
        ratio = mx.exp(logps - old)
        high = m.epsilon if m.epsilon_high is None else m.epsilon_high
        a = advantages[:, None]
        token = -mx.minimum(ratio * a, mx.clip(ratio, 1 - m.epsilon, 1 + high) * a)
        kl = mx.exp(ref_logps - logps) - (ref_logps - logps) - 1 if m.beta > 0 else mx.zeros_like(logps)
        token = (token + m.beta * kl) * mask
        if m.loss_type == "grpo":  # each completion's mean over its own tokens
            loss_sum = (token.sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)).sum()
        else:
            loss_sum = token.sum()
        clipped = (((ratio < 1 - m.epsilon) & (a < 0)) | ((ratio > 1 + high) & (a > 0))).astype(mx.float32) * mask
        stats = mx.stack([loss_sum, (mx.stop_gradient(kl) * mask).sum(), clipped.sum(), mask.sum()])
        return loss_sum * scales[0], stats

    def counts(self, micro_batches: list) -> dict:
        """The update's rollout record (the same on every micro-batch) and its prompts."""
        return {**micro_batches[0].rollout, "prompts": sum(b.global_items for b in micro_batches)}

    def summary(self, stats: list, tokens: int, counts: dict) -> dict:
        """Loss, reward (mean, spread, per reward), lengths, KL and clipping, as users of TRL look for them."""
        m, named = self.method, dict(zip(self.stats, stats))
        completions, total = max(counts.get("completions", 0), 1), max(counts.get("completion_tokens", 0), 1)
        count = {"grpo": completions, "dr_grpo": completions * m.max_completion_tokens, "dapo": total}[m.loss_type]
        mean = counts.get("reward_sum", 0.0) / completions
        out = {"train_loss": named["loss_sum"] / count, "reward": mean,
               "reward_std": math.sqrt(max(counts.get("reward_sq_sum", 0.0) / completions - mean * mean, 0.0)),
               **{f"reward_{r.name}": counts.get(f"reward_{r.name}_sum", 0.0) / completions for r in self.rewards},
               "completion_length": total / completions, "completion_length_max": counts.get("completion_length_max"),
               "truncated_share": counts.get("truncated", 0) / completions, "kl": named["kl_sum"] / total,
               "clip_fraction": named["clipped_tokens"] / total, "prompts": counts.get("prompts", 0),
               "zero_spread_share": counts.get("zero_spread_groups", 0) / max(counts.get("groups", 0), 1),
               "completion_tokens": counts.get("completion_tokens", 0)}
        if counts.get("samples"):
            out["samples"] = counts["samples"][-2:]
        return out

    def progress(self, record: dict) -> dict:
        return {"reward": f"{record['reward']:.3f}", "len": f"{record['completion_length']:.0f}"}

    # ------------------------------------------------------------------ held-out reward

    def held_out_reward(self, world, model, split, limit: int | None = None, members=None) -> tuple[float, int]:
        """The mean reward of greedy completions of ``split``'s prompts (the first ``limit``), over every rank.

        Prompt i is completed by the rank hosting nominal rank ``i mod N``, so the same prompts are
        scored however many ranks run. A collective.
        """
        nominal, hosted = (world.size, (world.rank,)) if members is None else (members.nominal, members.hosted)
        count = len(split) if limit is None else min(len(split), limit)
        total, was_training = 0.0, model.training
        model.eval()
        try:
            for i in range(count):
                if i % nominal in hosted:
                    done = generate_group(model, split.prompt(i), sample_keys(self.seed, 0, i, 1),
                                          self.method.max_completion_tokens, 0.0, self._eos())
                    total += float(self._score(split, i, done)[1][0])
        finally:
            model.train(was_training)
        return world.all_sum([total], phase="eval")[0] / max(count, 1), count

    def validate(self, world, model, split, per_rank: int, pad_multiple: int, max_batches, members,
                 score=None) -> dict:
        """``val_reward``, the held-out mean reward of greedy completions; ``val_loss`` is its negative, so the
        best checkpoint (``checkpoint.keep_best``) is the one with the highest reward."""
        nominal = world.size if members is None else members.nominal
        limit = None if max_batches is None else max_batches * per_rank * nominal
        reward, _ = self.held_out_reward(world, model, split, limit, members)
        return {"val_loss": -reward, "val_reward": reward}

    def validation_note(self, record: dict) -> str:
        return f", mean reward {record['val_reward']:.3f} (greedy)"

    def evaluate(self, world, model, tokenizer, split, cfg, stage=None) -> dict:
        self.tokenizer = tokenizer
        limit = None if cfg.eval.max_batches is None else \
            cfg.eval.max_batches * (cfg.eval.batch_size or cfg.training.batch_size) * world.size
        reward, count = self.held_out_reward(world, model, split, limit)
        return {"objective": self.name, "reward": reward, "prompts": count}

    def describe(self, result: dict) -> str:
        return (f"{result['split']}: mean reward {result['reward']:.3f} of greedy completions of {result['prompts']} "
                f"held-out prompts on {result['world_size']} rank(s)")
