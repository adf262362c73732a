"""``aem-dist export``: a trained model as one safetensors file, usable without its run folder.

The file holds the model's weights (safetensors: tensors only, nothing is unpickled when it is read)
and, as string metadata, everything needed to rebuild and use it:

=================  ==============================================================================
``format``         ``aem-dist-model/1``
``model_meta``     JSON: model name, feature dim, number of classes, class names, model config
``config``         JSON: the run's resolved config (secrets removed; data.root, loss.lam, train.*)
``class_names``    JSON list, in class-index order (the columns of ``probs``)
``epoch``          the checkpoint's epoch (the selected one for ``best``)
``source``         the run folder it came from (credentials redacted)
``created_by``     aem-dist version
=================  ==============================================================================

``aem-dist predict --run model.safetensors --data NEW_DATA --out pred.zarr`` uses it like a run folder;
in Python, :func:`load_exported` returns the same :class:`~aem_dist.observe.attention.RunModel`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .. import __version__, storage
from ..storage import StorageOptions
from .attention import RunModel

FORMAT = "aem-dist-model/1"
SUFFIX = ".safetensors"
HEADER_MAX = 100 << 20  # a header this large is no model of ours (bounded before it is read)


def export_model(run: RunModel, out: str, options: StorageOptions | None = None, *, redact_source: str | None = None) -> dict[str, str]:
    """Write ``run``'s weights and metadata to ``out`` (atomically); returns the metadata."""
    from safetensors.torch import save

    # safetensors refuses tensors that share memory (tied weights): each one gets its own copy
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in run.model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model_meta": json.dumps(run.meta, default=str),
        "config": json.dumps(run.config, default=str),
        "class_names": json.dumps([str(c) for c in run.meta.get("class_names") or range(int(run.meta["n_classes"]))]),
        "epoch": str(run.epoch),
        "source": redact_source if redact_source is not None else storage.redact(run.url, options),
        "created_by": f"aem-dist {__version__}",
    }
    storage.atomic_write_bytes(out, save(tensors, metadata=meta), options)
    return meta


def read_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its 8-byte length and JSON header), checked to be ours."""
    if len(data) < 8:
        raise ValueError(f"{where}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(HEADER_MAX, len(data) - 8):
        raise ValueError(f"{where}: not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise ValueError(f"{where}: not a safetensors file (unreadable header)") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not an aem-dist model export (format {meta.get('format')!r}, expected {FORMAT!r}; written by `aem-dist export`)")
    return meta


def load_exported(url: str, options: StorageOptions | None = None) -> RunModel:
    """Rebuild the model of an export: the same :class:`RunModel` a run folder gives, in eval mode."""
    from safetensors.torch import load

    from ..config import ModelConfig
    from ..models import build_model

    where = storage.redact(url, options)
    data = storage.read_bytes(url, options)
    meta = read_metadata(data, where)
    model_meta: dict[str, Any] = json.loads(meta["model_meta"])
    model = build_model(ModelConfig(**model_meta["model"]), int(model_meta["dim"]), int(model_meta["n_classes"]))
    model.load_state_dict(load(data))  # strict: every weight present, none extra
    return RunModel(model.eval(), model_meta, int(meta.get("epoch", -1)), json.loads(meta.get("config") or "{}"), url)


def is_export(url: str) -> bool:
    return str(url).endswith(SUFFIX)
