"""Resuming sweeps and runs without unpickling anything from storage.

Ray Tune's own resume (``Tuner.restore`` / ``Tuner.can_restore``) ``pickle.loads`` ``tuner.pkl`` and the
cloudpickled parts of ``experiment_state-*.json`` from the output prefix: anyone who can write there
could run code on the driver. aem-dist therefore never restores a Tune experiment. A resumed sweep is a
*fresh* Tune experiment over the same grid, and what is already done comes from files we read as data:

* a trial is finished when its ``trials/<trial>/results.json`` (JSON, written last) exists and holds
  the very config the trial would run (:func:`finished_results`) — it reports and returns at once;
  so is a trial a scheduler stopped (its ``stopped.json``, :func:`stopped_record`): it is kept, not
  trained on;
* a search's drawn points come from ``<out>/search.json`` (see :mod:`.search`), never from the
  searcher's pickled state;
* an unfinished trial continues from its last checkpoint: ``state.pt`` read with
  ``torch.load(weights_only=True)``, either from Ray Train (its run of the same name and storage path;
  Train V2 restores its checkpoint list from a JSON snapshot) or, for in-process trials
  (``scaling.num_workers: 0``), from ``trials/<trial>/checkpoints/`` written by
  :func:`run_inprocess_trial`.

Tune still writes its state (it is how Tune works), but nothing of it is ever read back.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .. import storage
from ..config import Config, apply_overrides, build_config
from ..engine.dist import DistContext
from ..engine.local import run_local_members
from ..engine.stages import model_init
from ..engine.loop import EpochReport
from ..engine.results import results_dict, stored_config
from ..engine.runrecord import result_relevant_diff
from ..storage import StorageOptions
from .resources import trial_device
from .trials import STOPPED_FILE, progress_metrics, stall_if_asked

log = logging.getLogger(__name__)


def experiment_exists(fs: Any, exp_path: str) -> bool:
    """Whether Tune state of an earlier run lies at ``exp_path`` (looked at, never loaded).

    ``fs`` is the pyarrow filesystem from :func:`aem_dist.storage.ray_storage_filesystem` (None = local)."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    return fs.get_file_info(exp_path).type != pafs.FileType.NotFound


def finished_results(run_dir: str, cfg: Config, options: StorageOptions, file: str = "results.json") -> dict[str, Any] | None:
    """The trial's results.json if it exists and was produced by this very configuration.

    results.json is written last, so a trial that has one finished — even if the driver died before
    Tune recorded it. Raises StorageError if storage cannot be read."""
    try:
        results = json.loads(storage.read_bytes(storage.join(run_dir, file), options))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign file: not finished, train (and rewrite) it
        return None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        return None
    # keys that do not change results may differ (Ray workers record progress off, ...): runrecord
    return results if not result_relevant_diff(results["config"], stored_config(cfg)) else None


def stopped_record(run_dir: str, cfg: Config, options: StorageOptions) -> dict[str, Any] | None:
    """The trial's ``stopped.json`` (a scheduler stopped it; written by the driver, see
    :class:`.search.EarlyStopRecorder`) if it was trained under this very configuration: a resumed sweep
    keeps such a trial as it is rather than training it on."""
    return finished_results(run_dir, cfg, options, STOPPED_FILE)


def run_inprocess_trial(cfgs: list[Config], run_dirs: list[str], checkpoints: str, options: StorageOptions) -> list[dict[str, Any]]:
    """A ``scaling.num_workers: 0`` trial (one run, or a population) inside its Tune function: trains in
    this process, with a checkpoint per epoch under ``checkpoints`` (resumed from when present) and each
    member's best state in ``run_dirs[k]/best``, reporting each epoch's metrics (no checkpoint) to Tune.
    Returns each member's results.json dict."""
    import ray
    import ray.tune

    # Progress is the driver's live trial table and metrics; a bar per trial would interleave.
    quiet = [build_config(apply_overrides(c.to_dict(redact=False), {"train.progress": False}), "trial config") for c in cfgs]

    from ..observe.callbacks import tune_metrics

    node_id = ray.get_runtime_context().get_node_id()

    def report(epoch: EpochReport) -> None:
        # node_id as Ray Train workers report it (worker.RayReporter); progress for ASHA (see .search)
        # worker_pid: this process trains (the stall watchdog checks whether it still works)
        extra = {"node_id": node_id, "worker_pid": os.getpid()}
        ray.tune.report(tune_metrics(progress_metrics(epoch.flat() | extra, epoch.epoch, cfgs[0].train.epochs)))
        stall_if_asked(cfgs[0].debug.stall_at_epoch, epoch.epoch)

    best_dirs = [storage.join(d, "best") for d in run_dirs]
    # the GPU Ray assigned to this trial (sweep.trial_gpus), never just any visible one
    ctx = DistContext.current(trial_device(cfgs[0].train.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")), cpus=cfgs[0].sweep.trial_cpus)
    # IBMIL stage 1, MHIM-MIL teacher init (models with stages never fuse into populations)
    init = model_init(quiet[0], run_dirs[0], options, ctx) if len(cfgs) == 1 else None
    results = run_local_members(quiet, checkpoints, best_dirs, options=options, on_epoch=report, model_init=init, ctx=ctx)
    return [results_dict(r, c) for r, c in zip(results, cfgs)]
