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

``sweep.search: random | optuna`` replaces the grid by points Tune's searcher draws from
``sweep.space`` (recorded in ``search.json``), and ``sweep.scheduler: asha`` lets Tune's ASHA stop
trials early (``trials/<trial>/stopped.json``); both run one trial per point. See :mod:`.search`.
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
from ..engine.selection import score_of
from ..observe.metrics import serve_run_metrics
from ..observe.tables import STOPPED_EARLY, trial_row, write_tables
from ..storage import StorageOptions
from .errors import SweepError
from .populations import Member, PopulationSpec, plan_populations
from .preflight import check_cluster, check_nodes_reach_storage
from .resume import experiment_exists, finished_results, run_inprocess_trial, stopped_record
from .search import SCORE_KEY, SEARCH_FILE, STOPPED_FILE, EarlyStopRecorder, SampleBook, make_scheduler, make_searcher, tune_space, unfused_reason
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


def run_trial(config: dict[str, Any], *, base: dict[str, Any], out: str, single: bool, searched: tuple[str, ...] = ()) -> None:
    """Tune function trainable: one population of grid points (often one point), or one point a search
    drew (its ``searched`` keys; its name is the Tune trial's, see :class:`.search.SampleBook`), start to
    finish (resuming from its last checkpoint). Each member writes its own ``trials/<name>/results.json``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.time()
    quiet_ray_logs()
    if "_population" in config:
        spec = PopulationSpec.from_config(config["_population"])
    elif searched:
        name = ray.tune.get_context().get_trial_name()
        spec = PopulationSpec(name, [Member(name, {k: config[k] for k in searched})])
    else:
        spec = PopulationSpec("run", [Member("run", {})])
    base_cfg = build_config(base, "sweep base config")
    cfgs = [config_with(base_cfg, m.values) for m in spec.members]
    run_dirs = [out if single else storage.join(out, "trials", m.name) for m in spec.members]
    options = StorageOptions.from_config(cfgs[0].storage, cfgs[0].data.retries)
    # A finished member (results.json, written last) or one a scheduler stopped costs nothing on resume; see .resume.
    results = [finished_results(d, c, options) or stopped_record(d, c, options) for d, c in zip(run_dirs, cfgs)]
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
    # A final report, so Tune holds completion metrics even for trials that had nothing left to train;
    # with one member, its best validation score: what a searcher learns from and a scheduler expects.
    final = {"done/best_epoch": [-1 if r["best_epoch"] is None else r["best_epoch"] for r in results], "done/test_auc": [r["test"].get("auc") for r in results]}
    if len(results) == 1:
        final[SCORE_KEY] = score_of(results[0]["val"] or {}, cfgs[0].train.select_metric)
    ray.tune.report(final)


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
    """The sweep's trials: grid points grouped into populations (validates every grid value first); one
    trial per point, said in one line, under a scheduler (see :func:`.search.unfused_reason`)."""
    points = grid_points(grid)
    why = unfused_reason(cfg)
    if why and len(points) > 1 and cfg.sweep.population != "off":
        announce(f"sweep.population={cfg.sweep.population} is not applied: {why}, so every grid point is its own trial (unfused)")
        cfg = config_with(cfg, {"sweep.population": "off"})
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
    searched = cfg.sweep.search != "grid" and not single
    if specs is None and not searched:
        specs = plan(cfg, grid) if grid else [PopulationSpec("run", [Member("run", {})])]
    # Before any trial: local paths on a multi-node cluster, a bundle no node can hold, a node that
    # cannot reach the object storage (see .preflight).
    nodes = ray.nodes()
    check_cluster(cfg, out, nodes, sweep=bool(grid) or searched)
    check_nodes_reach_storage(cfg, out, nodes, sweep=bool(grid) or searched)  # from every node, with that node's endpoint
    n_trials = cfg.sweep.num_samples if searched else len(specs)
    concurrency = max_concurrent(cfg, ray.cluster_resources(), n_trials)
    # A trial that starts a TorchTrainer only supervises it: it reserves memory, not CPU, so that
    # its workers can use every CPU (a 2-CPU laptop runs two 1-worker trials, or one 2-worker trial).
    fn_resources = trial_resources(cfg) if cfg.scaling.num_workers == 0 else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), out=out, single=single, searched=tuple(cfg.sweep.space) if searched else ()),
        {k.lower() if k in ("CPU", "GPU") else k: v for k, v in fn_resources.items()},
    )
    if searched:  # Tune's searcher draws the points; SampleBook names and records each (search.json)
        book = SampleBook.load(cfg, out, options)
        searcher = make_searcher(cfg, book.samples, concurrency)
        book.save()
        param_space = tune_space(cfg.sweep.space)
        # BasicVariantGenerator limits concurrency itself (Tune ignores max_concurrent_trials for it)
        search = {"search_alg": searcher, "num_samples": cfg.sweep.num_samples, "max_concurrent_trials": concurrency if cfg.sweep.search == "optuna" else None}
        naming = {"trial_name_creator": book.namer(), "trial_dirname_creator": _custom_name}
        log.info("%s search: %d point(s) from sweep.space (%s), %d drawn before, at most %d at once (per trial: %s)", cfg.sweep.search, cfg.sweep.num_samples, ", ".join(cfg.sweep.space), len(book.samples), concurrency, trial_resources(cfg))
    else:
        param_space = {"_population": tune.grid_search([s.as_config() for s in specs])}
        search = {"max_concurrent_trials": concurrency}
        naming = {"trial_name_creator": _population_name, "trial_dirname_creator": _population_name}
        n_points = sum(len(s.members) for s in specs)
        log.info("%d trial(s) for %d grid point(s), at most %d at once (per trial: %s)", len(specs), n_points, concurrency, trial_resources(cfg))
    scheduler = make_scheduler(cfg) if not single else None
    if scheduler is not None:  # stopped trials get their stopped.json from the driver (see .search)
        callbacks = [*(callbacks or []), EarlyStopRecorder(cfg, out, options)]

    # Never Tuner.restore: it unpickles state from the output prefix. A fresh experiment resumes from
    # our own JSON records and weights-only checkpoints instead (see .resume).
    if experiment_exists(fs, exp_path):
        if not resume:
            raise SweepError(f"{storage.redact(out, options)} already holds sweep {cfg.run.name!r}: pass --resume to continue it, or choose another --out / run.name")
        log.info("resuming sweep in %s: finished trials are kept, the others continue from their checkpoints", storage.redact(exp_path, options))
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(scheduler=scheduler, **search, **naming),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            storage_path=exp_root,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=max(cfg.run.max_failures, 0)),
            callbacks=callbacks or [],
            verbose=0,  # the trial table of TuneMetricsCallback reports progress
        ),
    )
    try:
        return tuner.fit()
    finally:
        if searched:
            book.close()


def _population_name(trial: Any) -> str:
    return trial.config["_population"]["name"]


def _custom_name(trial: Any) -> str:
    return trial.custom_trial_name


def _members(result: Any) -> list[str]:
    pop = (result.config or {}).get("_population")
    if pop:
        return [m.name for m in PopulationSpec.from_config(pop).members]
    return [result.path.rstrip("/").rsplit("/", 1)[-1]] if result.path else []  # a searched trial: its folder is its name


def sweep_points(cfg: Config, out: str, options: StorageOptions) -> list[tuple[str, dict[str, Any]]]:
    """(trial name, values) of every point of the sweep: the grid's, or those the search recorded."""
    if cfg.sweep.search != "grid":
        return [(s.name, s.values) for s in SampleBook.load(cfg, out, options).samples]
    return [(trial_name(p), p) for p in grid_points(dict(cfg.sweep.grid))]


