"""The per-worker function and the one TorchTrainer builder, shared by single runs and sweep trials.

``train_loop_per_worker`` wraps :func:`aem_dist.engine.loop.fit` — there is no second training loop.
It resumes from Ray's latest checkpoint, reports every epoch (all ranks: ``report`` is a barrier; rank
0 attaches the checkpoint; ``node_id`` names the node that trains, ``worker_pid`` rank 0's process, which
the stall watchdog looks at), keeps the best state in ``run_dir/best/state.pt``, and returns the results
dict from rank 0 (``worker_node_ids``: each rank's node).

:func:`fit_reporting_to_tune` runs such a trainer inside a Tune trial with one reporting path: rank 0's
reports reach Tune only from the trial function's own thread (see docs/ARCHITECTURE.md, "One reporting
path per trial").
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any

import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer

from .. import storage
from ..config import Config, apply_overrides, build_config
from ..engine.checkpoint import STATE_FILE, load_dir, state_to_bytes, write_best_states
from ..engine.dist import DistContext
from ..engine.loop import EpochReport, fit_members
from ..engine.results import results_dict
from ..engine.stages import model_init
from ..observe.callbacks import tune_metrics
from ..storage import StorageOptions
from .resources import trial_device, worker_resources
from .trials import progress_metrics, stall_if_asked


class RayReporter:
    """``on_epoch`` hook: report metrics (+ rank 0's checkpoint) to Ray Train or Ray Tune, and keep
    each member's best state in its ``best_dirs[k]/state.pt``."""

    def __init__(self, api: Any, ctx: DistContext, best_dirs: list[str], options: StorageOptions, every: int = 1, epochs: int = 1,
                 stall_at: int | None = None):
        self.api = api
        self.stall_at = stall_at  # debug.stall_at_epoch: stop reporting there (the watchdog's test)
        self.ctx = ctx
        self.best_dirs = best_dirs
        self.options = options
        self.every = every
        self.epochs = epochs
        self.checkpoint_s: float | None = None
        self.total_s = 0.0  # time spent reporting (checkpoint persistence included), for the timing record
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, report: EpochReport) -> None:
        if self.checkpoint_s is not None:  # the previous epoch's save: this one's is still to come
            report.extra["time/checkpoint_s"] = self.checkpoint_s
        report.extra["node_id"] = self.node_id  # which node trains the trial now (it changes after a node loss)
        report.extra["worker_pid"] = os.getpid()  # rank 0's process: the stall watchdog checks whether it still works
        metrics = tune_metrics(progress_metrics(report.flat(), report.epoch, self.epochs))  # ASHA's time attribute (see .search)
        # run.checkpoint_every: a report without a checkpoint still passes metrics (and is the barrier)
        due = (report.epoch + 1) % self.every == 0 or report.epoch + 1 == self.epochs
        with tempfile.TemporaryDirectory(prefix="aem-ckpt-") as tmp:
            checkpoint = None
            t0 = time.perf_counter()
            if self.ctx.is_main:
                blob = None
                if due:
                    blob = state_to_bytes(report.state())
                    with open(os.path.join(tmp, STATE_FILE), "wb") as f:
                        f.write(blob)
                    checkpoint = self.api.Checkpoint.from_directory(tmp)
                write_best_states(report, blob, self.best_dirs, self.options)
            self.api.report(metrics, checkpoint=checkpoint)  # persists the checkpoint before returning
            self.checkpoint_s = time.perf_counter() - t0
            self.total_s += self.checkpoint_s
        if self.ctx.is_main:
            stall_if_asked(self.stall_at, report.epoch)


