"""The bundled task: short instructions with constraints a program can check.

Each prompt asks for a few words on a topic ("Describe the ocean.") and adds
one to three constraints stated in plain words ("Use at most 20 words. Do not
use any commas."). A 135M instruct model satisfies such constraints sometimes
and not other times, so the n samples of one prompt usually score differently
(that gap is what makes a preference pair), and the mean score on held-out
prompts measures whether the policy got better, on a CPU in minutes.

Generation is deterministic: every prompt comes from its own
`random.Random` seeded with a string (hashed with SHA-512 by Python, so the
same on every run and Python version), so `make_prompts(s, n)` is a prefix of
`make_prompts(s, n + k)`. Train and held-out prompts use disjoint topics and
disjoint id prefixes.

The constraint dicts are the contract with the verifier judge
(`judge/verifier.py`): `task = {"kind": "constraints", "constraints": [...]}`
with items
    {"type": "max_words", "n": int}        at most n words
    {"type": "min_words", "n": int}        at least n words (always beside max_words: "Use between 6 and 20 words.")
    {"type": "lowercase"}                  no capital letters
    {"type": "include_word", "word": str}  the word appears
    {"type": "end_with", "phrase": str}    the answer ends with the phrase
    {"type": "no_commas"}                  no commas
    {"type": "bullet_points", "n": int, "min_words": int}
                                           exactly n lines starting with "- ", each with at least min_words words
    {"type": "on_topic", "words": [str]}   the answer names its topic (one of the words)

Why the last three: an online loop optimizes exactly what its judge checks.
With only the first six, a policy learned that "no" satisfies "lowercase, no
commas" and "beautiful." satisfies "include the word beautiful" (verifier
score 1.0, an answer nobody wants). So every prompt also asks for what a
helpful answer needs: it is about its topic (`on_topic`, implied by the
instruction "Describe the beach."), has a minimum length where a maximum
applies (stated: "Use between 6 and 20 words."), and its bullets have content
(stated: "each a short sentence of at least 3 words").
"""

from __future__ import annotations

import random
from typing import Any, Literal

from service import task_formats
from core.contracts import ChatMessage, PromptEvent

SOURCE = "bundled-constraints"
FORMATS_SOURCE = "bundled-formats"
# 2: min_words, bullet content and on_topic added; 3: the format families (service/task_formats.py) and the
# mixed curriculum. Scores of different versions are not comparable.
TASK_VERSION = 3
CURRICULA = ("basic", "formats", "mixed")
TASK_KIND = "constraints"
CONSTRAINT_TYPES = ("max_words", "lowercase", "include_word", "end_with", "no_commas", "bullet_points")
# Added to every prompt (on_topic) or beside another constraint (min_words with max_words), never drawn alone.
SUBSTANCE_TYPES = ("min_words", "on_topic")
BULLET_MIN_WORDS = 3

