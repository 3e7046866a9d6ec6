"""`odpo eval --suite ifeval=FILE`: the public benchmark's file read as published, its official checkers (lm-eval's
copy) applied to answers, the accuracies and paired differences computed as defined, and a real run through vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from judge import benchmark_suite as bs
from service.cli import main

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "ifeval" / "input_data.jsonl"


@pytest.fixture(scope="module", autouse=True)
def punkt(tmp_path_factory):
    bs.punkt_data(tmp_path_factory.mktemp("nltk"))


def _item(key, *ids_kwargs, prompt="Describe the sea.") -> bs.BenchmarkItem:
    return bs.BenchmarkItem(key, prompt, tuple(i for i, _ in ids_kwargs), tuple(k for _, k in ids_kwargs))


def test_the_published_file_loads_whole():
    items = bs.load_benchmark(BENCHMARK)
    assert len(items) == 541 and len({i.key for i in items}) == 541
    families = {bs.family(i) for item in items for i in item.instruction_ids}
    assert families == {"change_case", "combination", "detectable_content", "detectable_format", "keywords",
                        "language", "length_constraints", "punctuation", "startend"}


def test_official_checkers_judge_answers_strict_and_loose():
    no_comma_lower = _item(1, ("punctuation:no_comma", {}), ("change_case:english_lowercase", {}))
    assert bs.check(no_comma_lower, "the sea is calm and blue").strict == (True, True)
    assert bs.check(no_comma_lower, "The sea is calm, and blue").strict == (False, False)
    sentences = _item(2, ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}))
    # Punkt's English model knows "Mr." and "U.S." do not end a sentence: 2 sentences, not 5
    assert bs.check(sentences, "Mr. Smith saw the U.S. coast. It was calm.").strict == (True,)
    assert bs.check(sentences, "One. Two. Three.").strict == (False,)
    title = _item(3, ("detectable_format:title", {}))
    assert bs.check(title, "<<Sea>>\nThe sea.").prompt_strict
    # loose also tries the answer without its first line or its asterisks
    bold_end = _item(4, ("startend:end_checker", {"end_phrase": "Any other questions?"}))
    result = bs.check(bold_end, "The sea is calm. **Any other questions?**")
    assert result.strict == (False,) and result.loose == (True,)
    assert bs.check(title, "").strict == (False,)  # an empty answer follows nothing


def test_accuracies_and_paired_differences_are_the_defined_shares():
    items = [_item(1, ("punctuation:no_comma", {}), ("change_case:english_lowercase", {})),
             _item(2, ("punctuation:no_comma", {})),
             _item(3, ("detectable_format:title", {}))]
    ours = [bs.check(items[0], "the sea is calm"), bs.check(items[1], "No commas here"),
            bs.check(items[2], "no title")]
    ref = [bs.check(items[0], "The sea, calm"), bs.check(items[1], "Commas, here"), bs.check(items[2], "<<T>> x")]
    acc = bs.accuracies(items, ours)
    assert acc["prompt_strict"]["mean"] == pytest.approx(2 / 3, abs=1e-4)  # reported to 4 digits
    assert acc["instruction_strict"]["mean"] == pytest.approx(3 / 4) and acc["instruction_strict"]["n"] == 4
    assert acc["families"]["punctuation"]["strict"]["mean"] == 1.0
    assert acc["families"]["detectable_format"]["strict"]["mean"] == 0.0
    diff = bs.versus(items, ours, ref)
    assert diff["prompt_strict"]["mean"] == pytest.approx(2 / 3 - 1 / 3, abs=1e-4)
    assert diff["families_strict"]["punctuation"]["mean"] == 1.0
    assert diff["families_strict"]["change_case"]["mean"] == 1.0
    assert diff["families_strict"]["detectable_format"]["mean"] == -1.0
    lo, hi = diff["instruction_strict"]["low"], diff["instruction_strict"]["high"]
    assert lo <= diff["instruction_strict"]["mean"] <= hi


@pytest.mark.parametrize("content,why", [
    ("not json\n", "not JSON"),
    ('{"key": 1, "prompt": "x"}\n', "needs the fields"),
    ('{"key": 1, "prompt": "x", "instruction_id_list": ["no:such"], "kwargs": [{}]}\n', "unknown instruction"),
    ('{"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}\n', "one length"),
    ('{"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}\n' * 2, "repeated"),
])
def test_a_bad_benchmark_file_is_one_clear_error(tmp_path, content, why):
    path = tmp_path / "bench.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=why):
        bs.load_benchmark(path)


def test_cli_refuses_bad_suites_with_exit_2(tmp_path, capsys):
    for argv, said in ((["--suite", "mmlu"], "bad --suite"), (["--suite", f"ifeval={tmp_path / 'none.jsonl'}"],
                                                               "cannot read"),
                       (["--suite", "bundled", "--suite", "bundled"], "twice"),
                       (["--suite-limit", "0"], "--suite-limit")):
        code = main(["eval", "--models", "base@http://127.0.0.1:9", "--no-reference-logprob", "--win-judge", "none",
                     *argv])
        err = capsys.readouterr().err
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.integration
@pytest.mark.vllm
def test_eval_scores_a_served_model_on_the_benchmark_through_http(vllm_server, tmp_path, capsys):
    out = tmp_path / "eval"
    served = httpx.get(f"{vllm_server.url}/v1/models", timeout=30).json()["data"][0]["id"]  # the base model
    code = main(["eval", "--models", f"base={served}@{vllm_server.url},again={served}@{vllm_server.url}",
                 "--suite", f"ifeval={BENCHMARK}", "--suite-limit", "6", "--suite-max-tokens", "24",
                 "--out", str(out)])
    assert code == 0
    shown = capsys.readouterr().out
    assert "prompt-level strict" in shown and "punctuation" in shown
    report = json.loads((out / "eval.json").read_text())
    suite = report["suites"]["ifeval"]
    assert suite["items"] == 6 and report["models"] == []
    base, again = suite["models"]
    items = bs.load_benchmark(BENCHMARK)[:6]
    for got in base["answers"]:  # the stored verdicts are the checkers' verdicts on the stored answers
        item = next(i for i in items if i.key == got["key"])
        assert got["answer"].strip()
        assert list(bs.check(item, got["answer"]).strict) == got["strict"]
    # greedy answers of the same model agree, so the paired difference is exactly 0
    assert [a["answer"] for a in again["answers"]] == [a["answer"] for a in base["answers"]]
    assert again["versus_reference"]["prompt_strict"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 6}
