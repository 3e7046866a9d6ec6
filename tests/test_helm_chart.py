"""The Helm chart: rendered by Helm's Go engine, linted, and every object checked against the
Kubernetes schemas, offline. The rendered settings file is loaded by the real settings classes."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from core import settings as s
from tests.chart_tools import CHART, NAMESPACE, RELEASE, find, load_values, one, render, settings_file

KUBE_VERSION = "1.30"
# Custom resources: no schema ships with kubernetes-validate; checked field by field below
# (and the PrometheusRule by promtool in test_helm_alerts.py).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                ("keda.sh/v1alpha1", "ScaledObject")}
VALUE_FILES = [None, "values-cpu-external.yaml", "values-trial.yaml"]


@pytest.fixture(scope="module", params=VALUE_FILES, ids=lambda v: v or "defaults")
def rendered(request):
    return request.param, render(load_values(request.param))


def _containers(docs):
    for d in find(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            yield d, c


def test_lint_is_clean_with_default_and_custom_values():
    import helm_python as helm

    for name in VALUE_FILES:
        report = helm.lint(CHART, load_values(name), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert report["total_charts_linted"] == 1
        assert not problems, (name, problems)


def test_every_object_is_valid_kubernetes(rendered):
    name, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        # strict: unknown fields are errors too, not just wrong types.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_custom_resources_are_well_formed(rendered):
    _, docs = rendered
    services = {d["metadata"]["name"]: d for d in find(docs, "Service")}
    for sm in find(docs, "ServiceMonitor"):
        targets = [svc for svc in services.values()
                   if sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()]
        assert len(targets) == 1, sm["metadata"]["name"]
        port_names = {p["name"] for p in targets[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in port_names and ep["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", ep["interval"])
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    for so in find(docs, "ScaledObject"):
        one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        trigger = so["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in trigger["metadata"]["query"]
        assert not find(docs, "HorizontalPodAutoscaler"), "KEDA owns the HPA when it scales the generator"
    for rule in find(docs, "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
                assert r["labels"]["severity"] in {"critical", "warning", "info"}


def test_references_between_objects_resolve(rendered):
    name, docs = rendered
    values = load_values(name)
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in find(docs, "Deployment")}
    for svc in find(docs, "Service"):
        selected = [n for n, t in pods.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert len(selected) == 1, (svc["metadata"]["name"], selected)
        ports = {p["name"] for c in pods[selected[0]]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for d in find(docs, "PodDisruptionBudget") + find(docs, "Deployment"):
        sel = d["spec"]["selector"]["matchLabels"]
        assert sum(sel.items() <= t["metadata"]["labels"].items() for t in pods.values()) == 1
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        one(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in one(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])["spec"]

    config_maps = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"] for d in find(docs, "Secret")} | _existing_secrets(values)
    claims = {d["metadata"]["name"] for d in find(docs, "PersistentVolumeClaim")}
    claims |= {values.get("adapterStore", {}).get("existingClaim"), values.get("baseModel", {}).get("existingClaim")}
    accounts = {d["metadata"]["name"] for d in find(docs, "ServiceAccount")}
    for dep, c in _containers(docs):
        spec = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert spec["serviceAccountName"] in accounts
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, (dep["metadata"]["name"], m["name"])
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets
        port_names = {p["name"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in c:
                check = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                assert check["port"] in port_names, (dep["metadata"]["name"], probe)


def _existing_secrets(values: dict) -> set[str]:
    """The Secrets the values name (the chart mounts them, never creates them)."""
    security = values.get("kafka", {}).get("security", {})
    names = {values.get("admin", {}).get("existingSecret"),
             values.get("vllm", {}).get("apiKey", {}).get("existingSecret"),
             values.get("gateway", {}).get("apiKeys", {}).get("existingSecret"),
             security.get("sasl", {}).get("existingSecret"), security.get("tls", {}).get("caSecret"),
             security.get("tls", {}).get("clientCertSecret")}
    return {n for n in names if n}


def test_pods_run_with_secure_defaults(rendered):
    _, docs = rendered
    for dep, c in _containers(docs):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts  # writable scratch on a read-only root filesystem


def _load_settings(docs, tmp_path, monkeypatch):
    path = tmp_path / "odpo.yaml"
    path.write_text(settings_file(docs))
    for key in [k for k in os.environ if k.startswith("ODPO_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ODPO_CONFIG", str(path))
    return (s.CommonSettings(), s.GeneratorSettings(), s.JudgeSettings(), s.TrainerSettings(), s.GatewaySettings(),
            s.GateSettings())


def test_rendered_settings_load_in_the_real_settings_classes(rendered, tmp_path, monkeypatch):
    name, docs = rendered
    common, generator, judge, trainer, gateway, gate = _load_settings(docs, tmp_path, monkeypatch)
    assert common.metrics_host == "0.0.0.0" and gateway.host == "0.0.0.0" and gate.host == "0.0.0.0"
    store_mounts = {m["mountPath"] for _, c in _containers(docs) for m in c["volumeMounts"] if m["name"] == "adapters"}
    assert store_mounts == {str(common.store_dir)}
    store_writers = {d["metadata"]["name"] for d, c in _containers(docs) for m in c["volumeMounts"]
                     if m["name"] == "adapters" and not m.get("readOnly")}
    # the gate keeps its registry file and holds in the store; a gateway only reads adapter folders there
    assert f"{RELEASE}-odpo-gate" in store_writers and f"{RELEASE}-odpo-gateway" not in store_writers
    assert f"{RELEASE}-odpo-gate" in {d["metadata"]["name"] for d, c in _containers(docs)
                                      for m in c["volumeMounts"] if m["name"] == "adapters"}
    ports = {d["metadata"]["name"]: {p["name"]: p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"]
                                     for p in c["ports"]} for d in find(docs, "Deployment")}
    assert ports[f"{RELEASE}-odpo-gateway"]["http"] == gateway.port
    assert ports[f"{RELEASE}-odpo-gate"]["http"] == gate.port != gateway.port
    # the gate scores versions on the same engines the gateways route to
    assert (gate.vllm_url, gate.vllm_resolve_dns) == (gateway.vllm_url, gateway.vllm_resolve_dns)
    assert gate.control_topic == gateway.control_topic == "odpo.control"
    assert ports[f"{RELEASE}-odpo-judge"]["metrics"] == judge.metrics_port
    assert ports[f"{RELEASE}-odpo-trainer"]["metrics"] == trainer.metrics_port
    assert ports[f"{RELEASE}-odpo-generator"]["metrics"] == generator.metrics_port
    if generator.vllm_url is None:  # the gateway reaches the in-pod vLLM through the generator's Service
        assert generator.vllm_host == "0.0.0.0"
        assert ports[f"{RELEASE}-odpo-generator"]["http"] == generator.vllm_port
        # every generator pod's vLLM, by address: a headless Service the gateway resolves to all of them
        svc = one(docs, "Service", f"{RELEASE}-odpo-generator-engines")
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"] == one(docs, "Deployment", f"{RELEASE}-odpo-generator")["spec"]["selector"][
            "matchLabels"]
        http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
        assert gateway.vllm_url == f"http://{svc['metadata']['name']}:{http['port']}" and gateway.vllm_resolve_dns
    else:
        assert gateway.vllm_url == generator.vllm_url and not gateway.vllm_resolve_dns
    if find(docs, "Deployment", f"{RELEASE}-odpo-kafka"):
        kafka_svc = one(docs, "Service", f"{RELEASE}-odpo-kafka")
        assert common.bootstrap_servers == f"{kafka_svc['metadata']['name']}.{NAMESPACE}.svc:9092"


def test_custom_values_take_effect(tmp_path, monkeypatch):
    values = load_values("values-cpu-external.yaml")
    docs = render(values)
    common, generator, _, trainer, gateway, gate = _load_settings(docs, tmp_path, monkeypatch)
    # External Kafka, no broker pod.
    assert common.bootstrap_servers == values["kafka"]["bootstrapServers"]
    assert not find(docs, "Deployment", f"{RELEASE}-odpo-kafka")
    # GPU off: no GPU requested anywhere, CPU defaults for vLLM's dtype kept.
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for _, c in _containers(docs))
    assert generator.dtype == "float32"
    # Existing secret and claims: used, not created.
    assert not find(docs, "Secret") and not find(docs, "PersistentVolumeClaim")
    gate_pod = one(docs, "Deployment", f"{RELEASE}-odpo-gate")["spec"]["template"]["spec"]
    token = next(v["secret"] for v in gate_pod["volumes"] if v["name"] == "admin-token")
    assert token["secretName"] == "odpo-admin-token" and token["items"] == [{"key": "token", "path": "token"}]
    mount = next(m for m in gate_pod["containers"][0]["volumeMounts"] if m["name"] == "admin-token")
    assert str(gate.admin_token_file) == f"{mount['mountPath']}/token" and mount["readOnly"] is True
    assert not hasattr(gateway, "admin_token_file")
    assert str(common.base_model) == values["baseModel"]["path"]
    # config.* reaches the components; the chart's own wiring wins where it must.
    assert (trainer.beta, trainer.window_pairs, generator.max_tokens) == (0.2, 32, 64)
    assert gateway.request_timeout_s == 120 and common.log_level == "DEBUG"
    gen_pod = one(docs, "Deployment", f"{RELEASE}-odpo-generator")["spec"]["template"]["spec"]
    assert gen_pod["nodeSelector"] == {"node-pool": "cpu-large"} and gen_pod["tolerations"][0]["value"] == "llm"
    assert len(find(docs, "ServiceMonitor")) == 5
    # Kafka over SASL_SSL: the settings name the files of the mounted Secrets
    assert (common.kafka_security_protocol, common.kafka_sasl_mechanism, common.kafka_sasl_username) == (
        "SASL_SSL", "SCRAM-SHA-512", "odpo")
    assert str(common.kafka_sasl_password_file) == "/etc/odpo-kafka/sasl/password"
    assert str(common.kafka_ssl_cafile) == "/etc/odpo-kafka/ca/ca.crt"
    assert (str(common.kafka_ssl_certfile), str(common.kafka_ssl_keyfile)) == (
        "/etc/odpo-kafka/client/tls.crt", "/etc/odpo-kafka/client/tls.key")
    assert common.kafka_sasl_password is None  # never a value in the ConfigMap
    gate_sm = one(docs, "ServiceMonitor", f"{RELEASE}-odpo-gate")
    assert [e["port"] for e in gate_sm["spec"]["endpoints"]] == ["http"]  # /metrics beside the admin API
    assert one(docs, "ConfigMap", f"{RELEASE}-odpo-dashboard")["metadata"]["namespace"] == "monitoring"


def test_defaults_request_gpus_and_keep_one_trainer():
    docs = render()
    for component in ("generator", "trainer"):
        dep = one(docs, "Deployment", f"{RELEASE}-odpo-{component}")
        assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    trainer = one(docs, "Deployment", f"{RELEASE}-odpo-trainer")["spec"]
    assert trainer["replicas"] == 1 and trainer["strategy"]["type"] == "Recreate"
    gate = one(docs, "Deployment", f"{RELEASE}-odpo-gate")["spec"]
    assert gate["replicas"] == 1 and gate["strategy"]["type"] == "Recreate"
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {})
               for c in gate["template"]["spec"]["containers"])  # the reference model runs on CPU
    secret = one(docs, "Secret", f"{RELEASE}-odpo-admin")
    assert len(base64.b64decode(secret["data"]["admin-token"])) == 40
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not find(docs, "ServiceMonitor") and not find(docs, "PrometheusRule")


@pytest.mark.parametrize("gateway, budget", [
    ({}, 1),
    ({"replicas": 3, "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}}, "50%"),
    ({"replicas": 1}, None),
    ({"podDisruptionBudget": {"enabled": False, "minAvailable": 1}}, None),
], ids=["defaults", "three", "one", "budget-off"])
def test_gateway_replicas_are_stateless_readers(gateway, budget, tmp_path, monkeypatch):
    """Two gateway replicas by default, each reading the gate's decisions from odpo.control: a
    PodDisruptionBudget keeps one of them up during drains (none for a single replica, which must stay
    evictable). No replica leads any more: no pod IP to advertise, no election settings, no admin token, and
    the gate stays one pod whatever the gateway's replica count."""
    docs = render({"gateway": gateway})
    name = f"{RELEASE}-odpo-gateway"
    dep = one(docs, "Deployment", name)
    assert dep["spec"]["replicas"] == gateway.get("replicas", 2)
    budgets = [d for d in find(docs, "PodDisruptionBudget") if d["metadata"]["name"] == name]
    if budget is None:
        assert not budgets
    else:
        (pdb,) = budgets
        assert pdb["spec"]["minAvailable"] == budget and "maxUnavailable" not in pdb["spec"]
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    env = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not env & {"POD_IP", "ODPO_GATEWAY_ADVERTISE_URL"}
    assert not {n for n in env if n.startswith("ODPO_GATE_") or "ADMIN" in n}
    assert one(docs, "Deployment", f"{RELEASE}-odpo-gate")["spec"]["replicas"] == 1
    gateway_settings = _load_settings(docs, tmp_path, monkeypatch)[4]
    assert gateway_settings.port == 8000 and gateway_settings.control_topic == "odpo.control"


