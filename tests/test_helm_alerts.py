"""The chart's alert rules, checked and unit-tested by Prometheus' own promtool.

promtool comes from Debian's `prometheus` package (scripts/setup.sh extracts just
that binary into the venv, so no Prometheus server is installed or started).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.chart_tools import NAMESPACE, VALUES_DIR, dashboard, load_values, one, promtool, render, rule_exprs

ALERT_TESTS = VALUES_DIR / "alerts_test.yaml"
RULES_ON = {"metrics": {"prometheusRule": {"enabled": True}}}


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    path = promtool()
    if path is None:
        pytest.fail("promtool not found: run `bash scripts/setup.sh --test` (it installs it into .venv/bin)")
    return path


def _write_rules(docs, folder) -> None:
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("values", [RULES_ON, load_values("values-cpu-external.yaml")],
                         ids=["defaults", "custom-labels"])
def test_rules_pass_promtool_check(values, promtool_bin, tmp_path):
    _write_rules(render(values), tmp_path)
    out = _run(promtool_bin, "check", "rules", str(tmp_path / "rules.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_exprs(render(values)))} rules found" in out.stdout


def test_alert_unit_tests_pass(promtool_bin, tmp_path):
    _write_rules(render(RULES_ON), tmp_path)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    out = _run(promtool_bin, "test", "rules", str(tmp_path / ALERT_TESTS.name))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_a_wrong_expectation_fails_the_unit_tests(promtool_bin, tmp_path):
    """Guards the guard: promtool really compares what fires with what the tests expect."""
    _write_rules(render(RULES_ON), tmp_path)
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    quiet = next(t for t in tests["tests"] if t["alert_rule_test"][0]["exp_alerts"] == [])
    firing = next(t for t in tests["tests"] if t["alert_rule_test"][0]["exp_alerts"])
    quiet["alert_rule_test"][0]["exp_alerts"] = firing["alert_rule_test"][0]["exp_alerts"]
    tests["tests"] = [quiet]
    (tmp_path / "wrong_test.yaml").write_text(yaml.safe_dump(tests))
    out = _run(promtool_bin, "test", "rules", str(tmp_path / "wrong_test.yaml"))
    assert out.returncode != 0


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    alerts = set(rule_exprs(render(RULES_ON)))
    assert len(alerts) >= 9
    fires, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == alerts, alerts ^ fires
    assert quiet == alerts, alerts ^ quiet


def test_thresholds_come_from_values():
    values = {"metrics": {"prometheusRule": {"enabled": True, "alerts": {
        "generatorQueue": {"maxWaiting": 7, "for": "3m"}, "consumerLag": {"consumerGroupRegex": "mine-.*"}}}}}
    rule = one(render(values), "PrometheusRule")
    by_name = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert by_name["OdpoGeneratorQueueBacklog"]["expr"].strip().endswith("> 7")
    assert by_name["OdpoGeneratorQueueBacklog"]["for"] == "3m"
    assert 'consumergroup=~"mine-.*"' in by_name["OdpoConsumerLagHigh"]["expr"]


def test_quality_thresholds_come_from_values():
    values = {"metrics": {"prometheusRule": {"enabled": True, "alerts": {
        "policyDegenerating": {"window": "2h", "severity": "critical"},
        "judgeDegenerate": {"maxShare": 0.3, "for": "1h"}}}}}
    rule = one(render(values), "PrometheusRule")
    by_name = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert '[2h]' in by_name["OdpoPolicyDegenerating"]["expr"]
    assert by_name["OdpoPolicyDegenerating"]["labels"]["severity"] == "critical"
    assert by_name["OdpoJudgeDegenerateCandidates"]["expr"].strip().endswith("> 0.3")
    assert by_name["OdpoJudgeDegenerateCandidates"]["for"] == "1h"



def test_stale_pair_thresholds_come_from_values():
    values = {"metrics": {"prometheusRule": {"enabled": True, "alerts": {
        "staleDropped": {"maxShare": 0.8, "window": "30m", "for": "5m", "severity": "warning"},
        "generatorBehind": {"for": "20m", "severity": "critical"}}}}}
    rule = one(render(values), "PrometheusRule")
    by_name = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    stale = by_name["OdpoPairsDroppedStale"]
    assert "> 0.8" in stale["expr"] and "[30m]" in stale["expr"] and "[10m]" not in stale["expr"]
    assert stale["expr"].strip().endswith("> 0")  # nothing consumed, no alert
    assert (stale["for"], stale["labels"]["severity"]) == ("5m", "warning")
    behind = by_name["OdpoGeneratorBehindStore"]
    assert (behind["for"], behind["labels"]["severity"]) == ("20m", "critical")


def test_store_thresholds_come_from_values():
    values = {"metrics": {"prometheusRule": {"enabled": True, "alerts": {
        "archiveFailing": {"severity": "warning"},
        "storeGrowing": {"maxBytes": 50 * 2**30, "for": "2h", "severity": "critical"}}}}}
    rule = one(render(values), "PrometheusRule")
    by_name = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert by_name["OdpoPairArchiveFailing"]["labels"]["severity"] == "warning"
    store = by_name["OdpoStoreGrowing"]
    assert store["expr"].strip().endswith(f"> {50 * 2**30}")  # an integer, not Helm's 5.36870912e+10
    assert (store["for"], store["labels"]["severity"]) == ("2h", "critical")
    assert "more than 50 GiB" in store["annotations"]["description"]


@pytest.mark.parametrize("max_bytes", ["20Gi", 0, 1.5])
def test_store_threshold_must_be_whole_bytes(max_bytes):
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match="maxBytes"):
        render({"metrics": {"prometheusRule": {"enabled": True, "alerts": {"storeGrowing": {"maxBytes": max_bytes}}}}})

def test_dashboard_queries_parse(promtool_bin, tmp_path):
    """Every dashboard query is valid PromQL: promtool checks them as recording rules (Grafana's variables
    filled in)."""
    dash = dashboard(render({"metrics": {"dashboard": {"enabled": True}}}))
    rules = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$namespace", NAMESPACE)
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    assert len(rules) > 40
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run(promtool_bin, "check", "rules", str(tmp_path / "dashboard.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_shows_the_store_and_archive_in_the_data_flow_row():
    """The store's size by part (stacked, what OdpoStoreGrowing reads) and the archive's errors and pending pairs
    sit in the Data flow row; no two panels overlap after the rows below moved down."""
    dash = dashboard(render({"metrics": {"dashboard": {"enabled": True}}}))
    rows = sorted((p for p in dash["panels"] if p["type"] == "row"), key=lambda r: r["gridPos"]["y"])
    row = next(r for r in rows if r["title"] == "Data flow")
    below = min((r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > row["gridPos"]["y"]), default=10**6)
    in_row = [p for p in dash["panels"] if p["type"] != "row" and row["gridPos"]["y"] < p["gridPos"]["y"] < below]
    store = next(p for p in in_row if p["title"] == "Adapter store size by part")
    assert store["targets"][0]["expr"].startswith("sum by (part) (odpo_trainer_store_bytes{")
    assert store["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert store["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    exprs = " ".join(t["expr"] for p in in_row for t in p["targets"])
    for metric in ("odpo_trainer_archive_errors_total", "odpo_trainer_archive_pending_pairs"):
        assert metric in exprs, metric
    cells = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]
