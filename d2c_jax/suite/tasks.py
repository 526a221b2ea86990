"""The suite's world: made-up languages over shared concepts, task families, example generators.

A *concept* is an integer in [0, C). Language j renders concept c as a made-up word
(`World.words[j][c]`); all languages share the same concepts, so a skill learnt in one language
transfers to another. A *family* is a skill over word sequences (reverse, sort by concept index,
shift each concept to the next in a fixed cycle, ...). A task is (family, language); its prompt
names both: `"reverse l3 : w1 w2 w3 ="`, its response is the transformed sequence.

Everything is a pure function of the seed and of the global family/language index, so a suite with
fewer families or languages holds exactly the same tasks and examples as a bigger one with the
same seed. Shape legend: C concepts, L languages (here: not layers), n examples.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# Families in the order a suite takes them: `families=3` → reverse, sort, shift.
FAMILIES: tuple[str, ...] = ("reverse", "sort", "shift", "dedup", "copy", "rotate", "swap", "skip")
MAX_LANGUAGES = 16
# Every metric of the pinned tasks.json format is used by some family.
FAMILY_METRICS: dict[str, str] = {
    "reverse": "exact_match",
    "sort": "rouge_l",
    "shift": "chrf",
    "dedup": "squad_f1",
    "copy": "exact_match",
    "rotate": "rouge_l",
    "swap": "chrf",
    "skip": "squad_f1",
}
PROMPT_SEP = ":"
PROMPT_END = "="
# Split ids for the per-task random streams (the train split is never written to disk).
SPLITS = {"eval": 0, "search": 1, "train": 2, "pretrain": 3}


def _reverse(c: list[int], w: "World") -> list[int]:
    return c[::-1]


def _sort(c: list[int], w: "World") -> list[int]:
    return sorted(c)


def _shift(c: list[int], w: "World") -> list[int]:
    return [int(w.next_concept[x]) for x in c]


def _dedup(c: list[int], w: "World") -> list[int]:
    return list(dict.fromkeys(c))


def _copy(c: list[int], w: "World") -> list[int]:
    return list(c)


def _rotate(c: list[int], w: "World") -> list[int]:
    return c[1:] + c[:1]


def _swap(c: list[int], w: "World") -> list[int]:
    out = list(c)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _skip(c: list[int], w: "World") -> list[int]:
    return c[::2]


TRANSFORMS: dict[str, Callable[[list[int], "World"], list[int]]] = {
    "reverse": _reverse, "sort": _sort, "shift": _shift, "dedup": _dedup,
    "copy": _copy, "rotate": _rotate, "swap": _swap, "skip": _skip,
}

# Per-language sound inventories, so that languages look different from each other.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def language_name(j: int) -> str:
    """The language tag used in prompts and task names (filesystem-safe)."""
    return f"l{j}"


def task_name(family: str, language: int) -> str:
    return f"{family}_{language_name(language)}"


@dataclasses.dataclass(frozen=True)
class World:
    """The concepts, the languages' lexicons and the fixed structures the families use.

    words: L tuples of C distinct made-up words (distinct across languages too).
    next_concept: int[C], one cycle through all concepts (the `shift` skill).
    successors: int[C, 4] and successor_p: float[C, 4], the concept bigram chain shared by all
    languages (pre-training sentences), so the base model learns more than unigram statistics.
    """

    seed: int
    num_concepts: int
    words: tuple[tuple[str, ...], ...]
    next_concept: np.ndarray
    successors: np.ndarray
    successor_p: np.ndarray

    @property
    def num_languages(self) -> int:
        return len(self.words)


def _language_words(seed: int, j: int, num_concepts: int, taken: set[str]) -> tuple[str, ...]:
    rng = np.random.default_rng([seed, 7001, j])
    cons = "".join(sorted(rng.choice(list(_CONSONANTS), size=6, replace=False)))
    vows = "".join(sorted(rng.choice(list(_VOWELS), size=3, replace=False)))
    coda = bool(j % 2)  # odd languages close their last syllable: another visible difference
    words: list[str] = []
    while len(words) < num_concepts:
        syl = int(rng.integers(2, 4))
        w = "".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(syl))
        if coda:
            w += cons[rng.integers(len(cons))]
        if w in taken:
            continue
        taken.add(w)
        words.append(w)
    return tuple(words)


def reserved_words(num_languages: int) -> list[str]:
    """Non-lexicon words of the vocabulary: family names, language tags, punctuation."""
    return [PROMPT_SEP, PROMPT_END, *FAMILIES, *(language_name(j) for j in range(num_languages))]


def make_world(seed: int, num_languages: int, num_concepts: int) -> World:
    """Builds the world deterministically from the seed (language j does not depend on L)."""
    taken = set(reserved_words(MAX_LANGUAGES))
    words = tuple(_language_words(seed, j, num_concepts, taken) for j in range(num_languages))
    rng = np.random.default_rng([seed, 7002, num_concepts])
    perm = rng.permutation(num_concepts)
    next_concept = np.empty(num_concepts, np.int64)
    next_concept[perm] = np.roll(perm, -1)  # one cycle through every concept
    successors = np.stack([rng.choice(num_concepts, size=4, replace=False) for _ in range(num_concepts)])
    successor_p = rng.dirichlet(np.ones(4), size=num_concepts)
    return World(seed, num_concepts, words, next_concept, successors, successor_p)


def _input_concepts(family: str, rng: np.random.Generator, world: World, min_words: int,
                    max_words: int) -> list[int]:
    n = int(rng.integers(min_words, max_words + 1))
    if family == "dedup":  # needs repeats: draw from a small pool, force at least one
        pool = rng.choice(world.num_concepts, size=max(2, n - 2), replace=False)
        c = [int(x) for x in rng.choice(pool, size=n)]
        if len(set(c)) == n:
            c[int(rng.integers(1, n))] = c[0]
        return c
    return [int(x) for x in rng.choice(world.num_concepts, size=n, replace=False)]


def render(world: World, language: int, concepts: Sequence[int]) -> str:
    return " ".join(world.words[language][c] for c in concepts)


def make_prompt(family: str, language: int, text: str) -> str:
    return f"{family} {language_name(language)} {PROMPT_SEP} {text} {PROMPT_END}"


def example(world: World, family: str, language: int, rng: np.random.Generator,
            min_words: int, max_words: int) -> tuple[str, str]:
    """One (prompt, response) pair of the task (family, language)."""
    c = _input_concepts(family, rng, world, min_words, max_words)
    out = TRANSFORMS[family](c, world)
    return make_prompt(family, language, render(world, language, c)), render(world, language, out)


def task_examples(world: World, family: str, language: int, split: str, n: int, *,
                  min_words: int, max_words: int, exclude: set[str] | None = None) -> list[dict]:
    """n distinct examples of one task, none of whose prompts is in `exclude` (other splits)."""
    rng = np.random.default_rng([world.seed, 7003, FAMILIES.index(family), language, SPLITS[split]])
    seen = set(exclude or ())
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"cannot draw {n} distinct examples of {family}/{language}")
        prompt, response = example(world, family, language, rng, min_words, max_words)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": response})
    return out


def task_splits(world: World, family: str, language: int, sizes: dict[str, int], *,
                min_words: int, max_words: int) -> dict[str, list[dict]]:
    """Disjoint eval / search / train example sets of one task (eval drawn first)."""
    taken: set[str] = set()
    out = {}
    for split in ("eval", "search", "train"):
        out[split] = task_examples(world, family, language, split, sizes[split], min_words=min_words,
                                   max_words=max_words, exclude=taken)
        taken.update(e["prompt"] for e in out[split])
    return out


def concept_walks(world: World, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """int[n, length]: walks on the shared concept chain (pre-training sentences), vectorised."""
    out_nl = np.empty((n, length), np.int64)
    out_nl[:, 0] = rng.integers(world.num_concepts, size=n)
    cum_cp = np.cumsum(world.successor_p, axis=1)
    for i in range(1, length):
        prev_n = out_nl[:, i - 1]
        u_n = rng.random(n)[:, None]
        pick_n = np.minimum((u_n > cum_cp[prev_n]).sum(axis=1), 3)
        out_nl[:, i] = world.successors[prev_n, pick_n]
    return out_nl
