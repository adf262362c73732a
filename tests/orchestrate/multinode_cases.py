"""Cases run by tests/orchestrate/test_multinode.py, each in a fresh Python process (this file is not
collected on its own: its name does not start with test_). Ray keeps process-global state — its auth
mode and C++ config are read once per process — so a multi-node cluster started in the pytest process
that earlier ran private local Rays with token auth would inherit a mismatched client.

The cases share one cluster (``ray_multinode`` is module-scoped) and run in file order: the node-loss
case comes last, since it removes node_b."""

import gc
import json
import os
import re
import socket

import pytest

from aem_dist import storage
from aem_dist.config import load_config
from aem_dist.data.manifest import load_manifest
from aem_dist.observe.tables import read_csv
from aem_dist.orchestrate.errors import PreflightError
from tests.core.test_train import metrics_only

pytestmark = pytest.mark.integration

QUIET = {"train.progress": False, "metrics.enabled": False}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A quarter of the demo preset, another seed: different shards, faster trials."""
    from aem_dist.data.synthetic import get_spec, write_synthetic

    root = str(tmp_path_factory.mktemp("small-data"))
    write_synthetic(get_spec("demo", scale=0.25), root, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def bucket(s3_server, demo_data, small_data):
    """s3://multinode holding the demo dataset (demo/) and the small one (small/)."""
    url = s3_server.make_bucket("multinode")
    s3, _ = storage.open_fs(url, s3_server.options())
    s3.put(str(demo_data) + "/", "multinode/demo/", recursive=True)
    s3.put(small_data + "/", "multinode/small/", recursive=True)
    return url


def _s3(s3_server):
    return storage.open_fs("s3://multinode", s3_server.options())[0]


def _results(s3_server, out_key: str, trial: str) -> dict:
    return json.loads(_s3(s3_server).cat_file(f"multinode/{out_key}/trials/{trial}/results.json"))


def _cache_entries(cache_dir: str) -> set[str]:
    """sha256 of every shard in a node's cache (content-addressed: shards/<ab>/<sha256>.tar)."""
    if not os.path.isdir(cache_dir):
        return set()
    return {f[: -len(".tar")] for _, _, files in os.walk(os.path.join(cache_dir, "shards")) for f in files if f.endswith(".tar")}


def test_two_node_sweep_spreads_trials_and_refuses_local_paths(ray_multinode, s3_server, bucket, demo_data, tmp_path):
    """A 2-point sweep (one trial per dataset, streamed) runs one trial per worker node, all state on S3;
    each node's own shard cache then holds exactly the shards of the dataset its trial read: nothing of
    the other node's, nothing on the head. Local paths and a GPU per trial are refused before any trial."""
    from aem_dist.orchestrate.ray_env import ray_session
    from aem_dist.orchestrate.sweep import run_sweep

    options = s3_server.options()
    base = {**QUIET, "data.root": f"{bucket}/demo", "train.epochs": 1, "scaling.num_workers": 0, "sweep.grid": {"train.seed": [0, 1]}, "sweep.population": "off"}
    with ray_session(ray_multinode.address):
        # A local dataset on a 3-node cluster: refused before any trial, with the s3:// advice.
        local = load_config("demo", {**base, "data.root": str(demo_data)})
        with pytest.raises(PreflightError, match=rf"has 3 nodes but data\.root={demo_data}, --out={tmp_path}/local are local paths: .*s3://"):
            run_sweep(local, str(tmp_path / "local"))
        assert not (tmp_path / "local" / "trials").exists() and not (tmp_path / "local" / "ray").exists()
        # A GPU per trial on this CPU-only cluster: a clear error, not a trial pending forever.
        with pytest.raises(PreflightError, match=r"one trial needs CPU 1, GPU 1 .*sweep\.trial_gpus"):
            run_sweep(load_config("demo", {**base, "sweep.trial_gpus": 1}), f"{bucket}/gpu")

        roots = {"demo": f"{bucket}/demo", "small": f"{bucket}/small"}
        streamed = {**base, "data.loader": "stream", "sweep.grid": {"data.root": list(roots.values())}}
        run_sweep(load_config("demo", streamed), f"{bucket}/sweep", announce=lambda _: None)

    rows = read_csv(f"{bucket}/sweep/trials.csv", options)
    assert sorted(r["data.root"] for r in rows) == sorted(roots.values()) and all(r["status"] == "TERMINATED" for r in rows)
    s3 = _s3(s3_server)
    trained = {}  # node id → the dataset its trial read
    for row in rows:
        result = _results(s3_server, "sweep", row["trial"])
        trained[result["trial_node_id"]] = row["data.root"]
        assert s3.exists(f"multinode/sweep/trials/{row['trial']}/best/state.pt")  # written from the node that trained it
    # One 1-CPU trial per worker node: each node's custom resource saw exactly one trial; the head none.
    assert sorted(trained) == sorted(ray_multinode.node_ids.values()), (trained, ray_multinode.node_ids)

    # Node-local caches: each node holds every shard of its dataset and nothing else.
    shards = {root: {s.sha256 for split in load_manifest(root, options).splits.values() for s in split.shards} for root in roots.values()}
    assert not shards[roots["demo"]] & shards[roots["small"]]
    for name, node_id in ray_multinode.node_ids.items():
        assert _cache_entries(ray_multinode.cache_dirs[name]) == shards[trained[node_id]], name
    assert not os.path.exists(ray_multinode.cache_dirs["head"])  # the head trained nothing, so read no shard


