"""One training run: in this process (``scaling.num_workers: 0``) or as a Ray Train TorchTrainer.

A Ray run is a one-trial Tune run around the same trial function sweeps use (Ray's recommended way
to get driver-side callbacks for a single Train run): the driver sees every epoch's report and serves
it as Prometheus metrics, and re-running with the same ``--out`` resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .. import storage
from ..config import Config
from ..data.folds import check_folds
from ..data.manifest import load_manifest
from ..engine.local import clear_run, run_local
from ..engine.results import results_dict, run_record, write_json
from ..engine.runrecord import check_same_run, recorded_config
from ..observe.metrics import epoch_hook, run_labels, serve_run_metrics
from ..observe.identity import check_same_data, dataset_digests, read_record
from ..observe.tracking import tracking
from ..storage import StorageOptions
from .errors import TrainingFailed
from .plan import SweepPlan
from .resources import ray_storage

log = logging.getLogger(__name__)


def train_run(cfg: Config, out: str, *, address: str | None = None, announce: Callable[[str], None] = log.info, force_new: bool = False) -> dict[str, Any]:
    """Train ``cfg``; write ``out/run.json`` and ``out/results.json``; return the results dict.

    ``out`` belongs to one config: if it already holds a run (its ``run.json``) whose config differs
    in a result-relevant key, this raises :class:`~aem_dist.engine.runrecord.RunConfigMismatch`
    naming the keys, before anything is written; ``force_new`` removes the old run's checkpoints
    (local and Ray's), best state and results and starts over."""
    out = storage.absolute(out)
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    if cfg.data.fold is not None:  # a fold the dataset lacks fails here, before Ray or any worker starts
        check_folds(load_manifest(cfg.data.root, options), [cfg.data.fold], storage.redact(cfg.data.root, options))
    if force_new:
        clear_run(out, options, extra=(ray_storage(cfg, out, "train", "run"), ray_storage(cfg, out, cfg.run.name)))
    else:
        check_same_run(recorded_config(out, options), cfg.to_dict(), storage.redact(out, options))
        check_same_data(read_record(out, options), [cfg.data.root], storage.redact(out, options), options)
    write_json(storage.join(out, "run.json"), run_record(cfg, "train", options, datasets=dataset_digests([cfg.data.root], options)), options)
    with serve_run_metrics(cfg, announce) as exporter, tracking(cfg, out, "train", lambda _: out, announce) as tracker:
        if cfg.scaling.num_workers == 0 and address is None:
            hooks = [epoch_hook(exporter, run_labels(cfg))] if exporter is not None else []
            if tracker is not None:
                hooks.append(lambda report: tracker.epoch("", {}, report.flat()))
            hook = (lambda report: [h(report) for h in hooks]) if hooks else None
            results = results_dict(run_local(cfg, run_dir=out, options=options, on_epoch=hook), cfg)
            write_json(storage.join(out, "results.json"), results, options)
            if tracker is not None:
                tracker.done("", {})
            return results
        return _train_on_ray(cfg, out, address, exporter, options, tracker)


def _train_on_ray(cfg: Config, out: str, address: str | None, exporter, options: StorageOptions, tracker=None) -> dict[str, Any]:
    from ..observe.callbacks import TuneMetricsCallback
    from .ray_env import ray_session
    from .sweep import run_trials

    callback = TuneMetricsCallback(cfg, exporter, trial_name=lambda trial: "", tracker=tracker)
    with ray_session(address, cfg):
        grid_results = run_trials(SweepPlan.build(cfg, sweep=False), out, resume=True, callbacks=[callback])
    errors = [r.error for r in grid_results if r.error is not None]
    try:
        return storage.read_json(storage.join(out, "results.json"), options, what="results file")
    except FileNotFoundError:
        raise TrainingFailed(f"training failed: {storage.redact(errors[0] if errors else 'no results written', options)}") from None
