"""Ray Tune over a grid of config values (seeds × λ × any dotted key), one Ray Train run per trial.

Each trial is a Tune *function trainable* (:func:`run_trial`) that applies its grid values to the base
config with :func:`aem_dist.config.config_with` — the same dotted keys as ``--set`` — and then either
fits a :class:`TorchTrainer` (``scaling.num_workers ≥ 1``, results relayed to Tune by
``TuneReportCallback``) or, for ``num_workers: 0``, runs the per-worker function in the trial itself.

Layout under ``out``: ``run.json``, ``trials.csv``, ``summary.{csv,md}``, ``trials/<trial>/`` (results.json,
best/state.pt) and ``ray/<run.name>/`` (Tune's experiment state; Ray Train checkpoints under ``ray/train``).
``--resume`` starts a fresh Tune experiment over the same grid (Tune's pickled state is never loaded, see
:mod:`.resume`): finished trials (results.json) return at once, the others continue from their last
checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from typing import Any, Callable

from .. import storage
from ..config import Config, build_config, config_with
from ..data.folds import FOLD_KEY, check_folds
from ..data.manifest import load_manifest
from ..engine.results import run_record, write_json
from ..engine.runrecord import check_same_run, recorded_config
from ..observe.metrics import serve_run_metrics
from ..observe.tables import trial_row, write_tables
from ..storage import StorageOptions
from .errors import SweepError
from .populations import Member, PopulationSpec, plan_populations
from .preflight import check_cluster, check_nodes_reach_storage
from .resume import experiment_exists, finished_results, run_inprocess_trial
from .worker import make_trainer, quiet_ray_logs, worker_resources

log = logging.getLogger(__name__)

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved by each trial's supervising function


def trial_name(values: dict[str, Any]) -> str:
    """A stable, readable, path-safe name for a trial: 'lam=0.1_seed=0' (no timestamps, so runs resume)."""
    if not values:
        return "run"
    leaves = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, value in sorted(values.items()):
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{leaf if leaves.count(leaf) == 1 else key}={value}")
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", "_".join(parts))


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_trial(config: dict[str, Any], *, base: dict[str, Any], out: str, single: bool) -> None:
    """Tune function trainable: one population of grid points (often one point), start to finish
    (resuming from its last checkpoint). Each member writes its own ``trials/<name>/results.json``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.time()
    quiet_ray_logs()
    spec = PopulationSpec.from_config(config["_population"]) if "_population" in config else PopulationSpec("run", [Member("run", {})])
    base_cfg = build_config(base, "sweep base config")
    cfgs = [config_with(base_cfg, m.values) for m in spec.members]
    run_dirs = [out if single else storage.join(out, "trials", m.name) for m in spec.members]
    options = StorageOptions.from_config(cfgs[0].storage, cfgs[0].data.retries)
    # A finished member (results.json, written last) costs nothing on resume; see .resume.
    results = [finished_results(d, c, options) for d, c in zip(run_dirs, cfgs)]
    if any(r is None for r in results):
        cfg = cfgs[0]
        if cfg.scaling.num_workers == 0:
            ckpt_dir = storage.join(run_dirs[0] if len(cfgs) == 1 else storage.join(out, "populations", spec.name), "checkpoints")
            results = run_inprocess_trial(cfgs, run_dirs, ckpt_dir, options)
        else:
            trainer = make_trainer(cfgs, run_dirs, spec.name, ray_storage(cfg, out, "train"), callbacks=[TuneReportCallback()])
            results = trainer.fit().return_value
        ended = time.time()
        node_id = ray.get_runtime_context().get_node_id()  # where the trial function ran
        for run_dir, res in zip(run_dirs, results):
            res["timing"] = trial_timing(res.pop("timing", {}), started, ended)
            # On a multi-node cluster, which node trained it: rank 0's (after a node loss, the node it
            # finished on; worker_node_ids has every rank's), else (num_workers: 0) the trial function's.
            res["trial_node_id"] = res.get("worker_node_ids", [node_id])[0]
            write_json(storage.join(run_dir, "results.json"), res, options)
    # A final report, so Tune holds completion metrics even for trials that had nothing left to train.
    ray.tune.report({"done/best_epoch": [-1 if r["best_epoch"] is None else r["best_epoch"] for r in results], "done/test_auc": [r["test"].get("auc") for r in results]})