def quiet_ray_logs() -> None:
    """Keep Ray's per-report INFO lines (each one a whole metrics dict) off the console: Train V2 logs
    them under a logger named after its source file, which its own log-level setting misses. Our own
    records get their level in front ("INFO aem_dist.engine.loop: epoch 3: ..."), so that the driver
    keeps INFO lines in the run log and shows warnings (see :mod:`aem_dist.observe.console`)."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ours = logging.getLogger("aem_dist")
    if not any(getattr(h, "_aem_worker", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._aem_worker = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # one line per record, whatever Ray set up for the root logger


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Run in each Ray Train worker (``api="train"``) or directly in a Tune trial (``api="tune"``).

    ``config``: ``cfgs`` (one config dict per member: one for a plain run, K for a population),
    ``run_dirs`` (each member's trial folder) and ``api``. Returns each member's results (rank 0)."""
    started = time.time()  # wall clock: compared with the trial's own clock (same node) in the timing record
    quiet_ray_logs()
    # Progress is the driver's live trial table and metrics; a bar per worker would interleave.
    cfgs = [build_config(apply_overrides(c, {"train.progress": False}), "trial config") for c in config["cfgs"]]
    cfg = cfgs[0]
    api = ray.train if config.get("api", "train") == "train" else ray.tune
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    if api is ray.train:
        ctx = DistContext.current(ray.train.torch.get_device(), cpus=worker_resources(cfg).get("CPU"))  # torch threads = the worker's CPUs
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)  # nccl collectives (all_gather_object) use the current device
    else:
        ctx = DistContext.current(trial_device(cfg.train.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")), cpus=cfg.sweep.trial_cpus)
    resume = None
    checkpoint = api.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_dir(folder)
    best_dirs = [storage.join(d, "best") for d in config["run_dirs"]]
    # IBMIL stage 1, MHIM-MIL teacher init (models with stages never fuse into populations); None for most models
    init = model_init(cfg, config["run_dirs"][0], options, ctx) if len(cfgs) == 1 else None
    reporter = RayReporter(api, ctx, best_dirs, options, every=cfg.run.checkpoint_every, epochs=cfg.train.epochs, stall_at=cfg.debug.stall_at_epoch)
    fit_start = time.time()
    results = fit_members(cfgs, ctx=ctx, resume=resume, on_epoch=reporter, options=options, model_init=init)
    ended = time.time()
    # Every rank's Ray node, in rank order (a collective: every rank calls it), for results.json.
    node_ids = ctx.gather_objects(reporter.node_id)
    after = -1 if results[0].resumed_after is None else results[0].resumed_after
    epochs_s = sum(row["time"]["epoch_s"] for row in results[0].history if row["epoch"] > after)  # this process's epochs
    timing = {"worker_started": started, "worker_ended": ended, "members": len(cfgs), "setup_s": ended - fit_start - epochs_s - reporter.total_s,
              "epochs_s": epochs_s, "reports_s": reporter.total_s}
    return [results_dict(r, c) | {"timing": timing, "worker_node_ids": node_ids} for r, c in zip(results, cfgs)] if ctx.is_main else None


def make_trainer(cfgs: list[Config], run_dirs: list[str], name: str, storage_path: str, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer for one run or population: DDP over ``scaling.num_workers`` (gloo on CPU, nccl on
    GPU), checkpoints under ``storage_path/name``, restarts from the last checkpoint up to ``run.max_failures``."""
    cfg = cfgs[0]
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    fs, path = storage.ray_storage_filesystem(storage_path, options)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfgs": [c.to_dict(redact=True) for c in cfgs], "run_dirs": run_dirs, "api": "train"},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoint_keep),
            callbacks=callbacks or [],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


class RelayReports(ray.train.UserCallback):
    """Train callback (in Train's controller actor): rank 0's metrics of each report into ``queue``, which
    only the trial function's thread reads (:func:`fit_reporting_to_tune`). It replaces Ray's
    ``TuneReportCallback``, whose ``ray.tune.report`` from the controller is relayed by the trial actor's
    main thread — the one consumer of Tune's one-slot result queue — and so can deadlock with any report
    the trial function makes after ``fit()`` returned."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(metrics[0])  # blocks until the queue actor holds it, so before fit() can return


_FIT_ENDED = "__aem_fit_ended__"  # the last item of the relay queue


def fit_reporting_to_tune(cfgs: list[Config], run_dirs: list[str], name: str, storage_path: str) -> list[dict[str, Any]]:
    """``make_trainer(...).fit()`` inside a Tune trial, each epoch's metrics reported to Tune by this (the
    trial function's) thread, in order, and all of them before this returns; returns the workers' results.

    ``fit()`` runs in a helper thread; the relay queue is a 0-CPU Ray queue actor (a trial holds no CPU
    beyond its bundle). Tune's checkpoints are not used: trials resume from Ray Train's own checkpoints."""
    from ray.util.queue import Empty, Queue

    relay = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = make_trainer(cfgs, run_dirs, name, storage_path, callbacks=[RelayReports(relay)]).fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial thread below
            outcome["error"] = e
        finally:
            relay.put(_FIT_ENDED)  # after every report of the run: each put returned before fit() did

    thread = threading.Thread(target=fit, name="aem-fit", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = relay.get(timeout=5.0)
            except Empty:
                if thread.is_alive():
                    continue
                break  # the fit thread ended without its closing put (the queue actor failed): nothing more comes
            if item == _FIT_ENDED:
                break
            ray.tune.report(item)
        thread.join()
    finally:
        relay.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"].return_value
