"""Shared checks for the cluster packaging tests: strict CRD schemas, core Kubernetes schemas, PromQL names.

* KubeRay CRDs come from ``../shared/schemas/kuberay`` beside the repository (CI lays shared/ there).
  The API server drops fields a CRD schema does not declare, silently, so a misspelt or misplaced field
  in a manifest would simply vanish; :func:`strict` turns every declared object into
  ``additionalProperties: false`` so the same mistake is a validation error here.
* Core kinds (Secret, pod templates, ObjectMeta) are checked against the strict Kubernetes JSON schemas
  that ship with the ``kubernetes-validate`` package.
* :func:`promql_metric_names` pulls the metric names out of a PromQL expression, so the dashboard can
  be compared with what the exporter really exposes.
"""

from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
# CI lays shared/ beside the clone; a checkout elsewhere (a git worktree) can point at it explicitly.
SHARED = Path(os.environ.get("AEM_SHARED_DIR") or REPO.parent / "shared")
CRD_DIR = SHARED / "schemas" / "kuberay"
KUBERAY_DIR = REPO / "cluster" / "kuberay"
PROMETHEUS_DIR = REPO / "cluster" / "prometheus"
DASHBOARD = REPO / "cluster" / "grafana" / "aem-dist.json"

# The one command users run on a cluster: README.md ("Run on a Ray cluster") and docs/cluster.md document
# it, the RayJob submits it.
CLUSTER_COMMAND = "aem-dist sweep --config configs/cluster-sweep.yaml --out s3://aem-results/camelyon16-sweep --resume"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a manifest file."""
    with open(path) as fh:
        return [doc for doc in yaml.load_all(fh, Loader=_Loader) if doc]


# ---------------------------------------------------------------------------------------------- CRDs


def crd_files() -> dict[str, Path]:
    """Kind → CRD file in ../shared/schemas/kuberay."""
    return {"RayCluster": CRD_DIR / "ray.io_rayclusters.yaml", "RayJob": CRD_DIR / "ray.io_rayjobs.yaml"}


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which every object that declares ``properties`` rejects other keys.

    Objects that already say what extra keys may hold (``additionalProperties``) or that opt out
    (``x-kubernetes-preserve-unknown-fields``) keep their meaning.
    """
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key in ("enum", "default", "example", "required", "x-kubernetes-validations"):
                    continue  # data, not sub-schemas
                if key == "properties":
                    for sub in value.values():
                        walk(sub)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


def _cel_rules(validator: Any, rules: Any, instance: Any, schema: Any) -> Iterator[Any]:
    # CEL rules (x-kubernetes-validations) only run in an API server. Rather than pass a field whose rule
    # is unchecked, flag it, so a manifest that starts using one gets a deliberate review.
    from jsonschema import ValidationError

    messages = "; ".join(r.get("message", r.get("rule", "")) for r in rules)
    yield ValidationError(f"field carries CEL rules that are not evaluated here ({messages}); check it by hand")


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> Any:
    """A jsonschema validator for the v1 schema of a KubeRay kind, unknown fields being errors."""
    from jsonschema import Draft7Validator, validators

    with open(crd_files()[kind]) as fh:
        crd = yaml.load(fh, Loader=_Loader)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict(versions["v1"]["schema"]["openAPIV3Schema"])
    cls = validators.extend(Draft7Validator, {"x-kubernetes-validations": _cel_rules})
    return cls(schema)


def crd_errors(resource: dict[str, Any]) -> list[str]:
    """Every schema violation of a KubeRay resource, as 'path: message' lines (empty = valid)."""
    validator = crd_validator(resource["kind"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(resource), key=lambda e: list(map(str, e.absolute_path)))]


# ----------------------------------------------------------------------------------------- core kinds


@lru_cache(maxsize=1)
def _k8s_definitions() -> tuple[str, Any]:
    """(k8s version, referencing registry) for the newest strict schema set kubernetes-validate ships."""
    import importlib.resources

    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    version = kv.latest_version()
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    definitions = json.loads((root / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return version, (definitions["$id"], registry)


def core_errors(definition: str, obj: Any) -> list[str]:
    """Violations of ``obj`` against a core Kubernetes definition, e.g. ``io.k8s.api.core.v1.PodTemplateSpec``.

    The schemas are the strict variants: unknown fields are errors, as with the CRDs.
    """
    from jsonschema import Draft202012Validator

    _, (base, registry) = _k8s_definitions()
    validator = Draft202012Validator({"$ref": f"{base}#/$defs/{definition}"}, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


def k8s_version() -> str:
    return _k8s_definitions()[0]


def pod_templates(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name → pod template of a RayCluster or of a RayJob's rayClusterSpec."""
    spec = resource["spec"]
    if resource["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    return out


# ------------------------------------------------------------------------------------------- PromQL

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "atan2", "inf", "nan", "start", "end",
}
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression.

    Removes what cannot be a metric name — string literals, label matchers ``{...}``, range and subquery
    brackets ``[...]``, grouping clauses ``by (...)``, Grafana variables ``$x`` / ``${x}``, numbers and
    durations — then keeps identifiers that are not keywords and not function or aggregation calls.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', " ", expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(rf"(?<![\w.]){_IDENT}", text):
        name = match.group(0)
        after = text[match.end():].lstrip()
        if after.startswith("(") or name.lower() in _PROMQL_KEYWORDS:
            continue
        if re.fullmatch(r"\d.*", name):
            continue
        names.add(name)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query of a Grafana dashboard."""
    out: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        # label_values(<series selector>, <label>): only the selector is PromQL.
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        out.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return out


def exposed_names(registry: Any) -> set[str]:
    """Sample names a prometheus-client registry exposes (what PromQL can select).

    Counters are exposed as ``<name>_total``, histograms as ``<name>_bucket/_sum/_count``, summaries as
    ``<name>``, ``_sum``, ``_count``; ``_created`` series accompany counters, histograms and summaries.
    Families with labels but no children yet still count: their names are fixed by the family.
    """
    names: set[str] = set()
    for family in registry.collect():
        name, kind = family.name, family.type
        if kind == "counter":
            names |= {f"{name}_total", f"{name}_created"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif kind == "info":
            names.add(f"{name}_info")
        else:
            names.add(name)
        names |= {s.name for s in family.samples}
    return names
