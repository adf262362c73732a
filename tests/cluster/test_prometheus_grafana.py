"""PodMonitors scrape ports the Ray pods really expose; the Grafana dashboard queries only metrics the
exporter really registers."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require

from .helpers import (
    DASHBOARD, KUBERAY_DIR, PROMETHEUS_DIR, core_errors, dashboard_queries, exposed_names, load_docs, pod_templates,
    promql_metric_names,
)

# The part of the Prometheus Operator's monitoring.coreos.com/v1 PodMonitor schema these manifests use,
# strict like the KubeRay checks: a misspelt field is an error instead of being dropped by the API server.
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod"]},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "matchExpressions": {"type": "array"}},
}
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},  # checked against core ObjectMeta separately
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": _LABEL_SELECTOR,
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["port"],
                        "properties": {
                            "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]}, "interval": _DURATION, "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def _monitors() -> list[dict]:
    return [doc for path in sorted(PROMETHEUS_DIR.glob("*.yaml")) for doc in load_docs(path)]


def _podmonitor_errors(doc: dict) -> list[str]:
    from jsonschema import Draft202012Validator

    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft202012Validator(PODMONITOR_SCHEMA).iter_errors(doc)]


def test_podmonitors_have_the_podmonitor_shape():
    monitors = _monitors()
    assert {m["metadata"]["name"] for m in monitors} == {"aem-dist-ray", "aem-dist-driver"}
    for monitor in monitors:
        assert _podmonitor_errors(monitor) == [], monitor["metadata"]["name"]
        assert core_errors("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", monitor["metadata"]) == []


def test_podmonitor_shape_rejects_unknown_fields():
    monitor = copy.deepcopy(_monitors()[0])
    monitor["spec"]["podMetricsEndpoints"][0]["targetPort"] = 8080  # deprecated / misplaced field
    assert any("targetPort" in e for e in _podmonitor_errors(monitor))
    monitor = copy.deepcopy(_monitors()[0])
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert any("interval" in e for e in _podmonitor_errors(monitor))


def _cluster_pods() -> list[tuple[str, dict, set[str]]]:
    """(group, pod labels, container port names) for the RayCluster's groups."""
    cluster = load_docs(KUBERAY_DIR / "raycluster.yaml")[0]
    out = []
    for group, template in pod_templates(cluster).items():
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        out.append((group, template["metadata"]["labels"], ports))
    return out


def _selected(monitor: dict) -> list[tuple[str, set[str]]]:
    wanted = monitor["spec"]["selector"]["matchLabels"]
    return [(group, ports) for group, labels, ports in _cluster_pods() if wanted.items() <= labels.items()]


def test_every_scraped_port_exists_on_a_selected_pod():
    for monitor in _monitors():
        selected = _selected(monitor)
        assert selected, f"{monitor['metadata']['name']} selects no Ray pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert any(endpoint["port"] in ports for _, ports in selected), endpoint["port"]


def test_driver_metrics_scraped_on_the_head_and_ray_metrics_everywhere():
    monitors = {m["metadata"]["name"]: m for m in _monitors()}
    driver = monitors["aem-dist-driver"]
    assert [g for g, _ in _selected(driver)] == ["head"]
    (endpoint,) = driver["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "aem-metrics" and endpoint["path"] == "/metrics"
    ray = monitors["aem-dist-ray"]
    groups = {g for g, ports in _selected(ray) if "metrics" in ports}
    assert groups == {g for g, _, _ in _cluster_pods()}  # head and every worker group


# ------------------------------------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(aem_step_duration_seconds_bucket{run=~"$run"}[$__rate_interval])))'
    ) == {"aem_step_duration_seconds_bucket"}
    assert promql_metric_names("aem_epoch_duration_seconds_sum{a=\"b,c\"} / on (trial) aem_epoch_duration_seconds_count offset 5m") == {
        "aem_epoch_duration_seconds_sum", "aem_epoch_duration_seconds_count"}
    assert promql_metric_names("sum(rate(x_total[5m])) by (trial) > bool 0.5 and y") == {"x_total", "y"}
    assert promql_metric_names('avg by (lam) (aem_eval_auc{split="test"}) unless ignoring(split) z') == {"aem_eval_auc", "z"}
    assert promql_metric_names("1 + 2e3") == set()


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert "datasource" in names and {"run", "lam", "seed"} <= set(names)


def _dashboard_metric_names(dashboard: dict) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for where, expr in dashboard_queries(dashboard):
        found = promql_metric_names(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for name in found:
            names.setdefault(name, set()).add(where)
    return names


def test_dashboard_shows_what_the_issue_asks_for(dashboard):
    names = set(_dashboard_metric_names(dashboard))
    assert all(n.startswith("aem_") for n in names), sorted(names)
    for required in ("aem_train_loss", "aem_train_ce_loss", "aem_train_aem_loss", "aem_attention_entropy_nats",
                     "aem_eval_auc", "aem_eval_f1", "aem_instances_processed_total", "aem_trials"):
        assert required in names, required
    by_lam = [expr for _, expr in dashboard_queries(dashboard) if "aem_eval_auc" in expr and "by (lam)" in expr]
    assert by_lam, "no AUC-by-λ panel"


def _exporter_registry():
    """The exporter's registry, freshly built with every metric family it serves."""
    from aem_dist.observe.metrics import build_registry

    registry, _ = build_registry()
    return registry


def test_every_dashboard_metric_exists_in_the_exporter(dashboard):
    exposed = exposed_names(_exporter_registry())
    assert any(n.startswith("aem_") for n in exposed), "the exporter registry holds no aem_ metric"
    used = _dashboard_metric_names(dashboard)
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, f"dashboard queries metrics the exporter does not expose: {missing}"


def test_exposed_names_follow_prometheus_client_conventions():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    Counter("aem_bags_processed", "bags", ["run"], registry=registry)
    Histogram("aem_step_duration_seconds", "step", ["run"], registry=registry)
    Gauge("aem_epoch", "epoch", ["run"], registry=registry)
    names = exposed_names(registry)
    assert {"aem_bags_processed_total", "aem_step_duration_seconds_bucket", "aem_step_duration_seconds_count",
            "aem_step_duration_seconds_sum", "aem_epoch"} <= names
    assert "aem_step_duration_seconds" not in names and "aem_bags_processed" not in names


def _grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables the way Grafana would before sending a query."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(run|lam|seed|split)\}?", ".*", expr)


def _promtool_check(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess:
    rules = {"groups": [{"name": "aem-dist-dashboard",
                         "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True))
    return subprocess.run([shutil.which("promtool") or "promtool", "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """Prometheus's own parser (promtool, Debian package `prometheus`) accepts every dashboard query."""
    require(shutil.which("promtool") is not None, "promtool not found (Debian package prometheus; `make test-deps`)")
    exprs = [_grafana_to_promql(e) for _, e in dashboard_queries(dashboard)]
    proc = _promtool_check(tmp_path, exprs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(exprs)} rules found" in proc.stdout
    broken = _promtool_check(tmp_path, ["sum by (le (rate(aem_step_duration_seconds_bucket[1m]))"])
    assert broken.returncode != 0