def test_node_that_cannot_reach_s3_is_named_before_any_trial(ray_multinode, s3_server, bucket):
    """A node whose environment names another S3 endpoint (a pod's Secret that differs from the driver's):
    a one-line error naming that node and endpoint before any trial, not a hang; no credential in it."""
    from aem_dist.orchestrate.ray_env import ray_session
    from aem_dist.orchestrate.sweep import run_sweep

    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # held, never listening: every connection is refused
        endpoint = f"http://127.0.0.1:{dead.getsockname()[1]}"
        node_c = ray_multinode.add_node("node_c", env={"AWS_ENDPOINT_URL_S3": endpoint}).node_id
        try:
            cfg = load_config("demo", {**QUIET, "data.root": f"{bucket}/demo", "train.epochs": 1, "scaling.num_workers": 0, "sweep.grid": {"train.seed": [0]}})
            with ray_session(ray_multinode.address), pytest.raises(PreflightError) as info:
                run_sweep(cfg, f"{bucket}/unreachable", announce=lambda _: None)
        finally:
            ray_multinode.remove_node("node_c")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("1 of 4 nodes of this Ray cluster cannot reach the run's object storage"), message
    node = re.escape(node_c[:8])
    assert re.search(rf"node {node} \([0-9.]+\) cannot use object storage \(data\.root: cannot connect to object storage at {re.escape(endpoint)} ", message), message
    assert "AWS_ENDPOINT_URL_S3" in message and s3_server.secret not in message and s3_server.key not in message
    assert not _s3(s3_server).exists("multinode/unreachable/trials")


