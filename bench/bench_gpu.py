"""The GPU path measured on whatever device is there (a CUDA GPU if visible, else the CPU), in one run.

    PYTHONPATH=$PWD python bench/bench_gpu.py --out bench_gpu.json          # full (a GPU: ~5-8 min)
    PYTHONPATH=$PWD python bench/bench_gpu.py --quick --out /tmp/gpu.json   # smoke run, small subsets (CPU: ~2 min)

Parts (each prints a table; everything goes into the JSON file):

1. **Step rate grid** on in-memory bags of ``wsi-small`` and a ``wsi-c16`` subset: the paper-style
   loop (one bag per step, fp32, a Python loop, each bag moved to the device as it is used) against
   the engine's ``train_epoch`` at one bag per step and at 32 bags per step (instance budget 8192),
   for ``train.precision`` fp32 / tf32 / bf16, ``train.compile`` off / on and ``data.device_cache``
   on / off. Columns: steps/s, instances/s, ratio to the paper loop on the same data and device,
   peak device memory, and the FLOP rate as a fraction of a bare matmul chain of the same shapes in
   the same dtype on the same device. Compile time falls in an untimed warm-up epoch.
2. **End to end**: a CAMELYON16-protocol run (``configs/camelyon16.yaml``: 50 epochs, ABMIL, one bag
   per step, val + test every epoch, best epoch by val AUC + F1) on a written ``wsi-c16`` dataset,
   timed from ``fit`` start to its return (dataset generation excluded and reported apart); GPU
   utilisation sampled with ``nvidia-smi`` every 200 ms during it. The paper reports 10.5 min.
3. **Determinism**: two short runs with ``train.deterministic=true``; their metrics must be identical.

Goals (issue 11): one bag per step ≥ 3× the paper loop on the same GPU; the 50-epoch ``wsi-c16`` run
≤ 30 s (bf16 or tf32); GPU utilisation ≥ 60 % during training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_packing import HIDDEN, LAM, PaperABMIL, model_flops  # noqa: E402

BUDGET = 8192  # instance budget of the 32-bags-per-step rows (configs/demo.yaml)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def make_bags(preset: str, n: int | None):
    from aem_dist.data.synthetic import _world, get_spec, make_bag

    spec = get_spec(preset)
    world = _world(spec, 0)
    count = spec.n_bags["train"] if n is None else min(n, spec.n_bags["train"])
    return spec, [make_bag(spec, 0, "train", i, world) for i in range(count)]


def matmul_rate(instances: int, dim: int, device: torch.device, dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of the same matmul chain (embed, V, U) forward + backward as bare torch ops."""
    x = torch.randn(instances, dim, device=device, dtype=dtype)
    w1 = torch.randn(dim, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(HIDDEN, 2 * HIDDEN, device=device, dtype=dtype, requires_grad=True)
    for _ in range(3):
        (x @ w1 @ w2).sum().backward()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        (x @ w1 @ w2).sum().backward()
    sync(device)
    dt = (time.perf_counter() - t0) / repeats
    return 3.0 * 2 * instances * (dim * HIDDEN + 2 * HIDDEN * HIDDEN) / dt


def run_paper(bags, spec, device: torch.device, epochs: int) -> dict:
    """The paper's loop on ``device``: fp32 bags in host RAM, one moved to the device per step."""
    torch.manual_seed(0)
    model = PaperABMIL(spec.dim, spec.n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=(epochs + 1) * len(bags))
    xs = [torch.from_numpy(b.feats.astype(np.float32)) for b in bags]
    ys = [torch.tensor([b.label]) for b in bags]

    def epoch() -> None:
        for i in np.random.default_rng(0).permutation(len(bags)):
            logits, log_a = model(xs[i].to(device))
            loss = F.cross_entropy(logits, ys[i].to(device)) + LAM * (torch.exp(log_a) * log_a).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    epoch()  # warm-up
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync(device)
    return {"seconds": time.perf_counter() - t0, "steps": epochs * len(bags), "peak_mib": peak_mib(device)}


def run_engine(bags, spec, device: torch.device, epochs: int, *, max_bags: int, precision: str, compile_: str, cache: str) -> dict:
    """The engine's ``train_epoch`` on ``device`` with the given precision / compile / device cache."""
    from aem_dist.config import load_config
    from aem_dist.data.devicecache import DeviceCachedLoader, PinnedLoader
    from aem_dist.data.loader import InMemoryLoader, LoaderSpec
    from aem_dist.engine import precision as prec
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.loop import CosineToZero, Single, train_epoch
    from aem_dist.models import build_model

    cfg = load_config(None, [f"loss.lam={LAM}", f"model.hidden={HIDDEN}", f"train.max_bags_per_batch={max_bags}", "train.progress=false", f"train.precision={precision}", f"train.compile={compile_}"])
    prec.configure(precision, False, device)
    reset_peak(device)
    loader = InMemoryLoader(bags, LoaderSpec("train", train=True, max_bags=max_bags, max_instances=None if max_bags == 1 else BUDGET))
    if device.type == "cuda":
        loader = DeviceCachedLoader(loader, device) if cache == "on" else PinnedLoader(loader, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec.dim, spec.n_classes).to(device)
    ctx = DistContext(device=device)
    trainee = Single(cfg, model, ctx)  # the engine's trainee: fused AdamW, the step at train.precision
    sched = torch.optim.lr_scheduler.LambdaLR(trainee.optimizer, CosineToZero((epochs + 1) * loader.steps(0)))
    t0 = time.perf_counter()
    train_epoch(trainee, sched, loader, cfg, ctx, 0)  # warm-up (and compile)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = 0
    for e in range(epochs):
        stats, _ = train_epoch(trainee, sched, loader, cfg, ctx, e + 1)
        steps += int(stats[0]["steps"])
    sync(device)
    out = {"seconds": time.perf_counter() - t0, "steps": steps, "peak_mib": peak_mib(device), "warmup_s": warmup_s}
    prec.configure("fp32", False, device)
    return out


def grid(device: torch.device, quick: bool) -> list[dict]:
    cuda = device.type == "cuda"
    datasets = [("wsi-small", 24 if quick else None), ("wsi-c16", 6 if quick else 48)]
    epochs = 1 if quick else 3
    caches = ("on", "off") if cuda else ("-",)  # on CPU there is no device cache to switch
    configs = []
    for max_bags in (1, 32):
        for precision in ("fp32", "tf32", "bf16") if cuda else ("fp32", "bf16"):
            for compile_ in ("off", "on"):
                for cache in caches:
                    if compile_ == "on" and (cache != caches[0] or precision == "tf32"):
                        continue  # compiled rows: with the cache, fp32 and bf16 (compiling is the slow part)
                    if max_bags == 32 and (cache != caches[0] or (compile_ == "on" and precision != "bf16")):
                        continue  # 32-bag rows: eager with the cache, plus bf16 compiled
                    if quick and compile_ == "on" and precision != "bf16":
                        continue
                    configs.append((max_bags, precision, compile_, cache))
    rows = []
    for preset, n in datasets:
        spec, bags = make_bags(preset, n)
        instances = sum(b.n for b in bags)
        print(f"  {preset}: {len(bags)} bags, {instances} instances, D={spec.dim}", file=sys.stderr)
        base = run_paper(bags, spec, device, epochs) | {"mode": "paper", "max_bags": 1, "precision": "fp32", "compile": "off", "cache": "-"}
        runs = [base]
        for max_bags, precision, compile_, cache in configs:
            print(f"    engine max_bags={max_bags} {precision} compile={compile_} cache={cache}", file=sys.stderr)
            r = run_engine(bags, spec, device, epochs, max_bags=max_bags, precision=precision, compile_=compile_, cache=cache)
            runs.append(r | {"mode": "engine", "max_bags": max_bags, "precision": precision, "compile": compile_, "cache": cache})
        for r in runs:
            n_inst = epochs * instances
            flops = model_flops(n_inst, spec.dim, spec.n_classes, epochs * len(bags)) / r["seconds"]
            dtype = torch.bfloat16 if r["precision"] == "bf16" and cuda else torch.float32
            if r["precision"] == "tf32":
                torch.backends.cuda.matmul.allow_tf32 = True
            bare = matmul_rate(max(1, n_inst // r["steps"]), spec.dim, device, dtype)
            torch.backends.cuda.matmul.allow_tf32 = False
            r |= {
                "dataset": preset,
                "bags": len(bags),
                "mean_bag": instances / len(bags),
                "steps_per_s": r["steps"] / r["seconds"],
                "bags_per_s": epochs * len(bags) / r["seconds"],
                "instances_per_s": n_inst / r["seconds"],
                "vs_paper": (epochs * len(bags) / r["seconds"]) / (epochs * len(bags) / base["seconds"]),
                "gflops": flops / 1e9,
                "of_matmul": flops / bare,
            }
            rows.append(r)
        del bags
    return rows


class UtilSampler:
    """``nvidia-smi`` GPU utilisation every 200 ms while active (None where nvidia-smi is missing)."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self.proc = None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            index = device.index if device.index is not None else torch.cuda.current_device()
            cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        s = self.samples
        return {"mean_pct": float(np.mean(s)) if s else None, "median_pct": float(np.median(s)) if s else None, "samples": len(s)}


def end_to_end(device: torch.device, quick: bool, root: str, scale: float | None = None) -> list[dict]:
    from aem_dist.config import load_config
    from aem_dist.data.synthetic import get_spec, write_synthetic
    from aem_dist.engine import precision as prec
    from aem_dist.engine.loop import fit

    epochs = 2 if quick else 50
    scale = scale if scale is not None else (0.05 if quick else 1.0)
    t0 = time.perf_counter()
    write_synthetic(get_spec("wsi-c16", scale), root, seed=0, progress=False)
    gen_s = time.perf_counter() - t0
    rows = []
    for precision in ("bf16", "tf32", "fp32") if device.type == "cuda" else ("fp32", "bf16"):
        cfg = load_config("camelyon16", [f"data.root={root}", f"train.epochs={epochs}", "train.progress=false", f"train.precision={precision}", f"train.device={device.type}", "data.device_cache=auto"])
        sampler = UtilSampler(device)
        t0 = time.perf_counter()
        result = fit(cfg)
        sync(device)
        seconds = time.perf_counter() - t0
        util = sampler.stop()
        prec.configure("fp32", False, device)
        train_s = sum(r["time"]["train_s"] for r in result.history)
        rows.append({"precision": precision, "epochs": epochs, "seconds": seconds, "train_s": train_s, "eval_s": seconds - train_s, "generate_s": gen_s, "scale": scale, "best_epoch": result.best_epoch, "test_auc": result.test.get("auc"), "test_f1": result.test.get("f1"), "gpu_util": util})
        print(f"    end to end {precision}: {seconds:.1f} s", file=sys.stderr)
    return rows


def determinism(device: torch.device, root: str, quick: bool) -> dict:
    from aem_dist.config import load_config
    from aem_dist.engine import precision as prec
    from aem_dist.engine.loop import fit

    cfg = load_config("camelyon16", [f"data.root={root}", f"train.epochs={2 if quick else 3}", "train.progress=false", f"train.device={device.type}", "train.deterministic=true", "train.max_bags_per_batch=8", "train.max_instances_per_batch=65536"])
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} | {"train": {k: v for k, v in r["train"].items() if k != "data_wait_s"}} for r in h]  # noqa: E731
    try:
        a, b = fit(cfg), fit(cfg)
    finally:
        prec.configure("fp32", False, device)
    return {"identical": strip(a.history) == strip(b.history), "epochs": cfg.train.epochs, "last": strip(a.history)[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subsets, 1 timed epoch, a 2-epoch end-to-end run at 5 %% of wsi-c16")
    ap.add_argument("--out", default="bench_gpu.json", help="where the JSON goes")
    ap.add_argument("--c16-scale", type=float, default=None, help="bag-count scale of the end-to-end wsi-c16 dataset (default 1.0; --quick 0.05)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: grid, e2e, determinism")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(filter(None, args.skip.split(",")))
    report: dict = {"device": device_name(device), "torch": torch.__version__, "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"device: {report['device']}; torch {torch.__version__}", file=sys.stderr)
    if "grid" not in skip:
        report["grid"] = grid(device, args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = os.path.join(tmp, "wsi-c16")
        if "e2e" not in skip:
            report["end_to_end"] = end_to_end(device, args.quick, root, args.c16_scale)
        if "determinism" not in skip:
            if not os.path.exists(os.path.join(root, "manifest.json")):
                from aem_dist.data.synthetic import get_spec, write_synthetic

                write_synthetic(get_spec("wsi-c16", 0.05), root, seed=0, progress=False)
            report["determinism"] = determinism(device, root, args.quick)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_tables(report)
    print(f"\nJSON: {args.out}")


def print_tables(report: dict) -> None:
    print(f"\ndevice: {report['device']} (torch {report['torch']})")
    if "grid" in report:
        print(f"\n{'dataset':<10} {'mode':<7} {'bags/step':>9} {'prec':<5} {'compile':<7} {'cache':<5} {'steps/s':>9} {'inst/s':>11} {'vs paper':>8} {'peak MiB':>9} {'GFLOP/s':>8} {'of matmul':>9}")
        for r in report["grid"]:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            print(
                f"{r['dataset']:<10} {r['mode']:<7} {r['max_bags']:>9} {r['precision']:<5} {r['compile']:<7} {r['cache']:<5} {r['steps_per_s']:>9.1f} "
                f"{r['instances_per_s']:>11.0f} {r['vs_paper']:>7.2f}x {peak:>9} {r['gflops']:>8.1f} {r['of_matmul']:>8.0%}"
            )
    for r in report.get("end_to_end", []):
        util = r["gpu_util"]
        u = "n/a (no nvidia-smi / no GPU)" if util is None else f"mean {util['mean_pct']:.0f} % over {util['samples']} samples"
        print(f"\nend to end ({r['epochs']} epochs, wsi-c16 x{r['scale']}, {r['precision']}): {r['seconds']:.1f} s (train {r['train_s']:.1f} s, eval {r['eval_s']:.1f} s; data generation {r['generate_s']:.0f} s apart); GPU util {u}; test AUC {r['test_auc']}")
    if "determinism" in report:
        d = report["determinism"]
        print(f"\ndeterministic runs identical: {d['identical']} ({d['epochs']} epochs)")


if __name__ == "__main__":
    main()