def trial_timing(worker: dict[str, Any], started: float, ended: float) -> dict[str, Any]:
    """Where a trial's wall time went (seconds): ``start_s`` (trial function → training worker running:
    TorchTrainer and worker-group start-up, process group), ``setup_s`` (data and model), ``epochs_s``
    (training + evaluation), ``reports_s`` (Ray reports incl. checkpoint persistence), ``teardown_s``
    (worker done → trial function back). Shared by a population's members (``members``)."""
    out = {"trial_s": ended - started, "members": worker.get("members", 1)}
    if "worker_started" in worker:
        out |= {"start_s": worker["worker_started"] - started, "setup_s": worker["setup_s"], "epochs_s": worker["epochs_s"], "reports_s": worker["reports_s"], "teardown_s": ended - worker["worker_ended"]}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def ray_storage(cfg: Config, out: str, *parts: str) -> str:
    return storage.join(cfg.run.storage_path or storage.join(out, "ray"), *parts)


def trial_resources(cfg: Config) -> dict[str, float]:
    """Resources one trial occupies while it trains (all its workers together)."""
    if cfg.scaling.num_workers == 0:
        res = {"CPU": cfg.sweep.trial_cpus}
        if cfg.sweep.trial_gpus:
            res["GPU"] = cfg.sweep.trial_gpus
        return res
    per_worker = worker_resources(cfg)
    return {k: v * cfg.scaling.num_workers for k, v in per_worker.items()}


def max_concurrent(cfg: Config, cluster: dict[str, float], n_trials: int) -> int:
    """Trials that fit at once: min over resources of floor(cluster / per-trial), capped by the config."""
    need = {k: v for k, v in trial_resources(cfg).items() if v > 0}
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items()]
    n = max(1, min(fits) if fits else n_trials)
    if min(fits, default=1) == 0:
        raise SweepError(f"one trial needs {need} but the cluster has {dict((k, cluster.get(k, 0)) for k in need)}")
    if cfg.sweep.max_concurrent_trials:
        n = min(n, cfg.sweep.max_concurrent_trials)
    return min(n, max(1, n_trials))


def plan(cfg: Config, grid: dict[str, list[Any]], announce: Callable[[str], None] = log.info) -> list[PopulationSpec]:
    """The sweep's trials: grid points grouped into populations (validates every grid value first)."""
    points = grid_points(grid)
    try:
        manifest = load_manifest(cfg.data.root, StorageOptions.from_config(cfg.storage, cfg.data.retries))
    except Exception:  # noqa: BLE001  (the trials report an unreadable dataset with its own clear error)
        manifest = None
    if manifest is not None:  # a data.fold the dataset lacks: one clear error now, not one per trial
        check_folds(manifest, [p.get(FOLD_KEY, cfg.data.fold) for p in points], storage.redact(cfg.data.root))
    return plan_populations(cfg, points, [trial_name(p) for p in points], manifest, announce)


def run_trials(cfg: Config, out: str, *, grid: dict[str, list[Any]], resume: bool, single: bool, callbacks: list | None = None, specs: list[PopulationSpec] | None = None):
    """Run the grid with Ray Tune (Ray must be initialised); returns the ResultGrid."""
    import ray
    from ray import tune

    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    fs, exp_root = storage.ray_storage_filesystem(ray_storage(cfg, out), options)
    exp_path = f"{exp_root.rstrip('/')}/{cfg.run.name}"
    if specs is None:
        specs = plan(cfg, grid) if grid else [PopulationSpec("run", [Member("run", {})])]
    # Before any trial: local paths on a multi-node cluster, a bundle no node can hold, a node that
    # cannot reach the object storage (see .preflight).
    nodes = ray.nodes()
    check_cluster(cfg, out, nodes, sweep=bool(grid))
    check_nodes_reach_storage(cfg, out, nodes, sweep=bool(grid))  # from every node, with that node's endpoint
    concurrency = max_concurrent(cfg, ray.cluster_resources(), len(specs))
    # A trial that starts a TorchTrainer only supervises it: it reserves memory, not CPU, so that
    # its workers can use every CPU (a 2-CPU laptop runs two 1-worker trials, or one 2-worker trial).
    fn_resources = trial_resources(cfg) if cfg.scaling.num_workers == 0 else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), out=out, single=single),
        {k.lower() if k in ("CPU", "GPU") else k: v for k, v in fn_resources.items()},
    )
    param_space = {"_population": tune.grid_search([s.as_config() for s in specs])}
    n_points = sum(len(s.members) for s in specs)
    log.info("%d trial(s) for %d grid point(s), at most %d at once (per trial: %s)", len(specs), n_points, concurrency, trial_resources(cfg))

    # Never Tuner.restore: it unpickles state from the output prefix. A fresh experiment resumes from
    # our own JSON records and weights-only checkpoints instead (see .resume).
    if experiment_exists(fs, exp_path):
        if not resume:
            raise SweepError(f"{storage.redact(out, options)} already holds sweep {cfg.run.name!r}: pass --resume to continue it, or choose another --out / run.name")
        log.info("resuming sweep in %s: finished trials are kept, the others continue from their checkpoints", storage.redact(exp_path, options))
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            trial_name_creator=lambda t: t.config["_population"]["name"],
            trial_dirname_creator=lambda t: t.config["_population"]["name"],
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            storage_path=exp_root,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=max(cfg.run.max_failures, 0)),
            callbacks=callbacks or [],
            verbose=0,  # the trial table of TuneMetricsCallback reports progress
        ),
    )
    return tuner.fit()


