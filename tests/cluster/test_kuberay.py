"""KubeRay manifests: valid against the CRD schemas with unknown fields as errors, core kinds valid, and
consistent with the image, the cluster config and the documented command."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from tests.conftest import require

from .helpers import (
    CLUSTER_COMMAND, CRD_DIR, KUBERAY_DIR, REPO, core_errors, crd_errors, crd_files, load_docs, pod_templates,
)

MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
KUBERAY_KINDS = ("RayCluster", "RayJob")
AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def _resources() -> list[tuple[str, dict]]:
    return [(f"{path.name}#{i}", doc) for path in MANIFESTS for i, doc in enumerate(load_docs(path))]


def _of_kind(kind: str) -> dict:
    found = [doc for _, doc in _resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in cluster/kuberay, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def crds() -> Path:
    missing = [str(p) for p in crd_files().values() if not p.is_file()]
    require(not missing, f"KubeRay CRDs not found ({', '.join(missing)}); they live in shared/schemas/kuberay beside "
                         f"the repository (set AEM_SHARED_DIR to point elsewhere)")
    return CRD_DIR


def test_manifest_files_present():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-sweep.yaml", "secret.example.yaml"} <= names
    kinds = sorted(doc["kind"] for _, doc in _resources())
    # Everything in cluster/kuberay is checked below: KubeRay kinds against the CRDs, Secrets against core.
    assert set(kinds) <= {*KUBERAY_KINDS, "Secret"}, kinds
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 1


@pytest.mark.parametrize("where,resource", [r for r in _resources() if r[1]["kind"] in KUBERAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_resource_matches_crd_schema(crds, where, resource):
    assert resource["apiVersion"] == "ray.io/v1"
    assert crd_errors(resource) == [], f"{where} does not validate against the {resource['kind']} CRD"
    assert core_errors("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", resource["metadata"]) == []


@pytest.mark.parametrize("where,resource", [r for r in _resources() if r[1]["kind"] in KUBERAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_pod_templates_match_core_podtemplatespec(where, resource):
    templates = pod_templates(resource)
    assert "head" in templates and len(templates) >= 2
    for group, template in templates.items():
        assert core_errors("io.k8s.api.core.v1.PodTemplateSpec", template) == [], f"{where} group {group}"


@pytest.mark.parametrize(
    "kind,path,key",
    [
        ("RayCluster", ["spec"], "rayVersionn"),
        ("RayCluster", ["spec", "headGroupSpec"], "rayStartParam"),
        ("RayCluster", ["spec", "workerGroupSpecs", 0], "maxReplica"),
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0], "imagePullPolicyy"),
        ("RayJob", ["spec"], "shutdownAfterJobFinish"),
        ("RayJob", ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volumes", 0, "emptyDir"], "size"),
    ],
)
def test_unknown_field_is_rejected(crds, kind, path, key):
    resource = copy.deepcopy(_of_kind(kind))
    node = resource
    for part in path:
        node = node[part]
    node[key] = "x"
    errors = crd_errors(resource)
    assert any(repr(key) in e and "Additional properties" in e for e in errors), errors


def test_wrong_type_and_unchecked_cel_rule_are_rejected(crds):
    cluster = copy.deepcopy(_of_kind("RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be the string "0"
    assert any("num-cpus" in e and "string" in e for e in crd_errors(cluster))
    cluster = copy.deepcopy(_of_kind("RayCluster"))
    cluster["spec"]["managedBy"] = "ray.io/kuberay-operator"  # guarded by a CEL rule jsonschema cannot run
    assert any("CEL" in e for e in crd_errors(cluster))


def test_core_schemas_reject_unknown_fields():
    template = copy.deepcopy(pod_templates(_of_kind("RayCluster"))["head"])
    template["spec"]["containers"][0]["envv"] = []
    assert any("envv" in e for e in core_errors("io.k8s.api.core.v1.PodTemplateSpec", template))
    secret = copy.deepcopy(_of_kind_secret("aem-dist-s3"))
    secret["stringdata"] = secret.pop("stringData")
    assert any("stringdata" in e for e in core_errors("io.k8s.api.core.v1.Secret", secret))


def _of_kind_secret(name: str) -> dict:
    return next(doc for _, doc in _resources() if doc["kind"] == "Secret" and doc["metadata"]["name"] == name)


def test_rayjob_cluster_is_the_raycluster():
    """One cluster shape: the RayJob's rayClusterSpec equals raycluster.yaml's spec."""
    assert _of_kind("RayJob")["spec"]["rayClusterSpec"] == _of_kind("RayCluster")["spec"]


def _documented_command_source() -> tuple[Path, str]:
    """README.md once it has the cluster section the integrator copies there, docs/cluster.md until then."""
    readme = REPO / "README.md"
    if readme.is_file():
        text = readme.read_text()
        if re.search(r"^#+\s.*(Run on a Ray cluster|Kubernetes|KubeRay)", text, re.IGNORECASE | re.MULTILINE):
            return readme, text
    doc = REPO / "docs" / "cluster.md"
    return doc, doc.read_text()


def test_rayjob_entrypoint_is_the_documented_command():
    spec = _of_kind("RayJob")["spec"]
    assert spec["entrypoint"] == CLUSTER_COMMAND
    source, text = _documented_command_source()
    assert CLUSTER_COMMAND in text, f"{source.name} does not document the RayJob's command"
    # The runbook submits exactly that command with `ray job submit`.
    runbook = (REPO / "docs" / "cluster.md").read_text()
    submitted = [line.split(" -- ", 1)[1].strip() for line in runbook.splitlines()
                 if line.startswith("ray job submit ") and " -- " in line]
    assert submitted and set(submitted) == {CLUSTER_COMMAND}
    assert all("--address http://localhost:8265 --working-dir ." in line for line in runbook.splitlines()
               if line.startswith("ray job submit "))


def test_rayjob_lifecycle_settings():
    spec = _of_kind("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0          # time for the last scrape before the cluster goes
    assert spec["activeDeadlineSeconds"] >= 3600
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    # Entrypoint resources would move the driver (and its metrics endpoint) off the head pod.
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)


def _container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_s3_credentials_come_from_the_secret():
    secret = _of_kind_secret("aem-dist-s3")
    for where, resource in _resources():
        if resource["kind"] not in KUBERAY_KINDS:
            continue
        for group, template in pod_templates(resource).items():
            env = {e["name"]: e for e in _container(template).get("env", [])}
            for var in AWS_VARS:
                assert var in env, f"{where} {group}: {var} missing"
                assert "value" not in env[var], f"{where} {group}: {var} must not be a literal"
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_secret_example_is_valid_and_holds_only_placeholders():
    secrets = [doc for _, doc in _resources() if doc["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"aem-dist-s3", "aem-dist-ray-auth"}
    for secret in secrets:
        assert core_errors("io.k8s.api.core.v1.Secret", secret) == []
        for key, value in secret["stringData"].items():
            if re.search(r"KEY|SECRET|TOKEN", key, re.IGNORECASE):
                assert str(value).startswith("REPLACE_"), f"{key} must be a placeholder"
    text = (KUBERAY_DIR / "secret.example.yaml").read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert set(AWS_VARS) == set(_of_kind_secret("aem-dist-s3")["stringData"])
    # The RayCluster's token Secret is the one the example creates, with the key KubeRay reads.
    auth = _of_kind("RayCluster")["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "aem-dist-ray-auth"}
    assert "auth_token" in _of_kind_secret("aem-dist-ray-auth")["stringData"]