TRAIN_TOPICS = (
    "the ocean", "autumn", "your favorite food", "a busy city", "the moon", "rainy days", "a good friend",
    "learning to cook", "trees", "the night sky", "a library", "music", "sleep", "winter", "a garden",
    "bicycles", "coffee", "mountains", "the sun", "a small village", "birds", "summer holidays",
    "reading books", "a farm",
)
HELDOUT_TOPICS = (
    "the desert", "a train journey", "snow", "a river", "chess", "the zoo", "bread", "a lighthouse",
    "spring flowers", "the beach", "a museum", "swimming",
)
_TOPICS = {"train": TRAIN_TOPICS, "heldout": HELDOUT_TOPICS}
# Words that name each topic: an answer about the topic uses one of them (checked as whole words, any case).
TOPIC_WORDS = {
    "the ocean": ("ocean", "oceans", "sea", "seas"), "autumn": ("autumn", "fall"),
    "your favorite food": ("food", "foods", "dish", "dishes", "meal", "meals"),
    "a busy city": ("city", "cities", "town", "streets", "street"), "the moon": ("moon", "lunar"),
    "rainy days": ("rain", "rainy", "raining", "rains"), "a good friend": ("friend", "friends", "friendship"),
    "learning to cook": ("cook", "cooking", "cooks", "recipe", "recipes", "kitchen"),
    "trees": ("tree", "trees", "forest", "forests"), "the night sky": ("sky", "night", "stars", "star"),
    "a library": ("library", "libraries", "books", "book"), "music": ("music", "musical", "song", "songs"),
    "sleep": ("sleep", "sleeping", "asleep", "rest"), "winter": ("winter", "winters"),
    "a garden": ("garden", "gardens", "gardening"), "bicycles": ("bicycle", "bicycles", "bike", "bikes", "cycling"),
    "coffee": ("coffee", "coffees", "espresso"), "mountains": ("mountain", "mountains", "peak", "peaks"),
    "the sun": ("sun", "sunlight", "sunshine", "solar"), "a small village": ("village", "villages"),
    "birds": ("bird", "birds"), "summer holidays": ("summer", "holiday", "holidays", "vacation"),
    "reading books": ("reading", "read", "books", "book"), "a farm": ("farm", "farms", "farmer", "farming"),
    "the desert": ("desert", "deserts", "sand", "dunes"), "a train journey": ("train", "trains", "journey", "railway"),
    "snow": ("snow", "snowy", "snowflakes", "snowfall"), "a river": ("river", "rivers", "stream"),
    "chess": ("chess",), "the zoo": ("zoo", "zoos", "animals"), "bread": ("bread", "breads", "loaf", "baking"),
    "a lighthouse": ("lighthouse", "lighthouses"), "spring flowers": ("spring", "flower", "flowers", "blossoms"),
    "the beach": ("beach", "beaches", "shore", "sand"), "a museum": ("museum", "museums", "exhibits", "exhibit"),
    "swimming": ("swimming", "swim", "swimmer", "swimmers", "pool"),
}

INSTRUCTIONS = ("Describe {t}.", "Write a few sentences about {t}.", "Tell me about {t}.", "Say something nice about {t}.")
# Common words a small model uses now and then without being asked.
INCLUDE_WORDS = ("important", "people", "simple", "beautiful", "always", "every", "world", "time", "life", "day")
END_PHRASES = ("that is all.", "the end.", "thank you.", "have a nice day.")


def describe(constraint: dict[str, Any]) -> str:
    """The constraint as the sentence the user turn states."""
    kind = constraint["type"]
    if kind == "max_words":
        return f"Use at most {constraint['n']} words."
    if kind == "min_words":
        return f"Use at least {constraint['n']} words."
    if kind == "lowercase":
        return "Write only in lowercase letters."
    if kind == "include_word":
        return f'Include the word "{constraint["word"]}".'
    if kind == "end_with":
        return f'End your answer with the phrase "{constraint["phrase"]}"'
    if kind == "no_commas":
        return "Do not use any commas."
    if kind == "bullet_points":
        content = f'a short sentence of at least {constraint["min_words"]} words ' if "min_words" in constraint else ""
        return f'Answer with exactly {constraint["n"]} bullet points, each {content}on its own line starting with "- ".'
    if kind == "on_topic":
        return ""  # the instruction names the topic ("Describe the beach.")
    stated = task_formats.describe(constraint)
    if stated is None:
        raise ValueError(f"unknown constraint type {kind!r}")
    return stated


def state(constraints: list[dict[str, Any]]) -> str:
    """The sentences a user turn states for `constraints` (a word range reads as one sentence)."""
    by_type = {c["type"]: c for c in constraints}
    parts = []
    for c in constraints:
        if c["type"] == "min_words" and "max_words" in by_type:
            continue
        if c["type"] == "max_words" and "min_words" in by_type:
            parts.append(f"Use between {by_type['min_words']['n']} and {c['n']} words.")
        elif describe(c):
            parts.append(describe(c))
    return " ".join(parts)


