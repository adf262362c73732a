"""What a finished run leaves behind: ``results.json`` and the ``run.json`` provenance record."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

from .. import __version__, storage
from ..config import Config, mask_userinfo
from ..data.manifest import MANIFEST, MAX_MANIFEST_BYTES
from ..storage import StorageOptions
from . import precision as prec
from .loop import FitResult

PACKAGES = ("torch", "ray", "numpy", "webdataset", "zarr", "s3fs", "fsspec", "scikit-learn", "pydantic", "prometheus-client")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/Inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, sort_keys=False)


def write_json(url: str, obj: Any, options: StorageOptions | None = None) -> None:
    storage.atomic_write_text(url, to_json(obj) + "\n", options)


def stored_config(cfg: Config) -> dict[str, Any]:
    """The config as written into results.json / run.json: secrets removed, URL passwords masked."""
    return mask_userinfo(cfg.to_dict())


def results_dict(result: FitResult, cfg: Config) -> dict[str, Any]:
    """The content of ``results.json``."""
    return {
        "best_epoch": result.best_epoch,
        "val": result.val,
        "test": result.test,
        "skipped": result.skipped,
        "resumed_after_epoch": result.resumed_after,
        "stopped_after_epoch": result.stopped_at,  # train.patience ended training after this epoch (None: every epoch ran)
        "history": result.history,
        "config": stored_config(cfg),
    }


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"aem-dist": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | None = None) -> str | None:
    """The commit of the source tree aem_dist runs from, if it is a git checkout (with '+dirty')."""
    path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def manifest_sha256(root: str, options: StorageOptions | None = None) -> str | None:
    try:
        return hashlib.sha256(storage.read_bytes(storage.join(root, MANIFEST), options, cap=MAX_MANIFEST_BYTES, what="manifest")).hexdigest()
    except (FileNotFoundError, storage.StorageError):
        return None


def resources() -> dict[str, Any]:
    import torch

    return {
        "host_cpus": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "platform": platform.platform(),
    }


def numerics(cfg: Config) -> dict[str, Any]:
    """What decides whether a GPU run repeats bit for bit (docs/gpu.md), for run.json: ``precision`` as
    configured, ``precision_used`` as resolved on this machine's training device (``auto``; a model that
    cannot run bf16 falls back to fp32 at training start and says so in the log) and ``bf16_units``, the
    native bf16 matrix units found there (:func:`aem_dist.engine.precision.bf16_units`)."""
    import torch

    t = cfg.train
    gpu = cfg.scaling.use_gpu or t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    units = prec.bf16_units("cuda" if gpu and torch.cuda.is_available() else "cpu")
    return {
        "precision": t.precision,
        "precision_used": prec.resolve(t.precision, units),
        "bf16_units": units,
        "compile": t.compile,
        "deterministic": t.deterministic,
        "device_cache": cfg.data.device_cache,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def command_line(options: StorageOptions | None = None) -> str:
    """The command that started this process, with credentials given as overrides masked."""
    text = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    text = re.sub(r"(storage\.(?:key|secret)=)\S+", r"\1***", text)
    return mask_userinfo(storage.redact(text, options))


def run_record(cfg: Config, kind: str, options: StorageOptions | None = None, **extra: Any) -> dict[str, Any]:
    """The content of ``run.json``: resolved config (secrets redacted), versions, commit, data hash, resources."""
    return {
        "kind": kind,
        "command": command_line(options),
        "config": stored_config(cfg),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "dataset": {"root": storage.redact(cfg.data.root, options), "manifest_sha256": manifest_sha256(cfg.data.root, options)},
        "resources": resources(),
        "numerics": numerics(cfg),
        **extra,
    }