def _read_record(url: str, options: StorageOptions) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url, options))
    except FileNotFoundError:
        return None


def collect_rows(results, cfg: Config, out: str, points: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One trials.csv row per grid point (or drawn point), from each trial's results.json, or the
    stopped.json of a trial the scheduler stopped (status STOPPED_EARLY; else the status is from Tune)."""
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    by_name = {}  # grid point → the Tune result of the trial (population) that trained it
    for result in results:
        for member in _members(result):
            by_name[member] = result
    rows = []
    for name, values in points:
        run_dir = storage.join(out, "trials", name)
        result = by_name.get(name)
        data = _read_record(storage.join(run_dir, "results.json"), options)
        stopped = _read_record(storage.join(run_dir, STOPPED_FILE), options) if data is None else None
        if data is not None:
            status = "TERMINATED"
        elif stopped is not None:
            status, data = STOPPED_EARLY, stopped
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

    out = storage.absolute(out)
    grid = dict(cfg.sweep.grid)
    searched = cfg.sweep.search != "grid"
    if not grid and not searched:
        raise SweepError("sweep.grid is empty: set e.g. --set 'sweep.grid={train.seed: [0, 1], loss.lam: [0, 0.1]}'")
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    if resume:  # the sweep's trials resume their checkpoints: only under the base config they were trained with
        check_same_run(recorded_config(out, options), cfg.to_dict(), storage.redact(out, options), "choose another --out (or run.name) for a new sweep")
    if searched:
        specs, extra = None, {"search": cfg.sweep.search, "space": cfg.sweep.space, "num_samples": cfg.sweep.num_samples}
        announce(f"sweep.search={cfg.sweep.search}: {cfg.sweep.num_samples} point(s) drawn from sweep.space, one unfused trial each ({unfused_reason(cfg)}); points recorded in {SEARCH_FILE}")
    else:
        specs = plan(cfg, grid, announce)
        extra = {"grid": grid, "populations": [[m.name for m in s.members] for s in specs]}
    record = run_record(cfg, "sweep", options, cluster=ray.cluster_resources(), trial_resources=trial_resources(cfg), **extra)
    write_json(storage.join(out, "run.json"), record, options)
    keys = list(cfg.sweep.space) if searched else list(grid)
    with serve_run_metrics(cfg, announce) as exporter:
        callback = TuneMetricsCallback(cfg, exporter)
        results = run_trials(cfg, out, grid=grid, resume=resume, single=False, callbacks=[callback, *(callbacks or [])], specs=specs)
        rows = collect_rows(results, cfg, out, sweep_points(cfg, out, options))
        summary = write_tables(out, rows, keys, options, searched=keys if searched else ())
        if cfg.sweep.report:
            from ..observe.report import write_report  # matplotlib, umap: imported only when used

            report = write_report(out, options=options, progress=cfg.train.progress)
            announce(f"report: {storage.redact(report.url, options)}")
    failed = [r["trial"] for r in rows if r["status"] not in ("TERMINATED", STOPPED_EARLY)]
    if failed:
        raise SweepError(f"{len(failed)} of {len(rows)} trial(s) did not finish ({', '.join(failed)}); their errors are above and in {storage.redact(out, options)}/ray; rerun with --resume to retry them")
    return summary