def _gloo_fit(rank: int, port: int, overrides: dict, queue) -> None:
    """One rank of a plain 2-process gloo run of the training loop (no Ray); rank 0 puts its results."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as in Ray workers (OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from aem_dist.engine.loop import fit

        result = fit(load_config("demo", overrides))
        if rank == 0:
            queue.put({"val": result.val, "test": result.test, "history": metrics_only(result.history)})
    finally:
        gc.collect()  # every DDP wrapper gone and every rank done before the group goes
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        queue.close()
        queue.join_thread()
    os._exit(0)  # see tests/core/test_population_ddp.py: gloo threads may abort in exit-time destructors


def _gloo_reference(overrides: dict) -> dict:
    import torch.multiprocessing as mp

    from tests.fixtures.ray_cluster import free_ports

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=_gloo_fit, args=(r, port, overrides, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_ddp_across_nodes_equals_one_node(ray_multinode, s3_server, bucket, small_data):
    """A 2-worker Ray Train run with one worker on each node (1 CPU per node, 1 per worker) trains, and its
    metrics equal the same 2-rank DDP run in one machine's plain gloo group — what a 1-node 2-worker Ray
    run computes (checked once, bit for bit, on a private 2-CPU local Ray; not repeated here for CI time)."""
    from aem_dist.orchestrate.train import train_run

    common = {**QUIET, "train.epochs": 2, "model.dropout": 0.1}
    results = train_run(load_config("demo", {**common, "data.root": f"{bucket}/small", "scaling.num_workers": 2}), f"{bucket}/ddp", address=ray_multinode.address)
    assert sorted(results["worker_node_ids"]) == sorted(ray_multinode.node_ids.values())  # rank 0 on one node, rank 1 on the other
    assert results["trial_node_id"] == results["worker_node_ids"][0]

    reference = _gloo_reference({**common, "data.root": small_data})
    for split in ("val", "test"):
        assert results[split].keys() == reference[split].keys()
        for metric, value in reference[split].items():
            assert results[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)
    got = metrics_only(results["history"])
    assert [row["train"]["bags"] for row in got] == [row["train"]["bags"] for row in reference["history"]]
    assert [row["train"]["loss"] for row in got] == pytest.approx([row["train"]["loss"] for row in reference["history"]], abs=1e-6)


class _RemoveNodeAtEpoch:
    """A Tune callback (driver side): the first time a trial training on node ``name`` reports epoch
    ≥ ``epoch``, remove that node — its raylet and workers killed — before Tune asks for the next result.
    Results reach the driver through bounded queues (Train worker → controller → trial → driver, one
    result each), so the trial cannot have got more than a few epochs further when the node goes."""

    def __init__(self, cluster, name: str, epoch: int):
        self.cluster, self.name, self.epoch = cluster, name, epoch
        self.victim: str | None = None
        self.seen_epoch: int | None = None

    def as_tune_callback(self):
        from ray import tune

        outer = self

        class Callback(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                if outer.victim is None and result.get("node_id") == outer.cluster.node_ids[outer.name] and result.get("epoch", -1) >= outer.epoch:
                    outer.victim, outer.seen_epoch = trial.config["_population"]["name"], result["epoch"]
                    outer.cluster.remove_node(outer.name)

            def __reduce__(self):  # Tune pickles callbacks into its experiment state: a plain one, not the cluster
                return (tune.Callback, ())

        return Callback()


def test_node_loss_mid_sweep_resumes_on_the_surviving_node(ray_multinode, s3_server, bucket, small_data):
    """4 one-worker trials on two 1-CPU worker nodes, every state on S3. Once a trial on node_b has
    reported epoch 2, node_b is removed; the sweep finishes with every trial TERMINATED, the interrupted
    trial resumed from its S3 checkpoint on node_a, and every trial's metrics equal an undisturbed run's
    (the same point trained in this process: a 1-worker TorchTrainer trial computes exactly that, see
    test_ray_train.py::test_injected_failure_resumes_from_checkpoint). Runs last: node_b stays gone."""
    from aem_dist.engine.loop import fit
    from aem_dist.orchestrate.ray_env import ray_session
    from aem_dist.orchestrate.sweep import run_sweep

    epochs, seeds = 8, [0, 1, 2, 3]
    common = {**QUIET, "train.epochs": epochs, "model.dropout": 0.1}  # dropout: the RNG state must resume too
    # Half a CPU per trial: all 4 run at once (2 per node), then node_b's 2 resume together on node_a.
    one_worker = {"scaling.num_workers": 1, "sweep.trial_cpus": 0.5, "run.max_failures": 2, "sweep.grid": {"train.seed": seeds}, "sweep.population": "off"}
    cfg = load_config("demo", {**common, **one_worker, "data.root": f"{bucket}/small"})
    killer = _RemoveNodeAtEpoch(ray_multinode, "node_b", epoch=2)
    with ray_session(ray_multinode.address):
        run_sweep(cfg, f"{bucket}/nodeloss", announce=lambda _: None, callbacks=[killer.as_tune_callback()])
    assert killer.victim is not None and "node_b" not in ray_multinode.node_ids  # the node went mid-sweep

    rows = read_csv(f"{bucket}/nodeloss/trials.csv", s3_server.options())
    assert sorted(r["train.seed"] for r in rows) == seeds and all(r["status"] == "TERMINATED" for r in rows), rows
    for row in rows:
        result = _results(s3_server, "nodeloss", row["trial"])
        assert result["trial_node_id"] == ray_multinode.node_ids["node_a"], row["trial"]  # every trial finished on the survivor
        if row["trial"] == killer.victim:  # resumed from a checkpoint written on node_b, not from scratch
            assert 2 <= result["resumed_after_epoch"] < epochs - 1, result["resumed_after_epoch"]
        reference = fit(load_config("demo", {**common, "data.root": small_data, "train.seed": row["train.seed"]}))
        assert metrics_only(result["history"]) == metrics_only(reference.history), row["trial"]
        assert (result["val"], result["test"], result["best_epoch"]) == (reference.val, reference.test, reference.best_epoch), row["trial"]
