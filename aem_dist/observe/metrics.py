"""Prometheus metrics for runs and sweeps, served by the driver process.

One :class:`MetricsExporter` per run or sweep owns a private ``CollectorRegistry`` (never the global
default, so two exporters in one process, or a test, never share series) and serves it on
``metrics.host:metrics.port``. It is fed by the per-epoch reports that reach the driver — the
``on_epoch`` hook of an in-process run (:func:`epoch_hook`), a Ray Tune callback for sweeps or a Ray
Train callback for single distributed runs (:mod:`aem_dist.observe.callbacks`) — so workers never run
HTTP servers of their own and nothing collides on ports.

Every per-run series carries the labels ``run, trial, lam, seed, model`` (:data:`RUN_LABELS`); no label
ever changes per step. Counters are fed from per-epoch values and counted once per (series, epoch),
and cumulative values (``skipped/<reason>``) by their increase, so a report that arrives twice (a
retried delivery, a resumed trial replaying an epoch) never counts twice.

Example::

    exporter = MetricsExporter(cfg.metrics)
    print("metrics at", exporter.start())
    run_local(cfg, out, on_epoch=epoch_hook(exporter, run_labels(cfg)))
    exporter.finish()  # optional Pushgateway push, serve grace_s more seconds, stop
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server
from prometheus_client.registry import Collector

from ..config import Config, MetricsSection

log = logging.getLogger(__name__)

RUN_LABELS = ("run", "trial", "lam", "seed", "model")
PORT_TRIES = 100  # metrics.port taken: the next free one of this many ports serves (printed with the URL)
TRIAL_STATES = ("pending", "running", "terminated", "error")

# Step durations go from milliseconds (tiny bags packed on a GPU) to minutes (50 000-instance bags on a CPU).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
EPOCH_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family: its exposed name, type, help text and labels (besides RUN_LABELS)."""

    name: str  # the family name as Prometheus sees it (counters end in _total)
    kind: str  # gauge | counter | histogram
    doc: str
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    per_run: bool = True  # carries RUN_LABELS

    @property
    def labels(self) -> tuple[str, ...]:
        return (*RUN_LABELS, *self.extra_labels) if self.per_run else self.extra_labels

    @property
    def series_names(self) -> tuple[str, ...]:
        """Sample names a scrape shows for this family (histograms expand into three)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("aem_train_loss", "gauge", "Mean training loss per step of the last epoch (CE + λ·AEM term)."),
    MetricSpec("aem_train_ce_loss", "gauge", "Mean cross-entropy part of the training loss of the last epoch (nats)."),
    MetricSpec("aem_train_aem_loss", "gauge", "Mean AEM term Σ a log a (negative attention entropy, nats) of the last epoch, before the λ weight."),
    MetricSpec("aem_attention_entropy_nats", "gauge", "Mean per-bag attention entropy on a split at the last evaluation (nats).", ("split",)),
    MetricSpec("aem_eval_auc", "gauge", "Macro one-vs-rest AUC on a split at the last evaluation (0-1).", ("split",)),
    MetricSpec("aem_eval_f1", "gauge", "Macro F1 of the argmax on a split at the last evaluation (0-1).", ("split",)),
    MetricSpec("aem_best_val_score", "gauge", "Best validation selection score so far (val AUC + val F1 by default)."),
    MetricSpec("aem_epoch", "gauge", "Index (0-based) of the last finished epoch."),
    MetricSpec("aem_learning_rate", "gauge", "Learning rate at the end of the last epoch."),
    MetricSpec("aem_instances_per_second", "gauge", "Training throughput of the last epoch, instances per second over all ranks."),
    MetricSpec("aem_bags_processed_total", "counter", "Training bags processed (all ranks; a bag seen twice in an epoch counts twice)."),
    MetricSpec("aem_instances_processed_total", "counter", "Training instances processed (all ranks)."),
    MetricSpec("aem_data_wait_seconds_total", "counter", "Time the training step waited for data (seconds, mean over ranks)."),
    MetricSpec("aem_bad_samples_skipped_total", "counter", "Bad samples skipped under data.on_bad_sample=skip, by reason.", ("reason",)),
    MetricSpec("aem_step_duration_seconds", "histogram", "Duration of one training step on rank 0, data wait included (seconds).", buckets=STEP_BUCKETS),
    MetricSpec("aem_epoch_duration_seconds", "histogram", "Duration of one epoch: training plus evaluation (seconds).", buckets=EPOCH_BUCKETS),
    MetricSpec("aem_checkpoint_save_duration_seconds", "histogram", "Duration of one checkpoint save (seconds).", buckets=CHECKPOINT_BUCKETS),
    MetricSpec("aem_trials", "gauge", "Trials of the sweep by state (pending, running, terminated, error).", ("state",), per_run=False),
)
SPECS: dict[str, MetricSpec] = {s.name: s for s in METRICS}

# Gauges set straight from one EpochReport.flat() key.
GAUGE_KEYS: dict[str, str] = {
    "aem_train_loss": "train/loss",
    "aem_train_ce_loss": "train/ce",
    "aem_train_aem_loss": "train/aem",
    "aem_best_val_score": "best/val_score",
    "aem_epoch": "epoch",
    "aem_learning_rate": "lr",
    "aem_instances_per_second": "time/instances_per_s",
}
# Gauges with a split label: metric → flat key suffix under "<split>/".
SPLIT_GAUGE_KEYS: dict[str, str] = {"aem_attention_entropy_nats": "attn_entropy", "aem_eval_auc": "auc", "aem_eval_f1": "f1"}
# Counters fed once per epoch from per-epoch values.
EPOCH_COUNTER_KEYS: dict[str, str] = {
    "aem_bags_processed_total": "train/bags",
    "aem_instances_processed_total": "train/instances",
    "aem_data_wait_seconds_total": "train/data_wait_s",
}


def metric_names() -> set[str]:
    """Every metric family name the exporter exposes (counters with ``_total``, histograms by base name)."""
    return set(SPECS)


def series_names() -> set[str]:
    """Every sample name a scrape can show (histograms as ``_bucket``/``_sum``/``_count``), for dashboards."""
    return {n for s in METRICS for n in s.series_names}


class _ScrapeCounter(Collector):
    """Contributes no samples; counts how often the registry is collected (= scraped or pushed)."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def describe(self) -> list:  # registering must not count as a scrape
        return []

    def collect(self) -> Iterator:
        with self.cond:
            self.count += 1
            self.cond.notify_all()
        return iter(())


