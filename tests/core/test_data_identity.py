"""A run and a sweep --resume refuse a dataset whose manifest changed since they were trained on it, in one
line naming both digests; --force-new starts over (the report's refusal: tests/observe/test_report.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from aem_dist.config import load_config
from aem_dist.data.synthetic import get_spec, write_synthetic
from aem_dist.observe.identity import DataChanged, check_same_data, dataset_digests, manifest_digest


def _data(root, seed):
    shutil.rmtree(root, ignore_errors=True)
    write_synthetic(get_spec("demo"), str(root), seed=seed, progress=False)
    return manifest_digest(str(root))


def test_train_rerun_against_changed_data_is_refused(tmp_path):
    from aem_dist.orchestrate.train import train_run

    data, out = tmp_path / "data", tmp_path / "run"
    first = _data(data, 0)
    cfg = load_config("demo", [f"data.root={data}", "train.epochs=1", "train.progress=false", "scaling.num_workers=0", "metrics.enabled=false"])
    train_run(cfg, str(out))
    record = json.loads((out / "run.json").read_text())
    assert record["datasets"] == {str(data): first}
    train_run(cfg, str(out))  # the same data: resumes (here: already finished)
    second = _data(data, 1)  # other features written to the same URL
    with pytest.raises(DataChanged) as err:
        train_run(cfg, str(out))
    msg = str(err.value)
    assert first in msg and second in msg and "--force-new" in msg and "\n" not in msg
    train_run(cfg, str(out), force_new=True)
    assert json.loads((out / "run.json").read_text())["datasets"] == {str(data): second}


def test_sweep_resume_against_changed_data_is_refused_before_ray(tmp_path):
    from aem_dist.engine.results import run_record, write_json
    from aem_dist.orchestrate.sweep import run_sweep

    data, out = tmp_path / "data", tmp_path / "sweep"
    first = _data(data, 0)
    cfg = load_config("demo", [f"data.root={data}", "metrics.enabled=false"])
    write_json(str(out / "run.json"), run_record(cfg, "sweep", datasets=dataset_digests([str(data)])))
    second = _data(data, 2)
    with pytest.raises(DataChanged, match=f"{first}.*{second}.*choose another --out"):
        run_sweep(cfg, str(out), resume=True)  # refused before Ray is needed


def test_check_same_data_rules(tmp_path):
    data = tmp_path / "d"
    digest = _data(data, 0)
    check_same_data({"datasets": {str(data): digest}}, [str(data)], "x")  # unchanged
    check_same_data({"datasets": {"elsewhere": "0" * 64}}, [str(data)], "x")  # a dataset the record does not know
    check_same_data({"dataset": {"root": str(data), "manifest_sha256": digest}}, [str(data)], "x")  # older run.json
    with pytest.raises(DataChanged, match="has no manifest.json"):
        shutil.rmtree(data)
        check_same_data({"datasets": {str(data): digest}}, [str(data)], "x")

