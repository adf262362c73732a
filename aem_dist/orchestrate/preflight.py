"""Checks that run before Ray starts, and once Ray is up before any trial is scheduled.

A wrong ``data.root``, an unknown ``model.name`` or a GPU request on a CPU-only cluster used to surface a
minute into a run, as a worker traceback. These checks turn them into one line (a :class:`PreflightError`,
which the CLI prints and exits 2 on) within seconds:

* :func:`check_config` — Ray-free, before Ray is started or joined: every grid key and value, every
  point's ``model.name`` (against the registry) and ``data.root`` (its manifest is read and validated),
  and that ``--out`` / ``run.storage_path`` are reachable and writable when they are object storage.
* :func:`check_cluster` — once Ray is up, from ``ray.nodes()`` (a plain list, so it is testable without
  Ray): on a cluster of more than one node, no local path for ``data.root``, ``--out`` or
  ``run.storage_path`` (nodes share no disk); and every bundle a trial asks for (the trial itself with
  ``scaling.num_workers: 0``, else each Ray Train worker) fits on at least one alive node.
* :func:`check_nodes_reach_storage` — once Ray is up, on a cluster of more than one node: a probe task on
  every alive node reaches the object storage the trials use, with the endpoint and credentials *that
  node* resolves (its ``AWS_*`` environment, e.g. a pod's Secret), which may differ from the driver's.
"""

from __future__ import annotations

from typing import Any, Iterable

from .. import storage
from ..config import Config
from ..storage import StorageOptions
from .errors import PreflightError
from .plan import SweepPlan
from .resources import bundle

# A node that has not answered its storage probe by then is reported, not waited for (starting a worker
# process on a busy node takes seconds, not minutes).
PROBE_TIMEOUT_S = 120.0


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(v for v in values if v is not None))


def check_config(cfg: Config, out: str, *, sweep: bool) -> SweepPlan:
    """Ray-free checks of everything the run will read or write; returns the plan it checked (built here, once).

    Raises :class:`PreflightError` with one line listing every problem found ("; "-separated), each
    naming its config key (``model.name``, ``data.root``, ``--out``, ``run.storage_path``) and value.
    Raises :class:`~aem_dist.config.ConfigError` for an invalid grid key or value."""
    from ..data.limits import Limits
    from ..data.manifest import load_manifest
    from ..models import MODELS

    plan = SweepPlan.build(cfg, sweep)
    cfgs = plan.configs
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    problems = []
    for name in _unique(c.model.name for c in cfgs):
        if name not in MODELS:
            problems.append(f"model.name={name!r} is not a known model; choose from {', '.join(sorted(MODELS))}")
    for root in _unique(c.data.root for c in cfgs):
        point = next(c for c in cfgs if c.data.root == root)
        try:
            load_manifest(root, options, Limits.from_config(point.data))
        except Exception as err:  # noqa: BLE001  (whatever stops the manifest being read is this key's problem)
            problems.append(f"data.root={storage.redact(root, options)} is not a readable dataset: {_one_line(err)}")
    for key, url in (("--out", out), ("run.storage_path", cfg.run.storage_path)):
        if url is None or not storage.is_remote(url):
            continue
        try:
            storage.probe(url, options, write=True)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{key}={storage.redact(url, options)} is not writable: {_one_line(err)}")
    if problems:
        raise PreflightError("; ".join(problems))
    return plan


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def alive_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if n.get("Alive")]


def check_cluster(plan: SweepPlan, out: str, nodes: list[dict[str, Any]]) -> None:
    """Checks against the running cluster (``nodes`` as returned by ``ray.nodes()``), before any trial.

    Raises :class:`PreflightError`: a local path on a cluster of more than one alive node, or a trial
    bundle (resources of the trial, or of one Ray Train worker) that no alive node can hold."""
    cfg, alive = plan.cfg, alive_nodes(nodes)
    if len(alive) > 1:
        local = []
        for c in plan.configs:
            for key, url in (("data.root", c.data.root), ("--out", out), ("run.storage_path", c.run.storage_path)):
                if url is not None and not storage.is_remote(url) and (key, url) not in local:
                    local.append((key, url))
        if local:
            shown = ", ".join(f"{k}={u}" for k, u in local)
            raise PreflightError(
                f"this Ray cluster has {len(alive)} nodes but {shown} {'is a local path' if len(local) == 1 else 'are local paths'}: "
                "a trial on another node would not see the data or its results would stay on that node's disk. "
                "Put data and results on object storage (e.g. data.root=s3://bucket/dataset --out s3://bucket/sweep)"
            )
    need, keys = bundle(cfg)
    if not need:
        return
    if not any(all(n.get("Resources", {}).get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for n in alive):
        offered = "; ".join(_node_summary(n, need) for n in alive) or "no alive node"
        what = "one trial" if cfg.scaling.num_workers == 0 else "one Ray Train worker"
        raise PreflightError(f"{what} needs {_fmt(need)} ({keys}) but no node of this Ray cluster has that much: {offered}")


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in res.items())


