"""Loader registry: ``data.loader`` → the function that opens a split with that loader.

Every opener takes ``(data_cfg, manifest, spec, options)`` and returns a
:class:`~aem_dist.data.loader.SplitLoader`. A new loader is its module plus one line in
:data:`LOADERS` (and its name in ``DataConfig.loader``'s allowed values; a test checks they agree).
"""

from __future__ import annotations

from typing import Any, Callable

from ..storage import StorageOptions
from .loader import LoaderSpec, SplitLoader, open_memory
from .manifest import Manifest
from .stream import open_stream

Opener = Callable[[Any, Manifest, LoaderSpec, "StorageOptions | None"], SplitLoader]



def _memory(data_cfg: Any, manifest: Manifest, spec: LoaderSpec, options: StorageOptions | None = None) -> SplitLoader:
    return open_memory(str(data_cfg.root), manifest, spec, options)


LOADERS: dict[str, Opener] = {
    "memory": _memory,  # every bag of the split decoded into RAM once
    "stream": open_stream,  # shards read from storage through a node-local cache as training goes
}


def open_split(data_cfg: Any, manifest: Manifest, spec: LoaderSpec, options: StorageOptions | None = None) -> SplitLoader:
    """The loader ``data_cfg.loader`` names, for one split and rank. Raises ValueError for an unknown name."""
    opener = LOADERS.get(data_cfg.loader)
    if opener is None:
        raise ValueError(f"data.loader {data_cfg.loader!r} is not a known loader; choose from {', '.join(LOADERS)}")
    return opener(data_cfg, manifest, spec, options)
