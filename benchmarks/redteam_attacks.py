"""The attacks of benchmarks/redteam.py, each a function of the run's `Ctx` that returns one `Row`.

The attacker holds client API keys (as a client would: some with too few scopes or tight limits) and can reach
the broker on 127.0.0.1, read every topic and write any record; it does not hold the run's message key, the
gate's admin token or vLLM's API key. Its Kafka producer is a plain one: records go out unsigned, with a made-up
signature, or as verbatim replays of records the components signed (value and headers copied).

Evidence for each row: the HTTP status (and error code, `Retry-After`), the `odpo.dlq` letters naming the forged
record's key (which component, which reason), and the deltas of `odpo_bus_signature_failures_total`,
`odpo_gateway_key_refusals_total`, `odpo_bus_unannounced_adapters_total` on the components' /metrics.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import percentile
from core.contracts import (
    TOPIC_ADAPTERS,
    TOPIC_CONTROL,
    TOPIC_PREFERENCES,
    TOPIC_PROMPTS,
    TOPIC_SERVED,
    PromptEvent,
)
from core.topics import topic_name
from generator.lora_resolver import STORE_ENV as LORA_STORE_ENV
from service.task import make_prompts

# The topics of this deployment (`odpo up` sets no prefix; core/topics.py): every Kafka call uses these.
T_ADAPTERS = topic_name(TOPIC_ADAPTERS)
T_CONTROL = topic_name(TOPIC_CONTROL)
T_PREFERENCES = topic_name(TOPIC_PREFERENCES)
T_PROMPTS = topic_name(TOPIC_PROMPTS)
T_SERVED = topic_name(TOPIC_SERVED)

SIG = "odpo-sig"
BIG = 2 ** 31
CATASTROPHIC = "(a|a)+$"


@dataclass
class Row:
    attack: str
    expected: str
    blocked: bool | None = None  # None: not exercised
    how: str = ""
    legit_lost: int = 0  # legitimate requests that failed while the attack ran (filled in by the runner)
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Ctx:
    """What the attacks share: where the parts are, the client keys, the attacker's producer and the watch."""

    gateway: str
    gate: str
    keys: dict[str, str]
    store: Path
    run_dir: Path
    watch: object  # redteam.Watch
    producer: object  # a kafka-python producer that signs nothing
    metrics: dict[str, str]  # component -> /metrics URL
    legit: Counter = field(default_factory=Counter)  # "what/ok" or "what/failed" of legitimate calls made here
    forged_pairs: set[str] = field(default_factory=set)
    replayed_pairs: set[str] = field(default_factory=set)
    adapter_attack_newest: int | None = None  # newest real version when the forged AdapterReady went out
    head_replay: tuple[float, int] | None = None  # (when, promoted then) of the replayed signed head
    refused_checked: dict[int, int] = field(default_factory=dict)  # refused version -> status by name


# -- helpers ---------------------------------------------------------------------------------------------------
def http(ctx: Ctx, method: str, path: str, key: str | None = None, base: str | None = None, bearer: str | None = None,
         **kw) -> httpx.Response:
    headers = dict(kw.pop("headers", {}) or {})
    token = bearer if bearer is not None else (ctx.keys[key] if key else None)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"{base or ctx.gateway}{path}", headers=headers, timeout=120, **kw)


