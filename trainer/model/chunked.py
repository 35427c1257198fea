"""Cross-entropy of a causal LM that never holds the [tokens x vocabulary] logits at once.

Why this exists: with a large vocabulary the logits dominate a fine-tuning step's
memory. At 4 x 512 tokens and Qwen3's 151,936 tokens one float32 logits array is
1.2 GiB, and autodiff of ``cross_entropy(model(x), y)`` keeps several such arrays
alive; LoRA's adapters and a small model's activations are minor next to them.
Here the logits are computed a chunk of tokens at a time, in plain MLX ops (so
the same code runs on Metal), under a custom gradient, so no chunk's logits are
kept for the backward pass. The result equals ``nn.losses.cross_entropy(model(x), y)``
up to float rounding (tests/test_chunked_loss.py) for every head :mod:`trainer.model.heads` can split:
tied or not, quantized, LoRA-adapted, or trainable (full fine-tuning).

Two ways to get the gradient (``grad_in_forward``):

* In the forward (default for a frozen head: LoRA, QLoRA). Token i's loss depends
  on its own hidden row only, so its gradient is ``cotangent_i * (softmax_i -
  onehot_i) @ W``; the forward computes ``(softmax - onehot) @ W`` while it has the
  chunk's logits, and the backward only scales it. Two vocabulary-wide matmuls per
  token, as the plain loss, and one ``exp`` pass instead of two.
* Recomputed in the backward (a trainable head weight, whose gradient needs every
  token's cotangent; or evaluation, where no gradient is wanted). Three matmuls, plus
  the weight gradient.

What the lazy graph does with the chunks (measured: docs/RESULTS.md, "The chunked loss"):

* Order. Independent chunks are scheduled breadth-first: every chunk's logits
  would exist before any is reduced. :func:`mx.depends` chains chunk ``i + 1`` on
  chunk ``i``'s results, which makes a one-chunk-at-a-time schedule possible.
* Look-ahead. MLX allocates an op's output when it *dispatches* the op, and its
  eval loop runs up to ~100 ops ahead of the computation unless active memory
  exceeds ``mx.get_memory_limit()`` (default: 80% of RAM on a CPU). So, without a
  limit, about 16 chunk-sized arrays are allocated at once, whatever the chunk
  size: the peak is ~16 chunks, not one. With ``mx.set_memory_limit`` at the
  step's expected need the loop waits instead, and the peak is a few chunks. That
  limit is process-wide and a wrong one makes every evaluation synchronous, so the
  trainer does not set it: ~16 chunks of 64 MiB are already a small part of the
  whole logits (1.2 GiB at 4 x 512 tokens and 151,936 words).
* Common subexpressions. In recompute mode the backward evaluates ``x_chunk @ W.T``,
  the very expression of the forward, and ``mx.compile`` merges equal expressions:
  the forward's logits would be kept for the backward, all of them. The backward's
  chunks hang on their own :func:`mx.depends` chain (from the cotangent), so they
  are different nodes and are not merged.
"""

import math
from dataclasses import replace

import mlx.core as mx

from .heads import Head, Projection

#: Bytes of one float32 chunk of logits that the automatic chunk size aims at (see default_chunk_tokens).
CHUNK_BYTES = 64 * 2**20


