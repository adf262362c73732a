"""Ray Tune over a grid of config values (seeds × λ × any dotted key), one Ray Train run per trial.

Each trial is a Tune *function trainable* (:func:`run_trial`) that applies its grid values to the base
config with :func:`aem_dist.config.config_with` — the same dotted keys as ``--set`` — and then either
fits a :class:`TorchTrainer` (``scaling.num_workers ≥ 1``; its reports reach Tune from the trial's own
thread, :func:`.worker.fit_reporting_to_tune`) or, for ``num_workers: 0``, trains in the trial itself.
A :class:`.watchdog.StallWatchdog` in the driver names (and by default fails) a trial or a sweep that stalls.

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

import logging
import time
from typing import Any, Callable

from .. import storage
from ..config import Config, build_config, config_with
from ..engine.results import run_record, write_json
from ..engine.runrecord import check_same_run, recorded_config
from ..engine.selection import score_of
from ..observe.callbacks import INTERRUPTED as INTERRUPTED_STATE
from ..observe.identity import check_same_data, dataset_digests, read_record
from ..observe.metrics import serve_run_metrics
from ..observe.tables import STOPPED_EARLY, trial_row, write_tables, write_trials_csv
from ..observe.tracking import tracking
from ..storage import StorageOptions
from .errors import SweepError
from .interrupt import INTERRUPTED, SweepInterrupted, resume_plan
from .plan import SweepPlan
from .preflight import check_cluster, check_nodes_reach_storage
from .resources import function_resources, max_concurrent, ray_storage, trial_resources
from .resume import experiment_exists, finished_results, run_inprocess_trial, stopped_record
from .search import EarlyStopRecorder, SampleBook, make_scheduler, make_searcher, tune_space
from .trials import POPULATION, SCORE_KEY, SEARCH_FILE, STOPPED_FILE, trial_spec
from .watchdog import StallWatchdog
from .worker import fit_reporting_to_tune, quiet_ray_logs

log = logging.getLogger(__name__)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], out: str, single: bool, searched: bool = False) -> None:
    """Tune function trainable: one population of grid points (often one point), or one point a search
    drew (``searched``; its name is the Tune trial's, see :class:`.search.SampleBook`), start to
    finish (resuming from its last checkpoint). Each member writes its own ``trials/<name>/results.json``."""
    import ray.tune

    started = time.time()
    quiet_ray_logs()
    spec = trial_spec(config, ray.tune.get_context().get_trial_name() if searched else "run")
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
            results = fit_reporting_to_tune(cfgs, run_dirs, spec.name, ray_storage(cfg, out, "train"))
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
    # Safe: every epoch report went out from this thread before (one reporting path, see .worker).
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
        out |= {"start_s": worker["worker_started"] - started, "setup_s": worker["setup_s"], "epochs_s": worker["epochs_s"], "reports_s": worker["reports_s"],
            "teardown_s": ended - worker["worker_ended"]}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def run_trials(plan: SweepPlan, out: str, *, resume: bool, callbacks: list | None = None, watchdog: StallWatchdog | None = None):
    """Run the plan's trials with Ray Tune (Ray must be initialised); returns the ResultGrid. ``watchdog``:
    the stall watchdog to use (one is made when not given)."""
    import ray
    from ray import tune

    cfg, searched = plan.cfg, plan.searched
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    fs, exp_root = storage.ray_storage_filesystem(ray_storage(cfg, out), options)
    exp_path = f"{exp_root.rstrip('/')}/{cfg.run.name}"
    # Before any trial: local paths on a multi-node cluster, a bundle no node can hold, a node that
    # cannot reach the object storage (see .preflight).
    nodes = ray.nodes()
    check_cluster(plan, out, nodes)
    check_nodes_reach_storage(plan, out, nodes)  # from every node, with that node's endpoint
    concurrency = max_concurrent(cfg, ray.cluster_resources(), cfg.sweep.num_samples if searched else len(plan.populations))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), out=out, single=plan.single, searched=searched),
        {k.lower() if k in ("CPU", "GPU") else k: v for k, v in function_resources(cfg).items()},
    )
    if searched:  # Tune's searcher draws the points; SampleBook names and records each (search.json)
        book = SampleBook.load(cfg, out, options)
        searcher, limit = make_searcher(cfg, book.samples, concurrency)
        book.save()
        param_space = tune_space(cfg.sweep.space)
        search = {"search_alg": searcher, "num_samples": cfg.sweep.num_samples, "max_concurrent_trials": limit}
        naming = {"trial_name_creator": book.namer(), "trial_dirname_creator": _custom_name}
        log.info("%s search: %d point(s) from sweep.space (%s), %d drawn before, at most %d at once (per trial: %s)",
                 cfg.sweep.search, cfg.sweep.num_samples, ", ".join(cfg.sweep.space), len(book.samples), concurrency, trial_resources(cfg))
    else:
        param_space = {POPULATION: tune.grid_search([s.as_config() for s in plan.populations])}
        search = {"max_concurrent_trials": concurrency}
        naming = {"trial_name_creator": _population_name, "trial_dirname_creator": _population_name}
        log.info("%d trial(s) for %d grid point(s), at most %d at once (per trial: %s)",
                 len(plan.populations), len(plan.points), concurrency, trial_resources(cfg))
    scheduler = make_scheduler(cfg) if not plan.single else None
    if scheduler is not None:  # stopped trials get their stopped.json from the driver (see .search)
        callbacks = [*(callbacks or []), EarlyStopRecorder(cfg, out, options)]
    watchdog = watchdog or sweep_watchdog(cfg, out)

    # Never Tuner.restore: it unpickles state from the output prefix. A fresh experiment resumes from
    # our own JSON records and weights-only checkpoints instead (see .resume).
    if experiment_exists(fs, exp_path):
        if not resume:
            raise SweepError(f"{storage.redact(out, options)} already holds sweep {cfg.run.name!r}: "
                             "pass --resume to continue it, or choose another --out / run.name")
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
            callbacks=[*(callbacks or []), watchdog],
            stop=watchdog.stopper(),
            verbose=0,  # the trial table of TuneMetricsCallback reports progress
        ),
    )
    try:
        return tuner.fit()
    finally:
        if searched:
            book.close()


def sweep_watchdog(cfg: Config, out: str) -> StallWatchdog:
    """The stall watchdog of a sweep into ``out``; its lines name the run log folder ``out/logs``."""
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    return StallWatchdog(cfg, storage.redact(storage.join(out, "logs"), options))


def _population_name(trial: Any) -> str:
    return trial_spec(trial.config, "").name


def _custom_name(trial: Any) -> str:
    return trial.custom_trial_name


def _members(result: Any) -> list[str]:
    """The grid points (or the drawn point, named by its folder) a Tune result trained."""
    return [m.name for m in trial_spec(result.config, result.path.rstrip("/").rsplit("/", 1)[-1] if result.path else "").members]


def sweep_points(plan: SweepPlan, out: str, options: StorageOptions) -> list[tuple[str, dict[str, Any]]]:
    """(trial name, values) of every point of the sweep: the grid's, or those the search recorded."""
    if plan.searched:
        return [(s.name, s.values) for s in SampleBook.load(plan.cfg, out, options).samples]
    return [(m.name, m.values) for m in plan.points]


def _read_record(url: str, options: StorageOptions) -> dict[str, Any] | None:
    return storage.read_record(url, options)


def collect_rows(results, plan: SweepPlan, out: str, interrupted: set[str] = frozenset()) -> list[dict[str, Any]]:
    """One trials.csv row per grid point (or drawn point), from each trial's results.json, or the
    stopped.json of a trial the scheduler stopped (status STOPPED_EARLY; else the status is from Tune, or
    INTERRUPTED for the points in ``interrupted``). ``wall_s`` is the trial's own wall time from its
    results.json (``timing.trial_s``), so a resumed sweep keeps what finished trials took."""
    options = StorageOptions.from_config(plan.cfg.storage, plan.cfg.data.retries)
    by_name = {}  # grid point → the Tune result of the trial (population) that trained it
    for result in results:
        for member in _members(result):
            by_name[member] = result
    rows = []
    for name, values in sweep_points(plan, out, options):
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
            status = INTERRUPTED if name in interrupted else "PENDING"
        wall = ((data or {}).get("timing") or {}).get("trial_s")
        if wall is None and result is not None:
            wall = (result.metrics or {}).get("time_total_s")
        rows.append(trial_row(name, values, data, status=status, wall_s=wall, path=storage.redact(run_dir, options)))
    return rows


def run_sweep(cfg: Config, out: str, *, resume: bool = False, announce: Callable[[str], None] = log.info, callbacks: list | None = None,
              plan: SweepPlan | None = None) -> list[dict[str, Any]]:
    """The whole sweep (Ray must be initialised): trials with live metrics and a trial table, then
    trials.csv, summary.csv/md, run.json and the report with its plots. ``callbacks``: more Ray Tune
    callbacks (run in the driver, after the metrics callback); ``plan``: the plan of ``cfg`` the preflight
    checks built (else it is built here)."""
    import ray

    from ..observe.callbacks import TuneMetricsCallback

    out = storage.absolute(out)
    if not cfg.sweep.grid and cfg.sweep.search == "grid":
        raise SweepError("sweep.grid is empty: set e.g. --set 'sweep.grid={train.seed: [0, 1], loss.lam: [0, 0.1]}'")
    plan = plan or SweepPlan.build(cfg)
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    roots = [str(r) for r in cfg.sweep.grid.get("data.root", [cfg.data.root])]  # every dataset the sweep reads
    if resume:  # the sweep's trials resume their checkpoints: only under the base config and data they were trained with
        new_sweep = "choose another --out (or run.name) for a new sweep"
        check_same_run(recorded_config(out, options), cfg.to_dict(), storage.redact(out, options), new_sweep)
        check_same_data(read_record(out, options), roots, storage.redact(out, options), options, start_over=new_sweep)
    if plan.searched:
        extra = {"search": cfg.sweep.search, "space": cfg.sweep.space, "num_samples": cfg.sweep.num_samples}
        announce(f"sweep.search={cfg.sweep.search}: {cfg.sweep.num_samples} point(s) drawn from sweep.space, one unfused trial each "
                 f"(sweep.search={cfg.sweep.search} proposes one point per trial); points recorded in {SEARCH_FILE}")
    else:
        extra = {"grid": dict(cfg.sweep.grid), "populations": [[m.name for m in s.members] for s in plan.populations]}
        for note in plan.notes:
            announce(note)
    record = run_record(cfg, "sweep", options, cluster=ray.cluster_resources(), trial_resources=trial_resources(cfg), datasets=dataset_digests(roots, options),
                        **extra)
    write_json(storage.join(out, "run.json"), record, options)
    keys = list(cfg.sweep.space) if plan.searched else list(cfg.sweep.grid)
    trial_dir = lambda name: storage.join(out, "trials", name)  # noqa: E731
    with serve_run_metrics(cfg, announce) as exporter, tracking(cfg, out, "sweep", trial_dir, announce) as tracker:
        planned = [] if plan.searched else [m.name for s in plan.populations for m in s.members]  # "k of N grid points" from the plan
        callback = TuneMetricsCallback(cfg, exporter, planned=planned, total=cfg.sweep.num_samples if plan.searched else None, tracker=tracker)
        started = time.monotonic()
        watchdog = sweep_watchdog(cfg, out)
        try:
            results = run_trials(plan, out, resume=resume, callbacks=[callback, *(callbacks or [])], watchdog=watchdog)
        except KeyboardInterrupt:  # Ctrl-C (Tune's own handler is off, see .interrupt): no summary, no report
            callback.mark(INTERRUPTED_STATE)
            callback.final_table()
            rows = collect_rows([], plan, out, interrupted=set(callback.names(INTERRUPTED_STATE)))
            write_trials_csv(out, rows, keys, options)
            population_of = {m.name: (s.name, len(s.members)) for s in ([] if plan.searched else plan.populations) for m in s.members}
            elapsed = time.monotonic() - started
            raise SweepInterrupted(resume_plan(cfg, out, ray_storage(cfg, out, "train"), rows, population_of, elapsed, options)) from None
        rows = collect_rows(results, plan, out)
        summary = write_tables(out, rows, keys, options, searched=keys if plan.searched else ())
        if cfg.sweep.report:
            from ..observe.report import write_report  # matplotlib, umap: imported only when used

            report = write_report(out, options=options, progress=cfg.train.progress)
            announce(f"report: {storage.redact(report.url, options)}")
    failed = [r["trial"] for r in rows if r["status"] not in ("TERMINATED", STOPPED_EARLY)]
    if failed:
        errors = [r["trial"] for r in rows if r["status"] == "ERROR"]
        where = (
            f"their errors are above and in the run log ({storage.redact(out, options)}/logs)"
            if errors
            else "none of them raised an error (they never ran to the end)"
        )
        stalls = "".join(f"\n  {line}" for line in watchdog.stalls)  # the stall lines, once more at the end
        raise SweepError(f"{len(failed)} of {len(rows)} grid point(s) did not finish ({', '.join(failed)}); {where}; rerun with --resume to train them"
                         f"{stalls}")
    return summary
