"""Packed variable-length training vs the paper's one-bag-per-step loop, side by side in one run.

    python bench/bench_packing.py              # both datasets, prints a table (takes a few minutes)
    python bench/bench_packing.py --quick      # fewer epochs
    python bench/bench_packing.py --presets mil-small --modes paper,ours-32,ours-32c   # + torch.compile
    python bench/bench_packing.py --presets mil-small --interleave 7   # paper / ours-32 / ours-32c in one process
    python bench/bench_packing.py --presets wsi-small --interleave 5 --modes paper,ours-1,ours-1-bf16   # bf16 engine vs fp32 paper loop

``--interleave R`` builds the paper loop and the engine (eager and compiled, 32 bags per step) in one
process and times one epoch of each in turn, R rounds (the order rotates each round), then reports the
median bags/s of each mode and the ratio of medians: on a shared machine whose load drifts over
minutes this compares the modes under the same conditions, which separate processes cannot.

For each dataset (``mil-small``: ~10 instances a bag, like classic MIL sets; ``wsi-small``: median
~1 000 instances, D = 384) the same model is trained on the same in-RAM bags:

* ``paper``  — the reference loop: one bag per step, a Python loop over bags, fp32 tensors made once,
  plain softmax over the bag (no packing code at all);
* ``ours-1`` / ``ours-32`` — aem-dist's engine (``aem_dist.engine.loop.train_epoch`` over the in-memory
  loader, its AdamW from ``make_optimizer``) at ``max_bags_per_batch`` 1 and 32; ``ours-32`` also
  has the instance budget ``max_instances_per_batch`` = 8192 (as in configs/demo.yaml: a step's
  activations stay cache-sized when bags are large);
* ``ours-32c`` (only with ``--modes``) — ``ours-32`` with ``train.compile=on`` (the forward + loss
  through ``torch.compile``; compile time is spent in the warm-up epoch and not timed);
* ``ours-1-bf16`` / ``ours-32-bf16`` (``--interleave`` with ``--modes``) — the engine at
  ``train.precision=bf16`` (every matmul in bfloat16; the paper loop stays fp32).

Each configuration runs in its own process (so peak RSS is its own) and reports bags/s, instances/s,
peak RSS, and the achieved FLOP rate of its training steps as a fraction of a plain fp32 matmul chain
of the same shapes timed in the same process. Ratios are ``ours / paper`` for the same dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HIDDEN = 128
LAM = 0.1
DEFAULT_MODES = "paper,ours-1,ours-32"


def load_bags(preset: str):
    from aem_dist.data.synthetic import _world, get_spec, make_bag

    spec = get_spec(preset)
    world = _world(spec, 0)
    return spec, [make_bag(spec, 0, "train", i, world) for i in range(spec.n_bags["train"])]


def model_flops(instances: int, dim: int, n_classes: int, bags: int) -> float:
    """Forward + backward FLOPs of gated ABMIL (≈ 3× forward) for ``instances`` rows in ``bags`` bags."""
    forward = 2 * instances * (dim * HIDDEN + 2 * HIDDEN * HIDDEN + HIDDEN) + 2 * bags * HIDDEN * n_classes
    return 3.0 * forward


def matmul_rate(instances: int, dim: int, repeats: int = 20) -> float:
    """FLOP/s of the same matmul chain (embed, V, U) forward + backward as plain torch ops."""
    x = torch.randn(instances, dim)
    w1 = torch.randn(dim, HIDDEN, requires_grad=True)
    w2 = torch.randn(HIDDEN, 2 * HIDDEN, requires_grad=True)
    for _ in range(3):
        (x @ w1 @ w2).sum().backward()
    t0 = time.perf_counter()
    for _ in range(repeats):
        (x @ w1 @ w2).sum().backward()
    dt = (time.perf_counter() - t0) / repeats
    return 3.0 * 2 * instances * (dim * HIDDEN + 2 * HIDDEN * HIDDEN) / dt


class PaperABMIL(torch.nn.Module):
    """The paper's ABMIL written for one bag at a time (as in its public training scripts)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.embed = torch.nn.Linear(dim, HIDDEN, bias=False)
        self.V = torch.nn.Linear(HIDDEN, HIDDEN)
        self.U = torch.nn.Linear(HIDDEN, HIDDEN)
        self.w = torch.nn.Linear(HIDDEN, 1)
        self.classifier = torch.nn.Linear(HIDDEN, n_classes)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.embed(x))
        s = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(1)
        log_a = torch.log_softmax(s, dim=0)
        z = (torch.exp(log_a).unsqueeze(1) * h).sum(0, keepdim=True)
        return self.classifier(z), log_a


