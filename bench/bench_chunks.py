"""Per member-step time of a K-member population's chunked step by chunk size, against K = 1, in turn in one process.

    PYTHONPATH=$PWD python bench/bench_chunks.py 1800 fp32 35 35,7,2 4   # instances, precision, K, chunk sizes, rounds

One bag of T instances (D = 384, ABMIL hidden 128, configs/camelyon16.yaml), forward + backward + AdamW per
step; each round times one step at every chunk size and three K = 1 steps; min and median per member-step.
"""
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
from aem_dist.config import load_config
from aem_dist.engine.dist import DistContext
from aem_dist.engine.population import Members
from aem_dist.data.packing import PackedBatch
T, D, C = int(sys.argv[1]), 384, 3
prec = sys.argv[2]; K = int(sys.argv[3]); chunks = [int(c) for c in sys.argv[4].split(",")]; rounds = int(sys.argv[5])
class Dims: dim, n_classes = D, C
torch.manual_seed(0)
b = PackedBatch(torch.randn(T, D), torch.zeros(T, dtype=torch.long), torch.tensor([0, T]), torch.tensor([1]), ["a"])
def members(k):
    cfgs = [load_config("camelyon16", [f"train.seed={i}", "train.data_seed=0", f"loss.lam={0.01*i}", "train.progress=false", f"train.precision={prec}"]) for i in range(k)]
    m = Members(cfgs, Dims, DistContext()); m.seed_epoch(0, 0); return m
big, one = members(K), members(1)
def step(m, c):
    m.pop.chunk = c
    m.optimizer.zero_grad(); m.backward(b, DistContext()); m.optimizer.step()
times = {c: [] for c in chunks}; times["K=1"] = []
for r in range(rounds + 1):
    for c in chunks:
        t = time.perf_counter(); step(big, c); dt = time.perf_counter() - t
        if r: times[c].append(dt / K)
    for _ in range(3):
        t = time.perf_counter(); step(one, 1); dt = time.perf_counter() - t
        if r: times["K=1"].append(dt)
for c, v in times.items():
    print(f"T={T} {prec} K={K} chunk {c}: per member-step min {min(v)*1e3:.1f} ms, median {np.median(v)*1e3:.1f} ms")
