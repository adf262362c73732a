"""Checkpoint state: everything needed to resume, loaded with ``weights_only=True``.

A checkpoint is one ``state.pt`` in a folder: model, optimizer and scheduler state, RNG state,
the epoch just finished, the best-so-far selection and the history, plus what is needed to rebuild
the model (name, dims, model config). Only tensors and plain containers go in, so the safe
unpickler can read it back; nothing else is ever unpickled.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from .. import storage

STATE_FILE = "state.pt"
# A 64-member population of the largest model (weights + AdamW moments) is ~2 GB; the cap only stops a
# path that is no checkpoint (a device, a huge foreign file) from being read whole.
MAX_CHECKPOINT_BYTES = 16 << 30


def state_to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes, where: str = "checkpoint") -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{where}: not a loadable aem-dist checkpoint ({type(err).__name__}: {err})") from None


def save_dir(state: dict[str, Any], folder: str) -> str:
    """Write ``state`` as ``folder/state.pt`` (atomically); returns the file path."""
    path = os.path.join(folder, STATE_FILE)
    storage.atomic_write_bytes(path, state_to_bytes(state))
    return path


def load_dir(folder: str, options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """Read ``folder/state.pt`` from a path or URL."""
    url = storage.join(folder, STATE_FILE)
    return state_from_bytes(storage.read_bytes(url, options, cap=MAX_CHECKPOINT_BYTES, what="checkpoint"), storage.redact(url, options))


def write_best_states(report, blob: bytes | None, best_dirs: list[str], options: storage.StorageOptions | None = None) -> None:
    """Write ``best_dirs[k]/state.pt`` for every member whose best epoch this is. A single run's best
    state is its full checkpoint (``blob`` if already serialised); a population member's is its own
    standalone-format state (weights, selection, history, model_meta)."""
    for k, is_best in enumerate(report.member_best):
        if is_best:
            if report.member_state is None:
                data = blob if blob is not None else state_to_bytes(report.state())
            else:
                data = state_to_bytes(report.best_state(k))
            storage.atomic_write_bytes(storage.join(best_dirs[k], STATE_FILE), data, options)
