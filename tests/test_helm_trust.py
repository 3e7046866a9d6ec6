"""The chart's trust boundaries: NetworkPolicies, which pod gets which Secret, what the public Service carries,
read-only store mounts, and the values schema refusing secrets written as plain values."""

from __future__ import annotations

import base64

import pytest
import yaml

from tests.chart_tools import RELEASE, find, load_values, one, render, settings_file
from tests.test_helm_chart import VALUE_FILES, _containers, _load_settings


def _peers_of(policy: dict) -> dict[int, list | None]:
    """port -> the peers its rule admits (None: anyone); a port without a rule admits nobody."""
    out: dict[int, list | None] = {}
    for rule in policy["spec"].get("ingress") or []:
        for port in rule["ports"]:
            assert port["port"] not in out, "one rule per port"
            out[port["port"]] = rule.get("from")
    return out


def _pod(component: str) -> dict:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/component": component,
                                            "app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/name": "odpo"}}}


MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


@pytest.mark.parametrize("name", [None, "values-cpu-external.yaml", "values-trial.yaml"],
                         ids=lambda v: v or "defaults+tansu")
def test_network_policies_admit_only_the_named_peers(name):
    """Each pod has one NetworkPolicy (ingress): vLLM's port admits the gateway, gate and generator pods (and
    Prometheus, for vLLM's /metrics; its API key guards /v1 from there); the bundled Kafka admits odpo's pods
    only; the gateway's API port admits anyone unless `gatewayFrom` names peers; /metrics admits the monitoring
    peers only; the gate's port admits `adminFrom` and Prometheus. Every container port has a rule or is closed,
    and no rule has an empty `from` (which would admit everyone)."""
    values = load_values(name) if name else {"kafka": {"tansu": {"enabled": True}}}
    docs = render(values)
    policies = find(docs, "NetworkPolicy")
    deployments = find(docs, "Deployment")
    assert len(policies) == len(deployments)
    peers = {}
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert all(rule.get("from", None) != [] for rule in policy["spec"].get("ingress") or [])
        component = labels["app.kubernetes.io/component"]
        peers[component] = _peers_of(policy)
        ports = {p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert set(peers[component]) <= ports, component
    np_values = values.get("networkPolicy", {})
    admin = np_values.get("adminFrom", [])
    assert peers["gateway"] == {8000: np_values.get("gatewayFrom") or None, 9100: MONITORING}
    assert peers["gate"] == {8001: admin + MONITORING}
    assert peers["judge"] == peers["trainer"] == {9100: MONITORING}
    if values.get("generator", {}).get("vllmUrl"):
        assert peers["generator"] == {9100: MONITORING}  # no vLLM in the pod
    else:
        assert peers["generator"] == {9100: MONITORING,
                                      8100: [_pod("gateway"), _pod("gate"), _pod("generator")] + MONITORING}
    if values.get("kafka", {}).get("tansu", {}).get("enabled"):
        assert peers["kafka"] == {9092: [_pod(c) for c in ("gateway", "gate", "generator", "judge", "trainer")]}

    closed = render({"networkPolicy": {"metricsFrom": []}})
    gate = one(closed, "NetworkPolicy", f"{RELEASE}-odpo-gate")
    assert not gate["spec"].get("ingress"), "no peer named: the gate's port admits nobody (port-forward still works)"
    assert _peers_of(one(closed, "NetworkPolicy", f"{RELEASE}-odpo-judge")) == {}
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def _secret_volumes(docs) -> dict[str, set[str]]:
    """Deployment (short name) -> the Secrets its pods mount."""
    return {d["metadata"]["name"].removeprefix(f"{RELEASE}-odpo-"):
            {v["secret"]["secretName"] for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v}
            for d in find(docs, "Deployment")}


@pytest.mark.parametrize("credentials", ["on", "off"])
def test_secrets_are_mounted_only_where_they_are_used(credentials, tmp_path, monkeypatch):
    """vLLM's API key reaches vLLM's clients only (generator, gateway, gate) and only their settings name it;
    Kafka's password, CA and client certificate reach every Kafka client (every odpo pod) and never the broker;
    the admin token the gate only; client API keys the gateway only. Off: no key, no Secret, no setting."""
    if credentials == "on":
        values = load_values("values-cpu-external.yaml")
        docs = render(values)
        kafka = {"odpo-kafka-user", "kafka-cluster-ca", "odpo-kafka-client"}
        mounted = _secret_volumes(docs)
        assert mounted == {"generator": kafka | {"odpo-vllm-key"}, "gateway": kafka | {"odpo-vllm-key", "odpo-api-keys"},
                           "gate": kafka | {"odpo-vllm-key", "odpo-admin-token"}, "judge": kafka, "trainer": kafka}
        common, generator, judge, trainer, gateway, gate = _load_settings(docs, tmp_path, monkeypatch)
        for settings in (generator, gateway, gate):
            assert str(settings.vllm_api_key_file) == "/etc/odpo-vllm/api-key" and settings.vllm_api_key is None
        gen_pod = one(docs, "Deployment", f"{RELEASE}-odpo-generator")["spec"]["template"]["spec"]
        (key_volume,) = [v for v in gen_pod["volumes"] if v["name"] == "vllm-api-key"]
        assert key_volume["secret"]["items"] == [{"key": "key", "path": "api-key"}]
        config = yaml.safe_load(settings_file(docs))
        assert {section for section, body in config.items() if "vllm_api_key_file" in body} == {
            "generator", "gateway", "gate"}
    else:
        docs = render({"vllm": {"apiKey": {"enabled": False}}, "admin": {"enabled": False},
                       "kafka": {"tansu": {"enabled": True}}, "gateway": {"apiKeys": {"enabled": False}}})
        assert not any(_secret_volumes(docs).values()) and not find(docs, "Secret")
        common, generator, _, _, gateway, gate = _load_settings(docs, tmp_path, monkeypatch)
        assert common.kafka_security_protocol == "PLAINTEXT" and common.kafka_sasl_password_file is None
        assert generator.vllm_key() is gateway.vllm_key() is gate.vllm_key() is None
    # defaults: the key is generated (kept across upgrades) and mounted like an existing one
    docs = render()
    secret = one(docs, "Secret", f"{RELEASE}-odpo-vllm")
    assert len(base64.b64decode(secret["data"]["api-key"])) == 40
    assert {n for n, names in _secret_volumes(docs).items() if f"{RELEASE}-odpo-vllm" in names} == {
        "generator", "gateway", "gate"}


@pytest.mark.parametrize("name", VALUE_FILES, ids=lambda v: v or "defaults")
def test_the_public_service_carries_the_api_only(name, tmp_path, monkeypatch):
    """The gateway's /metrics is on its own port and Service (scraped by the ServiceMonitor), not on the public
    Service; the gateway's settings move it there (`metrics_port`)."""
    docs = render(load_values(name))
    public = one(docs, "Service", f"{RELEASE}-odpo-gateway")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    metrics = one(docs, "Service", f"{RELEASE}-odpo-gateway-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and [p["targetPort"] for p in metrics["spec"]["ports"]] == ["metrics"]
    container = one(docs, "Deployment", f"{RELEASE}-odpo-gateway")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    gateway = _load_settings(docs, tmp_path, monkeypatch)[4]
    assert ports == {"http": gateway.port, "metrics": gateway.metrics_port} and gateway.metrics_port != gateway.port
    for monitor in find(docs, "ServiceMonitor"):
        if monitor["metadata"]["name"] == f"{RELEASE}-odpo-gateway":
            assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
            assert not monitor["spec"]["selector"]["matchLabels"].items() <= public["metadata"]["labels"].items()
            assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("name", VALUE_FILES, ids=lambda v: v or "defaults")
def test_the_store_is_read_only_where_it_is_only_read(name):
    """Writers: the trainer (versions) and the gate (registry, holds); the gateways only read, and so do the
    generators whose vLLM runs in the pod (the zero adapter goes into the cache). A generator with `vllmUrl`
    writes the zero adapter into the store for that vLLM."""
    values = load_values(name)
    docs = render(values)
    modes = {d["metadata"]["name"].removeprefix(f"{RELEASE}-odpo-"): bool(m.get("readOnly"))
             for d, c in _containers(docs) for m in c["volumeMounts"] if m["name"] == "adapters"}
    external = bool(values.get("generator", {}).get("vllmUrl"))
    assert modes == {"gateway": True, "generator": not external, "gate": False, "trainer": False}


@pytest.mark.parametrize("values, where", [
    ({"kafka": {"security": {"sasl": {"password": "hunter2"}}}}, "password"),
    ({"vllm": {"apiKey": "sk-plain"}}, "/vllm/apiKey"),
    ({"vllm": {"apiKey": {"key": "sk-plain"}}}, "key"),
    ({"admin": {"token": "plain-token"}}, "token"),
    ({"kafka": {"security": {"protocol": "SASL_SCRAM"}}}, "/kafka/security/protocol"),
    ({"networkPolicy": {"metricsFrom": [{}]}}, "/networkPolicy/metricsFrom"),
], ids=["kafka-password", "vllm-key-string", "vllm-key-value", "admin-token", "bad-protocol", "empty-peer"])
def test_schema_refuses_secrets_written_as_values(values, where):
    """Secrets come from Secrets (existingSecret) or are generated: a password, key or token written into the
    values is refused before anything renders."""
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert where in str(err.value)


@pytest.mark.parametrize("values, message", [
    ({"kafka": {"tansu": {"enabled": True}, "security": {"protocol": "SASL_PLAINTEXT"}}}, "PLAINTEXT only"),
    ({"kafka": {"security": {"protocol": "SASL_SSL", "sasl": {"username": "odpo"}}}}, "existingSecret"),
    ({"kafka": {"security": {"protocol": "SASL_SSL", "sasl": {"existingSecret": "s"}}}}, "username"),
    ({"kafka": {"security": {"tls": {"caSecret": "ca"}}}}, "SSL or SASL_SSL"),
])
def test_kafka_security_that_cannot_work_is_refused(values, message):
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize("enabled", [True, False])
def test_client_api_keys_reach_the_gateways_only(enabled, tmp_path, monkeypatch):
    """On by default: the keys file is a Secret mounted into the gateway pods only, as a directory (a subPath
    mount never sees a rotated Secret), the gateway's settings name the file inside that mount, and the generated
    Secret is a keys file the gateway accepts (one key, every scope). Off: no Secret, no mount, no setting."""
    import base64

    from service.gateway.keys import SCOPES, parse_keys

    docs = render({"gateway": {"apiKeys": {"enabled": enabled}}})
    secret = f"{RELEASE}-odpo-api-keys"
    holders = {}
    for dep in find(docs, "Deployment") + find(docs, "StatefulSet"):
        spec = dep["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if volume.get("secret", {}).get("secretName") == secret:
                mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])
                          if m["name"] == volume["name"]]
                holders[dep["metadata"]["name"]] = mounts
    gateway = yaml.safe_load(settings_file(docs)).get("gateway", {})
    if not enabled:
        assert not holders and not find(docs, "Secret", secret) and "api_keys_file" not in gateway
        return
    assert set(holders) == {f"{RELEASE}-odpo-gateway"}, holders
    [mount] = holders[f"{RELEASE}-odpo-gateway"]
    assert "subPath" not in mount and mount["readOnly"] is True
    assert gateway["api_keys_file"] == f"{mount['mountPath']}/keys.yaml"
    [key] = parse_keys(base64.b64decode(one(docs, "Secret", secret)["data"]["keys.yaml"]).decode())
    assert key.id == "default" and set(key.scopes) == set(SCOPES)
