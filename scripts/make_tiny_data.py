"""Generate the tiny synthetic world: a pretraining corpus and a Q&A fine-tuning task.

The world holds animals (food, sound, colour, home) and people (city, job, pet,
drink), each attribute drawn at random from a small pool. The pretraining corpus
states these facts as short declarative sentences ("the cow eats corn."); the
fine-tuning task asks about them in a question format the corpus never uses
("what does the cow eat?" -> "the cow eats corn."). Valid and test ask only about
entities that no training question mentions, so a model passes them by learning
the question format, not by memorising answers: the facts themselves come from
pretraining.

Everything is a pure function of ``--seed`` (numpy's legacy ``RandomState``, whose
streams are frozen), so the files are byte-identical on every run::

    python scripts/make_tiny_data.py --seed 0 --out data

writes ``data/tiny-corpus/corpus.txt`` (one document per line),
``data/tiny-task/{train,valid,test}.jsonl`` plus ``data/tiny-task/README.md``, and
the preference pairs ``data/tiny-preference/{train,valid,test}.jsonl`` and the GRPO prompts
``data/tiny-prompts/{train,valid,test}.jsonl``, each with a README (each from a random stream of
its own, so the other files do not change).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ANIMALS = [
    "cow", "dog", "cat", "horse", "pig", "sheep", "goat", "duck", "hen", "fox",
    "wolf", "bear", "deer", "frog", "owl", "bee", "ant", "mouse", "rat", "lion",
    "tiger", "zebra", "camel", "llama", "seal", "whale", "crab", "snail", "moth", "bat",
    "otter", "lynx", "yak", "swan", "goose", "crow", "toad", "newt", "hare", "mole",
]
FOODS = ["grass", "seeds", "fish", "meat", "bugs", "fruit", "corn", "leaves", "nuts",
         "berries", "honey", "worms"]
SOUNDS = ["moo", "woof", "oink", "baa", "quack", "hiss", "buzz", "roar", "tweet",
          "squeak", "croak", "howl"]
COLOURS = ["red", "blue", "green", "brown", "black", "white", "gray", "pink",
           "orange", "yellow"]
HOMES = ["barn", "forest", "river", "cave", "field", "nest", "pond", "hill", "desert",
         "garden"]
CITIES = ["paris", "oslo", "rome", "cairo", "lima", "tokyo", "delhi", "dublin",
          "vienna", "madrid", "berlin", "boston"]
JOBS = ["baker", "farmer", "doctor", "teacher", "pilot", "singer", "painter", "miner",
        "tailor", "cook", "nurse", "guard"]
DRINKS = ["tea", "milk", "juice", "coffee", "water", "soda", "cocoa", "cider"]

# relation -> (value pool, corpus sentence, question templates). A question's answer
# is always the corpus sentence, so the task reuses what pretraining stored.
ANIMAL_RELATIONS = {
    "food": (FOODS, "the {e} eats {v}.",
             ["what does the {e} eat?", "what food does the {e} eat?",
              "tell me what the {e} eats."]),
    "sound": (SOUNDS, "the {e} says {v}.",
              ["what does the {e} say?", "what sound does the {e} make?",
               "tell me what the {e} says."]),
    "colour": (COLOURS, "the {e} is {v}.",
               ["what color is the {e}?", "which color is the {e}?",
                "tell me the color of the {e}."]),
    "home": (HOMES, "the {e} lives in the {v}.",
             ["where does the {e} live?", "where is the home of the {e}?",
              "tell me where the {e} lives."]),
}
PERSON_RELATIONS = {
    "city": (CITIES, "{e} lives in {v}.",
             ["where does {e} live?", "in which city does {e} live?",
              "tell me where {e} lives."]),
    "job": (JOBS, "{e} is a {v}.",
            ["what is the job of {e}?", "what does {e} do for work?",
             "tell me the job of {e}."]),
    "pet": (ANIMALS, "{e} has a {v}.",
            ["what pet does {e} have?", "which animal does {e} own?",
             "tell me the pet of {e}."]),
    "drink": (DRINKS, "{e} likes {v}.",
              ["what does {e} like to drink?", "which drink does {e} like?",
               "tell me what {e} drinks."]),
}

NUM_PEOPLE = 280
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def make_names(rng: np.random.RandomState, count: int) -> list[str]:
    """Distinct pronounceable names (CVCV or CVCVC) that clash with no world word."""
    taken = set(ANIMALS + FOODS + SOUNDS + COLOURS + HOMES + CITIES + JOBS + DRINKS)
    names: list[str] = []
    while len(names) < count:
        length = 4 if rng.rand() < 0.5 else 5
        name = "".join(rng.choice(list(CONSONANTS if i % 2 == 0 else VOWELS))
                       for i in range(length))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_world(rng: np.random.RandomState) -> list[dict]:
    """All facts of the world: one dict per (entity, relation) with its sentence."""
    entities = [(a, "animal") for a in ANIMALS]
    entities += [(p, "person") for p in make_names(rng, NUM_PEOPLE)]
    facts = []
    for name, kind in entities:
        relations = ANIMAL_RELATIONS if kind == "animal" else PERSON_RELATIONS
        for rel, (pool, sentence, questions) in relations.items():
            candidates = [v for v in pool if v != name]  # no "the cow has a cow."
            value = candidates[rng.randint(len(candidates))]
            text = re.sub(r"\ba (?=[aeiou])", "an ", sentence.format(e=name, v=value))
            facts.append({"entity": name, "kind": kind, "relation": rel, "sentence": text,
                          "questions": [q.format(e=name) for q in questions]})
    return facts


def make_corpus(rng: np.random.RandomState, facts: list[dict], repeats: int) -> list[str]:
    """Documents that state every fact exactly ``repeats`` times.

    Each round splits every entity's facts into one or two runs ("mentions"),
    shuffles the mentions of all entities and packs 1-3 of them per document, so
    a name recurs within a document (which teaches copying) while no fact is
    ever predictable from its own document.
    """
    by_entity: dict[str, list[str]] = {}
    for f in facts:
        by_entity.setdefault(f["entity"], []).append(f["sentence"])
    docs = []
    for _ in range(repeats):
        mentions = []
        for sentences in by_entity.values():
            order = [sentences[i] for i in rng.permutation(len(sentences))]
            cut = rng.randint(1, len(order) + 1)  # cut == len: a single mention
            mentions += [order[:cut]] + ([order[cut:]] if cut < len(order) else [])
        mentions = [mentions[i] for i in rng.permutation(len(mentions))]
        i = 0
        while i < len(mentions):
            take = rng.randint(1, 4)
            docs.append(" ".join(s for m in mentions[i:i + take] for s in m))
            i += take
    return docs


def split_entities(rng: np.random.RandomState, facts: list[dict],
                   held_animals: int, held_people: int) -> tuple[set, set]:
    """Pick disjoint held-out entity sets for valid and test."""
    animals = sorted({f["entity"] for f in facts if f["kind"] == "animal"})
    people = sorted({f["entity"] for f in facts if f["kind"] == "person"})
    animals = [animals[i] for i in rng.permutation(len(animals))]
    people = [people[i] for i in rng.permutation(len(people))]
    valid = set(animals[:held_animals] + people[:held_people])
    test = set(animals[held_animals:2 * held_animals] + people[held_people:2 * held_people])
    return valid, test


def qa_rows(facts: list[dict]) -> list[dict]:
    """One prompt/completion row per (fact, question template)."""
    return [{"prompt": q, "completion": f["sentence"]} for f in facts for q in f["questions"]]


def prompt_rows(facts: list[dict]) -> list[dict]:
    """One GRPO prompt per fact: the corpus sentence without its last word, which is the answer.

    ``{"prompt": "the owl eats", "answer": "worms."}``. The base model finishes such a sentence
    from pretraining, often with the right word, but rarely stops there: sampled, about one
    completion in four is exactly the answer; greedy, it runs on into the next sentence. What
    GRPO's exact-match reward teaches is to answer and stop.
    """
    rows = []
    for f in facts:
        *stem, last = f["sentence"].split()
        rows.append({"prompt": " ".join(stem), "answer": last})
    return rows


def preference_rows(rng: np.random.RandomState, facts: list[dict], entities: set) -> list[dict]:
    """One pair per fact of ``entities``: a question, its answer, and a true sentence that does not answer it.

    The rejected answer is, at even odds, another fact about the same entity
    (the wrong relation: "vito likes tea." to "what pet does vito have?") or
    the same relation's fact about another entity of the set ("kale has a
    lion."). Both are sentences the pretraining corpus states, so the base
    model finds them about as likely as the answer (near chance); telling them
    apart takes the question's relation and name, which is what tuning teaches.
    """
    by_entity: dict[str, dict] = {}
    for f in facts:
        if f["entity"] in entities:
            by_entity.setdefault(f["entity"], {})[f["relation"]] = f
    names = sorted(by_entity)
    rows = []
    for name in names:
        for relation, fact in sorted(by_entity[name].items()):
            question = fact["questions"][rng.randint(len(fact["questions"]))]
            if rng.rand() < 0.5:
                others = [r for r in sorted(by_entity[name]) if r != relation]
                rejected = by_entity[name][others[rng.randint(len(others))]]["sentence"]
            else:
                peers = [n for n in names if n != name and relation in by_entity[n]
                         and by_entity[n][relation]["sentence"].split(" ", 1)[1] != fact["sentence"].split(" ", 1)[1]]
                rejected = by_entity[peers[rng.randint(len(peers))]][relation]["sentence"]
            rows.append({"prompt": question, "chosen": fact["sentence"], "rejected": rejected})
    return [rows[i] for i in rng.permutation(len(rows))]


PREFERENCE_README = """\
# tiny-preference: which sentence answers the question?

