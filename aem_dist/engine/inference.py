"""Use a saved checkpoint: rebuild its model, evaluate or predict on any dataset split in one process."""

from __future__ import annotations

from typing import Any

from ..config import DataConfig, model_options
from ..data.folds import open_manifest
from ..data.loader import LoaderSpec, open_memory
from ..models import MILModel, build_model
from ..storage import StorageOptions
from .dist import DistContext
from .evaluate import EvalResult, evaluate


def model_from_state(state: dict[str, Any]) -> MILModel:
    """The model a checkpoint state describes (``model_meta``), with its weights, in eval mode."""
    meta = state["model_meta"]
    options = model_options(meta["model"]["name"])  # a checkpoint written before per-model options holds every model's keys
    model = build_model(options(**{k: v for k, v in meta["model"].items() if k in options.model_fields}), int(meta["dim"]), int(meta["n_classes"]))
    model.load_state_dict(state["model"])
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
