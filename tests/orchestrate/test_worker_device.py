"""Device choice of Ray trials on GPU nodes (pure functions: no Ray cluster is started)."""

from __future__ import annotations

import pytest
import torch

from aem_dist.config import load_config
from aem_dist.orchestrate.resources import trial_device, worker_resources


def test_trial_without_gpu_stays_on_cpu_even_when_gpus_are_visible():
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a trial that reserved no GPU.
    assert trial_device("auto", [], "0,1,2,3") == torch.device("cpu")
    assert trial_device("cpu", ["1"], "1") == torch.device("cpu")


def test_fractional_gpu_trial_uses_the_gpu_ray_assigned():
    assert trial_device("auto", ["2"], "2") == torch.device("cuda", 0)  # Ray narrowed the visible set
    assert trial_device("auto", [3], "2,3") == torch.device("cuda", 1)  # index inside the visible list
    assert trial_device("cuda", ["0"], None) == torch.device("cuda", 0)


def test_cuda_trial_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="sweep.trial_gpus"):
        trial_device("cuda", [], "0")


def test_fractional_gpus_for_multi_rank_ddp_are_refused():
    one = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=1", "sweep.trial_gpus=0.25"])
    assert worker_resources(one) == {"CPU": 1.0, "GPU": 0.25}
    two = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2", "sweep.trial_gpus=0.5"])
    with pytest.raises(ValueError, match="nccl needs a whole GPU per rank"):
        worker_resources(two)
    assert worker_resources(load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2"])) == {"CPU": 1.0, "GPU": 1.0}
