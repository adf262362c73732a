"""Use a saved checkpoint: rebuild its model, evaluate or predict on any dataset split in one process."""

from __future__ import annotations

from typing import Any

from ..config import DataConfig, model_options
from ..data.folds import open_manifest
from ..data.limits import Limits, SizeError
from ..data.loader import LoaderSpec, open_memory
from ..models import MILModel, build_model
from ..storage import StorageOptions
from .dist import DistContext
from .evaluate import EvalResult, evaluate


MAX_CLASSES = 4096  # far beyond any slide-level task; model_meta above it is no checkpoint of ours


def model_from_state(state: dict[str, Any], where: str = "checkpoint") -> MILModel:
    """The model a checkpoint state describes (``model_meta``), with its weights, in eval mode.

    ``model_meta`` is checked before anything is allocated from it: dim and classes within the data
    limits, and the model it describes built first on the ``meta`` device (no memory), whose every
    parameter must be a tensor of the same shape in the checkpoint — so a meta saying hidden = 1e6
    (4 TB of weights) in a kilobyte file is refused in one line naming ``where``. Raises ValueError."""
    import torch

    meta = state["model_meta"]
    try:
        dim, n_classes = int(meta["dim"]), int(meta["n_classes"])
        Limits().check_bag(1, dim, "model_meta")
        if not 1 <= n_classes <= MAX_CLASSES:
            raise SizeError(f"model_meta declares {n_classes:,} classes (1 … {MAX_CLASSES})")
        options = model_options(meta["model"]["name"])  # a checkpoint written before per-model options holds every model's keys
        cfg = options(**{k: v for k, v in meta["model"].items() if k in options.model_fields})
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_model(cfg, dim, n_classes).state_dict().items() if isinstance(v, torch.Tensor)}
    except (SizeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: model_meta is not a model this checkpoint can hold ({type(err).__name__}: {str(err)[:300]})") from None
    weights = state.get("model")
    held = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)} if isinstance(weights, dict) else {}
    wrong = [k for k, s in shapes.items() if held.get(k) != s]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{where}: model_meta describes {len(shapes)} tensors that the checkpoint does not hold as described (e.g. {k!r}: {shapes[k]} "
            f"described, {held.get(k, 'absent')} held); refusing to build it")
    model = build_model(cfg, dim, n_classes)
    model.load_state_dict(weights)
    return model.eval()


def evaluate_state(
    state: dict[str, Any],
    data_root: str,
    split: str,
    *,
    options: StorageOptions | None = None,
    max_bags: int = 16,
    max_instances: int | None = None,
    keep_attention: bool = False,
    fold: int | None = None,
) -> EvalResult:
    """Metrics (and per-bag predictions) of a checkpoint on ``split`` of ``data_root`` (of cross-validation
    fold ``fold``, when given), in this process."""
    data = DataConfig(root=data_root, fold=fold)
    manifest = open_manifest(data, options)
    meta = state["model_meta"]
    if int(meta["dim"]) != manifest.dim or int(meta["n_classes"]) != manifest.n_classes:
        raise ValueError(f"checkpoint expects dim {meta['dim']} / {meta['n_classes']} classes; dataset has {manifest.dim} / {manifest.n_classes}")
    loader = open_memory(data_root, manifest, LoaderSpec(split, max_bags=max_bags, max_instances=max_instances, with_coords=keep_attention), options)
    return evaluate(model_from_state(state), loader, DistContext(), manifest.n_classes, keep_attention=keep_attention)
