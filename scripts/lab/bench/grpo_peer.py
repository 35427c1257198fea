"""The peer's side of ``bench grpo``: mlx-lm-lora's own GRPO, run by the peer's Python, never ours.

It imports only the peer's environment (mlx-lm-lora, its mlx and mlx-lm), so
it is run as a file by that environment's interpreter, never imported::

    PEER_PYTHON grpo_peer.py train REPORTS [--record-batches K] [--stock-sampling] -- PEER_ARGS
    PEER_PYTHON grpo_peer.py prompts DATA_DIR MODEL OUT.json

``train`` runs ``mlx_lm_lora.train``'s own ``main()`` (its command line, as
``python -m mlx_lm_lora.train``) with three changes, each said on its output:

* **the prompts as plain text**: its ``GRPODataset`` renders every prompt
  through the chat template with an R1 system prompt, and no flag reaches the
  plain-text path it has (``text_completion_key``, which ``create_dataset``
  never passes); the tiny model continues text and has never seen a chat
  turn, so the dataset is built with ``text_completion_key`` = the prompt
  column: ``tokenizer.encode(prompt)``, exactly our ``data.format: text``
  (``prompts`` checks that, prompt by prompt);
* **plain temperature sampling** (unless ``--stock-sampling``): its
  ``GRPOTrainingArgs`` keeps ``top_p`` 0.95 and ``top_k`` 20, which no flag
  sets; ours samples from ``softmax(logits / T)`` alone, so the peer gets
  ``top_p`` 1 and ``top_k`` 0 (mlx-lm's ``make_sampler`` then applies neither);
* one reporting callback handed to its ``run()``: rank 0 appends every train
  and validation report, stamped with the wall time it arrived, to ``REPORTS``
  (``.val`` for validations); and ``REPORTS.args.json``: the
  ``GRPOTrainingArgs`` its trainer really got (its YAML merge silently drops
  several GRPO keys, so the bench passes those as flags and keeps this proof);
  and each rank's rollout seconds per update (``REPORTS.rollouts.rank<R>.jsonl``).

With ``--record-batches K`` every rank also writes the prompts and answers of
its first K training batches to ``REPORTS.batches.rank<R>.json`` (which prompts
each rank trains), and a digest of its trainable weights before and after
training to ``REPORTS.weights.rank<R>.json`` (do ranks hold the same adapters?).

``prompts`` tokenizes every split as that dataset does and writes each
prompt's tokens, text and answer, to compare with ours.
"""

import json
import sys
import time
import types
from pathlib import Path


def _rank() -> int:
    import mlx.core as mx

    return mx.distributed.init().rank()


def drop_blank_hostfile() -> bool:
    """Forget a blank ``MLX_HOSTFILE`` (``mlx-dp launch -n 1`` gives one, which MLX cannot parse); True if so."""
    import os

    path = os.environ.get("MLX_HOSTFILE")
    if not path or not Path(path).is_file() or Path(path).read_text().strip():
        return False
    del os.environ["MLX_HOSTFILE"]
    return True


def plain_text_prompts() -> None:
    """Make the peer's GRPO dataset tokenize each prompt as it is (its own ``text_completion_key`` path)."""
    from mlx_lm_lora.trainer import datasets

    original = datasets.GRPODataset

    class PlainTextPrompts(original):
        def __init__(self, data, tokenizer, prompt_key="prompt", answer_key="answer", system_key="system",
                     type_key="type", text_completion_key=None):
            super().__init__(data, tokenizer, prompt_key, answer_key, system_key, type_key,
                             text_completion_key=prompt_key)

    datasets.GRPODataset = PlainTextPrompts  # create_dataset looks it up in the module at every call


def plain_sampling(peer) -> None:
    """``top_p`` 1 and ``top_k`` 0 for the peer's GRPO (no flag sets them): softmax(logits / T) alone."""
    original = peer.GRPOTrainingArgs
    peer.GRPOTrainingArgs = lambda **kwargs: original(**{**kwargs, "top_p": 1.0, "top_k": 0, "min_p": 0.0})


