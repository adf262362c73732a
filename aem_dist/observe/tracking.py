"""Optional MLflow tracking of runs and sweeps (``mlflow.enabled``; ``pip install 'aem-dist[mlflow]'``).

One MLflow **parent run** per sweep (or ``train`` run), named by ``run.name`` and tagged with the output
folder, and one **child run per grid point**, named like its trial folder (``lam=0.1_seed=0``):

* params: the grid point's swept keys (``swept.loss.lam``) and its whole resolved config, dotted
  (``loss.lam``, ``train.lr``, ...; secrets are never in it), the parent holds the base config;
* metrics: every epoch report with ``step`` = epoch (``train/loss``, ``train/ce``, ``val/auc``, ...),
  and at the end the selected epoch's ``best/val/*`` and ``best/test/*``;
* artifacts: the child's ``results.json`` and best checkpoint ``best/state.pt``; the parent's
  ``report.md``, ``plots/``, ``summary.{csv,md}`` and ``trials.csv``.

Where: ``mlflow.tracking_uri`` (an MLflow server ``http(s)://…``, ``sqlite:///…``, ``databricks``, …) or,
left empty, an embedded store in the output folder: ``sqlite:///OUT/mlflow/mlflow.db`` with artifacts in
``OUT/mlflow/artifacts`` (MLflow ≥ 3 keeps its plain ``./mlruns`` file store in maintenance mode and
refuses it by default; a SQLite file is the local store it supports). Browse it with
``mlflow ui --backend-store-uri sqlite:///OUT/mlflow/mlflow.db``. A ``--resume`` continues the same
parent and child runs (found by their tags) instead of starting new ones.

Tracking never stops training: an MLflow error is logged once as a warning and tracking stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

from .. import storage
from ..config import Config, ConfigError, config_with
from ..storage import StorageOptions

log = logging.getLogger(__name__)

TAG_OUT, TAG_KIND, TAG_TRIAL = "aem.out", "aem.kind", "aem.trial"
PARAM_MAX = 6000  # MLflow's limit on one param value (characters)
SWEEP_ARTIFACTS = ("report.md", "summary.md", "summary.csv", "summary_folds.csv", "trials.csv", "run.json")


def embedded_uri(out: str) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store of a local output folder."""
    root = os.path.join(storage.absolute(out), "mlflow")
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}", os.path.join(root, "artifacts")


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config dict as MLflow params: dotted keys, values as text (at most :data:`PARAM_MAX`)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
            out[name] = text[:PARAM_MAX]
    return out


