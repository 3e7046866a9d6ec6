"""An admin call that arrives while the leader changes hands waits for a leader instead of failing at once.

The control plane is a stand-in here (its role and the leader it knows are set by the test, as the Kafka
election and the control topic would set them); the real processes are in tests/test_gateway_replicas.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import anyio
import pytest
from fastapi import HTTPException

from service.gateway.control import CLAIMING, FOLLOWING, LEADING
from service.gateway.leader_forward import forward
from core.settings import GatewaySettings


class _Control:
    def __init__(self, role: str, elected: bool, leader_url: str | None = None):
        self.role, self.elected, self.leader_url = role, elected, leader_url
        self.url = "http://me:8000"

    @property
    def leading(self) -> bool:
        return self.role == LEADING and self.elected

    def view(self) -> dict:
        return {"role": self.role, "leading": self.leading, "leader_url": self.leader_url, "url": self.url}


def _state(control: _Control, session_s: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(control=control, settings=GatewaySettings(leader_session_timeout_s=session_s))


def _later(delay_s: float, change) -> None:
    threading.Timer(delay_s, change).start()


@pytest.mark.parametrize("role, elected", [(LEADING, False), (CLAIMING, True)])
def test_a_call_during_a_rebalance_or_a_claim_waits_and_is_made_here_once_this_replica_leads(role, elected):
    control = _Control(role, elected)

    def leads():
        control.role, control.elected = LEADING, True

    _later(0.5, leads)
    started = time.monotonic()
    assert anyio.run(forward, _state(control, session_s=5), None, {}) is None  # None: make the change here
    assert 0.4 < time.monotonic() - started < 3


@pytest.mark.parametrize("role, elected, leader_url", [(LEADING, False, None), (FOLLOWING, False, None),
                                                       (FOLLOWING, False, "http://me:8000")])
def test_with_no_leader_known_after_twice_the_session_timeout_the_answer_is_503(role, elected, leader_url):
    control = _Control(role, elected, leader_url)
    started = time.monotonic()
    with pytest.raises(HTTPException) as caught:
        anyio.run(forward, _state(control, session_s=1), SimpleNamespace(headers={}), {})
    waited = time.monotonic() - started
    assert caught.value.status_code == 503 and int(caught.value.headers["Retry-After"]) > 0
    assert 1.9 < waited < 4, waited