def default_chunk_tokens(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: the power of two nearest to ``chunk_bytes`` of float32 logits, 16 to 4096.

    Why a byte budget: what a chunk costs in memory is tokens x vocabulary, so a fixed token
    count would be too large for a big vocabulary or needlessly small for a small one. 64 MiB
    gives 128 tokens at Qwen3's 151,936 and Llama 3's 128,256, 64 at Gemma 3's 262,144, 512 at
    32,000. Measured on a CPU (docs/RESULTS.md, "The chunked loss"): 128 and 256 tokens per chunk cost the
    least CPU time, 32 and 64 about 10% more; without a memory limit the peak grows with the
    chunk (about 16 chunks of logits are allocated ahead), so the smaller of the fast sizes.
    """
    tokens = max(1.0, chunk_bytes / (4 * vocab))
    return int(min(4096, max(16, 2 ** round(math.log2(tokens)))))


# ---------------------------------------------------------------------------- one chunk


def _project(p: Projection, x: mx.array, weight: mx.array) -> mx.array:
    """``x @ W.T`` for one term (in the weight's dtype, as the model computes it), times its scale, float32."""
    if p.kind == "quantized":
        w, scales, biases = p.arrays
        group_size, bits, mode = p.quant
        y = mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True, group_size=group_size,
                                bits=bits, mode=mode)
    else:
        y = x @ weight if p.transposed else x @ weight.T
    y = y.astype(mx.float32)
    return y if p.scale == 1.0 else y * p.scale


def _project_back(p: Projection, g: mx.array, weight: mx.array, like: mx.array) -> mx.array:
    """The gradient of one term's input: ``scale * g @ W``, in the input's dtype.

    ``g`` goes into the matmul in the weight's dtype, as autodiff of the unchunked model would
    have it: a float32 ``g`` would make MLX convert the whole weight to float32 for every chunk.
    """
    if p.kind == "quantized":
        w, scales, biases = p.arrays
        group_size, bits, mode = p.quant
        dx = mx.quantized_matmul(g.astype(like.dtype), w, scales=scales, biases=biases, transpose=False,
                                 group_size=group_size, bits=bits, mode=mode)
    else:
        g = g.astype(weight.dtype)
        dx = g @ weight.T if p.transposed else g @ weight
    if p.scale != 1.0:
        dx = dx * p.scale
    return dx.astype(like.dtype)


def _logits(terms, projections, xs, weights, bias):
    """One chunk's logits in float32, post-processing (scale, divisor, softcap) included."""
    y = _project(projections[0], xs[0], weights[0])
    for p, x, w in zip(projections[1:], xs[1:], weights[1:]):
        y = y + _project(p, x, w)
    if bias is not None:
        y = y + bias.astype(mx.float32)
    z = y if terms.logit_scale == 1.0 else y * terms.logit_scale
    if terms.logit_divisor != 1.0:
        z = z / terms.logit_divisor
    if terms.softcap is not None:
        z = mx.tanh(z / terms.softcap) * terms.softcap
    return z if terms.final_scale == 1.0 else z * terms.final_scale


# ---------------------------------------------------------------------------- the loss


def chunked_cross_entropy(hidden: mx.array, targets: mx.array, head: Head, chunk_tokens: int | None = None,
                          grad_in_forward: bool | None = None, scale: float = 1.0) -> mx.array:
    """Per-token ``-log softmax(head(hidden))[target]``, float32, of shape ``targets.shape``.

    Equals ``nn.losses.cross_entropy(head(hidden), targets)`` (computed in float32) to rounding;
    the caller multiplies by its mask and sums, as with the plain loss. Masked tokens are
    computed too (a fixed shape keeps ``mx.compile`` to one trace).

    Args:
        hidden (mx.array): [..., D] hidden states after the final norm (``split_head``'s trunk).
        targets (mx.array): [...] target token ids (int).
        head (heads.Head): The output head (``split_head``'s head).
        chunk_tokens (int | None): Tokens per chunk; ``None``: :func:`default_chunk_tokens`.
        grad_in_forward (bool | None): How the gradient is obtained. ``True``: the forward pass
            also computes, chunk by chunk, each token's gradient with respect to its hidden state
            for a unit cotangent ([tokens x D], small); the backward only scales it by the
            cotangent. As many vocabulary-wide matmuls as the plain loss, but wasted work when no
            gradient is taken (evaluation: pass ``False``). ``False``: the forward computes the
            loss alone and the backward recomputes each chunk's logits (one more matmul per
            chunk); the only way when a head weight is trainable (full fine-tuning: its gradient
            depends on the cotangent of every token). ``None`` (default): ``True`` unless a head
            weight or bias is trainable.
        scale (float): The logits are multiplied by this last (one over a sampling temperature).
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n = h.shape[0]
    terms = head.terms(h)  # the low-rank inputs of a LoRA head are built here, visible to autodiff
    if scale != 1.0:
        terms = replace(terms, final_scale=float(scale))
    projections = terms.projections
    chunk = chunk_tokens or default_chunk_tokens(_vocab(projections[0]))
    bounds = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    trainable = terms.bias_trainable or any(p.trainable for p in projections)
    if grad_in_forward is None:
        grad_in_forward = not trainable
    elif grad_in_forward and trainable:
        raise ValueError("grad_in_forward=True needs a frozen head: a trainable head weight's gradient "
                         "depends on every token's cotangent")
    xs = [p.x for p in projections]
    weights = [None if p.kind == "quantized" else p.arrays[0] for p in projections]
    if grad_in_forward:
        return _loss_grad_in_forward(terms, bounds, weights)(t, *xs)[0].reshape(shape)
    return _loss_recompute(terms, bounds, weights, t, xs).reshape(shape)


def _loss_grad_in_forward(terms, bounds, weights):
    """The loss with each token's hidden gradient (unit cotangent) computed in the forward pass.

    Why this is exact for any cotangent: token i's loss depends only on its own row, so
    d(sum_i c_i nll_i)/dx_i = c_i * (softmax_i - onehot_i) @ W, and ``(softmax - onehot) @ W``
    is known once the forward has the chunk's logits. The head's weights are closed over:
    frozen by construction (:func:`chunked_cross_entropy` checks).
    """
    projections = terms.projections

    @mx.custom_function
    def loss(t, *xs):
        nlls, grads, previous = [], [[] for _ in xs], None
        for s, e in bounds:
            xc = [x[s:e] for x in xs]
            if previous is not None:  # chunk i + 1 starts after chunk i is done (module docstring)
                xc = mx.depends(xc, previous)
            z = _logits(terms, projections, xc, weights, terms.bias)
            top = z.max(axis=-1, keepdims=True)
            exps = mx.exp(z - top)
            total = exps.sum(axis=-1, keepdims=True)
            nlls.append((mx.log(total) + top - mx.take_along_axis(z, t[s:e, None], axis=-1)).squeeze(-1))
            # softmax from the same exps (one exp pass per chunk; the plain loss does two)
            g = _through_post(terms, z, exps / total - _onehot(z, t[s:e]))
            for i, p in enumerate(projections):
                grads[i].append(_project_back(p, g, weights[i], xs[i]))
            previous = [nlls[-1]] + [d[-1] for d in grads]
        return (_concat(nlls), *[_concat(d) for d in grads])

    @loss.vjp
    def loss_vjp(primals, cotangents, outputs):
        t, xs = primals[0], primals[1:]
        cot = cotangents[0][:, None]  # the unit-cotangent gradients are outputs only for this: theirs are ignored
        return (mx.zeros_like(t), *[(cot * r).astype(x.dtype) for r, x in zip(outputs[1:], xs)])

    return loss


def _loss_recompute(terms, bounds, weights, t, xs):
    """The loss alone in the forward; the backward recomputes each chunk's logits (and does the weight gradients)."""
    projections = terms.projections
    k = len(projections)
    # What gets a gradient is fixed now, at trace time: the term inputs always, a weight (and the
    # bias) only where it is trainable. Frozen weights are closed over, not passed, so the backward
    # does no [vocab x d] work for them.
    trained = [i for i, p in enumerate(projections) if p.trainable]
    frozen_bias = None if terms.bias_trainable else terms.bias

    def unpack(primals):
        xs, t = list(primals[:k]), primals[k]
        ws = list(weights)
        for j, i in enumerate(trained):
            ws[i] = primals[k + 1 + j]
        bias = primals[k + 1 + len(trained)] if terms.bias_trainable else frozen_bias
        return xs, t, ws, bias

    @mx.custom_function
    def loss(*primals):
        xs, t, ws, bias = unpack(primals)
        nlls, lses, previous = [], [], None
        for s, e in bounds:
            xc = [x[s:e] for x in xs]
            if previous is not None:  # chunk i + 1 starts after chunk i is reduced (module docstring)
                xc = mx.depends(xc, [previous])
            z = _logits(terms, projections, xc, ws, bias)
            top = z.max(axis=-1, keepdims=True)
            lse = mx.log(mx.exp(z - top).sum(axis=-1)) + top.squeeze(-1)
            nlls.append(lse - mx.take_along_axis(z, t[s:e, None], axis=-1).squeeze(-1))
            lses.append(lse)
            previous = nlls[-1]
        # lse is kept for the backward (N floats), so it need not recompute the max and the sum
        return _concat(nlls), _concat(lses)

    @loss.vjp
    def loss_vjp(primals, cotangents, outputs):
        xs, t, ws, bias = unpack(primals)
        cot, lse_all = cotangents[0].astype(mx.float32), outputs[1]  # lse is internal: its cotangent is ignored
        dxs, dws, dbias = _recomputed_grads(terms, bounds, trained, xs, t, ws, bias, cot, lse_all)
        grads = [_concat(d) for d in dxs] + [mx.zeros_like(t)]
        grads += [dws[i].astype(ws[i].dtype) for i in trained]
        if terms.bias_trainable:
            grads.append(dbias.astype(bias.dtype))
        return tuple(grads)

    primals = [*xs, t] + [projections[i].arrays[0] for i in trained]
    if terms.bias_trainable:
        primals.append(terms.bias)
    return loss(*primals)[0]


def _recomputed_grads(terms, bounds, trained, xs, t, ws, bias, cot, lse_all) -> tuple:
    """The backward of recompute mode, chunk by chunk: (input gradients per term and chunk, the trainable
    weights' gradients in float32, the bias's)."""
    projections = terms.projections
    dxs = [[] for _ in projections]
    dws = {i: None for i in trained}
    dbias = None
    previous = cot  # a chain distinct from the forward's, so mx.compile cannot merge the recomputed logits
    for s, e in bounds:
        xc = mx.depends([x[s:e] for x in xs], [previous])
        z = _logits(terms, projections, xc, ws, bias)
        g = _through_post(terms, z, (mx.exp(z - lse_all[s:e, None]) - _onehot(z, t[s:e])) * cot[s:e, None])
        for i, p in enumerate(projections):
            dxs[i].append(_project_back(p, g, ws[i], xs[i]))
            if i in dws:  # trainable weight: accumulate in float32, whatever its dtype
                x32 = xc[i].astype(mx.float32)
                a, b = (x32.T, g) if p.transposed else (g.T, x32)
                dws[i] = a @ b * p.scale if dws[i] is None else mx.addmm(dws[i], a, b, alpha=p.scale)
        if terms.bias_trainable:
            dbias = g.sum(axis=0) if dbias is None else dbias + g.sum(axis=0)
        previous = dxs[0][-1]
    return dxs, dws, dbias


def _onehot(z: mx.array, t: mx.array) -> mx.array:
    return mx.arange(z.shape[-1])[None] == t[:, None]


def _through_post(terms, z: mx.array, g: mx.array) -> mx.array:
    """The gradient with respect to the logits after post-processing (``z``), taken back to before it."""
    if terms.final_scale != 1.0:
        g = g * terms.final_scale
        z = z / terms.final_scale
    if terms.softcap is not None:  # z = cap * tanh(u / cap): dz/du = 1 - (z / cap)^2
        g = g * (1.0 - mx.square(z / terms.softcap))
    if terms.logit_divisor != 1.0:
        g = g / terms.logit_divisor
    if terms.logit_scale != 1.0:
        g = g * terms.logit_scale
    return g


def _vocab(p: Projection) -> int:
    w = p.arrays[0]
    return w.shape[-1] if p.transposed else w.shape[0]


def _concat(parts: list) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
