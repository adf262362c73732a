"""Cases run by tests/orchestrate/test_multinode.py, each in a fresh Python process (this file is not
collected on its own: its name does not start with test_). Ray keeps process-global state — its auth
mode and C++ config are read once per process — so a multi-node cluster started in the pytest process
that earlier ran private local Rays with token auth would inherit a mismatched client."""

import json

import pytest

from aem_dist import storage
from aem_dist.config import load_config
from aem_dist.observe.tables import read_csv
from aem_dist.orchestrate.errors import PreflightError

pytestmark = pytest.mark.integration


def test_two_node_sweep_spreads_trials_and_refuses_local_paths(ray_multinode, s3_server, demo_data, tmp_path):
    from aem_dist.orchestrate.ray_env import ray_session
    from aem_dist.orchestrate.sweep import run_sweep

    options = s3_server.options()
    bucket = s3_server.make_bucket("multinode")
    s3, _ = storage.open_fs(bucket, options)
    s3.put(str(demo_data) + "/", "multinode/demo/", recursive=True)
    base = {
        "data.root": f"{bucket}/demo", "train.epochs": 1, "scaling.num_workers": 0, "train.progress": False,
        "metrics.enabled": False, "sweep.grid": {"train.seed": [0, 1]}, "sweep.population": "off",
    }  # fmt: skip
    with ray_session(ray_multinode.address):
        # A local dataset on a 3-node cluster: refused before any trial, with the s3:// advice.
        local = load_config("demo", {**base, "data.root": str(demo_data)})
        with pytest.raises(PreflightError, match=rf"has 3 nodes but data\.root={demo_data}, --out={tmp_path}/local are local paths: .*s3://"):
            run_sweep(local, str(tmp_path / "local"))
        assert not (tmp_path / "local" / "trials").exists() and not (tmp_path / "local" / "ray").exists()
        # A GPU per trial on this CPU-only cluster: a clear error, not a trial pending forever.
        with pytest.raises(PreflightError, match=r"one trial needs CPU 1, GPU 1 .*sweep\.trial_gpus"):
            run_sweep(load_config("demo", {**base, "sweep.trial_gpus": 1}), f"{bucket}/gpu")

        run_sweep(load_config("demo", base), f"{bucket}/sweep", announce=lambda _: None)

    rows = read_csv(f"{bucket}/sweep/trials.csv", options)
    assert sorted(r["train.seed"] for r in rows) == [0, 1] and all(r["status"] == "TERMINATED" for r in rows)
    nodes = {}
    for row in rows:
        result = json.loads(s3.cat_file(f"multinode/sweep/trials/{row['trial']}/results.json"))
        nodes[row["trial"]] = result["trial_node_id"]
        assert s3.exists(f"multinode/sweep/trials/{row['trial']}/best/state.pt")  # written from the node that trained it
    # One 1-CPU trial per worker node: each node's custom resource saw exactly one trial; the head none.
    assert sorted(nodes.values()) == sorted(ray_multinode.node_ids.values()), (nodes, ray_multinode.node_ids)
    assert ray_multinode.head_node_id not in nodes.values()
