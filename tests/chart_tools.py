"""Rendering the Helm chart offline and reading what it contains, for the chart tests.

The chart is rendered by Helm's own Go engine (the `helm-python-sdk` package binds
Helm's SDK; no cluster, no helm binary). PromQL metric names are pulled out of
expressions with a small tokenizer: enough for the expressions this chart writes.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "odpo"
VALUES_DIR = Path(__file__).resolve().parent / "helm"
RELEASE, NAMESPACE = "loop", "odpo-test"


def load_values(name: str | None) -> dict[str, Any]:
    return yaml.safe_load((VALUES_DIR / name).read_text()) if name else {}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders with `values` (NOTES.txt left out)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def settings_file(docs: list[dict]) -> str:
    """The ODPO_CONFIG YAML the pods read."""
    return one(docs, "ConfigMap", f"{RELEASE}-odpo-config")["data"]["odpo.yaml"]


def promtool() -> str | None:
    """scripts/setup.sh puts promtool (from Debian's prometheus package) into the venv's bin/."""
    local = Path(sys.prefix) / "bin" / "promtool"
    return str(local) if local.exists() else shutil.which("promtool")


# --- PromQL -----------------------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and durations left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\$\w+|\$\{\w+\}", "", text)  # Grafana variables such as $__rate_interval
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word, rest = m.group(0), text[m.end():]
        if word.lower() in _KEYWORDS or rest.lstrip().startswith("("):
            continue  # a keyword or a function call
        names.add(word)
    return names


def rule_exprs(docs: list[dict]) -> dict[str, str]:
    """Alert name -> PromQL expression of the rendered PrometheusRule."""
    rule = one(docs, "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def dashboard(docs: list[dict]) -> dict[str, Any]:
    cm = one(docs, "ConfigMap", f"{RELEASE}-odpo-dashboard")
    return json.loads(cm["data"]["odpo.json"])


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)", query or "")
        if m:
            exprs.append(m.group(1))
    return exprs