def code(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def show(label: str, resp: httpx.Response) -> str:
    extra = code(resp)
    ra = resp.headers.get("retry-after")
    return f"{label} {resp.status_code}" + (f" {extra}" if extra and extra != str(resp.status_code) else "") + \
        (f" Retry-After {ra}" if ra else "")


def check(results: list[tuple[str, httpx.Response, set[int]]]) -> tuple[bool, str]:
    ok = all(r.status_code in want for _, r, want in results)
    return ok, ", ".join(show(label, r) for label, r, _ in results)


def metric(url: str | None, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (0 when absent or unreachable)."""
    if not url:
        return 0.0
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def metric_deltas(ctx: Ctx, specs: list[tuple[str, str, dict]]):
    """A snapshot of the metrics `specs` ((component, name, labels)); call the result for the deltas text."""
    before = [metric(ctx.metrics.get(c), n, **lb) for c, n, lb in specs]

    def deltas() -> tuple[list[float], str]:
        after = [metric(ctx.metrics.get(c), n, **lb) for c, n, lb in specs]
        ds = [a - b for a, b in zip(after, before)]
        text = ", ".join(f"{c} {n.removeprefix('odpo_')}{{{','.join(f'{k}={v}' for k, v in lb.items())}}} +{d:g}"
                         for (c, n, lb), d in zip(specs, ds))
        return ds, text
    return deltas


def complete(ctx: Ctx, key: str, no_learn: bool = False, tag: str = "") -> str | None:
    """A legitimate chat completion on `policy` by `key`; its response id (None: it failed, counted)."""
    headers = {"x-odpo-no-learn": "1"} if no_learn else {}
    body = {"model": "policy", "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Name a colour you like ({tag or secrets.token_hex(3)})."}]}
    try:
        r = http(ctx, "POST", "/v1/chat/completions", key, json=body, headers=headers)
    except httpx.HTTPError:
        r = None
    ctx.legit[f"completion by {key}/{'ok' if r is not None and r.status_code == 200 else 'failed'}"] += 1
    return r.json()["id"] if r is not None and r.status_code == 200 else None


def legit(ctx: Ctx, what: str, resp: httpx.Response, want: int) -> bool:
    ok = resp.status_code == want
    ctx.legit[f"{what}/{'ok' if ok else 'failed'}"] += 1
    return ok


def send(ctx: Ctx, topic: str, key: str, value: bytes, headers: list | None = None) -> None:
    ctx.producer.send(topic, key=key.encode(), value=value, headers=headers or [])
    ctx.producer.flush()


def dlq_for(ctx: Ctx, topic: str, key: str, components: set[str], timeout_s: float = 60) -> dict[str, str]:
    """component -> error of the dead letters for the record `key` of `topic`, once every one of `components`
    wrote one (or at the timeout)."""
    deadline = time.time() + timeout_s
    while True:
        got = {d.component: d.error for d in ctx.watch.dead_letters() if d.source_topic == topic and d.key == key}
        if components <= set(got) or time.time() > deadline:
            return got
        time.sleep(0.5)


def letters(got: dict[str, str]) -> str:
    return "; ".join(f"DLQ {c}: {e.split(' (')[0][:60]}" for c, e in sorted(got.items())) or "no DLQ letter"


def readyz(base: str) -> dict | None:
    try:
        r = httpx.get(f"{base}/readyz", timeout=10)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def prompt_event(tag: str) -> PromptEvent:
    p = make_prompts("train", 1)[0]
    return p.model_copy(update={"id": f"redteam-{tag}", "source": "redteam"})


# -- 1) prompts ------------------------------------------------------------------------------------------------
def attack_prompts(ctx: Ctx) -> Row:
    row = Row("prompts: no key / inference-only key / regex / callable task",
              "401 / 403 / 400 task_kind_not_allowed x2; a constraints prompt by `feeder` 202")
    good = make_prompts("train", 1)[0]
    prompt = {"messages": [m.model_dump() for m in good.messages]}
    deltas = metric_deltas(ctx, [("gateway", "odpo_gateway_key_refusals_total", {"reason": "unauthenticated"}),
                                 ("gateway", "odpo_gateway_key_refusals_total", {"reason": "forbidden"})])
    res = [("no key", http(ctx, "POST", "/v1/prompts", json={"prompts": [prompt]}), {401}),
           ("client", http(ctx, "POST", "/v1/prompts", "client", json={"prompts": [prompt]}), {403}),
           ("regex", http(ctx, "POST", "/v1/prompts", "feeder", json={"prompts": [
               {**prompt, "task": {"kind": "regex", "pattern": CATASTROPHIC}}]}), {400}),
           ("callable", http(ctx, "POST", "/v1/prompts", "feeder", json={"prompts": [
               {**prompt, "task": {"kind": "callable", "path": "os:system", "args": {}}}]}), {400})]
    row.blocked, row.how = check(res)
    row.blocked &= all(code(r) == "task_kind_not_allowed" for label, r, _ in res[2:])
    legit(ctx, "constraints prompt by feeder", http(ctx, "POST", "/v1/prompts", "feeder", json={
        "prompts": [{**prompt, "task": good.task}]}), 202)
    row.how += "; " + deltas()[1]
    return row


def attack_judge_regex(ctx: Ctx) -> Row:
    """In process, on the judge's own code: what a signed regex or callable task (an operator's) would meet."""
    from judge.rules import score_task

    row = Row("judge: catastrophic regex / callable os:system (in process, judge.rules)",
              "the match runs out of its time limit (score 0, < 1 s); os:system is refused")
    t0 = time.monotonic()
    score = score_task({"kind": "regex", "pattern": CATASTROPHIC}, "a" * 40 + "b", (), 0.1)
    took = time.monotonic() - t0
    try:
        score_task({"kind": "callable", "path": "os:system", "args": {}}, "true", ())
        refused = "ran"
    except ValueError as exc:
        refused = str(exc)[:70]
    row.blocked = score == 0 and took < 1.0 and refused != "ran"
    row.how = f"regex scored {score} in {took:.2f}s; callable: {refused}"
    return row


# -- 2) feedback and key limits --------------------------------------------------------------------------------
def attack_feedback(ctx: Ctx) -> list[Row]:
    ids = [complete(ctx, "labeler", tag=f"fb{i}") for i in range(4)]
    hidden = complete(ctx, "labeler", no_learn=True, tag="nolearn")
    if None in ids or hidden is None:
        return [Row("feedback attacks", "responses to rate", None, "could not get responses from the gateway")]
    rate = lambda rid: {"response_id": rid, "rating": 1.0}  # noqa: E731
    deltas = metric_deltas(ctx, [("gateway", "odpo_gateway_key_refusals_total", {"reason": r}) for r in
                                 ("feedback_per_response", "feedback_per_hour")])
    rows = []
    row = Row("feedback: no key / key without the feedback scope", "401 / 403")
    row.blocked, row.how = check([("no key", http(ctx, "POST", "/v1/feedback", json=rate(ids[0])), {401}),
                                  ("client", http(ctx, "POST", "/v1/feedback", "client", json=rate(ids[0])), {403})])
    rows.append(row)
    row = Row("feedback: the same response rated twice by one key", "202 then 409 feedback_exists")
    first = http(ctx, "POST", "/v1/feedback", "labeler", json=rate(ids[0]))
    legit(ctx, "feedback by labeler", first, 202)
    second = http(ctx, "POST", "/v1/feedback", "labeler", json=rate(ids[0]))
    row.blocked = first.status_code == 202 and second.status_code == 409
    row.how = f"{show('first', first)}, {show('second', second)}"
    rows.append(row)
    row = Row("feedback: a response served with x-odpo-no-learn: 1", "404 response_not_found")
    r = http(ctx, "POST", "/v1/feedback", "labeler", json=rate(hidden))
    row.blocked, row.how = r.status_code == 404, show("rating", r)
    rows.append(row)
    row = Row("feedback: flood past feedback_per_hour (2)", "202, 202, then 429 feedback_rate_exceeded + Retry-After")
    res = [http(ctx, "POST", "/v1/feedback", "hourly", json=rate(rid)) for rid in ids[1:4]]
    for r in res[:2]:
        legit(ctx, "feedback by hourly", r, 202)
    row.blocked = [r.status_code for r in res] == [202, 202, 429] and "retry-after" in res[2].headers
    row.how = ", ".join(show(f"#{i + 1}", r) for i, r in enumerate(res)) + "; " + deltas()[1]
    rows.append(row)
    return rows


def attack_key_limits(ctx: Ctx) -> list[Row]:
    rows = []
    for kid, want_code, n, label in (("ratey", "rate_limit_exceeded", 6, "rate (0.2/s, burst 2)"),
                                     ("daily", "quota_exceeded", 4, "daily quota (3)")):
        row = Row(f"key limits: {label}", f"429 {want_code} + Retry-After")
        deltas = metric_deltas(ctx, [("gateway", "odpo_gateway_key_refusals_total",
                                      {"key": kid, "reason": "rate" if kid == "ratey" else "daily_quota"})])
        res = [http(ctx, "GET", "/v1/models", kid) for _ in range(n)]
        refused = [r for r in res if r.status_code == 429]
        row.blocked = bool(refused) and all(code(r) == want_code and "retry-after" in r.headers for r in refused) \
            and all(r.status_code in (200, 429) for r in res)
        row.how = f"statuses {[r.status_code for r in res]}" + (f", {show('429', refused[0])}" if refused else "") \
            + "; " + deltas()[1]
        rows.append(row)
    return rows


# -- 3) forged and replayed records on the topics --------------------------------------------------------------
def attack_sizes(ctx: Ctx) -> Row:
    row = Row("2 MiB body / 65 content parts", "413 request_too_large / 400")
    huge = {"model": "policy", "messages": [{"role": "user", "content": "a" * 99_000}] * 22}
    parts = {"model": "policy", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"}] * 65}]}
    try:
        big = http(ctx, "POST", "/v1/chat/completions", "client", json=huge)
    except httpx.HTTPError as exc:  # the gateway answered and closed while the body was still being sent
        big = None
        closed = f"2 MiB: connection closed while sending ({type(exc).__name__}), no status read"
    many = http(ctx, "POST", "/v1/chat/completions", "client", json=parts)
    if big is None:
        row.blocked, row.how = many.status_code == 400, f"{closed}, {show('65 parts', many)}"
    else:
        row.blocked, row.how = check([("2 MiB", big, {413}), ("65 parts", many, {400})])
    return row


def attack_names(ctx: Ctx) -> Row:
    row = Row("`policy-v1\\n`, `policy-v01` by name", "404 (exact names only)")
    chat = lambda m: {"model": m, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}  # noqa: E731
    row.blocked, row.how = check([(repr(m), http(ctx, "POST", "/v1/chat/completions", "client", json=chat(m)), {404})
                                  for m in ("policy-v1\n", "policy-v01")])
    return row


def attack_unknown_flood(ctx: Ctx, client, n: int = 200, min_s: float = 20.0) -> Row:
    row = Row(f"flood of unknown `policy-v<N>` names (>= {n} requests, >= {min_s:.0f} s)",
              "all 404, quickly; the legitimate client's latency barely moves")
    latencies, statuses, lock = [], Counter(), threading.Lock()
    start, counter = time.time(), iter(range(10 ** 9))

    def one(_):
        i = next(counter)
        t0 = time.monotonic()
        try:
            r = http(ctx, "POST", "/v1/chat/completions", "client", json={
                "model": f"policy-v{10 ** 6 + i}", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            status = r.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        with lock:
            latencies.append(time.monotonic() - t0)
            statuses[status] += 1

    with ThreadPoolExecutor(8) as pool:
        sent = 0
        while sent < n or time.time() - start < min_s:  # bursts of 8, n spread over min_s (then on at that pace)
            list(pool.map(one, range(8)))
            sent += 8
            time.sleep(max(0.0, start + sent * min_s / n - time.time()))
    end = time.time()
    before = client.p50(start - 60, start)
    during = client.p50(start, end)
    p95 = percentile(latencies, 95)
    row.blocked = set(statuses) == {404} and p95 < 2.0
    row.how = (f"{dict(statuses)} in {end - start:.0f}s (404 p50 {percentile(latencies, 50) * 1000:.0f} ms, p95 "
               f"{p95 * 1000:.0f} ms); legitimate client p50 {_ms(before)} before, {_ms(during)} during")
    return row


def check_refused_by_name(ctx: Ctx) -> None:
    """Versions the gate refused or rolled back (its registry file), each asked for by name once: 404 expected."""
    try:
        state = json.loads((ctx.store / "gate-registry.json").read_text())
    except (OSError, ValueError):
        return
    for rec in state.get("records", []):
        v = rec.get("version")
        if rec.get("status") in ("refused", "rolled_back") and v not in ctx.refused_checked:
            time.sleep(3)  # the gateway reads the decision from odpo.control
            r = http(ctx, "POST", "/v1/chat/completions", "client", json={
                "model": f"policy-v{v}", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            ctx.refused_checked[v] = r.status_code


def refused_row(ctx: Ctx) -> Row:
    row = Row("a version the gate refused / rolled back, by name", "404")
    if not ctx.refused_checked:
        row.how = "not exercised: the gate refused no version in this run"
        return row
    row.blocked = all(s == 404 for s in ctx.refused_checked.values())
    row.how = ", ".join(f"policy-v{v} {s}" for v, s in sorted(ctx.refused_checked.items()))
    return row


# -- 5) admin and secrets --------------------------------------------------------------------------------------
def attack_admin(ctx: Ctx) -> Row:
    row = Row("admin: the gate's API without/with a wrong token or a client key; admin routes on the gateway",
              "gate 401; gateway 404 (no admin routes; 401 without a key)")
    res = [("gate no token", http(ctx, "GET", "/admin/versions", base=ctx.gate), {401}),
           ("gate wrong token", http(ctx, "GET", "/admin/versions", base=ctx.gate, bearer="x" * 32), {401}),
           ("gate client key", http(ctx, "POST", "/admin/promote", base=ctx.gate, bearer=ctx.keys["client"],
                                    json={"version": 0}), {401}),
           ("gate rollback", http(ctx, "POST", "/admin/rollback", base=ctx.gate), {401}),
           ("gateway GET /admin/versions", http(ctx, "GET", "/admin/versions", "client"), {404}),
           ("gateway POST /admin/promote", http(ctx, "POST", "/admin/promote", "client", json={"version": 0}),
            {404, 405}),
           ("gateway no key", http(ctx, "GET", "/admin/versions"), {401, 404})]
    row.blocked, row.how = check(res)
    return row


def attack_vllm(ctx: Ctx, generator_pid: int | None) -> Row:
    row = Row("vLLM directly: runtime LoRA load and /v1/models without its API key", "401")
    port = None
    for p in psutil.Process(generator_pid).children(recursive=True) if generator_pid else []:
        try:
            args = p.cmdline()
        except psutil.Error:
            continue
        if "--port" in args:
            port = args[args.index("--port") + 1]
            break
    if port is None:
        row.how = "not exercised: vLLM's port not found under the generator"
        return row
    base = f"http://127.0.0.1:{port}"
    row.blocked, row.how = check([
        ("load_lora_adapter", http(ctx, "POST", "/v1/load_lora_adapter", base=base, json={
            "lora_name": "redteam", "lora_path": str(ctx.store / "policy-v1")}), {401}),
        ("/v1/models", http(ctx, "GET", "/v1/models", base=base), {401})])
    return row


def attack_secrets(ctx: Ctx, pids: dict[str, int]) -> Row:
    """Which process holds which secret: the admin token only the gate, vLLM none of odpo's settings (but the
    store path its LoRA resolver reads, ODPO_LORA_STORE, which is no secret); the run folder's secret files
    owner-only."""
    row = Row("secrets: admin token only in the gate, none of ODPO_* in vLLM, secret files 0600",
              "no other process holds them")
    leaks = []
    for name, pid in pids.items():
        procs = [psutil.Process(pid)] + (psutil.Process(pid).children(recursive=True) if name == "generator" else [])
        for p in procs:
            try:
                env = p.environ()
            except psutil.Error:
                continue
            vllm = p.pid != pid and _is_vllm(p)
            held = [k for k in env if (k == "ODPO_GATE_ADMIN_TOKEN" and name != "gate")
                    or (vllm and k.startswith("ODPO_") and k != LORA_STORE_ENV)]
            leaks += [f"{name}{' (vLLM)' if vllm else ''}: {k}" for k in held]
    for f in ("admin-token", "vllm-api-key"):
        path = ctx.run_dir / f
        if path.exists() and path.stat().st_mode & 0o077:
            leaks.append(f"{f} mode {oct(path.stat().st_mode & 0o777)}")
    row.blocked = not leaks
    row.how = "; ".join(leaks[:6]) or f"checked {len(pids)} components and their children"
    return row


def _is_vllm(p: psutil.Process) -> bool:
    try:
        return "vllm" in (p.name() + " ".join(p.cmdline())).lower()
    except psutil.Error:
        return False


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"