@pytest.mark.parametrize("name", VALUE_FILES, ids=lambda v: v or "defaults")
def test_exactly_one_gate_runs(name, tmp_path, monkeypatch):
    """The gate is the registry's one writer: one replica, and `Recreate` stops the old pod before its
    replacement starts (a rolling update would run two for a while); no autoscaler or disruption budget
    targets it. It runs `odpo gate`, is probed on /healthz and /readyz, and its ClusterIP Service serves the
    admin API and /metrics on the port the gate's settings listen on."""
    # defaults: with many gateways and an autoscaled generator beside it, the gate still runs alone
    values = load_values(name) if name else {"gateway": {"replicas": 4}, "generator": {"autoscaling": {"enabled": True}}}
    docs = render(values)
    gate = f"{RELEASE}-odpo-gate"
    dep = one(docs, "Deployment", gate)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert (container["command"], container["args"]) == (["odpo"], ["gate"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    for kind, ref in (("HorizontalPodAutoscaler", "scaleTargetRef"), ("ScaledObject", "scaleTargetRef")):
        assert all(d["spec"][ref]["name"] != gate for d in find(docs, kind))
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert not [d for d in find(docs, "PodDisruptionBudget")
                if d["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    svc = one(docs, "Service", gate)
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    settings = _load_settings(docs, tmp_path, monkeypatch)[5]
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8001, "http")]
    # it loads the base model: it gets the memory the gateway no longer needs
    gateway = one(docs, "Deployment", f"{RELEASE}-odpo-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert _mebibytes(container["resources"]["limits"]["memory"]) > _mebibytes(
        gateway["resources"]["limits"]["memory"])


def _mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[:-len(suffix)]) * factor
    return float(quantity) / 2**20


def test_a_second_gate_cannot_be_asked_for():
    """`gate.replicas` is no value of the chart: the schema refuses it rather than silently running one."""
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match="replicas"):
        render({"gate": {"replicas": 2}})