def _node_summary(node: dict[str, Any], need: dict[str, float]) -> str:
    res = node.get("Resources", {})
    return f"node {str(node.get('NodeID', '?'))[:8]}: {_fmt({k: res.get(k, 0.0) for k in need})}"


def storage_locations(plan: SweepPlan, out: str) -> list[tuple[str, str, bool]]:
    """``(key, url, write)`` of every object-storage location a trial reads or writes: each point's
    ``data.root`` (read), ``--out`` and ``run.storage_path`` (written). Local paths are left out."""
    found: list[tuple[str, str, bool]] = []
    for c in plan.configs:
        for key, url, write in (("data.root", c.data.root, False), ("--out", out, True), ("run.storage_path", c.run.storage_path, True)):
            if url is not None and storage.is_remote(url) and (key, url, write) not in found:
                found.append((key, url, write))
    return found


def probe_storage(section: dict[str, Any], retries: int, locations: list[tuple[str, str, bool]]) -> str | None:
    """Run on a cluster node (a Ray task): the first of ``locations`` this node cannot use, as a redacted
    one-line message, or None. ``section`` is the redacted ``storage`` config the trials get, so the node
    resolves endpoint and credentials exactly as its trials will (config, else its own ``AWS_*``)."""
    from ..config import StorageSection

    options = StorageOptions.from_config(StorageSection(**section), retries)
    for key, url, write in locations:
        try:
            storage.probe(url, options, write=write)
        except Exception as err:  # noqa: BLE001  (whatever stops the probe stops the trials on this node)
            return f"{key}: {storage.redact(_one_line(err), options)}"
    return None


def check_nodes_reach_storage(plan: SweepPlan, out: str, nodes: list[dict[str, Any]], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """On a cluster of more than one alive node, probe the trials' object storage from every alive node
    (the head too: trial functions that only supervise a TorchTrainer may run there), in parallel.

    Raises :class:`PreflightError` naming each node that cannot reach it (node id, address, endpoint and
    the storage error; no credential), or that did not answer within ``timeout_s`` — instead of trials
    that hang or fail on that node a minute later. Requires Ray to be initialised."""
    cfg, alive = plan.cfg, alive_nodes(nodes)
    locations = storage_locations(plan, out)
    if len(alive) <= 1 or not locations:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(probe_storage)
    section = cfg.to_dict()["storage"]  # redacted, as in every trial's config
    pending = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(section, cfg.data.retries, locations): n
        for n in alive
    }  # fmt: skip
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = []
    for ref in ready:
        try:
            problem = ray.get(ref)
        except Exception as err:  # noqa: BLE001  (the node died or could not run the task)
            problem = f"the storage probe failed: {_one_line(err)}"
        if problem:
            problems.append(f"{_node_name(pending[ref])} cannot use object storage ({problem})")
    for ref in late:
        ray.cancel(ref, force=True)
        problems.append(f"{_node_name(pending[ref])} did not answer a storage probe within {timeout_s:g} s")
    if problems:
        raise PreflightError(
            f"{len(problems)} of {len(alive)} nodes of this Ray cluster cannot reach the run's object storage, which the driver reaches: "
            + "; ".join(problems)
            + ". Give every node the same endpoint and credentials (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: "
            "on KubeRay, the pods' Secret) or set storage.endpoint_url"
        )


def _node_name(node: dict[str, Any]) -> str:
    return f"node {str(node.get('NodeID', '?'))[:8]} ({node.get('NodeManagerAddress', '?')})"
