"""A real Prometheus scrapes the driver's exporter during a short in-process training run."""

from __future__ import annotations

import math
import threading
from urllib.parse import urlparse

import pytest

from aem_dist.config import load_config
from aem_dist.engine.local import run_local
from aem_dist.observe.metrics import MetricsExporter, epoch_hook, run_labels

EPOCHS = 4


@pytest.mark.integration
def test_prometheus_scrapes_a_training_run(prometheus, demo_data, tmp_path):
    cfg = load_config("demo", [f"data.root={demo_data}", f"train.epochs={EPOCHS}", "train.progress=false", "run.name=prom-test", "loss.lam=0.1", "metrics.port=0", "metrics.grace_s=60"])
    exporter = MetricsExporter(cfg.metrics, run=cfg.run.name)
    url = exporter.start()
    prom = prometheus([urlparse(url).netloc])
    try:
        # Prometheus is up and has scraped the (still empty) endpoint before training starts.
        prom.wait_for('up{job="aem"} == 1')
        labels = run_labels(cfg)
        hook = epoch_hook(exporter, labels)

        def on_epoch(report):
            hook(report)
            if report.epoch < 2:  # let Prometheus see the early values too, so "increased" is observable
                assert exporter.wait_for_scrape(timeout=20), "no scrape within 20 s"

        result = run_local(cfg, str(tmp_path / "run"), on_epoch=on_epoch)
        # The run is over: the exporter keeps serving through its grace period until the final values are in.
        finisher = threading.Thread(target=exporter.finish, daemon=True)
        finisher.start()
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        prom.wait_for(f"aem_epoch{{{sel}}} == {EPOCHS - 1}")

        # trial is "" for a single run, and Prometheus drops empty labels: the series has no trial label.
        want = {"run": "prom-test", "lam": "0.1", "seed": "0", "model": "abmil", "job": "aem"}
        for name in ("aem_train_loss", "aem_train_aem_loss", "aem_instances_processed_total"):
            series = prom.query(f"{name}{{{sel}}}")
            assert len(series) == 1, (name, series)
            got = series[0]["metric"]
            assert {k: got.get(k) for k in want} == want, got
            assert set(got) == {"__name__", "instance", *want}, f"{name}: unexpected labels {sorted(got)}"

        loss = float(prom.query(f"aem_train_loss{{{sel}}}")[0]["value"][1])
        assert math.isfinite(loss)
        last = result.history[-1]
        assert loss == pytest.approx(last["train"]["loss"], rel=1e-9)

        for split in ("val", "test"):
            auc = prom.query(f'aem_eval_auc{{{sel},split="{split}"}}')
            assert len(auc) == 1 and 0.0 <= float(auc[0]["value"][1]) <= 1.0, auc
            ent = prom.query(f'aem_attention_entropy_nats{{{sel},split="{split}"}}')
            # mean entropy of bags: positive, at most log of the largest bag (demo bags hold ≤ 1 500 instances)
            assert len(ent) == 1 and 0.0 < float(ent[0]["value"][1]) <= math.log(1500), ent
        assert float(prom.query(f'aem_eval_auc{{{sel},split="test"}}')[0]["value"][1]) == pytest.approx(last["test"]["auc"], rel=1e-9)

        # The instance counter rose over the run (several scrapes saw it) and ends at the total trained.
        samples = prom.query(f"aem_instances_processed_total{{{sel}}}[10m]")[0]["values"]
        values = [float(v) for _, v in samples]
        assert values == sorted(values) and values[-1] > values[0], values
        assert values[-1] == sum(r["train"]["instances"] for r in result.history)
        assert float(prom.query(f"increase(aem_instances_processed_total{{{sel}}}[10m])")[0]["value"][1]) > 0

        hist = prom.query(f"aem_step_duration_seconds_count{{{sel}}}")
        assert float(hist[0]["value"][1]) == sum(r["train"]["steps"] for r in result.history)
        # no per-step label exploded the series count: one loss series for the run
        assert len(prom.query('aem_train_loss{run="prom-test"}')) == 1
        assert (tmp_path / "run" / "best" / "state.pt").exists()
    finally:
        exporter.stop()