def test_topic_prefix_partitions_and_replication_reach_the_settings(tmp_path, monkeypatch):
    """kafka.topicPrefix, topicPartitions and replicationFactor become CommonSettings `topic_*`; a bundled
    one-broker Tansu refuses a replication factor above 1, and the schema a prefix Kafka would refuse."""
    import helm_python as helm

    docs = render({"kafka": {"topicPrefix": "team-a.", "topicPartitions": 4, "replicationFactor": 3}})
    common = _load_settings(docs, tmp_path, monkeypatch)[0]
    assert (common.topic_prefix, common.topic_partitions, common.topic_replication_factor) == ("team-a.", 4, 3)
    defaults = _load_settings(render({}), tmp_path, monkeypatch)[0]
    assert (defaults.topic_prefix, defaults.topic_partitions, defaults.topic_replication_factor) == ("", 1, 1)
    with pytest.raises(helm.HelmRenderError, match="one broker"):
        render({"kafka": {"tansu": {"enabled": True}, "replicationFactor": 2}})
    with pytest.raises(helm.HelmValuesError, match="topicPrefix"):
        render({"kafka": {"topicPrefix": "team a/"}})


def _admin_references(docs, secret_name):
    """Deployment name -> how its pods reach the admin token (Secret volumes, secret env, ODPO_*ADMIN* env)."""
    refs: dict[str, list[str]] = {}
    for dep, c in _containers(docs):
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if v.get("secret", {}).get("secretName") == secret_name or v["name"] == "admin-token":
                refs.setdefault(name, []).append(f"volume {v['name']}")
        for m in c.get("volumeMounts", []):
            if m["name"] == "admin-token":
                refs.setdefault(name, []).append(f"mount {m['mountPath']}")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            if ref.get("name") == secret_name or "ADMIN" in e["name"]:
                refs.setdefault(name, []).append(f"env {e['name']}")
        for e in c.get("envFrom", []):
            if e.get("secretRef", {}).get("name") == secret_name:
                refs.setdefault(name, []).append("envFrom")
    return refs


