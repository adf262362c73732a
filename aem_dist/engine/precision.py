"""Numerics of a run: matmul precision (fp32 / tf32 / bf16 autocast) and deterministic mode.

``train.precision``:

* ``fp32`` — everything in float32 (TF32 matmuls explicitly off on CUDA). The default.
* ``tf32`` — float32 tensors, but CUDA matmuls may use TF32 tensor cores (10-bit mantissa inputs,
  float32 accumulation). No effect on CPU.
* ``bf16`` — the forward runs under ``torch.autocast(dtype=bfloat16)``: the linear layers (the FLOPs)
  run in bfloat16; softmax/entropy/loss stay float32: segment log-softmax upcasts its scores
  (:func:`aem_dist.models.segment.segment_log_softmax`), and :func:`float32_output` casts the model
  output to float32 before the loss terms and the AEM term are computed outside autocast. So the AEM
  term is always Σ a log a of a float32 log-softmax.

``train.deterministic`` (default false): ``torch.use_deterministic_algorithms(True)``, the cuBLAS
workspace setting it requires (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set before the first cuBLAS call),
cuDNN deterministic / no benchmark. Under that mode torch runs ``index_add_`` / ``index_put_(accumulate)``
— the segment sums and their backward — with its sort-based deterministic kernels instead of atomics,
and raises on any op that has no deterministic kernel. Off by default because those kernels are slower
on CUDA; on CPU the loop is deterministic either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator, get_args

import torch

from ..config import Precision
from ..models.base import MILOutput

log = logging.getLogger(__name__)

PRECISIONS = get_args(Precision)
CUBLAS_WORKSPACE = ":4096:8"


def configure(precision: str, deterministic: bool, device: torch.device) -> dict[str, Any]:
    """Set the process-wide backend flags for ``precision`` and ``deterministic``; returns what was set
    (for the log and run records). Raises ValueError for an unknown precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision {precision!r} not in {PRECISIONS}")
    tf32 = precision == "tf32"
    # Process-wide flags: set both ways so a previous run in this process cannot leak its choice.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    applied = {
        "precision": precision,
        "autocast": "bfloat16" if precision == "bf16" else None,
        "tf32_matmul": tf32 and device.type == "cuda",
        "deterministic": deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if device.type != "cuda" and precision == "tf32":
        log.info("train.precision=tf32 has no effect on %s (TF32 is a CUDA tensor-core mode); running fp32", device.type)
    return applied


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The context the forward runs in: bf16 autocast for ``bf16``, nothing otherwise."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def float32_output(out: MILOutput) -> MILOutput:
    """``out`` with every floating tensor (logits, scores, log-attention, extras) in float32 at least,
    so loss terms and the AEM term are computed in float32 whatever autocast produced. A no-op
    (same tensors) when they already are float32 or float64."""

    def up(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t

    low = (torch.float16, torch.bfloat16)
    changes = {f.name: up(getattr(out, f.name)) for f in dataclasses.fields(out) if isinstance(getattr(out, f.name), torch.Tensor) and getattr(out,
        f.name).dtype in low}
    extras = {k: up(v) for k, v in out.extras.items()}
    if any(v is not out.extras[k] for k, v in extras.items()):
        changes["extras"] = extras
    # dataclasses.replace keeps fields this module does not know about (models may add some).
    return dataclasses.replace(out, **changes) if changes else out
