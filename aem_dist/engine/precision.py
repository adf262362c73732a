"""Numerics of a run: matmul precision (fp32 / tf32 / bf16 autocast) and deterministic mode.

``train.precision``:

* ``fp32`` — everything in float32 (TF32 matmuls explicitly off on CUDA). The default.
* ``tf32`` — float32 tensors, but CUDA matmuls may use TF32 tensor cores (10-bit mantissa inputs,
  float32 accumulation). No effect on CPU.
* ``bf16`` — every forward (training and evaluation, single runs and populations, including a
  population's shared input product) runs under ``torch.autocast(dtype=bfloat16)``: every matmul (the
  FLOPs) runs in bfloat16, forward and backward; weights and optimizer state stay float32 (master
  weights); softmax/entropy/loss stay float32: segment log-softmax upcasts its scores
  (:func:`aem_dist.models.segment.segment_log_softmax`), and :func:`float32_output` casts the model
  output to float32 before the loss terms and the AEM term are computed outside autocast. So the AEM
  term is always Σ a log a of a float32 log-softmax. A model whose forward fails under bf16 autocast
  (:func:`bf16_failure`) says so in one line and runs fp32.
* ``auto`` — ``bf16`` where the device has native bf16 matrix units (:func:`bf16_units`: the CPU flags
  ``amx_bf16`` / ``avx512_bf16``, CUDA compute capability ≥ 8.0), ``fp32`` elsewhere (:func:`resolve`).

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
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo: then no bf16 units)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_units(device_type: str, *, flags: set[str] | None = None, capability: tuple[int, int] | None = None) -> list[str]:
    """The native bf16 matrix units of a device (empty: none). CPU: which of :data:`BF16_CPU_FLAGS` it has;
    CUDA: its tensor cores when the compute capability is ≥ 8.0 (Ampere and later). ``flags`` /
    ``capability`` describe another machine (tests simulate one); by default this machine's are read."""
    if device_type == "cuda":
        cap = tuple(capability if capability is not None else torch.cuda.get_device_capability())
        return [f"cuda sm_{cap[0]}{cap[1]} bf16 tensor cores"] if cap >= (8, 0) else []
    if device_type == "cpu":
        have = cpu_flags() if flags is None else set(flags)
        return [f for f in BF16_CPU_FLAGS if f in have]
    return []


def resolve(precision: str, units: list[str]) -> str:
    """The precision a run uses: ``auto`` is bf16 with native bf16 units, fp32 without; others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision {precision!r} not in {PRECISIONS}")
    return ("bf16" if units else "fp32") if precision == "auto" else precision


def bf16_failure(model: torch.nn.Module, dim: int, device: torch.device) -> str | None:
    """Why ``model`` cannot run under bf16 autocast (the first line of the error), or None when it can.

    A forward + loss terms on a 7-instance, 2-bag batch in train and eval mode, without gradients and
    with the RNG restored afterwards. When the same probe fails in float32 too, the failure is not
    bf16's (a model that needs bigger bags, say) and None is returned."""

    def attempt(precision: str) -> str | None:
        feats = torch.randn(7, dim, device=device)
        bag_index = torch.tensor([0, 0, 0, 1, 1, 1, 1], device=device)
        labels = torch.tensor([0, 0], device=device)
        was = model.training
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                for mode in (True, False):
                    model.train(mode)
                    with autocast(precision, device):
                        out = model(feats, bag_index, 2)
                    model.loss_terms(float32_output(out), labels)
        except Exception as err:  # noqa: BLE001  (any failure: report it, fall back)
            return str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        finally:
            model.train(was)
        return None

    why = attempt("bf16")
    return why if why is not None and attempt("fp32") is None else None


def configure(precision: str, deterministic: bool, device: torch.device) -> dict[str, Any]:
    """Set the process-wide backend flags for ``precision`` (already resolved: not ``auto``) and
    ``deterministic``; returns what was set (for the log and run records). Raises ValueError for an
    unknown precision."""
    if precision not in PRECISIONS or precision == "auto":
        raise ValueError(f"train.precision {precision!r} not in {PRECISIONS[:-1]} (resolve 'auto' first)")
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