def scalar_metrics(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of an epoch report (lists, strings and NaN are left out)."""
    out = {}
    for key, value in report.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"{prefix}{key}"] = float(value)
    return out


class MlflowTracker:
    """Logs one sweep (or run) and its grid points to MLflow; see the module docstring.

    Args:
        cfg: the base config (``mlflow.*``, ``run.name``, the params of every grid point).
        out: the output folder (a tag of the parent run; the embedded store lives under it).
        kind: ``sweep`` or ``train``.
        run_dir: grid point name → its folder (results.json, best/state.pt).
    """

    def __init__(self, cfg: Config, out: str, kind: str, run_dir: Callable[[str], str]):
        self.cfg = cfg
        self.out = storage.absolute(out)
        self.kind = kind
        self.run_dir = run_dir
        self.options = StorageOptions.from_config(cfg.storage, cfg.data.retries)
        self.client: Any = None
        self.parent_id: str | None = None
        self._children: dict[str, str] = {}  # grid point name → MLflow run id
        self._lock = threading.Lock()
        self.failed = False
        if cfg.mlflow.tracking_uri:
            self.uri, self.artifacts = cfg.mlflow.tracking_uri, None
        else:
            self.uri, self.artifacts = embedded_uri(out)

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "MlflowTracker":
        self._guard("start", self._start)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        interrupted = exc_type is not None and (issubclass(exc_type, KeyboardInterrupt) or getattr(exc_type, "interrupted", False))
        status = "FINISHED" if exc_type is None else ("KILLED" if interrupted else "FAILED")
        self._guard("finish", lambda: self._finish(status))

    def _start(self) -> None:
        from mlflow import MlflowClient

        if self.artifacts is not None:
            os.makedirs(os.path.dirname(self.uri.removeprefix("sqlite:///")), exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.mlflow.experiment or self.cfg.run.name
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifact_location=self.artifacts)
        self.experiment_id = exp_id
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{TAG_OUT}` = '{_quote(self.out)}' and tags.`{TAG_KIND}` = '{self.kind}'", max_results=1)
        if found:  # --resume: the same parent run goes on
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            children = self.client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=10_000)
            self._children = {r.data.tags.get(TAG_TRIAL, ""): r.info.run_id for r in children}
        else:
            run = self.client.create_run(
                exp_id, run_name=self.cfg.run.name, tags={TAG_OUT: self.out, TAG_KIND: self.kind, "aem.out_shown": storage.redact(self.out, self.options)}
            )
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, flat_params(self.cfg.to_dict(redact=True)))
        log.info("MLflow: experiment %r, run %s at %s", name, self.parent_id, storage.redact(self.uri, self.options))

    def _finish(self, status: str) -> None:
        if self.parent_id is None:
            return
        if self.kind == "sweep":
            for name in SWEEP_ARTIFACTS:
                self._artifact(self.parent_id, storage.join(self.out, name), "")
            plots = storage.join(self.out, "plots")
            if storage.exists(plots, self.options):
                fs, path = storage.open_fs(plots, self.options)
                for item in sorted(fs.ls(path, detail=False)):
                    self._artifact(self.parent_id, storage.join(plots, str(item).rstrip("/").rsplit("/", 1)[-1]), "plots")
        self.client.set_terminated(self.parent_id, status=status)

    # --- grid points -----------------------------------------------------------------------------

    def _child(self, name: str, values: Mapping[str, Any]) -> str:
        with self._lock:
            if name in self._children:
                return self._children[name]
            run = self.client.create_run(self.experiment_id, run_name=name or self.cfg.run.name, tags={"mlflow.parentRunId": self.parent_id, TAG_TRIAL: name})
            self._children[name] = run_id = run.info.run_id
        cfg = config_with(self.cfg, dict(values)) if values else self.cfg
        params = {f"swept.{k}": str(v)[:PARAM_MAX] for k, v in values.items()} | flat_params(cfg.to_dict(redact=True))
        self._log_params(run_id, params)
        return run_id

    def epoch(self, name: str, values: Mapping[str, Any], report: Mapping[str, Any]) -> None:
        """Log one grid point's epoch report (step = its epoch)."""

        def log_it() -> None:
            from mlflow.entities import Metric

            run_id = self._child(name, values)
            step, now = int(report.get("epoch", 0)), int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in scalar_metrics(report).items() if k != "epoch"]
            for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

        self._guard("epoch", log_it)

    def done(self, name: str, values: Mapping[str, Any], status: str = "FINISHED") -> None:
        """A grid point ended: its selected epoch's metrics and its artifacts, then its status."""

        def log_it() -> None:
            from mlflow.entities import Metric

            run_id = self._child(name, values)
            folder = self.run_dir(name)
            results = _read_json(storage.join(folder, "results.json"), self.options)
            if results is not None:
                now = int(time.time() * 1000)
                best = {**scalar_metrics(results.get("val") or {}, "best/val/"), **scalar_metrics(results.get("test") or {}, "best/test/")}
                if isinstance(results.get("best_epoch"), int):
                    best["best/epoch"] = float(results["best_epoch"])
                self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in best.items()])
            self._artifact(run_id, storage.join(folder, "results.json"), "")
            self._artifact(run_id, storage.join(folder, "best", "state.pt"), "best")
            self.client.set_terminated(run_id, status=status)

        self._guard("done", log_it)

    # --- helpers ---------------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _artifact(self, run_id: str, url: str, under: str) -> None:
        """Upload one file (local or on object storage) as an artifact, if it exists."""
        try:
            data = storage.read_bytes(url, self.options)
        except FileNotFoundError:
            return
        with tempfile.TemporaryDirectory(prefix="aem-mlflow-") as tmp:
            path = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(run_id, path, under or None)

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001  (tracking must never stop training)
            self.failed = True
            log.warning("MLflow tracking stopped (%s failed: %s); training goes on", what, storage.redact(err, self.options))


def check_tracking(cfg: Config, out: str) -> None:
    """ConfigError (one line) when ``mlflow.enabled`` cannot work: MLflow is not installed, or the
    embedded store would have to live on object storage (a SQLite file needs a local disk)."""
    if not cfg.mlflow.enabled:
        return
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("mlflow.enabled needs MLflow: pip install 'aem-dist[mlflow]' (or mlflow-skinny)")
    if not cfg.mlflow.tracking_uri and storage.is_remote(out):
        raise ConfigError(f"mlflow.enabled with --out {storage.redact(out)} needs mlflow.tracking_uri (an MLflow server, or sqlite:///path on this machine): "
                          "the embedded store is a SQLite file in a local output folder")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _read_json(url: str, options: StorageOptions) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url, options))
    except (FileNotFoundError, ValueError):
        return None


class tracking:
    """``with tracking(cfg, out, "sweep", run_dir) as tracker:`` — an :class:`MlflowTracker` when
    ``mlflow.enabled``, else None (nothing imported)."""

    def __init__(self, cfg: Config, out: str, kind: str, run_dir: Callable[[str], str], announce: Callable[[str], None] | None = None):
        check_tracking(cfg, out)
        self.tracker = MlflowTracker(cfg, out, kind, run_dir) if cfg.mlflow.enabled else None
        self.announce = announce

    def __enter__(self) -> MlflowTracker | None:
        if self.tracker is None:
            return None
        self.tracker.__enter__()
        if self.announce is not None and not self.tracker.failed:
            t = self.tracker
            self.announce(f"mlflow: {storage.redact(t.uri, t.options)} (experiment {t.cfg.mlflow.experiment or t.cfg.run.name!r})")
        return self.tracker

    def __exit__(self, *exc: Any) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(*exc)
