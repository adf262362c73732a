"""Model tests run single-threaded: their tensors are tiny, and a second intra-op thread only adds
contention (and many times the CPU time) on a shared 2-core machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