def _members(trial_config: dict[str, Any] | None) -> list[Member]:
    pop = (trial_config or {}).get("_population")
    return PopulationSpec.from_config(pop).members if pop else []


def collect_rows(results, cfg: Config, out: str, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One trials.csv row per grid point, from each trial's results.json (status from Tune)."""
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    by_name = {}  # grid point → the Tune result of the trial (population) that trained it
    for result in results:
        for member in _members(result.config):
            by_name[member.name] = result
    rows = []
    for values in grid_points(grid):
        name = trial_name(values)
        run_dir = storage.join(out, "trials", name)
        result = by_name.get(name)
        data = None
        try:
            data = json.loads(storage.read_bytes(storage.join(run_dir, "results.json"), options))
        except FileNotFoundError:
            pass
        if data is not None:
            status = "TERMINATED"
        elif result is not None and result.error is not None:
            status = "ERROR"
        else:
            status = "PENDING"
        wall = (result.metrics or {}).get("time_total_s") if result is not None else None
        rows.append(trial_row(name, values, data, status=status, wall_s=wall, path=storage.redact(run_dir, options)))
    return rows


def run_sweep(cfg: Config, out: str, *, resume: bool = False, announce: Callable[[str], None] = log.info, callbacks: list | None = None) -> list[dict[str, Any]]:
    """The whole sweep (Ray must be initialised): trials with live metrics and a trial table, then
    trials.csv, summary.csv/md, run.json and the report with its plots. ``callbacks``: more Ray Tune
    callbacks (run in the driver, after the metrics callback)."""
    import ray

    from ..observe.callbacks import TuneMetricsCallback
    from ..observe.report import write_report

    out = storage.absolute(out)
    grid = dict(cfg.sweep.grid)
    if not grid:
        raise SweepError("sweep.grid is empty: set e.g. --set 'sweep.grid={train.seed: [0, 1], loss.lam: [0, 0.1]}'")
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    if resume:  # the sweep's trials resume their checkpoints: only under the base config they were trained with
        check_same_run(recorded_config(out, options), cfg.to_dict(), storage.redact(out, options), "choose another --out (or run.name) for a new sweep")
    specs = plan(cfg, grid, announce)
    populations = [[m.name for m in s.members] for s in specs]
    record = run_record(cfg, "sweep", options, grid=grid, cluster=ray.cluster_resources(), trial_resources=trial_resources(cfg), populations=populations)
    write_json(storage.join(out, "run.json"), record, options)
    with serve_run_metrics(cfg, announce) as exporter:
        callback = TuneMetricsCallback(cfg, exporter)
        results = run_trials(cfg, out, grid=grid, resume=resume, single=False, callbacks=[callback, *(callbacks or [])], specs=specs)
        rows = collect_rows(results, cfg, out, grid)
        summary = write_tables(out, rows, list(grid), options)
        report = write_report(out, options=options, progress=cfg.train.progress)
        announce(f"report: {storage.redact(report.url, options)}")
    failed = [r["trial"] for r in rows if r["status"] != "TERMINATED"]
    if failed:
        raise SweepError(f"{len(failed)} of {len(rows)} trial(s) did not finish ({', '.join(failed)}); their errors are above and in {storage.redact(out, options)}/ray; rerun with --resume to retry them")
    return summary
