"""Judge throughput: candidate sets per second through the verifier judge, on the real broker.

Two sides in one run:
- in process: the verifier plugin scores the sets and pair construction
  builds their pairs, no Kafka (the judge's own ceiling);
- on the broker: the sets are produced to a topic of the embedded Tansu
  broker first, then one JudgeLoop (the service's loop: poll, judge, dedupe,
  produce, flush, commit) consumes them all; the clock runs from its first
  poll to the commit of the last offset.
The ratio shows what Kafka costs per set. Inputs are the bundled task's train
prompts with n=4 answers each, cut from a fixed pool of texts that satisfy
their constraints to different degrees (no vLLM needed).

    python -m benchmarks.judge_throughput [--sets 2000]
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from pathlib import Path

from kafka import TopicPartition

from judge.pairs import PairPolicy, build_pairs
from judge.rule_judge import RuleJudge
from judge.service import JudgeLoop
from core.broker import EmbeddedBroker
from core.bus import Inbox, ensure_topics, make_producer
from core.contracts import CandidateSet, Completion, SamplingParams
from core.settings import JudgeSettings
from benchmarks.common import write_json
from service.task import make_prompts

POOL = [
    "the ocean is calm and blue today",
    "The ocean, vast and deep, holds many secrets, stories, and creatures.",
    "- waves\n- salt\n- wind",
    "- the sun is warm\n- the sand is soft\n- the sea is blue\n- the sky is wide",
    "It is important to remember that every day is a simple and beautiful gift. That is all.",
    "people love the world and life every time. thank you.",
    "Autumn leaves fall, and the air turns crisp, cool, and golden.",
    "A short answer without commas that ends with the end.",
]


def candidate_sets(count: int, seed: int = 0) -> list[CandidateSet]:
    rng = random.Random(seed)
    prompts = make_prompts("train", min(count, 512))
    out = []
    for i in range(count):
        p = prompts[i % len(prompts)]
        prompt = p.model_copy(update={"id": f"{p.id}-b{i}"})
        texts = rng.sample(POOL, 4)
        comps = [Completion(text=t, token_ids=[rng.randrange(3, 49152) for _ in range(24)],
                            logprobs=[-rng.random() for _ in range(24)], finish_reason="stop") for t in texts]
        out.append(CandidateSet(prompt=prompt, prompt_token_ids=list(range(1, 40)), completions=comps,
                                policy_version=1, sampling=SamplingParams(n=4, temperature=1.0, top_p=1.0,
                                                                          max_tokens=48)))
    return out


def in_process(sets: list[CandidateSet]) -> tuple[float, int]:
    judge, policy = RuleJudge(), PairPolicy()
    start = time.perf_counter()
    pairs = 0
    for cset in sets:
        judgement = judge.judge(cset.prompt, [c.text for c in cset.completions])
        pairs += len(build_pairs(cset, judgement, judge.name, policy)[0])
    return len(sets) / (time.perf_counter() - start), pairs


def on_broker(sets: list[CandidateSet], bootstrap: str) -> tuple[float, int]:
    topic = f"bench.candidates.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic])
    producer = make_producer(bootstrap)
    for cset in sets:
        producer.send(topic, key=cset.prompt.id.encode(), value=cset.to_bytes())
    producer.flush()
    inbox = Inbox(bootstrap, topic, CandidateSet, "judge", producer, group_id=f"bench-{uuid.uuid4().hex[:8]}",
                  max_poll_records=500)
    # The rule judge alone: this measures the broker path, not the quality guard's model forwards.
    loop = JudgeLoop(inbox, producer, JudgeSettings(poll_timeout_s=0.5, seen_ids_cache=len(sets) + 1,
                                                    composition="rules_only"))
    try:
        while not inbox.consumer.assignment():  # the group join (about 3 s on Tansu) is not judging
            inbox.consumer.poll(timeout_ms=200)
        inbox.consumer.seek_to_beginning()
        tp = TopicPartition(topic, 0)
        start = time.perf_counter()
        while (inbox.consumer.committed(tp) or 0) < len(sets):
            loop.step()
        elapsed = time.perf_counter() - start
    finally:
        inbox.close()
        producer.close()
    return len(sets) / elapsed, len(loop.outbox.seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=2000, help="Candidate sets (n=4 each) to judge.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the results here as JSON.")
    args = ap.parse_args()
    sets = candidate_sets(args.sets)
    local_rate, local_pairs = in_process(sets)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap)
        broker_rate, broker_pairs = on_broker(sets, broker.bootstrap)
    assert broker_pairs == local_pairs, (broker_pairs, local_pairs)
    print(f"candidate sets: {args.sets} (n=4), pairs: {local_pairs}")
    print(f"in process (verifier + pair construction): {local_rate:8.0f} sets/s")
    print(f"judge loop on the Tansu broker:             {broker_rate:8.0f} sets/s")
    print(f"ratio broker / in-process: {broker_rate / local_rate:.2f}")
    write_json(args.out, {"sets": args.sets, "pairs": local_pairs, "in_process_sets_per_s": local_rate,
                          "broker_sets_per_s": broker_rate, "ratio": broker_rate / local_rate})


if __name__ == "__main__":
    main()
