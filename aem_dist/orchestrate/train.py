"""One training run: in this process (``scaling.num_workers: 0``) or as a Ray Train TorchTrainer."""

from __future__ import annotations

from typing import Any

from .. import storage
from ..config import Config
from ..engine.local import run_local
from ..engine.results import results_dict, run_record, write_json
from ..storage import StorageOptions


def train_run(cfg: Config, out: str) -> dict[str, Any]:
    """Train ``cfg``; write ``out/run.json`` and ``out/results.json``; return the results dict."""
    options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
    write_json(storage.join(out, "run.json"), run_record(cfg, "train", options), options)
    result = run_local(cfg, run_dir=out, options=options)
    results = results_dict(result, cfg)
    write_json(storage.join(out, "results.json"), results, options)
    return results