def run_paper(bags, spec, epochs: int) -> dict:
    torch.manual_seed(0)
    model = PaperABMIL(spec.dim, spec.n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(bags))
    xs = [torch.from_numpy(b.feats.astype(np.float32)) for b in bags]
    ys = [torch.tensor([b.label]) for b in bags]

    def epoch() -> None:
        for i in np.random.default_rng(0).permutation(len(bags)):
            logits, log_a = model(xs[i])
            loss = F.cross_entropy(logits, ys[i]) + LAM * (torch.exp(log_a) * log_a).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    epoch()  # warm-up
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return {"seconds": time.perf_counter() - t0, "steps": epochs * len(bags)}


def run_ours(bags, spec, epochs: int, max_bags: int, compile_: bool = False) -> dict:
    budget = None if max_bags == 1 else 8192
    from aem_dist.config import load_config
    from aem_dist.data.loader import InMemoryLoader, LoaderSpec
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.loop import CosineToZero, Single, train_epoch

    cfg = load_config(None, [f"loss.lam={LAM}", f"model.hidden={HIDDEN}", f"train.max_bags_per_batch={max_bags}", "train.progress=false", f"train.compile={'on' if compile_ else 'off'}"])
    loader = InMemoryLoader(bags, LoaderSpec("train", train=True, max_bags=max_bags, max_instances=budget))
    ctx = DistContext()
    trainee = Single.build(cfg, spec.dim, spec.n_classes, ctx)  # the engine's model and fused AdamW
    sched = torch.optim.lr_scheduler.LambdaLR(trainee.optimizer, CosineToZero(epochs * loader.steps(0)))
    train_epoch(trainee, sched, loader, cfg, ctx, 0)  # warm-up
    t0 = time.perf_counter()
    steps = 0
    for e in range(epochs):
        stats, _ = train_epoch(trainee, sched, loader, cfg, ctx, e + 1)
        steps += int(stats[0]["steps"])
    return {"seconds": time.perf_counter() - t0, "steps": steps}


def epoch_runners(bags, spec, modes: list[str]) -> dict:
    """One-epoch closures for the paper loop and each engine mode (``ours-B`` bags per step, ``-bf16``
    at train.precision bf16, a trailing ``c`` compiled) on the same bags (warm-up done)."""
    from aem_dist.config import load_config
    from aem_dist.data.loader import InMemoryLoader, LoaderSpec
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.loop import CosineToZero, Single, train_epoch

    torch.manual_seed(0)
    paper = PaperABMIL(spec.dim, spec.n_classes)
    popt = torch.optim.AdamW(paper.parameters(), lr=1e-4, weight_decay=1e-4)
    psched = torch.optim.lr_scheduler.CosineAnnealingLR(popt, T_max=1000 * len(bags))
    xs = [torch.from_numpy(b.feats.astype(np.float32)) for b in bags]
    ys = [torch.tensor([b.label]) for b in bags]

    def paper_epoch() -> int:
        for i in np.random.default_rng(0).permutation(len(bags)):
            logits, log_a = paper(xs[i])
            loss = F.cross_entropy(logits, ys[i]) + LAM * (torch.exp(log_a) * log_a).sum()
            popt.zero_grad()
            loss.backward()
            popt.step()
            psched.step()
        return len(bags)

    runners = {"paper": paper_epoch}
    for mode in modes:
        if mode == "paper":
            continue
        max_bags = int(mode.split("-")[1].rstrip("c"))
        sets = [f"loss.lam={LAM}", f"model.hidden={HIDDEN}", f"train.max_bags_per_batch={max_bags}", "train.progress=false",
            f"train.compile={'on' if mode.endswith('c') else 'off'}", f"train.precision={'bf16' if 'bf16' in mode else 'fp32'}"]
        cfg = load_config(None, sets)
        loader = InMemoryLoader(bags, LoaderSpec("train", train=True, max_bags=max_bags, max_instances=None if max_bags == 1 else 8192))
        trainee = Single.build(cfg, spec.dim, spec.n_classes, DistContext())
        sched = torch.optim.lr_scheduler.LambdaLR(trainee.optimizer, CosineToZero(1000 * loader.steps(0)))
        state = {"epoch": 0}

        def ours_epoch(trainee=trainee, sched=sched, loader=loader, cfg=cfg, state=state) -> int:
            state["epoch"] += 1
            stats, _ = train_epoch(trainee, sched, loader, cfg, DistContext(), state["epoch"])
            return int(stats[0]["bags"])

        runners[mode] = ours_epoch
    for run in runners.values():
        run()  # warm-up (compiles the compiled step)
    return runners


