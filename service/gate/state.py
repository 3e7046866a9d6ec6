"""Everything a request handler of the gate needs, built once per app in its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from core.settings import CommonSettings, GateSettings
from service.gate.control import GateControl
from service.gate.metrics import ScoreGauge
from service.gateway.engine import EngineClients, ModelRouter
from service.registry.book import VersionBook


@dataclass
class GateState:
    settings: GateSettings
    common: CommonSettings
    clients: EngineClients
    book: VersionBook
    router: ModelRouter  # what the engines serve: a version is made servable everywhere before it is promoted
    scores: ScoreGauge
    control: GateControl


def state_of(request: Request) -> GateState:
    return request.app.state.gate
