"""Build the tiny Llama that the demo and the tests fine-tune: tokenizer, pretraining, files.

Trains a byte-level BPE tokenizer on the synthetic corpus (scripts/make_tiny_data.py),
pretrains a ~0.9M-parameter ``mlx_lm.models.llama`` on it with plain MLX, checks that
the model recalls the corpus facts, and writes an mlx-lm-loadable directory::

    python scripts/make_tiny_data.py --seed 0 --out data
    MLX_DP_BLAS=openblas python scripts/make_tiny_model.py --seed 0 \\
        --corpus data/tiny-corpus/corpus.txt --out data/tiny-llama

The output is a pure function of the seed and the corpus for a given BLAS: the
OpenBLAS route (trainer/fastblas.py, on by default here on Linux, one thread) is much
faster than the stock wheel but rounds differently, so weights made without it
(MLX_DP_BLAS=mlx, or on macOS) differ in their last bits. The saved model works with
either. About 8 minutes on one busy core.
"""

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

# The BLAS shim has to be loaded before mlx.core, so it is set up before the imports below.
if platform.system() == "Linux":
    os.environ.setdefault("MLX_DP_BLAS", "openblas")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.tools import fastblas  # noqa: E402

try:
    if fastblas.requested():
        fastblas.enable(threads=1)  # one thread: fast enough, and results do not vary with cores
except fastblas.FastBlasError as e:
    sys.exit(f"error: {e}. Set MLX_DP_BLAS=mlx to pretrain on MLX's own BLAS (~15x slower).")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Role markers are special tokens, so the text after them is pre-tokenized on its own
# (with a prefix space, like every word of the corpus): the tokens of the prompt with
# add_generation_prompt=True are then an exact prefix of the tokens of the whole chat,
# which mlx-lm's --mask-prompt relies on. The assistant turn ends with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def model_config(vocab_size: int) -> dict:
    """The config.json of the tiny Llama (about 0.9M parameters at vocab 1024)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "torch_dtype": "float32",
    }


def train_tokenizer(corpus: Path, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, prefix space on) with the special tokens first."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS, PAD] + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    # encode(text) adds BOS, as pretraining saw it; chat templates add their own.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "additional_special_tokens": ROLE_TOKENS,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                "additional_special_tokens": ROLE_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def encode_docs(tok: Tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Each document as BOS + text + EOS token ids."""
    eos = tok.token_to_id(EOS)
    return [np.array(e.ids + [eos], dtype=np.int32)
            for e in tok.encode_batch(docs, add_special_tokens=True)]


def epoch_batches(docs: list[np.ndarray], rng: np.random.RandomState,
                  seq_len: int, batch_size: int):
    """Shuffle documents, concatenate, cut into (batch, seq_len + 1) windows."""
    stream = np.concatenate([docs[i] for i in rng.permutation(len(docs))])
    rows = len(stream) // (seq_len + 1)
    windows = stream[:rows * (seq_len + 1)].reshape(rows, seq_len + 1)
    for start in range(0, rows - batch_size + 1, batch_size):
        yield windows[start:start + batch_size]


def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def pretrain(model: nn.Module, docs: list[np.ndarray], args) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 50 steps."""
    tokens = sum(len(d) for d in docs)
    steps_per_epoch = tokens // ((args.seq_len + 1) * args.batch_size)
    total = steps_per_epoch * args.epochs
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, args.lr, args.warmup),
         optim.cosine_decay(args.lr, total - args.warmup, args.lr * 0.1)], [args.warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = np.random.RandomState(args.seed)
    print(f"pretraining: {tokens} tokens per epoch, {args.epochs} epochs, {total} steps "
          f"of {args.batch_size}x{args.seq_len}, blas={fastblas.active()}", flush=True)
    recent, start, n = [], time.perf_counter(), 0
    for epoch in range(args.epochs):
        for batch in epoch_batches(docs, rng, args.seq_len, args.batch_size):
            loss = step(mx.array(batch))
            mx.eval(state, loss)  # note: sync point, once per step
            n += 1
            recent = (recent + [loss])[-50:]
            if n % args.report_every == 0 or n == total:
                mean = mx.mean(mx.stack(recent)).item()  # note: sync point, at report time
                rate = n * args.batch_size * args.seq_len / (time.perf_counter() - start)
                print(f"step {n:5d}/{total}  epoch {epoch + 1}  loss {mean:.4f}  "
                      f"lr {optimizer.learning_rate.item():.2e}  {rate:.0f} tok/s", flush=True)
    return mx.mean(mx.stack(recent)).item()


def fact_recall(model: nn.Module, tok: Tokenizer, docs: list[str]) -> tuple[float, int]:
    """Share of the corpus's distinct sentences whose last word greedy decoding restores.

    Each sentence is fed alone after BOS; the model must predict every token of its last
    word and the full stop. Teacher forcing over those tokens equals greedy decoding.
    """
    sentences = sorted({s.strip() + "." for d in docs for s in d.split(".") if s.strip()})
    hits = 0
    for start in range(0, len(sentences), 256):
        chunk = sentences[start:start + 256]
        enc = [tok.encode(s).ids for s in chunk]
        heads = [len(tok.encode(s.rsplit(" ", 1)[0]).ids) for s in chunk]
        width = max(map(len, enc))
        batch = np.zeros((len(enc), width), dtype=np.int32)
        for i, ids in enumerate(enc):
            batch[i, :len(ids)] = ids
        pred = np.array(mx.argmax(model(mx.array(batch)), axis=-1))  # note: sync point
        for ids, head, row in zip(enc, heads, pred):
            hits += bool(np.all(row[head - 1:len(ids) - 1] == np.array(ids[head:])))
    return hits / len(sentences), len(sentences)


README = """\
# tiny-llama

