"""Admin changes on any replica: a follower forwards promote / pin / unpin / rollback to the leader.

The leader makes the change, publishes it on the control topic and answers
with the sequence number of the state that holds it; the follower answers
its client only once its own book has applied that state, so a client that
reads either replica right after sees the same `policy`. The forwarded call
carries the client's bearer token and a header naming the replica it came
from; a replica that gets a forwarded call and does not lead answers 503
rather than forwarding it again.

While the leader changes hands (the group rebalances as a replica joins or
leaves, a new leader claims its epoch) a call first waits for a leader to be
known, up to twice the election's session timeout: a rolling update of the
gateway costs an admin client some seconds, not an error. With no leader
known after that, or none reachable: 503 with a JSON body and `Retry-After`.
"""

from __future__ import annotations

import anyio
import httpx
from fastapi import HTTPException, Request

from service.gateway.control import FOLLOWING, NotReplicated
from service.gateway.protocol import RETRY_AFTER_S
from service.gateway.state import GatewayState

FORWARDED_BY = "x-odpo-forwarded-by"
SETTLE_POLL_S = 0.1


def unavailable(message: str) -> HTTPException:
    return HTTPException(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def _unsettled(view: dict) -> bool:
    """True while no replica is known to lead (from a control-plane `view()`): this one owns the partition but
    its group rebalances or its claim is not read back yet, or it follows a head that names no leader or names
    this replica itself."""
    if view["leading"]:
        return False
    if view["role"] != FOLLOWING:
        return True
    return view["leader_url"] in (None, "", view["url"])


async def _settled_view(state: GatewayState) -> dict:
    """The control plane's view once a leader is known, or after twice the session timeout (within the
    forward timeout) without one."""
    settings = state.settings
    wait_s = min(2 * settings.leader_session_timeout_s, settings.admin_forward_timeout_s)
    with anyio.move_on_after(wait_s):
        while _unsettled(state.control.view()):
            await anyio.sleep(SETTLE_POLL_S)
    return state.control.view()


async def forward(state: GatewayState, request: Request, body: dict | None) -> dict | None:
    """None when this replica makes the change itself (it leads, or there is no control plane); otherwise the
    leader's answer, once this replica's book holds the state it names."""
    control = state.control
    if control is None:
        return None
    view = await _settled_view(state)
    if view["leading"]:
        return None
    if view["role"] != FOLLOWING:  # still paused in a rebalance (on Tansu about 5 s per join or leave) or claiming
        raise unavailable("the gateway replicas are still confirming their leader (a replica joined or left); "
                          "try again in a few seconds")
    if request.headers.get(FORWARDED_BY):
        raise unavailable(f"this replica does not lead (any more); the leader is {view['leader_url'] or 'unknown'}")
    if _unsettled(view):
        raise unavailable("no gateway replica leads right now (an election is under way); try again shortly")
    headers = {"authorization": request.headers.get("authorization", ""), FORWARDED_BY: control.replica}
    timeout = state.settings.admin_forward_timeout_s
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.post(f"{view['leader_url']}{request.url.path}", json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise unavailable(f"the leader {view['leader_url']} is unreachable ({type(exc).__name__})") from None
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code != 200 or not isinstance(answer, dict):
        message = (answer or {}).get("error", {}).get("message") if isinstance(answer, dict) else None
        message = message or f"the leader {view['leader_url']} answered HTTP {resp.status_code}"
        retry = resp.headers.get("retry-after")
        raise HTTPException(resp.status_code if resp.status_code < 500 else 503, message,
                            headers={"Retry-After": retry or str(RETRY_AFTER_S)} if resp.status_code >= 500 or retry
                            else None)
    seq = int((answer.get("control") or {}).get("seq", 0))
    if not await anyio.to_thread.run_sync(control.wait_applied, seq, timeout):
        raise unavailable(f"the leader made the change (state {seq}) but this replica has not applied it within "
                          f"{timeout:g}s")
    return {"done": answer.get("done"), **state.book.snapshot(), "control": control.view()}


async def published(state: GatewayState) -> dict | None:
    """The control plane's view once the leader's change is on the control topic (None without one)."""
    control = state.control
    if control is None:
        return None
    try:
        seq = await anyio.to_thread.run_sync(control.published_seq)
    except NotReplicated as exc:
        raise unavailable(f"the change is made on this replica but not yet shared with the others ({exc}); "
                          "it is published when the broker answers") from None
    return {**control.view(), "seq": seq}
