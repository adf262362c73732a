"""Ray Tune over a grid of config values (seeds × λ × any dotted key), one Ray Train run per trial.

Each trial is a Tune *function trainable* (:func:`run_trial`) that applies its grid values to the base
config with :func:`aem_dist.config.config_with` — the same dotted keys as ``--set`` — and then either
fits a :class:`TorchTrainer` (``scaling.num_workers ≥ 1``, results relayed to Tune by
``TuneReportCallback``) or, for ``num_workers: 0``, runs the per-worker function in the trial itself.

Layout under ``out``: ``run.json``, ``trials.csv``, ``summary.{csv,md}``, ``trials/<trial>/`` (results.json,
best/state.pt) and ``ray/<run.name>/`` (Tune's experiment state; Ray Train checkpoints under ``ray/train``).
``--resume`` restores the Tune experiment: finished trials are kept, unfinished and errored ones re-run
and pick up their last Ray Train checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from typing import Any, Callable

from .. import storage
from ..config import Config, build_config, config_with
from ..engine.results import run_record, write_json
from ..engine.runrecord import check_same_run, recorded_config, result_relevant_diff
from ..observe.metrics import serve_run_metrics
from ..observe.tables import trial_row, write_tables
from ..storage import StorageOptions
from .errors import SweepError
from .worker import make_trainer, quiet_ray_logs, train_loop_per_worker, worker_resources

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


def run_trial(values: dict[str, Any], *, base: dict[str, Any], out: str, single: bool) -> None:
    """Tune function trainable: one grid point, start to finish (resuming from its last checkpoint)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_ray_logs()
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    cfg = config_with(build_config(base, "sweep base config"), values)
    name = trial_name(values)
    run_dir = out if single else storage.join(out, "trials", name)
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    # results.json is written last, so a trial that has one finished — even if the driver died before
    # Tune's experiment state recorded it. Resuming then costs nothing for it.
    results = _finished_results(run_dir, cfg, options)
    if results is None:
        if cfg.scaling.num_workers == 0:
            results = train_loop_per_worker({"cfg": cfg.to_dict(), "run_dir": run_dir, "api": "tune"})
        else:
            trainer = make_trainer(cfg, run_dir, name, ray_storage(cfg, out, "train"), callbacks=[TuneReportCallback()])
            results = trainer.fit().return_value
        write_json(storage.join(run_dir, "results.json"), results, options)
    # A final report, so Tune holds completion metrics even for trials that had nothing left to train.
    ray.tune.report({"done/best_epoch": -1 if results["best_epoch"] is None else results["best_epoch"], "done/test_auc": results["test"].get("auc")})


def _finished_results(run_dir: str, cfg: Config, options: StorageOptions) -> dict[str, Any] | None:
    """The trial's results.json if it exists and was produced by this very configuration."""
    try:
        results = json.loads(storage.read_bytes(storage.join(run_dir, "results.json"), options))
    except FileNotFoundError:
        return None
    return results if isinstance(results.get("config"), dict) and not result_relevant_diff(results["config"], cfg.to_dict()) else None


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


def run_trials(cfg: Config, out: str, *, grid: dict[str, list[Any]], resume: bool, single: bool, callbacks: list | None = None):
    """Run the grid with Ray Tune (Ray must be initialised); returns the ResultGrid."""
    import ray
    from ray import tune

    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    fs, exp_root = storage.ray_storage_filesystem(ray_storage(cfg, out), options)
    exp_path = f"{exp_root.rstrip('/')}/{cfg.run.name}"
    points = grid_points(grid)
    concurrency = max_concurrent(cfg, ray.cluster_resources(), len(points))
    # A trial that starts a TorchTrainer only supervises it: it reserves memory, not CPU, so that
    # its workers can use every CPU (a 2-CPU laptop runs two 1-worker trials, or one 2-worker trial).
    fn_resources = trial_resources(cfg) if cfg.scaling.num_workers == 0 else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), out=out, single=single),
        {k.lower() if k in ("CPU", "GPU") else k: v for k, v in fn_resources.items()},
    )
    param_space = {k: tune.grid_search(v) for k, v in grid.items()}
    log.info("%d trial(s), at most %d at once (per trial: %s)", len(points), concurrency, trial_resources(cfg))

    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        if not resume:
            raise SweepError(f"{storage.redact(out, options)} already holds sweep {cfg.run.name!r}: pass --resume to continue it, or choose another --out / run.name")
        log.info("resuming sweep from %s", storage.redact(exp_path, options))
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency,
                trial_name_creator=lambda t: trial_name(_grid_values(t.config, grid)),
                trial_dirname_creator=lambda t: trial_name(_grid_values(t.config, grid)),
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


def _grid_values(trial_config: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, Any]:
    return {k: trial_config[k] for k in grid if k in trial_config}


def collect_rows(results, cfg: Config, out: str, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One trials.csv row per grid point, from each trial's results.json (status from Tune)."""
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    by_name = {}
    for result in results:
        values = _grid_values(result.config or {}, grid)
        by_name[trial_name(values)] = result
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


def run_sweep(cfg: Config, out: str, *, resume: bool = False, announce: Callable[[str], None] = log.info) -> list[dict[str, Any]]:
    """The whole sweep (Ray must be initialised): trials with live metrics and a trial table, then
    trials.csv, summary.csv/md, run.json and the report with its plots."""
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
    record = run_record(cfg, "sweep", options, grid=grid, cluster=ray.cluster_resources(), trial_resources=trial_resources(cfg))
    write_json(storage.join(out, "run.json"), record, options)
    with serve_run_metrics(cfg, announce) as exporter:
        callback = TuneMetricsCallback(cfg, exporter, trial_name=lambda trial: trial_name(_grid_values(trial.config, grid)))
        results = run_trials(cfg, out, grid=grid, resume=resume, single=False, callbacks=[callback])
        rows = collect_rows(results, cfg, out, grid)
        summary = write_tables(out, rows, list(grid), options)
        report = write_report(out, options=options, progress=cfg.train.progress)
        announce(f"report: {storage.redact(report.url, options)}")
    failed = [r["trial"] for r in rows if r["status"] != "TERMINATED"]
    if failed:
        raise SweepError(f"{len(failed)} of {len(rows)} trial(s) did not finish ({', '.join(failed)}); their errors are above and in {storage.redact(out, options)}/ray; rerun with --resume to retry them")
    return summary
