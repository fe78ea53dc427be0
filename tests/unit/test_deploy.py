"""deploy/: the Kubernetes manifests and the Grafana dashboard promise what the code does.

YAML and JSON parse; kinds and apiVersions are ones Kubernetes serves; probes hit real, key-free routes; ports are
the config's defaults; the grace period covers the drain; the HPA's metric is the one the Prometheus adapter
serves and the batcher exports; every metric (and label) the dashboard queries exists in service/metrics.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from service.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "rewardserve-dashboard.json"
API_VERSIONS = {
    "Deployment": "apps/v1", "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1", "PodMonitor": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container"}  # added by the scrape, not by us


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "prometheus-adapter-values.yaml":  # Helm values, not a manifest
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [doc for _, doc in manifests() if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container() -> dict:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def exported_series() -> dict[str, set[str]]:
    """Every series name service/metrics.py exports, with its labels (histograms: _bucket has `le`)."""
    series: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, (Counter, Gauge, Histogram)):
            continue
        name, labels = collector._name, set(collector._labelnames)
        if isinstance(collector, Counter):
            series[name + "_total"] = labels
        elif isinstance(collector, Histogram):
            series.update({name + "_bucket": labels | {"le"}, name + "_count": labels, name + "_sum": labels})
        else:
            series[name] = labels
    return series


# ---- manifests ----------------------------------------------------------------------------------------
def test_every_manifest_parses_with_a_known_kind_and_api_version():
    docs = manifests()
    assert {doc["kind"] for _, doc in docs} == set(API_VERSIONS)
    for name, doc in docs:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], name
        if doc["kind"] != "Kustomization":
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
    listed = set(one("Kustomization")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}


def test_ports_are_the_config_defaults():
    defaults = ServeConfig()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": defaults.port, "grpc": defaults.grpc_port}
    args = container()["args"]
    assert args[args.index("--port") + 1] == str(defaults.port)
    assert args[args.index("--grpc-port") + 1] == str(defaults.grpc_port)
    assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable from outside the pod
    for service in (one("Service", "rewardserve"), one("Service", "rewardserve-headless")):
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "grpc": "grpc"}
        assert service["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    assert one("Service", "rewardserve-headless")["spec"]["clusterIP"] == "None"  # DNS lists every pod


def test_config_env_vars_exist():
    for env in container().get("env", []):
        assert env["name"].startswith("REWARDSERVE_")
        assert env["name"].removeprefix("REWARDSERVE_").lower() in ServeConfig.model_fields, env["name"]


def http_routes() -> set[str]:
    source = "".join(p.read_text() for p in (ROOT / "service" / "http_api").glob("*.py"))
    return set(re.findall(r'@(?:app|router)\.(?:get|post)\("([^"]+)"', source))


def test_probes_hit_real_routes_that_need_no_key():
    c = container()
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"  # 503 while loading or draining
    assert probes["livenessProbe"]["path"] == "/health"  # 200 while the process answers
    open_routes = set(ServeConfig().open_routes)
    for kind, probe in probes.items():
        assert probe["path"] in http_routes(), kind
        assert probe["path"] in open_routes, f"{kind}: a probe sends no API key"
        assert probe["port"] == "http"
    monitor = one("PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert monitor["path"] == "/metrics" and monitor["path"] in open_routes and monitor["port"] == "http"


def test_grace_period_covers_the_drain():
    """The whole drain (answering what was accepted, then the servers' own stop) is bounded by drain_timeout_s,
    which the pod's grace period must cover after its preStop sleep."""
    env = {e["name"]: e.get("value") for e in container().get("env", [])}
    drain_s = float(env.get("REWARDSERVE_DRAIN_TIMEOUT_S", ServeConfig().drain_timeout_s))
    spec = one("Deployment")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain_s + 5
    resources = container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]


# ---- HPA and the Prometheus adapter --------------------------------------------------------------------
def test_hpa_scales_the_deployment_on_the_queue_depth_the_adapter_serves():
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rewardserve"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name == metrics.QUEUE_DEPTH._name
    assert name in exported_series()
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name  # the adapter serves the metric under the name the HPA asks for
    queried = set(re.findall(r"rewardserve_[a-z0-9_]+", rule["seriesQuery"] + rule["name"]["matches"]))
    assert queried == {name}
    assert set(rule["resources"]["overrides"]) <= TARGET_LABELS
    assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", rule["metricsQuery"]))


# ---- Grafana --------------------------------------------------------------------------------------------
def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


SELECTOR = re.compile(r"(rewardserve_[a-z0-9_]+)(?:\{([^}]*)\})?")


def test_dashboard_parses_and_every_panel_queries_something():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10 and all(p["targets"] for p in graphs)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_metrics_and_labels_exist(expr):
    series = exported_series()
    used = SELECTOR.findall(expr)
    assert used, expr
    labels_here: set[str] = set()
    for name, matchers in used:
        assert name in series, f"{name} is not exported by service/metrics.py"
        labels_here |= series[name]
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
            assert label in series[name] | TARGET_LABELS, (name, label)
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            assert label in labels_here | TARGET_LABELS, (expr, label)
    for label in re.findall(r"label_values\(\s*rewardserve_\w+\s*,\s*(\w+)\)", expr):
        assert label in labels_here