@pytest.mark.parametrize("name", VALUE_FILES, ids=lambda v: v or "defaults")
def test_only_the_gate_holds_the_admin_token(name, tmp_path, monkeypatch):
    """The admin API is the gate's: its Secret is mounted into the gate pod and nowhere else (not the gateways,
    which face clients, nor vLLM/the generator, the judge or the trainer), and only the gate's settings name the
    token file. With the admin API off no pod has it."""
    values = load_values(name)
    docs = render(values)
    admin = values.get("admin", {})
    secret = admin.get("existingSecret") or f"{RELEASE}-odpo-admin"
    refs = _admin_references(docs, secret)
    config = settings_file(docs)
    *_, gate = _load_settings(docs, tmp_path, monkeypatch)
    if admin.get("enabled", True):
        assert set(refs) == {f"{RELEASE}-odpo-gate"}, refs
        assert gate.admin_token_file is not None and gate.admin_token is None
    else:
        assert not refs and gate.admin_token_file is None
        assert not find(docs, "Secret", secret)
    sections = yaml.safe_load(config)
    leaked = {section: sorted(k for k in body if "admin" in k) for section, body in sections.items()
              if section != "gate" and any("admin" in k for k in body)}
    assert not leaked, leaked
    gateway_env = {e["name"] for e in one(docs, "Deployment", f"{RELEASE}-odpo-gateway")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert not {n for n in gateway_env if n.startswith("ODPO_GATE_")}, gateway_env


@pytest.mark.parametrize("trainer, ranks, gpus", [
    ({}, 1, 1),
    ({"gpu": {"count": 4}}, 4, 4),
    ({"gpu": {"count": 2}, "nprocPerNode": 2, "maxRestarts": 1}, 2, 2),
    ({"gpu": {"enabled": False}, "nprocPerNode": 3}, 3, None),
], ids=["one-gpu", "four-gpus", "two-explicit", "cpu-three"])
def test_the_trainer_pod_runs_one_rank_per_gpu_under_torchrun(trainer, ranks, gpus):
    """N GPUs: `torchrun --nproc-per-node N -m service.cli trainer` in the one trainer pod, N GPUs requested, a
    /dev/shm volume for NCCL; one rank: the plain `odpo trainer`. A rank count that is not the GPU count fails."""
    import helm_python as helm

    docs = render({"trainer": trainer})
    dep = one(docs, "Deployment", f"{RELEASE}-odpo-trainer")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    if ranks == 1:
        assert (container["command"], container["args"]) == (["odpo"], ["trainer"]) and not shm
    else:
        restarts = str(trainer.get("maxRestarts", 3))
        assert container["command"] == ["torchrun"]
        assert container["args"] == ["--standalone", "--nproc-per-node", str(ranks), "--max-restarts", restarts,
                                     "-m", "service.cli", "trainer"]
        assert len(shm) == 1 and next(v for v in pod["volumes"] if v["name"] == shm[0]["name"])["emptyDir"][
            "medium"] == "Memory"
    assert {e["name"] for e in container["env"]} >= {"ODPO_CONFIG", "HOME"}  # the common container, unchanged
    assert container["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]  # rank 0's
    with pytest.raises(helm.HelmRenderError, match="one GPU per rank"):
        render({"trainer": {"gpu": {"count": 2}, "nprocPerNode": 4}})


MODEL_CLAIM = {"baseModel": {"existingClaim": "models", "path": "/models/my-model"}}


def _model_mount(docs, component):
    """The base-model claim mount of a component's pod (None when it has none), checked read-only."""
    pod = one(docs, "Deployment", f"{RELEASE}-odpo-{component}")["spec"]["template"]["spec"]
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
    volumes = [v for v in pod["volumes"] if v["name"] == "model"]
    assert len(mounts) == len(volumes) <= 1, component
    if not mounts:
        return None
    assert mounts[0]["readOnly"] is True and volumes[0]["persistentVolumeClaim"] == {"claimName": "models",
                                                                                     "readOnly": True}
    return mounts[0]


@pytest.mark.parametrize("config", [
    {},
    {"gate": {"reference_logprob": False}, "judge": {"reference_logprob": "off"}},
    {"gate": {"reference_logprob": "true"}, "judge": {"composition": "rules_only"}},
    {"gate": {"reference_logprob": "no"}, "judge": {"judge": "human"}},
    {"judge": {"composition": "weighted", "reference_logprob": True}},
], ids=["defaults", "both-off", "rules-only", "human", "weighted"])
def test_pods_that_score_the_reference_logprob_get_the_base_model(config, tmp_path, monkeypatch):
    """The promotion gate and the judge's quality guard load the base model when their settings say so (as the
    real settings classes read the rendered file): then their pod mounts the model claim, read-only, where
    common.base_model points, like the generator and trainer; else it does not. The gateways never load it."""
    docs = render({**MODEL_CLAIM, "config": config})
    common, _, judge, _, _, gate = _load_settings(docs, tmp_path, monkeypatch)
    needs = {"generator": True, "trainer": True, "gateway": False, "gate": gate.reference_logprob,
             "judge": judge.reference_logprob and judge.composition != "rules_only" and judge.judge != "human"}
    for component, needed in needs.items():
        mount = _model_mount(docs, component)
        assert (mount is not None) == needed, (component, config)
        if mount:
            assert common.base_model.is_relative_to(mount["mountPath"])


def test_the_packaged_model_needs_no_claim_and_converts_into_the_cache(tmp_path, monkeypatch):
    """Without a model claim every pod converts the packaged model into its writable cache emptyDir; the judge,
    which builds its guard before it serves /healthz, waits on a startup probe."""
    docs = render()
    common, *_ = _load_settings(docs, tmp_path, monkeypatch)
    assert common.base_model is None
    for component in ("gateway", "gate", "judge", "generator", "trainer"):
        assert _model_mount(docs, component) is None
        pod = one(docs, "Deployment", f"{RELEASE}-odpo-{component}")["spec"]["template"]["spec"]
        cache = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(common.cache_dir))
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == cache["name"])
        assert not cache.get("readOnly")
    judge = one(docs, "Deployment", f"{RELEASE}-odpo-judge")["spec"]["template"]["spec"]["containers"][0]
    assert judge["startupProbe"]["failureThreshold"] * judge["startupProbe"]["periodSeconds"] >= 300


