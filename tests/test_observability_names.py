"""Every metric the alerts, the dashboard and the autoscaler read is one that something exports.

Exported names are read live: every module of the components that creates a
prometheus_client metric is imported and the default REGISTRY is asked what it
holds, so metrics other work adds or renames show up here at once. vLLM's names
are the ones documented in shared/notes/vllm-cpu.md; consumer lag comes from a
Kafka exporter (danielqsj/kafka_exporter, also shipped by Strimzi and Bitnami).
Label values the chart selects by (a gate signal, a drop or guard reason) are
checked against the code's bounded sets too.
"""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
from prometheus_client import REGISTRY

from tests.chart_tools import ROOT, dashboard, dashboard_exprs, find, load_values, metric_names, render, rule_exprs

VLLM_NOTES = ROOT.parent / "shared" / "notes" / "vllm-cpu.md"
KAFKA_EXPORTER = {"kafka_consumergroup_lag"}
# Names the rules and dashboard use before the code exports them: each with who is to add it.
PENDING = {
    "odpo_bus_dead_letters_total": "core/bus.py dead_letter(): every DLQ message, labels component, topic",
}
COMPONENT_PACKAGES = ("service", "generator", "judge", "trainer")
_METRIC_CTOR = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']odpo_")
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}
EVERYTHING_ON = {"metrics": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}},
                 "generator": {"keda": {"enabled": True}}}


def exported_odpo_names() -> set[str]:
    """Sample names of every odpo metric the components register (imports their metric modules)."""
    for package in COMPONENT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if _METRIC_CTOR.search(path.read_text()):
                importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("odpo_"):
            names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def documented_vllm_names() -> set[str]:
    assert VLLM_NOTES.exists(), f"{VLLM_NOTES} lists vLLM's metric names; shared/ must lie beside the repo"
    names = set(re.findall(r"`(vllm:[a-z0-9_]+)`", VLLM_NOTES.read_text()))
    assert "vllm:num_requests_waiting" in names
    return names | {n + s for n in names for s in ("_bucket", "_count", "_sum")}


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, dashboard, autoscaler)."""
    docs = render(EVERYTHING_ON)
    used: dict[str, set[str]] = {}
    for alert, expr in rule_exprs(docs).items():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"alert {alert}")
    for expr in dashboard_exprs(dashboard(docs)):
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    for so in find(docs, "ScaledObject"):
        for name in metric_names(so["spec"]["triggers"][0]["metadata"]["query"]):
            used.setdefault(name, set()).add("KEDA trigger")
    return used


def test_metric_names_are_read_out_of_promql():
    expr = ('histogram_quantile(0.9, sum by (le, route) (rate(odpo_a_seconds_bucket{namespace="x", s=~"5.."}'
            '[$__rate_interval] offset 5m))) / on (route) group_left max(vllm:num_requests_waiting) > 2 * '
            '(sum(increase(odpo_b_total{x="rate(y)"}[1h])) or vector(0)) and absent(odpo_c)')
    assert metric_names(expr) == {"odpo_a_seconds_bucket", "vllm:num_requests_waiting", "odpo_b_total", "odpo_c"}


def test_the_components_export_what_the_code_defines():
    exported = exported_odpo_names()
    for name in ("odpo_trainer_loss", "odpo_trainer_nan_skips_total", "odpo_generator_swap_latency_seconds_bucket",
                 "odpo_gateway_requests_total", "odpo_judge_pairs_total",
                 # the gate's (service/gate/metrics.py) and every control-topic reader's (service/registry/metrics.py)
                 "odpo_gate_writing", "odpo_gate_promoted_version", "odpo_gate_refusals_by_signal_total",
                 "odpo_control_seq", "odpo_control_epoch"):
        assert name in exported, name


# Names of the elected-leader gateway, before the gate became its own component: nothing exports them now, so
# a rule or panel still reading one would show nothing (or fire on nothing), silently.
RETIRED = {
    "odpo_gateway_leader": None,
    "odpo_gateway_control_seq": "odpo_control_seq",
    "odpo_gateway_control_epoch": "odpo_control_epoch",
    "odpo_gateway_heldout_score": "odpo_gate_heldout_score",
    "odpo_gateway_promoted_heldout_score": "odpo_gate_promoted_heldout_score",
    "odpo_gateway_promotions_total": "odpo_gate_promotions_total",
    "odpo_gateway_promotion_refusals_total": "odpo_gate_promotion_refusals_total",
    "odpo_gateway_gate_refusals_by_signal_total": "odpo_gate_refusals_by_signal_total",
    "odpo_gateway_heldout_signal": "odpo_gate_heldout_signal",
    "odpo_gateway_eval_seconds_bucket": "odpo_gate_eval_seconds_bucket",
}


def test_retired_names_are_gone_from_the_code_and_the_chart():
    exported = exported_odpo_names()
    assert not set(RETIRED) & exported
    assert {new for new in RETIRED.values() if new} <= exported
    used = used_names()
    assert not {name: sorted(used[name]) for name in RETIRED if name in used}
    assert not set(RETIRED) & set(PENDING)


def test_the_gate_is_watched():
    """The gate's own liveness reaches an alert (no gate writing: nothing is promoted) and the dashboard (which
    process writes, and whether the gateways hold the gate's registry state)."""
    docs = render(EVERYTHING_ON)
    exprs = rule_exprs(docs)
    assert "odpo_gate_writing" in metric_names(exprs["OdpoGateNotWriting"])
    assert "absent(odpo_gate_writing" in exprs["OdpoGateNotWriting"].replace(" ", "")
    panels = {t["expr"] for p in dashboard(docs)["panels"] for t in p.get("targets", [])}
    assert any(re.search(r"by \(pod\) \(odpo_gate_writing\{", e) for e in panels)
    assert any(re.search(r"by \(pod\) \(odpo_control_seq\{", e) for e in panels)
    assert any("odpo_gate_promoted_version" in e for e in panels)


