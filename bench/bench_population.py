"""Populations (fused trials) vs one trial per grid point vs the paper's loop, side by side in one run.

    PYTHONPATH=$PWD python bench/bench_population.py                  # the CAMELYON16 protocol shape (long)
    PYTHONPATH=$PWD python bench/bench_population.py --seeds 2 --lams 3 --epochs 3    # a quick look
    PYTHONPATH=$PWD python bench/bench_population.py --only steps     # the step-time table alone
    PYTHONPATH=$PWD python bench/bench_population.py --only interleave --rounds 5 --wsi-steps 10   # loaded machine: steps in turn

The sweep: ``configs/camelyon16.yaml`` (ABMIL, hidden 128, AdamW lr 1e-4 cosine, batch of one bag,
val + test every epoch) on ``wsi-small`` at ``--scale`` 0.25, ``--epochs`` 10, a grid of ``--seeds`` ×
``--lams`` (the paper's 5 × 7 by default), three ways:

* ``unfused`` — ``aem-dist sweep --set sweep.population=off``: one Ray Tune trial per grid point, each
  training in its trial's process (``scaling.num_workers: 0``, as the config ships), one CPU each, as
  many at once as the CPUs allow;
* ``fused-bf16`` / ``fused-fp32`` — ``aem-dist sweep --set train.data_seed=0 --set sweep.trial_cpus=2``
  at ``train.precision`` bf16 / fp32: the whole grid fuses into one population (``sweep.population:
  auto``) trained in one in-process trial given every CPU;
* ``loop``    — the grid as sequential runs of a batch-1 loop like the paper's script (the model of
  bench_packing.py, fp32 tensors in RAM loaded once and not timed), training and evaluating val and
  test every epoch.

The sweeps are timed end to end (the command's wall time: Ray start-up, trials, tables; report off). The
per-trial timing record (results.json ``timing``) gives where a trial's time goes.

Step time: a K-member population's training step vs one model's (the engine's ``Single``), K ∈ {1, 7,
35}, fp32 and bf16, one bag per step on ``mil-small`` and ``wsi-small`` bags: member-steps/s and the FLOP
rate as a fraction of a bare matmul chain of the same shapes in the same dtype (x @ W for all members at once, then the members'
V/U layers as a batched matmul, forward + backward) timed in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_packing import HIDDEN, PaperABMIL, load_bags, model_flops  # noqa: E402

LAMS = [0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]  # configs/camelyon16.yaml


def cli(*args: str, log: Path) -> float:
    """Run ``aem-dist ARGS`` (its own process, like a user); returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "aem_dist", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"aem-dist {' '.join(args[:2])} failed; see {log}")
    return time.perf_counter() - t0


def sweep(data: str, out: Path, seeds: int, lams: list[float], epochs: int, *extra: str) -> dict:
    grid = f"sweep.grid={{train.seed: {list(range(seeds))}, loss.lam: {lams}}}"
    # in-process trials (scaling.num_workers 0, as configs/camelyon16.yaml ships): no per-trial Ray Train start-up
    sets = [f"data.root={data}", f"train.epochs={epochs}", "scaling.num_workers=0", "train.progress=false", "metrics.port=0", "metrics.grace_s=0",
        "sweep.report=false", grid, *extra]
    wall = cli("sweep", "--config", "camelyon16", "--out", str(out), *[a for s in sets for a in ("--set", s)], log=out.with_suffix(".log"))
    timings = [json.loads(p.read_text())["timing"] for p in sorted(out.glob("trials/*/results.json"))]
    trials = list({json.dumps(t, sort_keys=True): t for t in timings}.values())  # a population's members share one record
    keys = ("trial_s", "start_s", "setup_s", "epochs_s", "reports_s", "teardown_s")
    # In-process trials (num_workers 0) record only trial_s: there is no worker to start or tear down.
    return {"wall_s": wall, "trials": len(trials), "per_trial": {k: float(np.mean([t[k] for t in trials])) for k in keys if all(k in t for t in trials)}}