Made by `python scripts/make_tiny_data.py --seed {seed} --out data`; do not edit by hand.
Preference pairs on the tiny world of `../tiny-task` (the same people, animals and held-out
entities): a question, the sentence that answers it (`chosen`) and a true sentence of the world
that does not (`rejected`): at even odds another fact about the same entity (the wrong relation)
or the same relation's fact about another entity. Example:
{{"prompt": "{q}", "chosen": "{c}", "rejected": "{r}"}}.
The pretraining corpus states every one of these sentences, so the base model finds the two about
equally likely: it prefers the chosen answer on about half of the held-out pairs (near chance).
Valid and test ask only about the held-out entities of `../tiny-task`. Pairs: train {n_train}, valid
{n_valid}, test {n_test}; one question template per fact, drawn at random.
"""


PROMPTS_README = """\
# tiny-prompts: finish the sentence, and stop

Made by `python scripts/make_tiny_data.py --seed {seed} --out data`; do not edit by hand.
GRPO prompts on the tiny world of `../tiny-task`: a sentence of the pretraining corpus without its
last word, and that word as the answer, e.g. {{"prompt": "{p}", "answer": "{a}"}}. The prompts are
plain text (`data.format: text`): the base model continues them as it continues its corpus. It
often names the right word, but rarely stops after it, so an exact-match reward (the completion is
the answer and nothing more) starts low and teaches it to answer and stop. Valid and test ask only
about the held-out entities of `../tiny-task`. Rows: train {n_train}, valid {n_valid}, test {n_test}.
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