@pytest.mark.parametrize("name, where", [("values-bad-type.yaml", "/generator"),
                                         ("values-unknown-key.yaml", "additional properties 'replica'")])
def test_schema_refuses_wrong_values(name, where):
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError) as err:
        render(load_values(name))
    assert where in str(err.value)
    with helm.Chart.load(CHART) as chart:  # the same verdict from the schema check alone
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(load_values(name))


def test_both_autoscalers_at_once_are_refused():
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match="enable one of them"):
        render({"generator": {"autoscaling": {"enabled": True}, "keda": {"enabled": True}}})


def _schema_objects(node, path="$"):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            yield path, node
        for k, v in node.items():
            yield from _schema_objects(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _schema_objects(v, f"{path}[{i}]")


def test_schema_closes_every_object_it_describes():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = [p for p, o in _schema_objects(schema) if o.get("additionalProperties") is not False]
    assert not open_objects


def test_every_value_is_documented():
    """helm-docs style: each leaf value (or the object that holds it) has a `# --` comment right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, documented_parents = [], []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        documented_parents = [(d, k) for d, k in documented_parents if d < indent]
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        has_doc = j >= 0 and lines[j].strip().startswith("# --") and len(lines[j]) - len(lines[j].lstrip()) == indent
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        is_parent = not rest and len(nxt) - len(nxt.lstrip()) > indent and not nxt.strip().startswith("- ")
        if has_doc and is_parent:
            documented_parents.append((indent, key))
        elif not has_doc and not is_parent and not documented_parents:
            undocumented.append(f"line {i + 1}: {key}")
    assert not undocumented




# -- trust boundaries: NetworkPolicies, secrets, ports, store mounts ---------------------------------------------
@pytest.mark.integration
def test_the_trial_broker_command_starts_tansu(tmp_path):
    """The chart's Tansu container command, run here on a loopback port, answers Kafka requests."""
    from core.broker import free_port, kafka_ready

    docs = render(load_values("values-trial.yaml"))
    c = one(docs, "Deployment", f"{RELEASE}-odpo-kafka")["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    local = f"tcp://127.0.0.1:{port}"  # the pod listens on 0.0.0.0 and advertises its Service name
    args = [local if a.startswith("tcp://") else a for a in c["args"]]
    cmd = [sys.executable if c["command"][0] == "python" else c["command"][0], *c["command"][1:], *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not kafka_ready(f"127.0.0.1:{port}", timeout_s=1.0):
            assert proc.poll() is None, f"the broker exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the broker did not answer within 30s"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