def paper_loop(data: str, seeds: int, lams: list[float], epochs: int) -> dict:
    """The grid as sequential batch-1 runs (train + val/test every epoch), dataset in RAM (not timed)."""
    from aem_dist.data.loader import read_split
    from aem_dist.data.manifest import load_manifest

    manifest = load_manifest(data)
    splits = {s: read_split(data, manifest, s) for s in ("train", "val", "test")}
    xs = {s: [torch.from_numpy(b.feats.astype(np.float32)) for b in bags] for s, bags in splits.items()}
    ys = {s: [torch.tensor([b.label]) for b in bags] for s, bags in splits.items()}
    t0 = time.perf_counter()
    for seed in range(seeds):
        for lam in lams:
            torch.manual_seed(seed)
            model = PaperABMIL(manifest.dim, manifest.n_classes)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(xs["train"]))
            for epoch in range(epochs):
                model.train()
                for i in np.random.default_rng([seed, epoch]).permutation(len(xs["train"])):
                    logits, log_a = model(xs["train"][i])
                    loss = F.cross_entropy(logits, ys["train"][i]) + lam * (torch.exp(log_a) * log_a).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                model.eval()
                with torch.no_grad():
                    for split in ("val", "test"):
                        probs = torch.cat([torch.softmax(model(x)[0], 1) for x in xs[split]])
                        _ = probs.numpy()  # metrics are cheap next to the forwards; left out on both sides
    return {"wall_s": time.perf_counter() - t0, "runs": seeds * len(lams)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(instances: int, dim: int, k: int, dtype: torch.dtype = torch.float32, repeats: int = 10, device: torch.device = torch.device("cpu")) -> float:
    """FLOP/s of the population's matmuls as bare ops in ``dtype``: x @ W (all members), then V/U per member (bmm)."""
    x = torch.randn(instances, dim, dtype=dtype, device=device)
    w1 = torch.randn(dim, k * HIDDEN, dtype=dtype, device=device, requires_grad=True)
    w2 = torch.randn(k, HIDDEN, 2 * HIDDEN, dtype=dtype, device=device, requires_grad=True)

    def step():
        h = (x @ w1).view(instances, k, HIDDEN).transpose(0, 1)
        torch.bmm(h, w2).sum().backward()

    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / repeats
    return 3.0 * 2 * instances * (dim * HIDDEN + 2 * HIDDEN * HIDDEN) * k / dt


def step_times(preset: str, ks: list[int], steps: int, precisions: tuple[str, ...] = ("fp32", "bf16"), device: str = "cpu") -> list[dict]:
    """One training step (forward, loss, backward, AdamW) of K members vs one model, per precision; the
    FLOP rate as a fraction of the bare matmul chain of the same shapes in the same dtype."""
    from aem_dist.config import load_config
    from aem_dist.data.loader import InMemoryLoader, LoaderSpec
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.loop import Single
    from aem_dist.engine.population import Members
    from aem_dist.models import build_model

    spec, bags = load_bags(preset)
    loader = InMemoryLoader(bags, LoaderSpec("train", train=True, max_bags=1))
    dev = torch.device(device)
    ctx = DistContext(device=dev)
    batches = [b.to(dev, torch.float32) for _, b in zip(range(steps), loader.epoch(0))]
    instances = int(np.mean([b.n_instances for b in batches]))

    class Dims:  # what Members reads from a manifest
        dim, n_classes = spec.dim, spec.n_classes

    rows = []
    for precision in precisions:
        for k in ks:
            cfgs = [load_config("camelyon16", [f"train.seed={i}", f"loss.lam={LAMS[i % len(LAMS)]}", "train.data_seed=0", "train.progress=false",
                f"train.precision={precision}"]) for i in range(k)]
            if k == 1:
                torch.manual_seed(0)
                trainee = Single(cfgs[0], build_model(cfgs[0].model, spec.dim, spec.n_classes).to(dev), ctx)
            else:
                trainee = Members(cfgs, Dims, ctx)
            trainee.seed_epoch(0, 0)

            def run():
                for b in batches:
                    trainee.optimizer.zero_grad()
                    trainee.backward(b, ctx)
                    trainee.optimizer.step()

            run()  # warm-up
            sync(dev)
            t0 = time.perf_counter()
            run()
            sync(dev)
            dt = (time.perf_counter() - t0) / len(batches)
            flops = model_flops(instances, spec.dim, spec.n_classes, 1) * k
            bare = bare_rate(instances, spec.dim, k, torch.bfloat16 if precision == "bf16" else torch.float32, device=dev)
            rows.append({"preset": preset, "precision": precision, "K": k, "step_ms": dt * 1e3, "member_steps_per_s": k / dt, "gflops": flops / dt / 1e9,
                "of_bare": flops / dt / bare, "bare_gflops": bare / 1e9, "instances": instances})
    return rows


def interleaved_steps(preset: str, k: int, rounds: int, bags_per_round: int) -> dict:
    """Per member-step time of the paper's fp32 loop step (one model) against a K-member population at fp32
    and at bf16 (the engine's chunked step), timed in turn on the same bags in one process, R rounds: on a
    shared machine whose load drifts this compares them under the same conditions. Returns medians."""
    from aem_dist.config import load_config
    from aem_dist.data.loader import InMemoryLoader, LoaderSpec
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.population import Members

    spec, bags = load_bags(preset)
    loader = InMemoryLoader(bags, LoaderSpec("train", train=True, max_bags=1))
    batches = [b for _, b in zip(range(bags_per_round), loader.epoch(0))]
    xs = [b.feats.float() for b in batches]
    ys = [b.labels for b in batches]

    class Dims:  # what Members reads from a manifest
        dim, n_classes = spec.dim, spec.n_classes

    torch.manual_seed(0)
    paper = PaperABMIL(spec.dim, spec.n_classes)
    popt = torch.optim.AdamW(paper.parameters(), lr=1e-4, weight_decay=1e-4)

    def paper_round() -> None:
        for x, y in zip(xs, ys):
            logits, log_a = paper(x)
            loss = F.cross_entropy(logits, y) + 0.005 * (torch.exp(log_a) * log_a).sum()
            popt.zero_grad()
            loss.backward()
            popt.step()

    runners, members = {"paper-fp32": (paper_round, 1)}, {}
    for precision in ("fp32", "bf16"):
        cfgs = [load_config("camelyon16", [f"train.seed={i % 5}", f"loss.lam={LAMS[i % len(LAMS)]}", "train.data_seed=0", "train.progress=false",
            f"train.precision={precision}"]) for i in range(k)]
        m = members[precision] = Members(cfgs, Dims, DistContext())
        m.seed_epoch(0, 0)

        def pop_round(m=m) -> None:
            for b in batches:
                m.optimizer.zero_grad()
                m.backward(b, DistContext())
                m.optimizer.step()

        runners[f"fused-{precision}"] = (pop_round, k)
    for run, _ in runners.values():
        run()  # warm-up
    per: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            run, members_n = runners[n]
            t0 = time.perf_counter()
            run()
            per[n].append((time.perf_counter() - t0) / (len(batches) * members_n))
    med = {n: float(np.median(v)) for n, v in per.items()}
    return {"preset": preset, "K": k, "rounds": rounds, "bags_per_round": len(batches), "instances": int(np.mean([b.n_instances for b in batches])),
        "member_step_ms": {n: v * 1e3 for n, v in med.items()}, "per_round_ms": {n: [x * 1e3 for x in v] for n, v in per.items()},
        "chunks": {p: len(m.pop.chunks(int(np.mean([b.n_instances for b in batches])))) for p, m in members.items()},
        "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--lams", type=int, default=7, help="the first N of the paper's λ grid")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--only", choices=("sweep", "steps", "interleave"), default=None)
    ap.add_argument("--rounds", type=int, default=5, help="--only interleave: rounds")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--skip-unfused", action="store_true", help="leave out the one-trial-per-point sweep (the longest)")
    ap.add_argument("--device", default="cpu", help="device of the step-time table (cuda on a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the step-time table")
    ap.add_argument("--wsi-steps", type=int, default=20, help="wsi-small steps per timing")
    args = ap.parse_args()
    out: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if args.only in (None, "sweep"):
        lams = LAMS[: args.lams]
        work = Path(tempfile.mkdtemp(prefix="bench-pop-"))
        data = str(work / "wsi-small")
        cli("synth", "--preset", "wsi-small", "--scale", str(args.scale), "--out", data, log=work / "synth.log")
        print(f"grid {args.seeds} seeds x {len(lams)} λ, {args.epochs} epochs, wsi-small x{args.scale}; work in {work}", file=sys.stderr)
        out["loop"] = paper_loop(data, args.seeds, lams, args.epochs)
        print(f"  loop done: {out['loop']['wall_s']:.0f} s", file=sys.stderr)
        for way, extra in (("fused-bf16", ("train.precision=bf16",)), ("fused-fp32", ("train.precision=fp32",)), ("unfused", ("sweep.population=off",))):
            if way == "unfused" and args.skip_unfused:
                continue
            fused = ("train.data_seed=0", "sweep.trial_cpus=2") if way.startswith("fused") else ()
            out[way] = sweep(data, work / way, args.seeds, lams, args.epochs, *fused, *extra)
            print(f"  {way} done: {out[way]['wall_s']:.0f} s", file=sys.stderr)
        n = args.seeds * len(lams)
        print(f"\nsweep of {n} grid points ({args.seeds} seeds x {len(lams)} λ), {args.epochs} epochs, batch of one bag, wsi-small x{args.scale}")
        print(f"{'way':<11} {'wall s':>8} {'trials':>7} {'fused bf16 is':>14} {'fused fp32 is':>14}")
        for way in ("unfused", "fused-bf16", "fused-fp32", "loop"):
            if way in out:
                r = out[way]
                print(f"{way:<11} {r['wall_s']:>8.1f} {r.get('trials', r.get('runs')):>7} {r['wall_s'] / out['fused-bf16']['wall_s']:>13.2f}x "
                      f"{r['wall_s'] / out['fused-fp32']['wall_s']:>13.2f}x")
        print("\nper trial (mean s): " + "  ".join(f"{w}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[w]["per_trial"].items())
            for w in ("unfused", "fused-bf16", "fused-fp32") if w in out))
    if args.only == "interleave":
        torch.set_num_threads(args.threads)
        r = out["interleave"] = interleaved_steps("wsi-small", 35, args.rounds, args.wsi_steps)
        print(f"\nwsi-small, K = {r['K']}, {r['rounds']} interleaved rounds of {r['bags_per_round']} one-bag steps (mean {r['instances']} instances), "
              f"chunks {r['chunks']}, load average {r['load_avg']:.1f}")
        base = r["member_step_ms"]["paper-fp32"]
        for n, v in r["member_step_ms"].items():
            print(f"{n:<11} {v:>8.2f} ms per member-step (median)  paper loop / this: {base / v:.2f}x")
    if args.only not in ("sweep", "interleave"):
        torch.set_num_threads(args.threads)
        out["steps"] = step_times("mil-small", [1, 7, 35], 200, device=args.device) + step_times("wsi-small", [1, 7, 35], args.wsi_steps, device=args.device)
        print(f"\n{'dataset':<10} {'prec':>5} {'K':>3} {'inst/bag':>8} {'step ms':>8} {'member-steps/s':>15} {'vs K=1':>7} {'GFLOP/s':>8} {'bare':>7} "
              f"{'of bare':>8}")
        for r in out["steps"]:
            base = next(b for b in out["steps"] if b["preset"] == r["preset"] and b["precision"] == r["precision"] and b["K"] == 1)
            print(f"{r['preset']:<10} {r['precision']:>5} {r['K']:>3} {r['instances']:>8} {r['step_ms']:>8.2f} {r['member_steps_per_s']:>15.0f} "
                  f"{r['member_steps_per_s'] / base['member_steps_per_s']:>6.2f}x {r['gflops']:>8.1f} {r['bare_gflops']:>7.1f} {r['of_bare']:>7.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
