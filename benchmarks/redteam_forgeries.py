"""The Kafka forgeries of benchmarks/redteam.py: records an attacker without the run's message key writes
straight to the broker (unsigned, with a made-up signature, or verbatim replays of signed records), each a
function of the run's `Ctx` returning one `Row` (the HTTP attacks are in benchmarks/redteam_attacks.py)."""

from __future__ import annotations

import json
import secrets
import time

from benchmarks.redteam_attacks import (
    BIG,
    CATASTROPHIC,
    SIG,
    T_ADAPTERS,
    T_CONTROL,
    T_PREFERENCES,
    T_PROMPTS,
    T_SERVED,
    Ctx,
    Row,
    dlq_for,
    http,
    letters,
    metric_deltas,
    prompt_event,
    readyz,
    send,
    show,
)
from core.contracts import AdapterReady, PreferencePair, ServedRecord, ServedText
def _pair(tag: str) -> PreferencePair:
    return PreferencePair(id=f"redteam-pair-{tag}", prompt=prompt_event(f"pair-{tag}"), chosen="no",
                          rejected="people love the ocean; its waves are calm and blue.", policy_version=0,
                          judge="verifier", chosen_score=1.0, rejected_score=0.0, margin=1.0)


def attack_forged_pairs(ctx: Ctx) -> Row:
    row = Row("forged PreferencePair rewarding \"no\" (unsigned / unknown key id / wrong MAC)",
              "dead-lettered by the trainer (unsigned, unknown_key, mismatch); never archived or trained")
    key_id = ctx.watch.signing_key_id()
    variants = {"unsigned": [], "unknown": [(SIG, f"evil:{'0' * 64}".encode())],
                "mismatch": [(SIG, f"{key_id}:{'1' * 64}".encode())]}
    deltas = metric_deltas(ctx, [("trainer", "odpo_bus_signature_failures_total", {"topic": T_PREFERENCES})])
    got = {}
    for name, headers in variants.items():
        pair = _pair(f"{name}-{secrets.token_hex(3)}")
        ctx.forged_pairs.add(pair.id)
        send(ctx, T_PREFERENCES, pair.id, pair.to_bytes(), headers)
        got[name] = dlq_for(ctx, T_PREFERENCES, pair.id, {"trainer"})
    row.blocked = all("trainer" in g and g["trainer"].startswith("signature") for g in got.values())
    row.how = "; ".join(f"{n}: {letters(g)}" for n, g in got.items()) + "; " + deltas()[1] + \
        " (archive and ledger checked at the end)"
    return row


def attack_replayed_pair(ctx: Ctx) -> Row:
    row = Row("replayed signed PreferencePair (value and header copied)", "not trained twice (the trainer's ledger)")
    rec = ctx.watch.first(T_PREFERENCES)
    if rec is None:
        row.how = "no pair seen yet"
        return row
    ctx.replayed_pairs.add(PreferencePair.from_bytes(rec.value).id)
    ctx.producer.send(T_PREFERENCES, key=rec.key, value=rec.value, headers=list(rec.headers or []))
    ctx.producer.flush()
    row.how = f"replayed {next(iter(ctx.replayed_pairs))}; checked at the end"
    return row


