"""The peer's side of ``bench preference``: mlx-lm-lora's own DPO, run by the peer's Python, never ours.

It imports only the peer's environment (mlx-lm-lora, its mlx and mlx-lm), so
it is run as a file by that environment's interpreter, never imported::

    PEER_PYTHON preference_peer.py train REPORTS [--record-batches K] -- --config PEER.yaml
    PEER_PYTHON preference_peer.py tokens DATA_DIR MODEL OUT.json

``train`` runs ``mlx_lm_lora.train``'s own ``main()`` (the peer's command
line, as ``python -m mlx_lm_lora.train``) with one reporting callback handed to
its ``run()``, which ``main()`` calls without one: rank 0 appends every train
and validation report, stamped with the wall time it arrived, to ``REPORTS``
(``.val`` for validations), since its console prints rounded it/s only. With
``--record-batches K``, every rank also writes the token rows of its first K
training batches to ``REPORTS.batches.rank<R>.json``: the evidence of which
pairs each rank trains on (``iterate_dpo_batches`` deals no rank offset); and
a digest of its trainable weights before and after training to
``REPORTS.weights.rank<R>.json`` (do the ranks hold the same adapters?).

``tokens`` tokenizes every split as the peer's DPO does (its ``load_dataset``
with its tokenizer, chat template fallback included) and writes each pair's
chosen and rejected tokens and prompt length, to compare with ours.
"""

import json
import sys
import time
import types
from pathlib import Path


def _rank() -> int:
    import mlx.core as mx

    return mx.distributed.init().rank()


def record_batches(path_base: str, keep: int) -> None:
    """Wrap the peer's ``iterate_dpo_batches`` so each rank writes its first ``keep`` training batches."""
    from mlx_lm_lora.trainer import dpo_trainer

    original, seen = dpo_trainer.iterate_dpo_batches, []

    def trimmed(tokens, mask) -> list[list[int]]:
        # a row's answer ends at its mask's last 1 (the rest is padding)
        rows = []
        for row, m in zip(tokens.tolist(), mask.tolist()):
            last = max((i for i, v in enumerate(m) if v), default=-1)
            rows.append(row[:last + 1])
        return rows

    def wrapped(dataset, batch_size, max_seq_length, train=False):
        for batch in original(dataset, batch_size, max_seq_length, train=train):
            if train and len(seen) < keep:  # train_dpo calls this once per iteration, for one batch
                chosen, rejected, chosen_mask, rejected_mask = batch
                seen.append({"chosen": trimmed(chosen, chosen_mask), "rejected": trimmed(rejected, rejected_mask)})
                Path(f"{path_base}.batches.rank{_rank()}.json").write_text(json.dumps(seen))
            yield batch

    dpo_trainer.iterate_dpo_batches = wrapped  # looked up in the module at every call


def allow_cpu() -> bool:
    """Let the peer's ``train_dpo`` start on MLX's CPU backend; True when that took a stand-in.

    It calls ``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``
    unguarded, and without Metal ``device_info()`` has no such key (KeyError before
    the first update; mlx-lm's own trainer guards it). A wired limit means nothing
    without Metal, so the key is supplied as 0, which ``set_wired_limit`` accepts.
    """
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return False
    device_info = mx.device_info
    mx.device_info = lambda: {"max_recommended_working_set_size": 0, **device_info()}
    return True


def drop_blank_hostfile() -> bool:
    """Forget a blank ``MLX_HOSTFILE``; True when there was one.

    ``mlx.launch -n 1`` (and ``mlx-dp launch -n 1``, which does as it does) gives
    one rank a blank hostfile, which ``mx.distributed.init()`` fails to parse
    (a JSON error); mlx-dp's trainer drops it, the peer does not. One rank needs
    no ring, so it is dropped before MLX is imported.
    """
    import os

    path = os.environ.get("MLX_HOSTFILE")
    if not path or not Path(path).is_file() or Path(path).read_text().strip():
        return False
    del os.environ["MLX_HOSTFILE"]
    return True


def record_weights(path_base: str, peer) -> None:
    """Wrap the peer's ``train_dpo`` so each rank writes a digest of its trainable weights before and after.

    Its LoRA layers are made in ``from_pretrained``, before ``train_model`` seeds MLX, so
    whether the ranks start (and end) with the same adapters is worth seeing.
    """
    import hashlib

    import numpy as np
    from mlx.utils import tree_flatten

    original = peer.train_dpo

    def digest(model) -> str:
        h = hashlib.sha256()
        for name, value in sorted(tree_flatten(model.trainable_parameters()), key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(np.asarray(value).tobytes())
        return h.hexdigest()[:16]

    def wrapped(model, *args, **kwargs):
        seen = {"before": digest(model)}
        result = original(model, *args, **kwargs)
        seen["after"] = digest(model)
        Path(f"{path_base}.weights.rank{_rank()}.json").write_text(json.dumps(seen))
        return result

    peer.train_dpo = wrapped  # train_model calls it by its name in mlx_lm_lora.train


def train(reports: str, argv: list[str], keep_batches: int) -> int:
    """``mlx_lm_lora.train.main()`` with ``argv``, its reports stamped into ``reports`` (rank 0)."""
    if drop_blank_hostfile():
        print("[bench] one rank: the launcher's blank MLX_HOSTFILE dropped (MLX cannot parse it)", flush=True)
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import train as peer

    if allow_cpu():
        print("[bench] no Metal: mx.device_info() given max_recommended_working_set_size=0 for the peer's "
              "train_dpo (set_wired_limit is a no-op here)", flush=True)

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

    if keep_batches:
        record_batches(reports, keep_batches)
        record_weights(reports, peer)
    run = peer.run
    peer.run = lambda args, training_callback=None: run(args, training_callback or Recorder())
    sys.argv = ["mlx_lm_lora.train", *argv]
    peer.main()
    return 0


def tokens(data_dir: str, model: str, out: str) -> int:
    """Each split's pairs as the peer's DPO tokenizes them: chosen, rejected and prompt length."""
    from mlx_lm.utils import load
    from mlx_lm_lora.chat_template import ensure_chat_template
    from mlx_lm_lora.trainer.datasets import load_dataset

    _, tokenizer = load(model)  # as its from_pretrained does, fallback template included
    fallback = ensure_chat_template(tokenizer)
    config = types.SimpleNamespace(data=data_dir, train_mode="dpo", train=True, test=True, hf_dataset=False)
    splits = dict(zip(("train", "valid", "test"), load_dataset(config, tokenizer)))
    doc = {"fallback_template": fallback, "splits": {}}
    for name, split in splits.items():
        doc["splits"][name] = [{"chosen": list(split[i]["chosen"]), "rejected": list(split[i]["rejected"]),
                                "prompt": split[i]["chosen_prompt_length"]} for i in range(len(split))]
    Path(out).write_text(json.dumps(doc))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["train"] and len(argv) >= 2 and "--" in argv:
        options, rest = argv[2:argv.index("--")], argv[argv.index("--") + 1:]
        keep = int(options[options.index("--record-batches") + 1]) if "--record-batches" in options else 0
        return train(argv[1], rest, keep)
    if argv[:1] == ["tokens"] and len(argv) == 4:
        return tokens(*argv[1:])
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