A {params_m:.2f}M-parameter Llama ({layers} layers, hidden {hidden}, {heads} heads, {kv} KV heads,
MLP {mlp}, vocab {vocab}, tied embeddings, float32) pretrained from scratch on the synthetic
corpus `../tiny-corpus/corpus.txt`: short sentences about animals and people. Made by

    python scripts/make_tiny_data.py --seed {seed} --out data
    MLX_DP_BLAS=openblas python scripts/make_tiny_model.py --seed {seed} \\
        --corpus data/tiny-corpus/corpus.txt --out data/tiny-llama

- Tokenizer: byte-level BPE trained on the corpus; `<s>` `</s>` `<unk>` `<pad>` and role
  tokens `<|system|>` `<|user|>` `<|assistant|>`; the chat template ends an assistant turn
  with `</s>`.
- Pretraining: {epochs} epochs of {tokens} tokens ({steps} steps of {batch}x{seq_len}), AdamW,
  peak lr {lr}, cosine decay; final training loss {loss:.3f} (the choice of the next entity
  and relation is random, so it cannot reach 0).
- Fact recall: greedy decoding completes {recall:.1%} of the corpus's {n_facts} distinct
  sentences from all but their last word.
- It has never seen a question: `data/tiny-task` teaches that format by fine-tuning.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
    parser.add_argument("--corpus", type=Path, default=Path("data/tiny-corpus/corpus.txt"),
                        help="one document per line (default data/tiny-corpus/corpus.txt)")
    parser.add_argument("--out", type=Path, default=Path("data/tiny-llama"),
                        help="model directory to write (default data/tiny-llama)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocab cap (default 1024)")
    parser.add_argument("--epochs", type=int, default=12, help="passes over the corpus (default 12)")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per step (default 64)")
    parser.add_argument("--seq-len", type=int, default=64,
                        help="tokens per window; documents average ~26 (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    parser.add_argument("--report-every", type=int, default=100, help="steps between logs (default 100)")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found; run scripts/make_tiny_data.py first")

    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    docs_text = [line for line in args.corpus.read_text(encoding="utf-8").splitlines() if line]
    tok = train_tokenizer(args.corpus, args.vocab_size)
    save_tokenizer(tok, args.out)
    docs = encode_docs(tok, docs_text)

    config = model_config(tok.get_vocab_size())
    mx.random.seed(args.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {params} parameters, vocab {config['vocab_size']}", flush=True)

    loss = pretrain(model, docs, args)
    recall, n_facts = fact_recall(model, tok, docs_text)
    print(f"final loss {loss:.4f}; fact recall {recall:.1%} of {n_facts} sentences", flush=True)

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(args.out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
                  "pad_token_id": tok.token_to_id(PAD)}
    (args.out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokens = sum(len(d) for d in docs)
    steps = tokens // ((args.seq_len + 1) * args.batch_size) * args.epochs
    (args.out / "README.md").write_text(README.format(
        params_m=params / 1e6, layers=config["num_hidden_layers"], hidden=config["hidden_size"],
        heads=config["num_attention_heads"], kv=config["num_key_value_heads"],
        mlp=config["intermediate_size"], vocab=config["vocab_size"], seed=args.seed,
        epochs=args.epochs, tokens=tokens, steps=steps, batch=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, loss=loss, recall=recall, n_facts=n_facts))
    print(f"wrote {args.out} in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