def interleaved(preset: str, rounds: int, modes: list[str]) -> None:
    """Median bags/s of the paper loop and each mode timed in turn in one process."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    spec, bags = load_bags(preset)
    runners = epoch_runners(bags, spec, modes)
    names = list(runners)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            done = runners[n]()
            rates[n].append(done / (time.perf_counter() - t0))
    med = {n: float(np.median(v)) for n, v in rates.items()}
    print(f"\n{preset}: {rounds} interleaved rounds, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<9} {'median bags/s':>13} {'vs paper':>8}   per round")
    for n in names:
        print(f"{n:<9} {med[n]:>13.0f} {med[n] / med['paper']:>7.2f}x   " + " ".join(f"{v:.0f}" for v in rates[n]))
    for n in names[1:]:
        print(f"per-round ratio {n} / paper: {' '.join(f'{c / p:.2f}' for c, p in zip(rates[n], rates['paper']))}")


def child(preset: str, mode: str, epochs: int) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    spec, bags = load_bags(preset)
    instances = sum(b.n for b in bags)
    out = run_paper(bags, spec, epochs) if mode == "paper" else run_ours(bags, spec, epochs, int(mode.split("-")[1].rstrip("c")), mode.endswith("c"))
    n_bags = epochs * len(bags)
    n_inst = epochs * instances
    rate = model_flops(n_inst, spec.dim, spec.n_classes, n_bags) / out["seconds"]
    mean_step_instances = max(1, n_inst // out["steps"])
    out |= {
        "preset": preset,
        "mode": mode,
        "bags_per_s": n_bags / out["seconds"],
        "instances_per_s": n_inst / out["seconds"],
        "flops_per_s": rate,
        "matmul_fraction": rate / matmul_rate(mean_step_instances, spec.dim),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_bag": instances / len(bags),
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 timed epoch instead of 3")
    ap.add_argument("--presets", default="mil-small,wsi-small")
    ap.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated: paper, ours-1, ours-32, ours-32c (compiled)")
    ap.add_argument("--interleave", type=int, metavar="ROUNDS", help="time paper / ours-32 / ours-32c in turn in one process (see above)")
    ap.add_argument("--child", nargs=3, metavar=("PRESET", "MODE", "EPOCHS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    if args.interleave:
        for preset in args.presets.split(","):
            interleaved(preset, args.interleave, args.modes.split(",") if args.modes != DEFAULT_MODES else ["paper", "ours-32", "ours-32c"])
        return
    epochs = 1 if args.quick else 3
    rows = []
    for preset in args.presets.split(","):
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", preset, mode, str(epochs)], capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  done {preset} {mode}", file=sys.stderr)
    print(f"\n{'dataset':<10} {'mode':<8} {'mean bag':>8} {'bags/s':>9} {'inst/s':>11} {'vs paper':>8} {'peak RSS':>9} {'GFLOP/s':>8} {'of matmul':>9}")
    for r in rows:
        base = next(b for b in rows if b["preset"] == r["preset"] and b["mode"] == "paper")
        print(
            f"{r['preset']:<10} {r['mode']:<8} {r['mean_bag']:>8.0f} {r['bags_per_s']:>9.0f} {r['instances_per_s']:>11.0f} "
            f"{r['bags_per_s'] / base['bags_per_s']:>7.2f}x {r['peak_rss_mib']:>6.0f} MiB {r['flops_per_s'] / 1e9:>8.2f} {r['matmul_fraction']:>8.0%}"
        )


if __name__ == "__main__":
    main()
