"""The miniature experiment's text: a seeded grammar of short sentences over a small vocabulary.

Every sentence is ``the <size> <agent> <verb> the <thing> <prep> the <place>`` (9 words). Each agent has
ONE thing and ONE place it goes with (``dog → bone, park``), an arbitrary pairing that a model can
only learn from the data; size, verb and preposition are free. So the first four words (the
*context*, ``the big dog finds``) determine the last five (the *ending*, ``the bone near the park``) and
a continuation test can ask: given the context, is this ending the right one or another agent's?

Held-out sentences are whole (size, agent, verb) combinations never seen in training, so a model
cannot pass the test by recalling a sentence; it must have learned the agent → ending pairing.

Non-words for the lexical test are the vocabulary's words with their vowels rotated (``dog → dug``),
kept only if they are not themselves words of the grammar.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

SIZES = ("big", "small", "old", "young")
VERBS = ("finds", "wants", "sees", "takes")
PREPS = ("near", "by")  # not "in": eSpeak reports "in the" as ONE word event (no timing for "the")
# agent, thing, place: a fixed, arbitrary pairing
PAIRINGS = (
    ("dog", "bone", "park"),
    ("cat", "milk", "kitchen"),
    ("bird", "seed", "garden"),
    ("horse", "hay", "barn"),
    ("fish", "worm", "river"),
    ("king", "crown", "castle"),
    ("baker", "bread", "shop"),
    ("child", "kite", "field"),
)
N_CONTEXT_WORDS = 4


@dataclasses.dataclass(frozen=True)
class Sentence:
    size: str
    agent: str
    verb: str
    prep: str

    @property
    def thing(self) -> str:
        return _THING[self.agent]

    @property
    def place(self) -> str:
        return _PLACE[self.agent]

    @property
    def context(self) -> str:
        return f"the {self.size} {self.agent} {self.verb}"

    @property
    def ending(self) -> str:
        return ending_of(self.agent, self.prep)

    @property
    def text(self) -> str:
        return f"{self.context} {self.ending}"


_THING = {a: t for a, t, _ in PAIRINGS}
_PLACE = {a: p for a, _, p in PAIRINGS}
AGENTS = tuple(a for a, _, _ in PAIRINGS)


def ending_of(agent: str, prep: str) -> str:
    return f"the {_THING[agent]} {prep} the {_PLACE[agent]}"


def vocabulary() -> list[str]:
    words = {"the", *SIZES, *VERBS, *PREPS}
    for triple in PAIRINGS:
        words.update(triple)
    return sorted(words)


def all_sentences() -> list[Sentence]:
    return [Sentence(s, a, v, p) for s, a, v, p in itertools.product(SIZES, AGENTS, VERBS, PREPS)]


def split_combinations(seed: int, held_out_fraction: float = 0.25) -> tuple[set, set]:
    """(train, held-out) sets of (size, agent, verb) combinations; every agent keeps training combinations."""
    rng = np.random.default_rng(seed)
    train, held = set(), set()
    for agent in AGENTS:
        combos = [(s, agent, v) for s in SIZES for v in VERBS]
        order = rng.permutation(len(combos))
        n_held = int(round(held_out_fraction * len(combos)))
        for k, i in enumerate(order):
            (held if k < n_held else train).add(combos[i])
    return train, held


def nonword(word: str) -> str | None:
    """``word`` with each vowel replaced by the next in a, e, i, o, u (``dog → dug``); None if that is a word."""
    nxt = {"a": "e", "e": "i", "i": "o", "o": "u", "u": "a"}
    w = "".join(nxt.get(c, c) for c in word)
    return None if w == word or w in set(vocabulary()) else w
