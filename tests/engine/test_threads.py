"""A trial's torch threads are its CPU share (DistContext.cpus), in-process and for populations."""

from __future__ import annotations

import logging
import os

import torch

from aem_dist.config import load_config
from aem_dist.engine.dist import DistContext
from aem_dist.engine.loop import fit_members


def test_cpu_share_sets_torch_threads_within_what_the_process_may_use():
    usable = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        assert DistContext().use_cpu_share() is None and torch.get_num_threads() == before  # no share: left alone
        assert DistContext(cpus=0.25).use_cpu_share() == 1 and torch.get_num_threads() == 1  # a fraction: one thread
        assert DistContext(cpus=1000).use_cpu_share() == usable and torch.get_num_threads() == usable  # never more than the CPUs there are
        assert DistContext.current("cpu", cpus=1.0).use_cpu_share() == 1
    finally:
        torch.set_num_threads(before)


def test_a_population_trains_with_the_threads_of_its_share(demo_data, caplog):
    cfgs = [load_config("demo", [f"data.root={demo_data}", "train.progress=false", "train.epochs=1", "model.hidden=8", "train.data_seed=0",
        f"train.seed={i}"]) for i in range(2)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        with caplog.at_level(logging.INFO, logger="aem_dist.engine.loop"):
            fit_members(cfgs, ctx=DistContext(cpus=1.0))
        assert torch.get_num_threads() == 1
        assert "torch threads: 1 (CPU share 1 of" in caplog.text
    finally:
        torch.set_num_threads(before)
