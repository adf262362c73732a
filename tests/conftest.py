"""Shared test set-up. Fixture modules in tests/fixtures/ (real SeaweedFS, Ray head, Prometheus)
are loaded as plugins so any test can request them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = sorted(f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when a real component is missing — except under CI=true, where it is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required test component missing under CI=true: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    """An integration test runs real Ray, SeaweedFS and Prometheus processes on a shared 2-core machine,
    where a scheduling hiccup can fail one run: it gets one more try (pytest-rerunfailures), which the
    output shows (``R``, a RERUN line and "N rerun" in the closing line). A second failure fails."""
    gpu_skip = None
    for item in items:
        if item.get_closest_marker("gpu"):
            import torch

            if not torch.cuda.is_available():
                # GPU-only by nature (not a missing test component), so skipped under CI=true too, with the reason.
                gpu_skip = gpu_skip or pytest.mark.skip(reason="needs a CUDA GPU (none visible here); bench/gpu_check.sh runs the gpu tests on one")
                item.add_marker(gpu_skip)
        if item.get_closest_marker("integration") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=5))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """The synthetic `demo` dataset, written once per test session."""
    from aem_dist.data.synthetic import get_spec, write_synthetic

    root = str(tmp_path_factory.mktemp("demo-data"))
    write_synthetic(get_spec("demo"), root, seed=0, progress=False)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run torch single-threaded: their tensors are small, and on a shared 2-core machine a second
    intra-op thread mostly adds contention (with Ray workers, servers and other tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
