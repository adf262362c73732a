"""The distributed context the loop runs in: rank, world, device, and the collectives it needs.

Nothing here starts processes: under Ray Train the process group already exists (gloo on CPU, nccl
on GPU); in a plain process there is none and every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpus: float | None = None  # the CPU share this process was given (a Ray trial or worker); None: not set

    @classmethod
    def current(cls, device: torch.device | str | None = None, cpus: float | None = None) -> "DistContext":
        """From the initialised process group (if any), the given or best device and the CPU share."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device, cpus)
        return cls(0, 1, 0, device, cpus)

    def use_cpu_share(self) -> int | None:
        """torch's intra-op threads = this process's CPU share (whole CPUs, at least 1, at most the CPUs it
        may run on), so a trial given 1 of 2 cores does not spin a second thread on its neighbour's core
        and a population given every core uses them all. Returns the thread count (None: no share set,
        torch's threads left as they are)."""
        if self.cpus is None:
            return None
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, min(usable, int(self.cpus + 1e-9)))
        torch.set_num_threads(n)
        return n

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum across ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self._coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item()) == 0

    def bag_share(self, n_bags: int, like: torch.Tensor | None = None) -> torch.Tensor | float:
        """Factor that turns this rank's mean-over-bags loss into its share of the global mean.

        DDP averages gradients over ranks, so a rank's bag weighs 1/(world·n_rank); scaling the rank's
        loss by world·n_rank/Σn makes every bag of the step weigh 1/Σn — the step's gradient is then
        the mean of all its bags' gradients, whatever each rank holds. One all-reduce of the counts
        per step. Not distributed: 1.0 (no collective). Distributed: a 0-dim tensor of ``like``'s
        dtype on the collective's device (nccl: the GPU), so no host sync is needed.
        """
        if not self.distributed:
            return 1.0
        t = torch.tensor([float(n_bags)], dtype=torch.float64, device=self._coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        share = (self.world_size * float(n_bags)) / t[0]  # (,) float64
        return share.to(like.dtype) if like is not None else share

    def _coll_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def parallelize(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The one place parallelism is applied: DDP across ranks, or the model as it is."""
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