def wrap_trainer(peer, reports: str, keep: int) -> None:
    """Wrap ``train_grpo``: record its effective arguments (rank 0), and with ``keep`` each rank's first
    ``keep`` training batches and a digest of its trainable weights before and after."""
    import hashlib
    from dataclasses import asdict

    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm_lora.trainer import grpo_trainer

    original = peer.train_grpo

    def digest(model) -> str:
        h = hashlib.sha256()
        for name, value in sorted(tree_flatten(model.trainable_parameters()), key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(np.asarray(value).tobytes())
        return h.hexdigest()[:16]

    def recording(dataset, batch_size, max_seq_length, train=False):
        seen, rank = [], _rank()
        for batch in grpo_trainer.iterate_grpo_batches(dataset, batch_size, max_seq_length, train=train):
            if train and len(seen) < keep:  # one batch per iteration
                _, _, prompts, answers, _ = batch
                seen.append({"prompts": list(prompts), "answers": list(answers)})
                Path(f"{reports}.batches.rank{rank}.json").write_text(json.dumps(seen))
            yield batch

    def wrapped(model, *args, **kwargs):
        training = kwargs.get("args")
        if training is not None and _rank() == 0:
            Path(f"{reports}.args.json").write_text(json.dumps(asdict(training), default=str))
        if not keep:
            return original(model, *args, **kwargs)
        kwargs["iterate_batches"] = recording  # its default is bound at definition: passed, not patched
        seen = {"before": digest(model)}
        result = original(model, *args, **kwargs)
        seen["after"] = digest(model)
        Path(f"{reports}.weights.rank{_rank()}.json").write_text(json.dumps(seen))
        return result

    peer.train_grpo = wrapped  # train_model calls it by its name in mlx_lm_lora.train


def time_rollouts(reports: str) -> None:
    """Each rank appends every training rollout's seconds (``generate_grpo``: sampling, decoding) and its
    completion tokens to ``REPORTS.rollouts.rank<R>.jsonl``; validation rollouts (model in eval mode) are left out."""
    import mlx.core as mx
    from mlx_lm_lora.trainer import grpo_trainer

    original, count = grpo_trainer.generate_grpo, [0]

    def timed(model, *args, **kwargs):
        training, start = model.training, time.perf_counter()
        completions, texts, indices = original(model, *args, **kwargs)
        mx.eval(completions)  # already evaluated token by token; a no-op that makes the timing honest
        if training:
            count[0] += 1
            record = {"step": count[0], "rank": _rank(), "generate_s": time.perf_counter() - start,
                      "completion_tokens": int(sum(c.size for c in completions))}
            with open(f"{reports}.rollouts.rank{_rank()}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return completions, texts, indices

    grpo_trainer.generate_grpo = timed  # train_grpo looks it up in its module at every call


def train(reports: str, argv: list[str], keep_batches: int, stock_sampling: bool) -> int:
    """``mlx_lm_lora.train.main()`` with ``argv``, its reports stamped into ``reports`` (rank 0)."""
    if drop_blank_hostfile():
        print("[bench] one rank: the launcher's blank MLX_HOSTFILE dropped (MLX cannot parse it)", flush=True)
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import train as peer

    plain_text_prompts()
    print("[bench] prompts as plain text: GRPODataset(text_completion_key=prompt), as data.format: text", flush=True)
    if not stock_sampling:
        plain_sampling(peer)
        print("[bench] sampling softmax(logits / T) alone: top_p 1, top_k 0 (no flag sets them)", flush=True)
    wrap_trainer(peer, reports, keep_batches)
    time_rollouts(reports)

    def write(suffix: str, info: dict) -> None:
        if _rank() != 0:
            return
        record = {"time": time.time(), **{k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}}
        with open(reports + suffix, "a") as f:
            f.write(json.dumps(record) + "\n")

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            write("", info)

        def on_val_loss_report(self, info: dict) -> None:
            write(".val", info)

    run = peer.run
    peer.run = lambda args, training_callback=None: run(args, training_callback or Recorder())
    sys.argv = ["mlx_lm_lora.train", *argv]
    peer.main()
    return 0


def prompts(data_dir: str, model: str, out: str) -> int:
    """Each split's prompts as the peer's GRPO (plain text, as patched above) tokenizes them."""
    from mlx_lm.utils import load
    from mlx_lm_lora.chat_template import ensure_chat_template
    from mlx_lm_lora.trainer.datasets import load_dataset

    plain_text_prompts()
    _, tokenizer = load(model)  # as its from_pretrained does, fallback template included
    ensure_chat_template(tokenizer)
    config = types.SimpleNamespace(data=data_dir, train_mode="grpo", train=True, test=True, hf_dataset=False)
    splits = dict(zip(("train", "valid", "test"), load_dataset(config, tokenizer)))
    doc = {"splits": {name: [{"tokens": list(split[i][0]), "prompt": split[i][2], "answer": split[i][3]}
                             for i in range(len(split))] for name, split in splits.items()}}
    Path(out).write_text(json.dumps(doc))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["train"] and len(argv) >= 2 and "--" in argv:
        options, rest = argv[2:argv.index("--")], argv[argv.index("--") + 1:]
        keep = int(options[options.index("--record-batches") + 1]) if "--record-batches" in options else 0
        return train(argv[1], rest, keep, "--stock-sampling" in options)
    if argv[:1] == ["prompts"] and len(argv) == 4:
        return prompts(*argv[1:])
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
