"""The reward-model judge on a tiny local sequence classifier (SmolLM2's tokenizer, random weights, nothing downloaded).

Batched scoring must equal scoring each conversation alone, through the
model's own forward pass; pairs follow the rewards; the service runs the
plugin from settings on the real broker.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from judge.registry import make_judge
from judge.reward_model import RewardModelJudge
from judge.service import run
from core.contracts import (
    TOPIC_CANDIDATES,
    TOPIC_PREFERENCES,
    ChatMessage,
    PreferencePair,
    PromptEvent,
)
from core.settings import CommonSettings, JudgeSettings
from tests.test_judge_service import candidate_set, read_until

pytestmark = pytest.mark.integration

PROMPT = PromptEvent(id="rm-q", messages=[ChatMessage(role="user", content="Describe the sea briefly.")])
ANSWERS = ["calm blue sea", "The sea is wide, deep, old and cold, and it is full of life.", "sea", "Waves. Salt. Wind."]


def tiny_classifier(tokenizer_dir, out_dir, num_labels: int = 1):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         num_labels=num_labels, pad_token_id=None)  # many reward models ship without one
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards spread well apart
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def rm_dir(model_dir, tmp_path_factory):
    return tiny_classifier(model_dir, tmp_path_factory.mktemp("tiny-rm"))


def reference_reward(rm_dir, text: str) -> float:
    """One conversation alone, no padding: the last token's score."""
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def test_batched_rewards_equal_one_by_one(rm_dir):
    judge = RewardModelJudge(rm_dir, device="cpu", batch_size=3)
    rendered = [judge.render(PROMPT, a) for a in ANSWERS]
    assert rendered[0].endswith("<|im_start|>assistant\ncalm blue sea<|im_end|>\n")  # the chat template
    assert "<|im_start|>user\nDescribe the sea briefly.<|im_end|>" in rendered[0]
    judgement = judge.judge(PROMPT, ANSWERS)
    expected = [reference_reward(rm_dir, t) for t in rendered]
    assert judgement.scores == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 3) for s in judgement.scores}) == len(ANSWERS), "a degenerate model scores all alike"
    assert judgement.verdicts is None


def test_long_conversations_are_cut_from_the_left(rm_dir):
    judge = RewardModelJudge(rm_dir, device="cpu", max_length=12)
    ending = " and that is the end of the story of the sea."
    a, b = judge.score_texts(["Once upon a time" + ending, "Long long ago, far away" + ending])
    assert a == pytest.approx(b, abs=1e-6)  # only the last 12 tokens (the same) are read


def test_bad_reward_models_are_refused(rm_dir, model_dir, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        RewardModelJudge(tmp_path)
    with pytest.raises(ValueError, match="2 outputs"):
        RewardModelJudge(tiny_classifier(model_dir, tmp_path / "two", num_labels=2), device="cpu")
    with pytest.raises(ValueError, match="REWARD_MODEL_PATH"):
        make_judge(JudgeSettings(judge="reward_model"))


def test_reward_model_judge_service_pairs_best_against_worst(rm_dir, broker, producer, group_id):
    run_id = uuid.uuid4().hex[:8]
    cset = candidate_set(f"{run_id}-rm", ANSWERS)
    rewards = RewardModelJudge(rm_dir, device="cpu").judge(cset.prompt, ANSWERS).scores
    best, worst = max(range(4), key=rewards.__getitem__), min(range(4), key=rewards.__getitem__)

    stop = threading.Event()
    # The plugin alone (composition rules_only, no quality guard): the pair follows the rewards.
    settings = JudgeSettings(judge="reward_model", reward_model_path=rm_dir, reward_model_device="cpu",
                             group_id=group_id, poll_timeout_s=0.2, composition="rules_only")
    thread = threading.Thread(target=run, args=(CommonSettings(bootstrap_servers=broker.bootstrap), settings, stop),
                              daemon=True)
    thread.start()
    try:
        producer.send(TOPIC_CANDIDATES, key=cset.prompt.id.encode(), value=cset.to_bytes()).get(timeout=30)
        mine = lambda r: r.key == cset.prompt.id.encode()
        records = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 1)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    (pair,) = [PreferencePair.from_bytes(r.value) for r in records]
    assert (pair.chosen, pair.rejected, pair.judge) == (ANSWERS[best], ANSWERS[worst], "reward_model")
    assert pair.margin == pytest.approx(rewards[best] - rewards[worst], abs=1e-5)
