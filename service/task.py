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
    {"type": "lowercase"}                  no capital letters
    {"type": "include_word", "word": str}  the word appears
    {"type": "end_with", "phrase": str}    the answer ends with the phrase
    {"type": "no_commas"}                  no commas
    {"type": "bullet_points", "n": int}    exactly n lines starting with "- "
"""

from __future__ import annotations

import random
from typing import Any, Literal

from service.contracts import ChatMessage, PromptEvent

SOURCE = "bundled-constraints"
TASK_KIND = "constraints"
CONSTRAINT_TYPES = ("max_words", "lowercase", "include_word", "end_with", "no_commas", "bullet_points")

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

INSTRUCTIONS = ("Describe {t}.", "Write a few sentences about {t}.", "Tell me about {t}.", "Say something nice about {t}.")
# Common words a small model uses now and then without being asked.
INCLUDE_WORDS = ("important", "people", "simple", "beautiful", "always", "every", "world", "time", "life", "day")
END_PHRASES = ("that is all.", "the end.", "thank you.", "have a nice day.")


def describe(constraint: dict[str, Any]) -> str:
    """The constraint as the sentence the user turn states."""
    kind = constraint["type"]
    if kind == "max_words":
        return f"Use at most {constraint['n']} words."
    if kind == "lowercase":
        return "Write only in lowercase letters."
    if kind == "include_word":
        return f'Include the word "{constraint["word"]}".'
    if kind == "end_with":
        return f'End your answer with the phrase "{constraint["phrase"]}"'
    if kind == "no_commas":
        return "Do not use any commas."
    if kind == "bullet_points":
        return f'Answer with exactly {constraint["n"]} bullet points, each on its own line starting with "- ".'
    raise ValueError(f"unknown constraint type {kind!r}")


def _constraint(kind: str, rng: random.Random, bullets: bool) -> dict[str, Any]:
    if kind == "max_words":
        # Bulleted answers need a few words per bullet to stay satisfiable.
        return {"type": kind, "n": rng.randint(15, 30) if bullets else rng.randint(10, 30)}
    if kind == "include_word":
        return {"type": kind, "word": rng.choice(INCLUDE_WORDS)}
    if kind == "end_with":
        return {"type": kind, "phrase": rng.choice(END_PHRASES)}
    if kind == "bullet_points":
        return {"type": kind, "n": rng.randint(2, 4)}
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
    return [_constraint(k, rng, bullets) for k in kinds]


def make_prompt(split: Literal["train", "heldout"], index: int, seed: int = 0) -> PromptEvent:
    """The `index`-th prompt of a split; the same arguments always give the same prompt."""
    topics = _TOPICS.get(split)
    if topics is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    # Topics go round in a seeded order, so consecutive prompts cover all topics before repeating one.
    order = list(topics)
    random.Random(f"odpo-task/{split}/{seed}/topics").shuffle(order)
    topic = order[index % len(order)]
    rng = random.Random(f"odpo-task/{split}/{seed}/{index}")
    instruction = rng.choice(INSTRUCTIONS).format(t=topic)
    constraints = _constraints(rng)
    text = " ".join([instruction] + [describe(c) for c in constraints])
    return PromptEvent(
        id=f"{split}-{index:04d}",
        messages=[ChatMessage(role="user", content=text)],
        task={"kind": TASK_KIND, "topic": topic, "constraints": constraints},
        source=SOURCE,
    )


def make_prompts(split: Literal["train", "heldout"], n: int, seed: int = 0) -> list[PromptEvent]:
    """The first `n` prompts of a split (ids `train-0000`, ... or `heldout-0000`, ...)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_prompt(split, i, seed) for i in range(n)]