def attack_adapters(ctx: Ctx) -> Row:
    row = Row("forged AdapterReady: v1 as v2^31 (unsigned / v1's header), another version's folder; v1 replayed",
              "DLQ by the generator and the gate; `policy` unchanged; later versions still promoted")
    rec = ctx.watch.first(T_ADAPTERS)
    if rec is None:
        row.how = "no version published yet"
        return row
    v1 = AdapterReady.from_bytes(rec.value)
    newest = max(ctx.watch.versions(), default=v1.version)
    ctx.adapter_attack_newest = newest
    before_gw, before_gate = readyz(ctx.gateway), readyz(ctx.gate)
    specs = [(c, "odpo_bus_signature_failures_total", {"topic": T_ADAPTERS}) for c in ("generator", "gate")]
    specs += [(c, "odpo_bus_unannounced_adapters_total", {}) for c in ("generator", "gate")]
    deltas = metric_deltas(ctx, specs)
    big = v1.model_copy(update={"version": BIG}).to_bytes()
    folder = v1.model_copy(update={"version": newest + 1, "parent_version": newest}).to_bytes()
    tag = secrets.token_hex(3)
    forged = {f"redteam-big-{tag}": (big, []), f"redteam-bigsig-{tag}": (big, list(rec.headers or [])),
              f"redteam-folder-{tag}": (folder, [])}
    for key, (value, headers) in forged.items():
        send(ctx, T_ADAPTERS, key, value, headers)
    ctx.producer.send(T_ADAPTERS, key=rec.key, value=rec.value, headers=list(rec.headers or []))  # verbatim
    ctx.producer.flush()
    got = {k: dlq_for(ctx, T_ADAPTERS, k, {"generator", "gate"}) for k in forged}
    time.sleep(5)
    gw, gate = readyz(ctx.gateway), readyz(ctx.gate)
    by_name = http(ctx, "POST", "/v1/chat/completions", "client", json={
        "model": f"policy-v{BIG}", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    served = {gw and gw.get("policy_version"), gate and gate.get("promoted")}
    dl_ok = all({"generator", "gate"} <= set(g) for g in got.values())
    row.blocked = dl_ok and BIG not in served and by_name.status_code == 404 and gw is not None and gate is not None
    row.how = (f"{sum(len(g) for g in got.values())}/6 DLQ letters ({letters(next(iter(got.values())))}); "
               f"policy v{(before_gw or {}).get('policy_version')} -> v{(gw or {}).get('policy_version')}, gate "
               f"v{(before_gate or {}).get('promoted')} -> v{(gate or {}).get('promoted')}; "
               f"{show(f'policy-v{BIG}', by_name)}; " + deltas()[1])
    return row


def attack_control(ctx: Ctx) -> list[Row]:
    gw0, gate0 = readyz(ctx.gateway), readyz(ctx.gate)
    head = ctx.watch.last(T_CONTROL, b"head")
    claim = ctx.watch.last(T_CONTROL, b"claim")
    deltas = metric_deltas(ctx, [(c, "odpo_bus_signature_failures_total", {"topic": T_CONTROL})
                                 for c in ("gateway", "gate")])
    rows = []
    row = Row("control topic: unsigned head promoting a bogus version; claims with \"epoch\": 1e999",
              "skipped by every reader: `policy` and the gateway's epoch unchanged, the gate still writing")
    bogus = json.loads(head.value) if head is not None else {"seq": 1, "versions": {}}
    bogus.update({"epoch": 10 ** 6, "writer": "redteam", "seq": int(bogus.get("seq", 0)) + 10 ** 6,
                  "promoted": 999, "url": "http://127.0.0.1:9"})
    inf_claim = b'{"epoch": 1e999, "writer": "redteam", "url": "http://127.0.0.1:9"}'
    send(ctx, T_CONTROL, "head", json.dumps(bogus).encode())
    send(ctx, T_CONTROL, "claim", inf_claim)
    if claim is not None:  # a real claim's header on the forged value: mismatch
        send(ctx, T_CONTROL, "claim", inf_claim, list(claim.headers or []))
    time.sleep(8)
    gw, gate = readyz(ctx.gateway), readyz(ctx.gate)
    epoch0 = (gw0 or {}).get("registry", {}).get("epoch")
    epoch = (gw or {}).get("registry", {}).get("epoch")
    gate_epoch0, gate_epoch = (((g or {}).get("control") or {}).get("epoch") for g in (gate0, gate))
    row.blocked = gw is not None and gate is not None and gw.get("policy_version") != 999 and epoch == epoch0 \
        and gate_epoch == gate_epoch0 and (gate.get("control") or {}).get("writing", True)
    row.how = (f"gateway policy v{(gw0 or {}).get('policy_version')} -> v{(gw or {}).get('policy_version')}, "
               f"epoch {epoch0} -> {epoch}; gate /readyz {'200 writing' if gate else 'NOT ready'}, epoch "
               f"{gate_epoch0} -> {gate_epoch}; " + deltas()[1])
    rows.append(row)
    rows.append(_replay_head(ctx))
    return rows


def _replay_head(ctx: Ctx) -> Row:
    row = Row("control topic: the gate's first signed head replayed verbatim after a promotion",
              "readers keep the newer state: `policy` never goes back")
    first = ctx.watch.first(T_CONTROL, b"head")
    gate = readyz(ctx.gate)
    if first is None or gate is None or json.loads(first.value).get("promoted") == gate.get("promoted"):
        row.how = "no promotion since the first head yet"
        return row
    ctx.head_replay = (time.time(), int(gate["promoted"]))
    ctx.producer.send(T_CONTROL, key=first.key, value=first.value, headers=list(first.headers or []))
    ctx.producer.flush()
    time.sleep(10)
    gw = readyz(ctx.gateway)
    now = readyz(ctx.gate)
    row.blocked = gw is not None and now is not None and gw.get("policy_version", -1) >= ctx.head_replay[1] \
        and now.get("promoted", -1) >= ctx.head_replay[1]
    row.how = (f"replayed a head promoting v{json.loads(first.value).get('promoted')} while v{ctx.head_replay[1]} was "
               f"promoted: gateway policy v{(gw or {}).get('policy_version')}, gate v{(now or {}).get('promoted')} "
               "10 s later (the monitor checks it never went back)")
    return row


def attack_served(ctx: Ctx) -> Row:
    row = Row("forged odpo.served record, then feedback naming it", "skipped by the gateway's served log; 404")
    rid = f"redteam-served-{secrets.token_hex(4)}"
    deltas = metric_deltas(ctx, [("gateway", "odpo_bus_signature_failures_total", {"topic": T_SERVED})])
    record = ServedRecord(id=rid, replica="redteam", choices=[ServedText(prompt=prompt_event(rid), text="no",
                                                                         policy_version=0)])
    send(ctx, T_SERVED, rid, record.to_bytes())
    time.sleep(2)
    r = http(ctx, "POST", "/v1/feedback", "labeler", json={"response_id": rid, "rating": 1.0})
    row.blocked, row.how = r.status_code == 404, show("feedback", r) + "; " + deltas()[1]
    return row


def attack_forged_prompt(ctx: Ctx) -> Row:
    row = Row("unsigned prompt with a catastrophic regex task on odpo.prompts", "dead-lettered by the generator")
    event = prompt_event(f"prompt-{secrets.token_hex(3)}").model_copy(update={
        "task": {"kind": "regex", "pattern": CATASTROPHIC}})
    deltas = metric_deltas(ctx, [("generator", "odpo_bus_signature_failures_total", {"topic": T_PROMPTS})])
    send(ctx, T_PROMPTS, event.id, event.to_bytes())
    got = dlq_for(ctx, T_PROMPTS, event.id, {"generator"})
    row.blocked = "generator" in got and got["generator"].startswith("signature")
    row.how = letters(got) + "; " + deltas()[1]
    return row


# -- 4) sizes and names ----------------------------------------------------------------------------------------
