"""The promotion gate when the engine dies while it scores a version: no verdict, the version is scored again.

An engine death under the gate's own requests is shown on real vLLM in
tests/test_generator_server.py (503 to the gateway's clients, the death counted); here the gate's decision
on the error it then sees, vLLM's HTTP 500 with its EngineDeadError body (the body text vLLM 0.32 sends), is
checked without the minute a second vLLM start costs. The scoring step is replaced, nothing else.
"""

from __future__ import annotations

import httpx

from service.registry.book import VersionBook
from service.gate.promotion import SERVER_ERROR_TRIES, PromotionGate
from service.gate.metrics import ScoreGauge
from core.settings import CommonSettings, GateSettings
from tests.test_gateway_book import ready

ENGINE_DEAD = (b'{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for the root cause.",'
               b'"type":"InternalServerError","param":null,"code":500}}')


def gate_scoring(version: int, answer: httpx.Response) -> tuple[PromotionGate, VersionBook]:
    book = VersionBook(0.05)
    assert book.next_evaluation() == (0, [])
    book.decide(0, 0.5)
    book.add(ready(version))
    gate = PromotionGate(book, adapters=None, settings=GateSettings(), bootstrap="127.0.0.1:1",
                         scores=ScoreGauge(4), common=CommonSettings())

    def engine_answers(v):
        raise httpx.HTTPStatusError(f"HTTP {answer.status_code}", request=answer.request, response=answer)

    gate._make_servable, gate._judge = (lambda v: True), engine_answers
    gate._halt.set()  # no waits between tries
    return gate, book


def response(status: int, body: bytes) -> httpx.Response:
    return httpx.Response(status, content=body, request=httpx.Request("POST", "http://engine/v1/chat/completions"))


def test_an_engine_that_died_while_scoring_is_no_verdict_on_the_version():
    gate, book = gate_scoring(1, response(500, ENGINE_DEAD))
    for _ in range(SERVER_ERROR_TRIES + 2):  # however often: each time the engine died, not the version
        assert book.next_evaluation() == (1, [])
        gate._evaluate(1)
        assert book.record(1).status == "pending", book.record(1)
    assert book.promoted == 0 and book.record(1).score is None


def test_other_server_errors_fail_the_version_after_a_few_tries():
    gate, book = gate_scoring(2, response(500, b'{"error":{"message":"something else","code":500}}'))
    for _ in range(SERVER_ERROR_TRIES - 1):
        assert book.next_evaluation() == (2, [])
        gate._evaluate(2)
        assert book.record(2).status == "pending"
    assert book.next_evaluation() == (2, [])
    gate._evaluate(2)
    assert book.record(2).status == "failed" and "500" in book.record(2).reason
