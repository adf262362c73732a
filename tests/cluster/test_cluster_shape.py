"""The cluster's shape agrees with the sweep config it runs: head without work, GPU group sized for the
trials per GPU, metrics port, /dev/shm, shard cache, image and Ray version."""

from __future__ import annotations

import math
import re
import tomllib

import pytest
from packaging.requirements import Requirement

from aem_dist.config import load_config

from .helpers import KUBERAY_DIR, REPO, load_docs

_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "64Gi", "10") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m and m.group(2) in _UNITS, f"unsupported quantity {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def test_quantity_parser():
    assert quantity("500m") == 0.5 and quantity("10") == 10 and quantity("64Gi") == 64 * 2**30 and quantity(2) == 2


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_docs(KUBERAY_DIR / "raycluster.yaml")[0]["spec"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "cluster-sweep.yaml")


def _container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def _volumes(template: dict) -> dict:
    container = _container(template)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return {path: volumes[name] for path, name in mounts.items()}


def test_head_takes_no_work_and_exposes_the_aem_metrics_port(cluster, cfg):
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in _container(head["template"]).get("ports", [])}
    assert ports["aem-metrics"] == cfg.metrics.port
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080
    assert "nvidia.com/gpu" not in _container(head["template"])["resources"]["limits"]
    # The driver must listen on the pod IP for Prometheus to reach it.
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"


def test_gpu_workers_autoscale_and_fit_the_trials_per_gpu(cluster, cfg):
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]
    resources = _container(group["template"])["resources"]
    assert resources["requests"] == resources["limits"]  # Ray sizes itself from limits; no overcommit
    gpus = quantity(resources["limits"]["nvidia.com/gpu"])
    cpus = quantity(resources["limits"]["cpu"])
    trials_per_pod = gpus / cfg.sweep.trial_gpus
    assert trials_per_pod == 4 and cfg.scaling.use_gpu and cfg.scaling.num_workers == 1
    # Each trial: a Ray Train worker with trial_cpus plus the Tune trial driver's 0.01 CPU.
    assert cpus >= math.ceil(trials_per_pod * (cfg.sweep.trial_cpus + 0.01)), "GPU pods run out of CPUs before GPUs"
    assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))


def test_every_pod_has_shm_for_the_object_store_and_workers_a_shard_cache(cluster, cfg):
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        volumes = _volumes(group["template"])
        shm = volumes["/dev/shm"]["emptyDir"]
        limit = quantity(_container(group["template"])["resources"]["limits"]["memory"])
        assert shm["medium"] == "Memory"
        assert 0.2 * limit <= quantity(shm["sizeLimit"]) <= 0.5 * limit
    (worker,) = cluster["workerGroupSpecs"]
    cache_dir = cfg.data.cache_dir
    mounts = _volumes(worker["template"])
    mount = next(path for path in mounts if cache_dir.startswith(path.rstrip("/") + "/"))
    assert "medium" not in mounts[mount]["emptyDir"]  # local disk, not RAM
    assert quantity(mounts[mount]["emptyDir"]["sizeLimit"]) >= cfg.data.cache_max_gb * 2**30


def test_pods_run_as_the_image_user(cluster):
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        ctx = group["template"]["spec"]["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000
    assert re.search(r"^USER 1000:100$", (REPO / "Dockerfile").read_text(), re.MULTILINE)


def test_images_and_ray_version_agree_with_the_project(cluster):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    images = set()
    for path in KUBERAY_DIR.glob("*.yaml"):
        images |= set(re.findall(r"^\s*image:\s*(\S+)", path.read_text(), re.MULTILINE))
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit(":", 1)[1] == project["version"]
    ray_req = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray")
    dockerfile = (REPO / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE).group(1)
    assert cluster["rayVersion"] == ray_version
    assert f"rayproject/ray:{ray_version}-" in dockerfile
    assert ray_req.specifier.contains(ray_version), (str(ray_req), ray_version)