def _constraint(kind: str, rng: random.Random, bullets: bool) -> dict[str, Any]:
    if kind == "max_words":
        # Bulleted answers need a few words per bullet to stay satisfiable.
        return {"type": kind, "n": rng.randint(15, 30) if bullets else rng.randint(12, 30)}
    if kind == "include_word":
        return {"type": kind, "word": rng.choice(INCLUDE_WORDS)}
    if kind == "end_with":
        return {"type": kind, "phrase": rng.choice(END_PHRASES)}
    if kind == "bullet_points":
        return {"type": kind, "n": rng.randint(2, 4), "min_words": BULLET_MIN_WORDS}
    return {"type": kind}


def _constraints(rng: random.Random) -> list[dict[str, Any]]:
    count = rng.randint(1, 3)
    while True:
        kinds = rng.sample(CONSTRAINT_TYPES, count)
        # The last line of a bulleted answer is a bullet: asking it to end with a
        # closing phrase as well reads as a contradiction, so never combine them.
        if not ("bullet_points" in kinds and "end_with" in kinds):
            break
    bullets = "bullet_points" in kinds
    out = [_constraint(k, rng, bullets) for k in kinds]
    for c in list(out):
        if c["type"] == "max_words":  # a limit without a floor rewards one-word answers
            out.append({"type": "min_words", "n": max(4, c["n"] // 3)})
    return out


def _formats_constraints(rng: random.Random, request: str) -> list[dict[str, Any]]:
    kinds = task_formats.draw_kinds(rng)
    layout = bool(task_formats.MULTI_PART.intersection(kinds))
    out = []
    for k in kinds:
        if k in task_formats.FORMAT_TYPES:
            out.append(task_formats.constraint(k, rng, request))
        elif k == "max_words" and layout:  # several parts need room
            out.append({"type": k, "n": rng.randint(25, 50)})
        else:
            out.append(_constraint(k, rng, "bullet_points" in kinds))
    for c in list(out):
        if c["type"] == "max_words":
            out.append({"type": "min_words", "n": max(4, c["n"] // 3)})
    return out


def make_prompt(split: Literal["train", "heldout"], index: int, seed: int = 0, curriculum: str = "basic") -> PromptEvent:
    """The `index`-th prompt of a split; the same arguments always give the same prompt.

    `basic`: the first six constraints; `formats`: at least one of the format families; `mixed`
    (what the loop trains and the gate evaluates on): even indexes basic, odd ones formats.
    """
    topics = _TOPICS.get(split)
    if topics is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if curriculum not in CURRICULA:
        raise ValueError(f"curriculum must be one of {', '.join(CURRICULA)}, got {curriculum!r}")
    if curriculum == "mixed":
        return make_prompt(split, index // 2, seed, "formats" if index % 2 else "basic")
    formats = curriculum == "formats"
    # Topics go round in a seeded order, so consecutive prompts cover all topics before repeating one.
    order = list(topics)
    random.Random(f"odpo-task/{split}/{seed}/topics{'/formats' if formats else ''}").shuffle(order)
    topic = order[index % len(order)]
    rng = random.Random(f"odpo-task/{split}/{seed}/{'formats/' if formats else ''}{index}")
    instruction = rng.choice(INSTRUCTIONS).format(t=topic)
    constraints = _formats_constraints(rng, instruction) if formats else _constraints(rng)
    text = " ".join(filter(None, [instruction, state(constraints)]))
    constraints.append({"type": "on_topic", "words": list(TOPIC_WORDS[topic])})
    return PromptEvent(
        id=f"{split}-{'f' if formats else ''}{index:04d}",
        messages=[ChatMessage(role="user", content=text)],
        task={"kind": TASK_KIND, "topic": topic, "constraints": constraints},
        source=FORMATS_SOURCE if formats else SOURCE,
    )


def make_prompts(split: Literal["train", "heldout"], n: int, seed: int = 0, curriculum: str = "basic") -> list[PromptEvent]:
    """The first `n` prompts of a split (ids `train-0000`, ... or `heldout-0000`, ...; `-f0000` for formats)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_prompt(split, i, seed, curriculum) for i in range(n)]
