"""The exporter on its own: naming conventions, feeding semantics, serving, grace period, Pushgateway."""

from __future__ import annotations

import math
import re
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.validation import METRIC_LABEL_NAME_RE, METRIC_NAME_RE, _validate_labelname, _validate_metric_name

from aem_dist.config import MetricsSection, load_config
from aem_dist.observe.metrics import METRICS, RUN_LABELS, MetricsExporter, build_registry, epoch_hook, metric_names, run_labels, series_names

LABELS = {"run": "r", "trial": "t1", "lam": 0.1, "seed": 0, "model": "abmil"}
SEL = {"run": "r", "trial": "t1", "lam": "0.1", "seed": "0", "model": "abmil"}


def report(epoch: int, **extra) -> dict:
    base = {
        "epoch": epoch,
        "train/loss": 0.5 / (epoch + 1),
        "train/ce": 0.4,
        "train/aem": -3.0,
        "train/bags": 96,
        "train/instances": 13_745,
        "train/steps": 12,
        "train/data_wait_s": 0.25,
        "lr": 1e-3,
        "val/auc": 0.8,
        "val/f1": 0.7,
        "val/attn_entropy": 4.5,
        "test/auc": 0.75,
        "test/f1": 0.65,
        "test/attn_entropy": 4.6,
        "time/epoch_s": 1.5,
        "time/instances_per_s": 9000.0,
        "time/step_s": [0.01, 0.02, 0.03],
        "best/epoch": epoch,
        "best/val_score": 1.5,
    }
    base.update(extra)
    return base


def value(exporter: MetricsExporter, name: str, **labels) -> float | None:
    return exporter.registry.get_sample_value(name, {**SEL, **labels})


# --- (c) the registry follows Prometheus naming conventions ---------------------------------------

BAD_UNITS = re.compile(r"_(ms|milliseconds|microseconds|us|ns|minutes|hours|days|kb|mb|gb|kib|mib|gib|percent)(_|$)")


def test_registry_names_follow_prometheus_conventions():
    registry, _ = build_registry()
    families = {f.name: f for f in registry.collect()}
    exposed = set()
    for fam in families.values():
        # prometheus-client reports counter families without _total; the exposed name has it.
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        exposed.add(name)
        _validate_metric_name(name)  # prometheus-client's own check
        assert METRIC_NAME_RE.match(name), f"{name}: not a classic Prometheus name (Prometheus 2.x needs one)"
        assert name.startswith("aem_"), name
        assert not BAD_UNITS.search(name), f"{name}: use base units (seconds, bytes, ratios)"
        if fam.type == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if fam.type == "histogram" or "duration" in name or "wait" in name:
            assert re.search(r"_seconds(_total)?$", name), f"{name}: durations are in seconds and say so"
        assert fam.documentation, f"{name}: no help text"
    assert exposed == metric_names()
    # label names: valid, not reserved, never per step
    for spec in METRICS:
        for label in spec.labels:
            _validate_labelname(label)
            assert METRIC_LABEL_NAME_RE.match(label) and not label.startswith("__"), label
            assert label not in ("step", "epoch", "batch", "le", "quantile"), f"{spec.name}: label {label!r}"
        if spec.per_run:
            assert spec.labels[: len(RUN_LABELS)] == RUN_LABELS
    assert {"aem_train_loss", "aem_train_ce_loss", "aem_train_aem_loss", "aem_attention_entropy_nats", "aem_eval_auc", "aem_eval_f1", "aem_best_val_score", "aem_epoch",
            "aem_bags_processed_total", "aem_instances_processed_total", "aem_instances_per_second", "aem_step_duration_seconds", "aem_epoch_duration_seconds",
            "aem_checkpoint_save_duration_seconds", "aem_data_wait_seconds_total", "aem_bad_samples_skipped_total", "aem_trials"} <= metric_names()
    assert "aem_step_duration_seconds_bucket" in series_names() and "aem_step_duration_seconds" not in series_names()


def test_exposition_round_trips_through_the_parser():
    exporter = MetricsExporter(MetricsSection(port=0))
    exporter.on_report(LABELS, report(0, **{"skipped/corrupt_npy": 1}))
    exporter.set_trial_states({"running": 1})
    from prometheus_client import generate_latest

    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(exporter.registry).decode())}
    assert parsed["aem_eval_auc"].samples[0].labels["split"] in ("val", "test")
    assert {s.labels["state"] for s in parsed["aem_trials"].samples} == {"pending", "running", "terminated", "error"}
    # the parser strips _total from counter family names, like the client does
    assert parsed["aem_bags_processed"].type == "counter"


