"""Sampling completions for on-policy objectives (GRPO): one prompt's group at a time, each sample with its own key.

A completion must depend only on the weights and on (seed, generation, prompt,
sample): never on which rank generates it or on which other sequences share its
batch, so that N ranks train exactly what one process trains. mlx-lm's samplers
draw from the global ``mx.random.state`` (one draw for the whole batch, so a
row's noise depends on the batch size), and its ``BatchGenerator`` moves rows
between batches as they finish; neither keeps that promise. So:

* :func:`sample_keys` derives each sample's key from the seed, the generation,
  the prompt's index in the dataset and the sample's index, by hashing
  (MLX has no ``fold_in``, and ``mx.random.split(key, n)[i]`` changes with ``n``);
* :func:`generate_group` samples one prompt's ``group_size`` completions as one
  batch: the prompt is run once through mlx-lm's KV cache and the cache is
  repeated over the group, so no row is padded and the batch never holds another
  prompt's rows; every decode step draws each row's token with that row's key;
* rows that end (EOS) leave the batch. Which rows are in the batch depends only
  on the group's own tokens, the same on every world size.

Greedy decoding (``temperature == 0``) takes the argmax; the keys advance anyway.
"""

import hashlib
import struct

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache


def _key_words(key: mx.array) -> int:
    hi, lo = (int(x) for x in key.tolist())  # note: a sync point per key, at rollout time only
    return ((hi & 0xFFFFFFFF) << 32) | (lo & 0xFFFFFFFF)


def fold_in(key: mx.array, data: int) -> mx.array:
    """A key that depends only on ``key`` and ``data`` (as ``jax.random.fold_in``), stable across processes."""
    digest = hashlib.blake2b(struct.pack("<Qq", _key_words(key), int(data)), digest_size=8).digest()
    return mx.random.key(struct.unpack("<Q", digest)[0])


def sample_keys(seed: int, generation: int, index: int, group_size: int) -> mx.array:
    """``(group_size, 2)`` keys of prompt ``index``'s samples at ``generation``; row i never depends on the size."""
    group = fold_in(fold_in(mx.random.key(seed), generation), index)
    return mx.stack([fold_in(group, i) for i in range(group_size)])


_split_rows = mx.vmap(lambda k: mx.random.split(k))
_categorical_rows = mx.vmap(lambda logits, k: mx.random.categorical(logits, key=k))


def sample_rows(logits: mx.array, keys: mx.array, temperature: float) -> tuple:
    """One token per row from ``softmax(logits / temperature)`` with each row's own key.

    Returns:
        tuple: ``(tokens (rows,), the rows' next keys)``.
    """
    pairs = _split_rows(keys)
    following, now = pairs[:, 0], pairs[:, 1]
    logits = logits.astype(mx.float32)
    if temperature == 0:
        return mx.argmax(logits, axis=-1), following
    return _categorical_rows(logits * (1.0 / temperature), now), following


def _trimmable(cache: list) -> bool:
    """Whether every layer's cache is one whose rows can be repeated and dropped by indexing."""
    return all(isinstance(c, (KVCache, RotatingKVCache)) for c in cache)


def _prefill(model, prompt: list[int], rows: int) -> tuple:
    """The prompt through the model once, its cache repeated over ``rows``: ``(last logits (rows, V), cache)``."""
    cache = make_prompt_cache(model)
    if not _trimmable(cache):  # a cache of another kind: run the prompt once per row
        logits = model(mx.array([prompt] * rows, dtype=mx.uint32), cache=cache)[:, -1, :]
        return logits, cache
    logits = model(mx.array(prompt, dtype=mx.uint32)[None], cache=cache)[:, -1, :]
    for c in cache:
        c.keys, c.values = mx.repeat(c.keys, rows, axis=0), mx.repeat(c.values, rows, axis=0)
    return mx.repeat(logits, rows, axis=0), cache


def generate_group(model, prompt: list[int], keys: mx.array, max_tokens: int, temperature: float,
                   eos: set) -> list[list[int]]:
    """``len(keys)`` completions of one prompt, sampled as one batch.

    Args:
        model: The policy (in eval mode: no dropout).
        prompt (list[int]): The prompt's tokens.
        keys (mx.array): ``(samples, 2)``, from :func:`sample_keys`.
        max_tokens (int): The longest completion.
        temperature (float): Softmax temperature; 0 is greedy.
        eos (set[int]): Tokens that end a completion (kept in it: the loss scores them).

    Returns:
        list[list[int]]: Each sample's tokens, in the order of ``keys``.
    """
    rows = keys.shape[0]
    logits, cache = _prefill(model, prompt, rows)
    trim = _trimmable(cache)
    out, done, batch_rows = [[] for _ in range(rows)], [False] * rows, list(range(rows))
    for step in range(max_tokens):
        tokens, keys = sample_rows(logits, keys, temperature)
        drawn = tokens.tolist()  # note: sync point per generated token
        for j, row in enumerate(batch_rows):
            if not done[row]:  # a finished row of a cache that cannot drop rows decodes on, unread
                out[row].append(drawn[j])
                done[row] = drawn[j] in eos
        live = [j for j, row in enumerate(batch_rows) if not done[row]]
        if not live or step == max_tokens - 1:
            break
        if trim and len(live) < len(batch_rows):
            index = mx.array(live)
            for c in cache:
                c.keys, c.values = c.keys[index], c.values[index]
            tokens, keys, batch_rows = tokens[index], keys[index], [batch_rows[j] for j in live]
        logits = model(tokens[:, None], cache=cache)[:, -1, :]
    return out
