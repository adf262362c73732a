"""Costs of the observability pieces, measured side by side in one run.

    PYTHONPATH=. python bench/bench_observe.py [--data data/demo] [--run RUN_FOLDER]

Prints: the exporter's cost per epoch report (vs the epoch it describes), the time of one scrape of a
64-trial sweep registry and its size, and — with --run — predict throughput (instances/s) and the
zarr write/read rate of its attention store.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from prometheus_client import generate_latest

from aem_dist.config import MetricsSection
from aem_dist.observe.metrics import MetricsExporter


def report(epoch: int, steps: int) -> dict:
    return {"epoch": epoch, "train/loss": 0.5, "train/ce": 0.4, "train/aem": -3.0, "train/bags": 96, "train/instances": 13745, "train/data_wait_s": 0.2,
            "lr": 1e-4, "val/auc": 0.9, "val/f1": 0.8, "val/attn_entropy": 4.5, "test/auc": 0.85, "test/f1": 0.75, "test/attn_entropy": 4.6,
            "time/epoch_s": 12.0, "time/instances_per_s": 1e4, "time/step_s": [0.01] * steps, "best/val_score": 1.7, "skipped/corrupt_npy": 0}


def bench_exporter() -> None:
    e = MetricsExporter(MetricsSection(port=0))
    n, steps = 200, 270  # 270 steps ≈ one CAMELYON16 epoch at one bag per step
    t0 = time.perf_counter()
    for i in range(n):
        e.on_report({"run": "b", "trial": "t", "lam": 0.1, "seed": 0, "model": "abmil"}, report(i, steps))
    per = (time.perf_counter() - t0) / n
    print(f"on_report: {per * 1e6:.0f} µs per epoch report with {steps} step times")
    sweep = MetricsExporter(MetricsSection(port=0))
    for t in range(64):
        sweep.on_report({"run": "s", "trial": f"trial_{t:04d}", "lam": [0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0][t % 8], "seed": t // 8, "model": "abmil"}, report(0, steps))
    t0 = time.perf_counter()
    for _ in range(20):
        text = generate_latest(sweep.registry)
    print(f"scrape of a 64-trial sweep: {(time.perf_counter() - t0) / 20 * 1e3:.1f} ms, {len(text) / 1024:.0f} KiB")


def bench_predict(run: str, data: str | None) -> None:
    from aem_dist.observe.attention import AttentionStore, load_run_model, predict_split, write_attention

    model = load_run_model(run)
    root = data or model.config["data"]["root"]
    t0 = time.perf_counter()
    bags = predict_split(model, root, "test", progress=False)
    dt = time.perf_counter() - t0
    n = sum(len(b.attention) for b in bags)
    print(f"predict: {len(bags)} bags, {n:,} instances in {dt:.2f} s = {n / dt:,.0f} instances/s (CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_attention(f"{tmp}/a.zarr", bags, class_names=model.meta["class_names"])
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        total = sum(len(b.attention) for b in AttentionStore(f"{tmp}/a.zarr"))
        r = time.perf_counter() - t0
    print(f"zarr: write {w * 1e3:.0f} ms, read all {len(bags)} bags one by one {r * 1e3:.0f} ms ({total:,} instances)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run folder (best/state.pt) for the predict/zarr numbers")
    ap.add_argument("--data", help="dataset (default: the run's data.root)")
    args = ap.parse_args()
    bench_exporter()
    if args.run:
        bench_predict(args.run, args.data)
