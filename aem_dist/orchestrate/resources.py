"""What a run asks of Ray: resources of a worker and of a trial, trials at once, a trial's device, Ray's storage.

A floor below every module that starts Ray work (no Ray import): the sweep, the Ray Train worker and the
preflight checks read the same numbers from here.
"""

from __future__ import annotations

import math

import torch

from .. import storage
from ..config import Config
from .errors import SweepError

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved by each trial's supervising function


def worker_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of one training worker: scaling.resources_per_worker, else sweep.trial_cpus/gpus."""
    if cfg.scaling.resources_per_worker:
        return dict(cfg.scaling.resources_per_worker)
    res = {"CPU": cfg.sweep.trial_cpus}
    if cfg.scaling.use_gpu:
        res["GPU"] = cfg.sweep.trial_gpus or 1.0
    if cfg.scaling.use_gpu and cfg.scaling.num_workers > 1 and 0 < res.get("GPU", 1.0) < 1.0:
        # Ray may place two ranks of one trial on the same GPU, and nccl refuses duplicate GPUs.
        raise ValueError(f"scaling.num_workers={cfg.scaling.num_workers} DDP ranks with {res['GPU']} GPU each: "
                         "nccl needs a whole GPU per rank (fractional GPUs are for 1-worker trials)")
    return res


def in_process(cfg: Config) -> dict[str, float]:
    """Resources of a trial that trains in its own process (``scaling.num_workers: 0``)."""
    return {"CPU": cfg.sweep.trial_cpus} | ({"GPU": cfg.sweep.trial_gpus} if cfg.sweep.trial_gpus else {})


def trial_resources(cfg: Config) -> dict[str, float]:
    """Resources one trial occupies while it trains (all its workers together)."""
    if cfg.scaling.num_workers == 0:
        return in_process(cfg)
    return {k: v * cfg.scaling.num_workers for k, v in worker_resources(cfg).items()}


def function_resources(cfg: Config) -> dict[str, float]:
    """What the Tune trial function reserves: the trial itself in process; a function that starts a TorchTrainer only
    supervises it and reserves memory, not CPU, so that its workers can use every CPU (a 2-CPU laptop runs two 1-worker
    trials, or one 2-worker trial)."""
    return in_process(cfg) if cfg.scaling.num_workers == 0 else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


def bundle(cfg: Config) -> tuple[dict[str, float], str]:
    """Resources that must fit on one node (positive amounts only): the trial in process, else one Ray Train worker;
    and the keys that set them."""
    if cfg.scaling.num_workers == 0:
        need, keys = in_process(cfg), "sweep.trial_cpus, sweep.trial_gpus"
    else:
        need = worker_resources(cfg)
        keys = "scaling.resources_per_worker" if cfg.scaling.resources_per_worker else "sweep.trial_cpus, scaling.use_gpu, sweep.trial_gpus"
    return {k: float(v) for k, v in need.items() if v > 0}, keys


def max_concurrent(cfg: Config, cluster: dict[str, float], n_trials: int) -> int:
    """Trials that fit at once: min over resources of floor(cluster / per-trial), capped by the config."""
    need = {k: v for k, v in trial_resources(cfg).items() if v > 0}
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items()]
    n = max(1, min(fits) if fits else n_trials)
    if min(fits, default=1) == 0:
        raise SweepError(f"one trial needs {need} but the cluster has {dict((k, cluster.get(k, 0)) for k in need)}")
    if cfg.sweep.max_concurrent_trials:
        n = min(n, cfg.sweep.max_concurrent_trials)
    return min(n, max(1, n_trials))


def trial_device(requested: str, gpu_ids: list, visible: str | None) -> torch.device:
    """The device of a Tune trial that trains in its own process (``scaling.num_workers: 0``).

    The GPU Ray assigned to the trial (``sweep.trial_gpus``, fractions included) as numbered inside
    ``CUDA_VISIBLE_DEVICES`` (which Ray sets to the assigned ids), else the CPU. Ray ≥ 2.5x no longer
    hides GPUs from a task that reserved none, so ``auto`` must not mean "CUDA if visible" here:
    every GPU-less trial on a GPU node would land on GPU 0 without Ray counting it.
    Raises ValueError for ``train.device: cuda`` in a trial that reserved no GPU.
    """
    if requested == "cpu" or (requested == "auto" and not gpu_ids):
        return torch.device("cpu")
    if not gpu_ids:
        raise ValueError("train.device=cuda but this trial reserved no GPU: set sweep.trial_gpus (e.g. 0.25 to share a GPU four ways)")
    order = [v.strip() for v in visible.split(",")] if visible else []
    first = str(gpu_ids[0])
    return torch.device("cuda", order.index(first) if first in order else 0)


def ray_storage(cfg: Config, out: str, *parts: str) -> str:
    """Where Ray keeps a run's state: ``run.storage_path``, else ``<out>/ray``."""
    return storage.join(cfg.run.storage_path or storage.join(out, "ray"), *parts)
