"""Evaluation tasks, generated deterministically from a seed (RULER-style synthetic tasks on real essay text,
multi-document QA from real passages, and two fidelity measures that work on any model).

RULER: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654. Needles, variable tracking and common-word extraction follow its task definitions.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

from ..data import essays

QA_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "qa")
TASKS = (*QA_TASKS, "fidelity", "longgen")


@dataclass
class Sample:
    """One evaluation example.

    QA-style tasks: `context` is compressed, then `question` is asked; `answer_prefix` starts the model's answer
    (as RULER does for vt/cwe); `references` are scored by case-insensitive substring match, "all" (fraction found)
    or "any" (1 if one is found). Fidelity/longgen carry token ids instead.
    """

    task: str
    index: int
    context: str = ""
    question: str = ""
    references: list[str] = field(default_factory=list)
    match: str = "all"
    answer_prefix: str = ""
    context_ids: list[int] | None = None
    continuation_ids: list[int] | None = None
    meta: dict = field(default_factory=dict)


def check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------------ text pools
def _essay_ids(tokenizer, offset: int, n_tokens: int) -> list[int]:
    texts = [text for _, text in essays()]
    ids: list[int] = []
    i = offset
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(texts[i % len(texts)] + "\n\n", add_special_tokens=False))
        i += 1
    return ids[:n_tokens]


def _word_pool() -> list[str]:
    """Distinct lowercase words of the essays (5-10 letters), sorted: keys and filler words for synthetic tasks."""
    words = set()
    for _, text in essays():
        words.update(w for w in re.findall(r"[a-z]+", text.lower()) if 5 <= len(w) <= 10)
    return sorted(words)


def _filler(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """About n_tokens tokens of essay text starting at a random essay."""
    return tokenizer.decode(_essay_ids(tokenizer, rng.randrange(10_000), n_tokens))


def _insert(text: str, items: list[tuple[float, str]]) -> str:
    """Put each (depth, text) at the sentence or line boundary closest to that fraction of the text."""
    bounds = [0] + [m.end() for m in re.finditer(r"[.!?]\s+|\n+", text)] + [len(text)]
    placed = []
    for depth, needle in items:
        at = min(bounds, key=lambda b: abs(b - depth * len(text)))
        placed.append((at, needle))
    for at, needle in sorted(placed, key=lambda x: -x[0]):  # from the end, so earlier offsets stay valid
        text = text[:at] + needle + " " + text[at:]
    return text


def _budget(tokenizer, context_length: int, reserved: list[str]) -> int:
    """Filler tokens left once the reserved texts (needles, question) are counted, with a small margin."""
    used = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in reserved)
    return max(16, context_length - used - 64)


def _depth(index: int, n: int) -> float:
    """Needle depths spread evenly over the samples (RULER sweeps depth the same way)."""
    return 0.5 if n == 1 else 0.05 + 0.9 * index / (n - 1)


def _key(rng: random.Random, pool: list[str]) -> str:
    return f"{rng.choice(pool)}-{rng.choice(pool)}"


def _magic(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


# ------------------------------------------------------------------------------------------ generators
NEEDLE = "One of the special magic numbers for {key} is: {value}."


def niah(tokenizer, context_length: int, n: int, seed: int, kind: str) -> list[Sample]:
    """Needle-in-a-haystack variants: single, multikey (3 distractor keys), multivalue (4 values), multiquery (4 keys)."""
    pool = _word_pool()
    samples = []
    for i in range(n):
        rng = random.Random(f"{kind}-{seed}-{i}")
        depth = _depth(i, n)
        keys = [_key(rng, pool) for _ in range(4)]
        if kind == "niah_single":
            needles = [(depth, keys[0], _magic(rng))]
            asked = keys[:1]
        elif kind == "niah_multikey":
            needles = [(depth, keys[0], _magic(rng))] + [(rng.random(), k, _magic(rng)) for k in keys[1:]]
            asked = keys[:1]
        elif kind == "niah_multivalue":
            needles = [(depth, keys[0], _magic(rng))] + [(rng.random(), keys[0], _magic(rng)) for _ in range(3)]
            asked = keys[:1]
        elif kind == "niah_multiquery":
            needles = [(depth, keys[0], _magic(rng))] + [(rng.random(), k, _magic(rng)) for k in keys[1:]]
            asked = keys
        else:
            raise ValueError(f"unknown needle task {kind!r}")
        texts = [NEEDLE.format(key=k, value=v) for _, k, v in needles]
        if kind == "niah_multivalue":
            question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        elif kind == "niah_multiquery":
            question = ("What are all the special magic numbers for " + ", ".join(asked[:-1]) + f", and {asked[-1]} "
                        "mentioned in the provided text?")
        else:
            question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        refs = [v for _, k, v in needles if k in asked]
        filler = _filler(tokenizer, _budget(tokenizer, context_length, texts + [question]), rng)
        context = _insert(filler, [(d, t) for (d, _, _), t in zip(needles, texts)])
        samples.append(Sample(kind, i, context, question, refs, "all", meta={"depth": round(depth, 3)}))
    return samples


def variable_tracking(tokenizer, context_length: int, n: int, seed: int, hops: int = 4) -> list[Sample]:
    """A chain `VAR A = 12345`, `VAR B = VAR A`, ... hidden in essay text; find every variable holding the value."""
    samples = []
    for i in range(n):
        rng = random.Random(f"vt-{seed}-{i}")
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10_000, 100_000))
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(hops)]
        depths = sorted(rng.uniform(0.02, 0.98) for _ in statements)
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
                  f"assigned the value {value}, they are:")
        filler = _filler(tokenizer, _budget(tokenizer, context_length, statements + [question, prefix]), rng)
        context = _insert(filler, list(zip(depths, statements)))
        samples.append(Sample("vt", i, context, question, names, "all", answer_prefix=prefix))
    return samples


def common_words(tokenizer, context_length: int, n: int, seed: int, top: int = 10) -> list[Sample]:
    """A numbered word list where `top` words repeat often (RULER: 30x) and the rest rarely (3x)."""
    pool = _word_pool()
    samples = []
    for i in range(n):
        rng = random.Random(f"cwe-{seed}-{i}")
        tokens_per_word = 4  # "12. word\n" is about this many tokens; sized by measuring below
        words = rng.sample(pool, 400)
        common, rare = words[:top], words[top:]
        n_words = max(top * 6, (context_length - 200) // tokens_per_word)
        freq_common = max(6, min(30, n_words // (top * 4)))
        rare_count = max(0, (n_words - freq_common * top) // 3)
        listing = common * freq_common + [w for w in rare[:rare_count] for _ in range(3)]
        rng.shuffle(listing)
        text = "\n".join(f"{j + 1}. {w}" for j, w in enumerate(listing))
        ids = tokenizer.encode(text, add_special_tokens=False)
        while len(ids) > context_length - 150 and rare_count > 0:  # trim rare words until it fits
            rare_count = int(rare_count * 0.9)
            listing = common * freq_common + [w for w in rare[:rare_count] for _ in range(3)]
            rng.shuffle(listing)
            text = "\n".join(f"{j + 1}. {w}" for j, w in enumerate(listing))
            ids = tokenizer.encode(text, add_special_tokens=False)
        question = f"What are the {top} most common words in the above list?"
        prefix = f"The top {top} words that appear most often in the list are:"
        samples.append(Sample("cwe", i, "Below is a numbered list of words.\n" + text, question, common, "all",
                              answer_prefix=prefix, meta={"frequency": freq_common}))
    return samples


def multi_doc_qa(tokenizer, context_length: int, n: int, seed: int, pool: list[dict]) -> list[Sample]:
    """A real passage with its question, among distractor passages up to the context length; "any" answer counts.

    `pool`: dicts with "passage", "question", "answers" (see eval/qa_data.py for the installed source).
    """
    if len(pool) < 2:
        raise ValueError("the QA pool needs at least two passages")
    samples = []
    for i in range(n):
        rng = random.Random(f"qa-{seed}-{i}")
        gold = pool[rng.randrange(len(pool))]
        question = f"Answer the question based on the given documents. Only give me the answer.\n\nQuestion: {gold['question']}"
        budget = context_length - len(tokenizer.encode(question, add_special_tokens=False)) - 64
        docs, used = [gold["passage"]], len(tokenizer.encode(gold["passage"], add_special_tokens=False))
        while True:
            other = pool[rng.randrange(len(pool))]
            if other["passage"] in docs:
                if len(docs) >= len({p["passage"] for p in pool}):
                    break
                continue
            cost = len(tokenizer.encode(other["passage"], add_special_tokens=False)) + 6
            if used + cost > budget:
                break
            docs.append(other["passage"])
            used += cost
        order = docs[1:]
        depth = _depth(i, n)
        order.insert(round(depth * len(order)), docs[0])
        context = "\n\n".join(f"Document {j + 1}:\n{p}" for j, p in enumerate(order))
        samples.append(Sample("qa", i, context, question, list(gold["answers"]), "any",
                              meta={"depth": round(depth, 3), "documents": len(order)}))
    return samples


def fidelity(tokenizer, context_length: int, n: int, seed: int, continuation: int = 64, source: str = "essays"):
    """Natural text: `context_length - continuation` tokens of context, then `continuation` tokens to teacher-force."""
    samples = []
    for i in range(n):
        rng = random.Random(f"fidelity-{seed}-{i}")
        ids = _text_ids(tokenizer, context_length, rng, source)
        cut = context_length - continuation
        samples.append(Sample("fidelity", i, context_ids=ids[:cut], continuation_ids=ids[cut:],
                              meta={"source": source}))
    return samples


def long_generation(tokenizer, context_length: int, n: int, seed: int, new_tokens: int = 256, source: str = "essays"):
    """A prompt of `context_length` tokens of natural text; the model continues it for `new_tokens` tokens."""
    samples = []
    for i in range(n):
        rng = random.Random(f"longgen-{seed}-{i}")
        samples.append(Sample("longgen", i, context_ids=_text_ids(tokenizer, context_length, rng, source),
                              meta={"new_tokens": new_tokens, "source": source}))
    return samples


def _text_ids(tokenizer, n_tokens: int, rng: random.Random, source: str) -> list[int]:
    if source == "essays":
        return _essay_ids(tokenizer, rng.randrange(10_000), n_tokens)
    if source == "pydoc":
        from ..data import pydoc_topics

        topics = [text for _, text in pydoc_topics()]
        start = rng.randrange(len(topics))
        ids: list[int] = []
        j = start
        while len(ids) < n_tokens:
            ids.extend(tokenizer.encode(topics[j % len(topics)] + "\n\n", add_special_tokens=False))
            j += 1
        return ids[:n_tokens]
    raise ValueError(f"unknown text source {source!r}; use 'essays' or 'pydoc'")


def make_samples(task: str, tokenizer, context_length: int, n: int, seed: int, qa_pool: list[dict] | None = None,
                 **options) -> list[Sample]:
    """The `n` samples of `task` (same seed, same samples)."""
    check_task(task)
    if task.startswith("niah"):
        return niah(tokenizer, context_length, n, seed, task)
    if task == "vt":
        return variable_tracking(tokenizer, context_length, n, seed)
    if task == "cwe":
        return common_words(tokenizer, context_length, n, seed)
    if task == "qa":
        if qa_pool is None:
            from .qa_data import load_qa_pool

            qa_pool = load_qa_pool()
        return multi_doc_qa(tokenizer, context_length, n, seed, qa_pool)
    if task == "fidelity":
        return fidelity(tokenizer, context_length, n, seed, **options)
    return long_generation(tokenizer, context_length, n, seed, **options)