# --- feeding semantics -------------------------------------------------------------------------


def test_gauges_counters_histograms_from_epoch_reports():
    e = MetricsExporter(MetricsSection(port=0))
    e.on_report(LABELS, report(0, **{"time/checkpoint_s": 0.2}))
    e.on_report(LABELS, report(1))
    assert value(e, "aem_train_loss") == pytest.approx(0.25)
    assert value(e, "aem_epoch") == 1
    assert value(e, "aem_eval_auc", split="test") == pytest.approx(0.75)
    assert value(e, "aem_attention_entropy_nats", split="val") == pytest.approx(4.5)
    assert value(e, "aem_instances_processed_total") == 2 * 13_745
    assert value(e, "aem_bags_processed_total") == 2 * 96
    assert value(e, "aem_data_wait_seconds_total") == pytest.approx(0.5)
    assert value(e, "aem_step_duration_seconds_count") == 6
    assert value(e, "aem_step_duration_seconds_sum") == pytest.approx(0.12)
    assert value(e, "aem_epoch_duration_seconds_count") == 2
    assert value(e, "aem_checkpoint_save_duration_seconds_count") == 1


def test_repeated_reports_never_double_count():
    e = MetricsExporter(MetricsSection(port=0))
    r0 = report(0, **{"skipped/corrupt_npy": 2})
    e.on_report(LABELS, r0)
    e.on_report(LABELS, r0)  # the same epoch delivered twice
    assert value(e, "aem_instances_processed_total") == 13_745
    assert value(e, "aem_step_duration_seconds_count") == 3
    assert value(e, "aem_bad_samples_skipped_total", reason="corrupt_npy") == 2
    e.on_report(LABELS, report(1, **{"skipped/corrupt_npy": 5}))  # cumulative 2 → 5: +3
    assert value(e, "aem_bad_samples_skipped_total", reason="corrupt_npy") == 5
    e.on_report(LABELS, report(2, **{"skipped/corrupt_npy": 1}))  # a restarted source counts from 0 again
    assert value(e, "aem_bad_samples_skipped_total", reason="corrupt_npy") == 6
    # another trial is another series
    e.on_report({**LABELS, "trial": "t2"}, r0)
    assert value(e, "aem_instances_processed_total") == 3 * 13_745
    assert value(e, "aem_instances_processed_total", trial="t2") == 13_745


def test_non_finite_values_are_not_exported():
    e = MetricsExporter(MetricsSection(port=0))
    e.on_report(LABELS, report(0, **{"test/auc": math.nan, "best/val_score": -math.inf}))
    assert value(e, "aem_eval_auc", split="test") is None
    assert value(e, "aem_best_val_score") is None
    assert value(e, "aem_eval_auc", split="val") == pytest.approx(0.8)


def test_trial_states():
    e = MetricsExporter(MetricsSection(port=0))
    e.set_trial_states({"pending": 3, "running": 1})
    assert e.registry.get_sample_value("aem_trials", {"state": "pending"}) == 3
    assert e.registry.get_sample_value("aem_trials", {"state": "error"}) == 0
    with pytest.raises(ValueError, match="unknown trial states"):
        e.set_trial_states({"paused": 1})


def test_run_labels_from_config():
    cfg = load_config("demo", ["loss.lam=0.005", "train.seed=3", "run.name=c16"])
    assert run_labels(cfg, "trial_1") == {"run": "c16", "trial": "trial_1", "lam": "0.005", "seed": "3", "model": "abmil"}
    assert run_labels(cfg, lam=0.0)["lam"] == "0"


def test_two_exporters_have_private_registries():
    a, b = MetricsExporter(MetricsSection(port=0)), MetricsExporter(MetricsSection(port=0))
    a.on_report(LABELS, report(0))
    assert value(a, "aem_epoch") == 0 and value(b, "aem_epoch") is None


# --- serving ----------------------------------------------------------------------------------