README = """\
# tiny-task: questions about a synthetic world

Made by `python scripts/make_tiny_data.py --seed {seed} --out data`; do not edit by hand.
A world of {animals} animals (food, sound, colour, home) and {people} people (city, job, pet,
drink) is stated as plain sentences in `../tiny-corpus/corpus.txt`, on which `../tiny-llama`
was pretrained. Here the same facts are asked as questions, a format the corpus never uses:
{{"prompt": "{q}", "completion": "{a}"}}. The completion is the corpus
sentence, so fine-tuning teaches the format and when to stop; the facts come from pretraining.
Valid and test ask only about held-out entities ({held_a} animals and {held_p} people each) that
no training row mentions. Rows: train {n_train}, valid {n_valid}, test {n_test}; three question
templates per relation. Score: greedy completion after the chat template, stripped, equal to
the completion: 0% before tuning; 85-93% in our runs after 200 LoRA steps at batch 8
(rank 8, scale 10, lr 3e-4, --mask-prompt). Keep scale x lr below ~5e-3: larger diverges.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="world and split seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("data"),
                        help="folder that receives tiny-corpus/ and tiny-task/ (default data)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="times the corpus states each fact (default 20)")
    parser.add_argument("--eval-rows", type=int, default=200,
                        help="rows in each of valid and test (default 200)")
    args = parser.parse_args(argv)

    rng = np.random.RandomState(args.seed)
    facts = make_world(rng)
    docs = make_corpus(rng, facts, args.repeats)
    held_animals, held_people = 4, 24
    valid_ents, test_ents = split_entities(rng, facts, held_animals, held_people)

    train = qa_rows([f for f in facts if f["entity"] not in valid_ents | test_ents])
    valid = qa_rows([f for f in facts if f["entity"] in valid_ents])
    test = qa_rows([f for f in facts if f["entity"] in test_ents])
    train = [train[i] for i in rng.permutation(len(train))]
    valid = [valid[i] for i in sorted(rng.permutation(len(valid))[:args.eval_rows])]
    test = [test[i] for i in sorted(rng.permutation(len(test))[:args.eval_rows])]

    corpus_dir, task_dir = args.out / "tiny-corpus", args.out / "tiny-task"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    (corpus_dir / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        write_jsonl(task_dir / f"{name}.jsonl", rows)
    pref_dir = args.out / "tiny-preference"
    pref_dir.mkdir(parents=True, exist_ok=True)
    pref_rng = np.random.RandomState([args.seed, 1])  # a stream of its own: the files above stay as they were
    held_out = valid_ents | test_ents
    prefs = {"train": preference_rows(pref_rng, facts, {f["entity"] for f in facts} - held_out),
             "valid": preference_rows(pref_rng, facts, valid_ents),
             "test": preference_rows(pref_rng, facts, test_ents)}
    for name, rows in prefs.items():
        write_jsonl(pref_dir / f"{name}.jsonl", rows)
    prompt_dir = args.out / "tiny-prompts"
    prompt_dir.mkdir(parents=True, exist_ok=True)
    prompt_rng = np.random.RandomState([args.seed, 2])  # its own stream too
    train_facts = [f for f in facts if f["entity"] not in held_out]
    prompts = {"train": [prompt_rows(train_facts)[i] for i in prompt_rng.permutation(len(train_facts))]}
    for name, ents in (("valid", valid_ents), ("test", test_ents)):
        rows = prompt_rows([f for f in facts if f["entity"] in ents])
        prompts[name] = [rows[i] for i in sorted(prompt_rng.permutation(len(rows))[:args.eval_rows // 2])]
    for name, rows in prompts.items():
        write_jsonl(prompt_dir / f"{name}.jsonl", rows)
    (prompt_dir / "README.md").write_text(PROMPTS_README.format(
        seed=args.seed, p=prompts["train"][0]["prompt"], a=prompts["train"][0]["answer"],
        n_train=len(prompts["train"]), n_valid=len(prompts["valid"]), n_test=len(prompts["test"])), encoding="utf-8")
    first = prefs["train"][0]
    (pref_dir / "README.md").write_text(PREFERENCE_README.format(
        seed=args.seed, q=first["prompt"], c=first["chosen"], r=first["rejected"], n_train=len(prefs["train"]),
        n_valid=len(prefs["valid"]), n_test=len(prefs["test"])), encoding="utf-8")
    (task_dir / "README.md").write_text(README.format(
        seed=args.seed, animals=len(ANIMALS), people=NUM_PEOPLE, q=train[0]["prompt"],
        a=train[0]["completion"], held_a=held_animals, held_p=held_people,
        n_train=len(train), n_valid=len(valid), n_test=len(test)), encoding="utf-8")
    size = (corpus_dir / "corpus.txt").stat().st_size
    print(f"corpus: {len(docs)} documents, {size / 1e6:.2f} MB -> {corpus_dir}/corpus.txt")
    print(f"task: train {len(train)}, valid {len(valid)}, test {len(test)} -> {task_dir}/")
    print(f"preference: train {len(prefs['train'])}, valid {len(prefs['valid'])}, test {len(prefs['test'])} "
          f"-> {pref_dir}/")
    print(f"prompts: train {len(prompts['train'])}, valid {len(prompts['valid'])}, test {len(prompts['test'])} "
          f"-> {prompt_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