def test_every_used_metric_is_exported():
    exported = exported_odpo_names() | documented_vllm_names() | KAFKA_EXPORTER
    used = used_names()
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported and name not in PENDING}
    assert not unknown, f"rules/dashboard read metrics nothing exports: {unknown}"
    missing = sorted(set(PENDING) - exported)
    if missing:
        warnings.warn("metrics the chart reads that the code does not export yet: "
                      + "; ".join(f"{n} ({PENDING[n]})" for n in missing), stacklevel=1)


def test_pending_names_are_really_used():
    assert set(PENDING) <= set(used_names())


def test_dashboard_shows_the_loop():
    dash = dashboard(render(EVERYTHING_ON))
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("policy version", "held-out score", "dpo loss", "margin", "accuracy", "pairs per second",
                   "staleness", "hot-swap latency", "request latency", "error", "vllm queue"):
        assert needed in titles, needed
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            assert 'namespace="$namespace"' in t["expr"] or "kafka_consumergroup_lag" in t["expr"], t["expr"]


def known_label_values() -> dict[tuple[str, str], set[str]]:
    """(metric, label) -> the bounded set of values the code exports, for labels the chart selects by value."""
    from judge import metrics as judge_metrics
    from service.gate import metrics as gate_metrics

    signals = set(gate_metrics.GATE_SIGNALS)
    return {
        ("odpo_gate_heldout_signal", "signal"): signals | {"prompts", "score_diff_low", "score_diff_high"},
        ("odpo_gate_refusals_by_signal_total", "signal"): {"score"} | signals - {"strict_pass"},
        ("odpo_judge_pairs_dropped_total", "reason"): set(judge_metrics.DROP_REASONS),
        ("odpo_judge_guard_failures_total", "reason"): set(judge_metrics.GUARD_REASONS),
    }


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^{}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def selected_label_values(expr: str):
    """(metric, label, value) of every label matcher in `expr`; a regex matcher gives each of its alternatives."""
    for metric, body in _SELECTOR.findall(expr):
        for label, op, value in _MATCHER.findall(body):
            for v in value.split("|") if "~" in op else [value]:
                yield metric, label, v


def test_selected_label_values_are_exported():
    """A matcher on a value the code never exports selects nothing, silently: the chart's signal and reason
    values must be the code's."""
    docs = render(EVERYTHING_ON)
    exprs = list(rule_exprs(docs).values()) + dashboard_exprs(dashboard(docs))
    known = known_label_values()
    checked, unknown = set(), []
    for expr in exprs:
        for metric, label, value in selected_label_values(expr):
            if (metric, label) in known:
                checked.add((metric, label))
                if value not in known[(metric, label)]:
                    unknown.append((metric, label, value))
    assert not unknown, unknown
    assert len(checked) >= 3, checked  # held-out signals, gate refusals, judge drops


def test_the_known_label_values_are_the_exported_ones():
    """The counters export each of their values from the start (zeros, so increase() sees the first event), and
    no other; so the list above follows the code."""
    exported_odpo_names()
    exported: dict[tuple[str, str], set[str]] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                exported.setdefault((sample.name, label), set()).add(value)
    for (metric, label), values in known_label_values().items():
        if metric.endswith("_total"):
            assert exported.get((metric, label)) == values, metric
        else:  # a gauge: values appear as versions are scored
            assert exported.get((metric, label), set()) <= values, metric


def test_dashboard_shows_what_clients_get():
    """The held-out quality signals per version, the gate's refusals by signal and the judge's guard failures
    and quality drops, in one row."""
    dash = dashboard(render(EVERYTHING_ON))
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    row = next(r for r in rows if r["title"] == "What clients get")
    after = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > row["gridPos"]["y"]]
    below = min(after, default=10**6)
    panels = [p for p in dash["panels"] if p["type"] != "row" and row["gridPos"]["y"] < p["gridPos"]["y"] < below]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    shown = {v for m, label, v in selected_label_values(exprs) if m == "odpo_gate_heldout_signal"}
    assert {"mean_words", "on_topic_share", "ref_logprob", "strict_pass", "score", "score_diff_low",
            "score_diff_high"} <= shown
    for metric in ("odpo_gate_refusals_by_signal_total", "odpo_judge_guard_failures_total",
                   "odpo_judge_score_count", "odpo_judge_pairs_dropped_total"):
        assert metric in exprs, metric
    assert 'reason=~"degenerate|collapse"' in exprs


@pytest.mark.parametrize("name", [None, "values-cpu-external.yaml"])
def test_generator_scrape_covers_vllm_metrics(name):
    """vLLM's own /metrics (the queue the alert and the autoscalers read) is scraped beside the generator's."""
    values = load_values(name) if name else {"metrics": {"serviceMonitor": {"enabled": True}}}
    docs = render(values)
    sm = next(d for d in find(docs, "ServiceMonitor") if d["metadata"]["name"].endswith("-generator"))
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics", "http"}