def build_registry() -> tuple[CollectorRegistry, dict[str, Any]]:
    """A fresh private registry with every metric of :data:`METRICS`; returns it and name → metric object."""
    registry = CollectorRegistry(auto_describe=True)
    objects: dict[str, Any] = {}
    for spec in METRICS:
        if spec.kind == "gauge":
            objects[spec.name] = Gauge(spec.name, spec.doc, spec.labels, registry=registry)
        elif spec.kind == "counter":
            # prometheus-client appends _total itself; give it the stem so the family is exactly spec.name.
            objects[spec.name] = Counter(spec.name.removesuffix("_total"), spec.doc, spec.labels, registry=registry)
        elif spec.kind == "histogram":
            objects[spec.name] = Histogram(spec.name, spec.doc, spec.labels, buckets=spec.buckets, registry=registry)
        else:  # pragma: no cover - the table above is static
            raise ValueError(f"unknown metric kind {spec.kind!r} for {spec.name}")
    return registry, objects


def format_label(value: Any) -> str:
    """A label value: '' for None, integers without '.0', floats in their shortest repr ('0.1', '0.005')."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value)) if value != 0 else "0"
    return str(value)


def run_labels(cfg: Config, trial: str = "", **overrides: Any) -> dict[str, str]:
    """The RUN_LABELS of one run from its config (``overrides`` win, e.g. a trial's own λ)."""
    values = {"run": cfg.run.name, "trial": trial, "lam": cfg.loss.lam, "seed": cfg.train.seed, "model": cfg.model.name}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return {k: format_label(values.get(k)) for k in RUN_LABELS}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class _SeriesState:
    """What has been counted for one label set, so repeated reports never count twice."""

    counted_epochs: set[int]
    cumulative: dict[str, float]


class MetricsExporter:
    """Serves one run's or sweep's metrics from the driver; see the module docstring.

    Args:
        section: host, port (0 = a free port), grace_s, pushgateway (``aem_dist.config.MetricsSection``).
        job: Pushgateway job name.
        run: run/sweep name, the Pushgateway grouping key ``run`` (default: the ``run`` label of the
            reports fed so far). The Pushgateway overwrites a metric's own ``run`` label with the
            grouping key, so the two should agree.
    """

    def __init__(self, section: MetricsSection | None = None, *, job: str = "aem-dist", run: str | None = None):
        self.section = section or MetricsSection()
        self.job = job
        self.run = run
        self.registry, self.metrics = build_registry()
        self._scrapes = _ScrapeCounter()
        self.registry.register(self._scrapes)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _SeriesState] = {}
        self._server = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        self.moved_from: int | None = None  # the configured port, when it was taken and the next free one serves

    # --- serving -------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve ``/metrics`` on ``host:port``; returns the URL (with the real port when port is 0).

        A ``metrics.port`` another process holds (e.g. a second sweep on the same machine) moves to the
        next free port among the :data:`PORT_TRIES` after it, and :attr:`moved_from` says so; OSError
        names the range when all are taken, or the error when the address itself cannot be bound."""
        if self._server is not None:
            return self.url or ""
        host, port = self.section.host, self.section.port
        candidates = [port] if port == 0 else [p for p in range(port, port + PORT_TRIES) if p <= 65535]
        for candidate in candidates:
            try:
                self._server, self._thread = start_http_server(candidate, addr=host, registry=self.registry)
                break
            except OSError as err:
                if err.errno != errno.EADDRINUSE or candidate == candidates[-1]:
                    span = f"{host}:{port}" if len(candidates) == 1 or err.errno != errno.EADDRINUSE else f"{host}:{port}-{candidates[-1]} (all in use)"
                    raise OSError(f"cannot serve metrics on {span} ({err}); set metrics.port to a free port or 0") from None
        self.moved_from = port if self._server.server_address[1] != port and port != 0 else None
        bound = self._server.server_address[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        self.url = f"http://{shown}:{bound}/metrics"
        moved = f"; metrics.port {port} is in use" if self.moved_from is not None else ""
        log.info("serving metrics at %s (bound to %s%s)", self.url, host, moved)
        return self.url

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def scrapes(self) -> int:
        """How many times the registry was collected (scrapes and pushes)."""
        return self._scrapes.count

    def wait_for_scrape(self, after: int | None = None, timeout: float = 30.0) -> bool:
        """Block until the scrape count exceeds ``after`` (default: now); False on timeout."""
        with self._scrapes.cond:
            base = self._scrapes.count if after is None else after
            return self._scrapes.cond.wait_for(lambda: self._scrapes.count > base, timeout=timeout)

    def push(self) -> bool:
        """Push the registry to ``metrics.pushgateway`` (job, grouping key ``run``); False if it failed."""
        gateway = self.section.pushgateway
        if not gateway:
            return False
        run = self.run or next((key[0] for key in self._series), "aem")
        try:
            push_to_gateway(gateway, job=self.job, registry=self.registry, grouping_key={"run": run}, timeout=10)
        except OSError as err:  # a down gateway must not fail a finished run
            log.warning("pushgateway %s: push failed: %s", gateway, err)
            return False
        log.info("pushed final metrics to pushgateway %s (job %s, run %s)", gateway, self.job, run)
        return True

    def grace_period(self, grace_s: float | None = None) -> float:
        """Seconds :meth:`finish` keeps serving: ``grace_s`` (default ``metrics.grace_s``) if the
        endpoint has been scraped so far or ``metrics.grace_always`` is set, else 0 — nobody is
        watching, and waiting would only delay the exit."""
        grace = self.section.grace_s if grace_s is None else grace_s
        return grace if (self.scrapes > 0 or self.section.grace_always) else 0.0

    def finish(self, grace_s: float | None = None, *, stop_after_scrape: bool = False) -> None:
        """End of the run: push to the Pushgateway (if configured), keep serving ``grace_s`` seconds
        (default ``metrics.grace_s``) so the last values get scraped, then stop. The grace period
        applies only when the endpoint was scraped during the run (a scraper is watching) or
        ``metrics.grace_always`` is set; otherwise the run exits at once.

        ``stop_after_scrape`` ends the grace period early once a scrape has happened after this call.
        Ctrl-C during the grace period stops at once.
        """
        grace = self.grace_period(grace_s)  # decided before the push, which counts as a collection
        self.push()
        if self._server is not None and grace > 0:
            log.info("run finished; serving final metrics at %s for %.0f s more", self.url, grace)
            deadline = time.monotonic() + grace
            seen = self.scrapes
            try:
                while (left := deadline - time.monotonic()) > 0 and self._server is not None:  # stop() ends it early
                    if self.wait_for_scrape(seen, timeout=min(left, 0.5)) and stop_after_scrape:
                        break
            except KeyboardInterrupt:
                pass
        self.stop()

    def stop(self) -> None:
        """Stop serving now (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "MetricsExporter":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.stop()

    # --- feeding -------------------------------------------------------------------------------

    def on_report(self, labels: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """Consume one ``EpochReport.flat()`` dict (or a Tune/Train result carrying the same keys).

        Gauges are set (non-finite values are left out rather than exported as NaN); per-epoch
        counters and histograms are fed once per (label set, epoch); ``skipped/<reason>`` is cumulative
        and counted by its increase (a drop means the source restarted counting from 0).
        """
        lv = {k: format_label(labels.get(k)) for k in RUN_LABELS}
        key = tuple(lv[k] for k in RUN_LABELS)
        m = self.metrics
        for name, flat_key in GAUGE_KEYS.items():
            value = _finite(metrics.get(flat_key))
            if value is not None:
                m[name].labels(**lv).set(value)
        for split in ("val", "test"):
            for name, suffix in SPLIT_GAUGE_KEYS.items():
                value = _finite(metrics.get(f"{split}/{suffix}"))
                if value is not None:
                    m[name].labels(**lv, split=split).set(value)
        epoch = metrics.get("epoch")
        with self._lock:
            state = self._series.setdefault(key, _SeriesState(set(), {}))
            fresh_epoch = isinstance(epoch, (int, float)) and int(epoch) not in state.counted_epochs
            if fresh_epoch:
                state.counted_epochs.add(int(epoch))
            increments: dict[str, float] = {}
            for flat_key, value in metrics.items():
                if not str(flat_key).startswith("skipped/"):
                    continue
                value = _finite(value)
                if value is None:
                    continue
                last = state.cumulative.get(flat_key, 0.0)
                increments[flat_key.split("/", 1)[1]] = value - last if value >= last else value
                state.cumulative[flat_key] = value
        for reason, inc in increments.items():
            child = m["aem_bad_samples_skipped_total"].labels(**lv, reason=reason)
            if inc > 0:
                child.inc(inc)
        if not fresh_epoch:
            return
        for name, flat_key in EPOCH_COUNTER_KEYS.items():
            value = _finite(metrics.get(flat_key))
            if value is not None and value >= 0:
                m[name].labels(**lv).inc(value)
        steps = metrics.get("time/step_s")
        if isinstance(steps, (list, tuple)):
            hist = m["aem_step_duration_seconds"].labels(**lv)
            for s in steps:
                if (v := _finite(s)) is not None:
                    hist.observe(v)
        for name, flat_key in (("aem_epoch_duration_seconds", "time/epoch_s"), ("aem_checkpoint_save_duration_seconds", "time/checkpoint_s")):
            value = _finite(metrics.get(flat_key))
            if value is not None:
                m[name].labels(**lv).observe(value)

    def set_trial_states(self, counts: Mapping[str, int]) -> None:
        """Set ``aem_trials{state}`` for every known state (missing states read 0)."""
        unknown = set(counts) - set(TRIAL_STATES)
        if unknown:
            raise ValueError(f"unknown trial states {sorted(unknown)}; expected {TRIAL_STATES}")
        for state in TRIAL_STATES:
            self.metrics["aem_trials"].labels(state=state).set(int(counts.get(state, 0)))


def epoch_hook(exporter: MetricsExporter, labels: Mapping[str, Any]) -> Callable[[Any], None]:
    """An ``on_epoch`` hook for in-process runs: feeds each ``EpochReport`` to ``exporter``.

    Use with ``aem_dist.engine.local.run_local(cfg, out, on_epoch=epoch_hook(exporter, run_labels(cfg)))``.
    """
    fixed = dict(labels)

    def on_epoch(report: Any) -> None:
        exporter.on_report(fixed, report.flat())

    return on_epoch


class serve_run_metrics:
    """The driver's exporter for one run or sweep: starts it (when ``metrics.enabled``), prints its URL
    with ``announce`` (saying so when ``metrics.port`` was taken and the next free port serves) and yields
    it (None when disabled, or when no port of the range could be bound — then training goes on without
    metrics and a warning says how to fix it). A clean exit finishes (push + grace period);
    an error stops serving at once.

    ``with serve_run_metrics(cfg) as exporter: run_local(cfg, out, on_epoch=epoch_hook(exporter, run_labels(cfg)))``
    """

    def __init__(self, cfg: Config, announce: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.announce = announce
        self.exporter: MetricsExporter | None = None

    def __enter__(self) -> MetricsExporter | None:
        if not self.cfg.metrics.enabled:
            return None
        exporter = MetricsExporter(self.cfg.metrics, run=self.cfg.run.name)
        try:
            url = exporter.start()
        except OSError as err:
            log.warning("metrics disabled for this run: %s", err)
            return None
        self.exporter = exporter
        if self.announce is not None:
            moved = f" (metrics.port {exporter.moved_from} is in use)" if exporter.moved_from is not None else ""
            self.announce(f"metrics: {url}{moved}")
        return exporter

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.exporter is None:
            return
        if exc_type is None:
            self.exporter.finish()
        else:
            self.exporter.stop()