def test_serves_on_a_free_port_and_finishes_after_grace():
    e = MetricsExporter(MetricsSection(port=0, grace_s=30))
    url = e.start()
    assert url.startswith("http://127.0.0.1:") and e.port and e.port > 0
    hook = epoch_hook(e, LABELS)

    class Rep:
        def flat(self):
            return report(0)

    hook(Rep())
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'aem_instances_processed_total{lam="0.1",model="abmil",run="r",seed="0",trial="t1"} 13745.0' in text
    # finish() keeps serving through the grace period; with stop_after_scrape it ends after one more scrape
    done = threading.Event()
    t = threading.Thread(target=lambda: (e.finish(stop_after_scrape=True), done.set()))
    t.start()
    time.sleep(0.3)
    assert not done.is_set(), "finish() returned before the grace period / a scrape"
    assert "aem_epoch" in urllib.request.urlopen(url, timeout=5).read().decode()
    t.join(timeout=10)
    assert done.is_set()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_port_in_use_moves_to_the_next_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        e = MetricsExporter(MetricsSection(port=port))
        url = e.start()
        try:
            assert e.moved_from == port and e.port != port and port < e.port < port + 100
            assert url == f"http://127.0.0.1:{e.port}/metrics"
            assert b"aem_trials" in urllib.request.urlopen(url, timeout=5).read()
        finally:
            e.stop()


def test_address_that_cannot_be_bound_is_a_clear_error():
    e = MetricsExporter(MetricsSection(host="192.0.2.123", port=0))  # TEST-NET: no interface holds it
    with pytest.raises(OSError, match=r"192\.0\.2\.123:0.*metrics\.port"):
        e.start()


@pytest.mark.integration
def test_pushgateway_receives_final_results(pushgateway):
    e = MetricsExporter(MetricsSection(port=0, pushgateway=pushgateway.address, grace_s=0))  # grouping key = the reports' run label
    e.start()
    e.on_report(LABELS, report(4))
    e.finish()
    text = pushgateway.metrics_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [s for s in families["aem_eval_auc"].samples if s.labels.get("split") == "test"]
    assert samples and samples[0].value == pytest.approx(0.75)
    assert samples[0].labels["job"] == "aem-dist" and samples[0].labels["run"] == "r"
    assert any(s.value == 13_745 for s in families["aem_instances_processed"].samples if s.name.endswith("_total"))


def test_push_failure_does_not_raise():
    port = None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = MetricsExporter(MetricsSection(port=0, pushgateway=f"127.0.0.1:{port}", grace_s=0))
    assert e.push() is False


def test_serve_run_metrics_for_an_in_process_run(demo_data, tmp_path):
    """The driver exporter of `aem-dist train` (num_workers 0): serves while training, announces its URL."""
    from aem_dist.engine.local import run_local
    from aem_dist.observe.metrics import serve_run_metrics

    cfg = load_config("demo", [f"data.root={demo_data}", "train.epochs=2", "train.progress=false", "metrics.port=0", "metrics.grace_s=0", "run.name=local"])
    said: list[str] = []
    seen: list[str] = []
    with serve_run_metrics(cfg, announce=said.append) as exporter:
        url = said[0].removeprefix("metrics: ")
        hook = epoch_hook(exporter, run_labels(cfg))

        def on_epoch(report):
            hook(report)
            seen.append(urllib.request.urlopen(url, timeout=5).read().decode())

        result = run_local(cfg, str(tmp_path / "run"), on_epoch=on_epoch)
    assert said[0].startswith("metrics: http://127.0.0.1:")
    assert len(seen) == 2 and 'aem_epoch{lam="0.1",model="abmil",run="local",seed="0",trial=""} 1.0' in seen[1]
    instances = sum(r["train"]["instances"] for r in result.history)
    assert f'aem_instances_processed_total{{lam="0.1",model="abmil",run="local",seed="0",trial=""}} {float(instances)}' in seen[1]
    with pytest.raises(OSError):  # finished: no longer served
        urllib.request.urlopen(url, timeout=2)
    off = load_config("demo", ["metrics.enabled=false"])
    with serve_run_metrics(off) as exporter:
        assert exporter is None
    with socket.socket() as busy:  # a taken port: the next free one serves, and the announcement says so
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        said.clear()
        with serve_run_metrics(load_config("demo", [f"metrics.port={port}", "metrics.grace_s=0"]), announce=said.append) as exporter:
            assert exporter.port != port and said == [f"metrics: {exporter.url} (metrics.port {port} is in use)"]
    with serve_run_metrics(load_config("demo", ["metrics.host=192.0.2.123"])) as exporter:  # nothing to bind: the run goes on without metrics
        assert exporter is None


def test_grace_period_only_when_scraped_or_opted_in():
    e = MetricsExporter(MetricsSection(port=0, grace_s=30))
    url = e.start()
    try:
        assert e.grace_period() == 0.0  # nothing scraped the endpoint: no reason to wait at the end
        assert MetricsExporter(MetricsSection(port=0, grace_s=30, grace_always=True)).grace_period() == 30
        urllib.request.urlopen(url, timeout=5).read()
        assert e.grace_period() == 30
    finally:
        e.stop()
