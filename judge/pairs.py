"""From a judged candidate set to preference pairs that do not teach the wrong lesson.

Which pairs are considered (`strategy`):
- `best_vs_worst` (default): the highest against the lowest score, the widest
  margin a set offers, one pair per set, so the trainer's windows spread over
  many prompts;
- `all_pairs`: every two responses whose scores differ;
- `top_k`: each of the k best against each of the k worst.

Each candidate pair is then dropped, with a counted reason, when:
- `identical`: both texts are the same (nothing to tell apart);
- `tie`: the scores are equal, or a pairwise judge's own direct verdict was a
  tie or went the other way (it only looks better by round-robin);
- `margin`: the score gap is below `min_margin`;
- `length`: the length guard says the chosen wins by being longer. `drop`
  drops every pair whose chosen is more than `length_tolerance` longer (in
  characters) than its rejected; `penalize` subtracts `length_penalty` per
  doubling of that length ratio from the margin and drops the pair when less
  than `min_margin` is left. Judges (LLMs and reward models alike) favour
  longer answers, and DPO amplifies whatever separates chosen from rejected;
- `degenerate`: the chosen side failed the quality guard (judge/quality.py:
  empty, too short, repetitive, off topic, disfluent); a degenerate answer
  may be rejected, never chosen;
- `collapse`: the mirror of `length`: the chosen wins by being much shorter.
  `drop` drops pairs whose chosen has fewer than `collapse_ratio` x the
  rejected's words; `penalize` subtracts `collapse_penalty` per halving of
  that word ratio from the margin and drops the pair when less than
  `min_margin` is left. A rule verifier rewards short answers (fewer words
  break fewer rules), and an online loop turns that into one-word replies;
- `cap`: more than `max_pairs` survive (the widest margins are kept).

Beside them, `repair_pair` makes the set's repair pair (judge/repair.py): the
best answer with its prompt's constraints met by edits, preferred over that
answer as sampled. It has no sampler token ids (the chosen side was never
sampled; the trainer tokenizes both sides through the chat template), and is
dropped as `repair` unless the judge scores the repaired answer higher and
finds it not degenerate, or as `collapse` when the edits (a word or sentence
limit) cut it to less than the collapse guard allows.

Pair ids are deterministic (`core.contracts.pair_id`), so a replayed set
gives the same ids and the judge's seen-ids cache and the trainer's ledger
drop the repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from judge.base import Judge, Judgement
from judge.repair import repair
from core.contracts import CandidateSet, PreferencePair, pair_id
from core.settings import JudgeSettings

from judge.verifier import parse_constraints, words

REPAIR_SUFFIX = "+repair"  # `PreferencePair.judge` of a repair pair: the judge's name and this

DropReason = Literal["tie", "margin", "length", "identical", "cap", "degenerate", "collapse", "repair"]
Strategy = Literal["best_vs_worst", "all_pairs", "top_k"]


@dataclass(frozen=True)
class PairPolicy:
    strategy: Strategy = "best_vs_worst"
    k: int = 1
    min_margin: float = 1e-6
    max_pairs: int = 4
    length_guard: Literal["off", "drop", "penalize"] = "off"
    length_tolerance: float = 0.1
    length_penalty: float = 0.25
    collapse_guard: Literal["off", "drop", "penalize"] = "off"
    collapse_ratio: float = 0.5
    collapse_penalty: float = 0.1

    @classmethod
    def from_settings(cls, s: JudgeSettings) -> "PairPolicy":
        return cls(s.pairing, s.pair_k, s.min_margin, s.max_pairs_per_prompt, s.length_guard, s.length_tolerance,
                   s.length_penalty, s.collapse_guard, s.collapse_ratio, s.collapse_penalty)


def best_and_worst(scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the highest and the lowest score; the first one wins among equals (deterministic)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def candidate_pairs(scores: Sequence[float], strategy: Strategy, k: int = 1) -> list[tuple[int, int]]:
    """(higher, lower) index pairs the strategy considers; among equal scores the earlier index comes first."""
    n = len(scores)
    if strategy == "best_vs_worst":
        return [best_and_worst(scores)]
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    rank = {i: r for r, i in enumerate(ranked)}
    if strategy == "all_pairs":
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    elif strategy == "top_k":
        k = min(k, n // 2)
        pairs = [(i, j) for i in ranked[:k] for j in ranked[n - k:]]
    else:
        raise ValueError(f"unknown pairing strategy {strategy!r}")
    return [(i, j) if rank[i] < rank[j] else (j, i) for i, j in pairs]


def _length_reason(chosen: str, rejected: str, margin: float, policy: PairPolicy) -> bool:
    """True when the length guard drops this pair."""
    if policy.length_guard == "off":
        return False
    lc, lr = len(chosen.strip()), max(len(rejected.strip()), 1)
    if lc <= lr * (1 + policy.length_tolerance):
        return False
    if policy.length_guard == "drop":
        return True
    return margin - policy.length_penalty * math.log2(lc / lr) < policy.min_margin


def _collapse_reason(chosen: str, rejected: str, margin: float, policy: PairPolicy) -> bool:
    """True when the collapse guard drops this pair (the chosen wins by being much shorter)."""
    if policy.collapse_guard == "off":
        return False
    wc, wr = max(len(words(chosen)), 1), len(words(rejected))
    if wc >= wr * policy.collapse_ratio:
        return False
    if policy.collapse_guard == "drop":
        return True
    return margin - policy.collapse_penalty * math.log2(wr / wc) < policy.min_margin


def select(texts: Sequence[str], judgement: Judgement,
           policy: PairPolicy) -> tuple[list[tuple[int, int, float]], list[DropReason]]:
    """The (chosen, rejected, margin) index pairs to publish, widest margin first, and the reasons of the rest."""
    scores = judgement.scores
    if len(scores) != len(texts):
        raise ValueError(f"{len(scores)} scores for {len(texts)} responses")
    kept: list[tuple[int, int, float]] = []
    dropped: list[DropReason] = []
    for w, l in candidate_pairs(scores, policy.strategy, policy.k):
        margin = float(scores[w]) - float(scores[l])
        verdict = judgement.verdict(w, l)
        if w == l:  # best_vs_worst on equal scores
            dropped.append("tie")
        elif texts[w] == texts[l]:
            dropped.append("identical")
        elif judgement.degenerate(w) is not None:
            dropped.append("degenerate")
        elif margin <= 0 or (verdict is not None and verdict <= 0):
            dropped.append("tie")
        elif margin < policy.min_margin:
            dropped.append("margin")
        elif _length_reason(texts[w], texts[l], margin, policy):
            dropped.append("length")
        elif _collapse_reason(texts[w], texts[l], margin, policy):
            dropped.append("collapse")
        else:
            kept.append((w, l, margin))
    kept.sort(key=lambda p: -p[2])  # stable: equal margins keep the strategy's order
    dropped.extend(["cap"] * max(0, len(kept) - policy.max_pairs))
    return kept[:policy.max_pairs], dropped


def build_pairs(cset: CandidateSet, judgement: Judgement, judge: str,
                policy: PairPolicy) -> tuple[list[PreferencePair], list[DropReason]]:
    """The preference pairs of a judged candidate set (with the sampler's token ids), and why others were not made."""
    texts = [c.text for c in cset.completions]
    chosen_pairs, dropped = select(texts, judgement, policy)
    pairs = []
    for w, l, margin in chosen_pairs:
        chosen, rejected = cset.completions[w], cset.completions[l]
        pairs.append(PreferencePair(
            id=pair_id(cset.prompt.id, chosen.text, rejected.text, cset.policy_version),
            prompt=cset.prompt,
            chosen=chosen.text,
            rejected=rejected.text,
            prompt_token_ids=list(cset.prompt_token_ids),
            chosen_token_ids=list(chosen.token_ids),
            rejected_token_ids=list(rejected.token_ids),
            chosen_logprobs=list(chosen.logprobs),
            rejected_logprobs=list(rejected.logprobs),
            policy_version=cset.policy_version,
            judge=judge,
            chosen_score=float(judgement.scores[w]),
            rejected_score=float(judgement.scores[l]),
            margin=margin,
        ))
    return pairs, dropped


def repair_pair(cset: CandidateSet, judgement: Judgement, judge: Judge,
                policy: PairPolicy) -> tuple[PreferencePair | None, DropReason | None]:
    """The set's repair pair (the module's docstring), or None and why not (None, None: nothing to repair)."""
    task = cset.prompt.task
    try:
        parse_constraints(task)
    except ValueError:  # not the verifier's task (another judge scores this prompt): nothing to repair
        return None, None
    texts = [c.text for c in cset.completions]
    best, _ = best_and_worst(judgement.scores)
    fixed = repair(task, texts[best], texts[:best] + texts[best + 1:])
    if fixed is None or not words(fixed):
        return None, None
    verdict = judge.judge(cset.prompt, [fixed, texts[best]])
    margin = float(verdict.scores[0]) - float(verdict.scores[1])
    if verdict.degenerate(0) is not None or margin < max(policy.min_margin, 1e-9) or \
            (verdict.verdict(0, 1) is not None and verdict.verdict(0, 1) <= 0):
        return None, "repair"
    if _collapse_reason(fixed, texts[best], margin, policy):
        return None, "collapse"
    return PreferencePair(
        id=pair_id(cset.prompt.id, fixed, texts[best], cset.policy_version),
        prompt=cset.prompt, chosen=fixed, rejected=texts[best],
        policy_version=cset.policy_version, judge=getattr(judge, "name", "judge") + REPAIR_SUFFIX,
        chosen_score=float(verdict.scores[0]), rejected_score=float(verdict.scores[1]), margin=margin,
    ), None
