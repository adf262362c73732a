"""configs/cluster-sweep.yaml is a valid Config and the paper's CAMELYON16 settings; docs/cluster.md is a
complete runbook whose paths exist."""

from __future__ import annotations

import re

import yaml

from aem_dist.config import load_config

from .helpers import CLUSTER_COMMAND, REPO

CONFIG = REPO / "configs" / "cluster-sweep.yaml"
RUNBOOK = REPO / "docs" / "cluster.md"


def test_cluster_config_loads_with_the_cluster_settings():
    cfg = load_config(CONFIG)  # extra="forbid": an unknown or misplaced key fails here
    assert cfg.data.root.startswith("s3://") and cfg.data.loader == "stream"
    assert cfg.scaling.num_workers == 1 and cfg.scaling.use_gpu is True
    assert cfg.sweep.trial_gpus == 0.25
    assert {"train.seed", "loss.lam"} <= set(cfg.sweep.grid)
    assert (cfg.metrics.host, cfg.metrics.port) == ("0.0.0.0", 9464)
    assert cfg.run.max_failures == 2
    assert CLUSTER_COMMAND.split("--config ")[1].split()[0] == "configs/cluster-sweep.yaml"
    assert CLUSTER_COMMAND.split("--out ")[1].split()[0].startswith("s3://")


def test_cluster_config_keeps_the_paper_settings():
    """Same model, loss, optimisation and grid as configs/camelyon16.yaml: only the execution differs."""
    paper = yaml.safe_load((REPO / "configs" / "camelyon16.yaml").read_text())
    cluster = yaml.safe_load(CONFIG.read_text())
    assert cluster["model"] == paper["model"] and cluster["loss"] == paper["loss"]
    assert {k: v for k, v in cluster["train"].items() if k != "progress"} == paper["train"]
    assert cluster["sweep"]["grid"] == paper["sweep"]["grid"]
    assert load_config(CONFIG).to_dict()["model"] == load_config(REPO / "configs" / "camelyon16.yaml").to_dict()["model"]


def test_cluster_config_resolves_from_any_working_directory(tmp_path, monkeypatch):
    """A RayJob runs the command where configs/ may not exist; the packaged copy is found by name."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/cluster-sweep.yaml")
    assert cfg.sweep.trial_gpus == 0.25


def test_runbook_covers_every_step():
    text = RUNBOOK.read_text()
    for needle in (
        "docker build", "docker push", "helm install kuberay-operator", "kubectl -n aem create secret generic aem-dist-s3",
        "aem-dist-ray-auth", "kubectl -n aem apply -f cluster/kuberay/raycluster.yaml", "port-forward",
        "RAY_AUTH_TOKEN", f"ray job submit --address http://localhost:8265 --working-dir . -- {CLUSTER_COMMAND}",
        "kubectl -n aem apply -f cluster/kuberay/rayjob-sweep.yaml", "cluster/prometheus/podmonitors.yaml",
        "cluster/grafana/aem-dist.json", "aws s3 sync", "Resume", "trials per GPU", "Sizing",
    ):
        assert needle in text, f"docs/cluster.md lacks {needle!r}"


def test_runbook_paths_exist():
    text = RUNBOOK.read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:cluster|configs|docs)/[\w./-]+\.(?:ya?ml|json|md)|Dockerfile|\.dockerignore)", text))
    assert len(paths) >= 6
    for path in paths:
        assert (REPO / path).exists(), f"docs/cluster.md names {path}, which does not exist"
