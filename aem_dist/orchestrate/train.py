"""One training run: in this process (``scaling.num_workers: 0``) or as a Ray Train TorchTrainer.

A Ray run is a one-trial Tune run around the same trial function sweeps use (Ray's recommended way
to get driver-side callbacks for a single Train run): the driver sees every epoch's report, and
re-running with the same ``--out`` resumes from the last checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

from .. import storage
from ..config import Config
from ..engine.local import run_local
from ..engine.results import results_dict, run_record, write_json
from ..storage import StorageOptions
from .errors import TrainingFailed


def train_run(cfg: Config, out: str, *, address: str | None = None, on_epoch=None, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``cfg``; write ``out/run.json`` and ``out/results.json``; return the results dict."""
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    write_json(storage.join(out, "run.json"), run_record(cfg, "train", options), options)
    if cfg.scaling.num_workers == 0 and address is None:
        results = results_dict(run_local(cfg, run_dir=out, options=options, on_epoch=on_epoch), cfg)
        write_json(storage.join(out, "results.json"), results, options)
        return results

    from .ray_env import ray_session
    from .sweep import run_trials

    with ray_session(address, cfg):
        grid_results = run_trials(cfg, out, grid={}, resume=True, single=True, callbacks=callbacks)
    errors = [r.error for r in grid_results if r.error is not None]
    try:
        return json.loads(storage.read_bytes(storage.join(out, "results.json"), options))
    except FileNotFoundError:
        raise TrainingFailed(f"training failed: {storage.redact(errors[0] if errors else 'no results written', options)}") from None
