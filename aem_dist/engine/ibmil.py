"""IBMIL's first stage, run before the interventional model trains (``model.name: ibmil``).

Registered as IBMIL's stage (:mod:`aem_dist.engine.stages`), :func:`stage_init` is called by a run — ``engine.local.run_local``,
the Ray worker — before ``fit``:

1. stage 1 — the same config with ``model.ibmil_stage: 1`` (the base ABMIL), trained in
   ``<run>/stage1`` (or ``model.ibmil_stage1``) with per-epoch checkpoints there, so an interrupted
   stage 1 resumes and a finished one is not trained again;
2. the confounder dictionary — the best stage-1 checkpoint's bag features of every training bag,
   k-means into ``model.ibmil_confounders`` clusters on the L2-normalised features (the official
   ``clustering.py``: no PCA, 20 iterations, seed 66), the centroids taken over the raw features —
   written to ``<stage1>/confounders.npy`` (atomically; reused when present);
3. returns ``{"confounders": C}``, which ``fit`` loads into the freshly built stage-2 model.

Under DDP every rank trains stage 1 together; rank 0 writes the checkpoints and builds the dictionary,
which then reaches the other ranks through the process group.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch

from .. import storage
from ..config import Config
from ..data.folds import open_manifest
from ..data.loader import LoaderSpec, open_memory
from ..storage import StorageOptions
from .checkpoint import load_dir
from .dist import DistContext
from .inference import model_from_state
from .local import LocalCheckpoints
from .loop import fit, resolve_device
from .stages import stage

log = logging.getLogger(__name__)
CONFOUNDERS_FILE = "confounders.npy"


def stage1_config(cfg: Config) -> Config:
    """Stage 1: the same run with the base model (no confounders) and no injected failure."""
    data = cfg.to_dict(redact=False)
    data["model"]["ibmil_stage"] = 1
    data["debug"]["fail_at_epoch"] = None
    return Config.model_validate(data)


@torch.no_grad()
def bag_features(state: dict, cfg: Config, options: StorageOptions | None) -> np.ndarray:
    """(n_train_bags, D) float32: the stage-1 model's bag features M of every training bag, by key."""
    model = model_from_state(state)
    manifest = open_manifest(cfg.data, options)
    loader = open_memory(cfg.data.root, manifest, LoaderSpec("train", max_bags=16, max_instances=cfg.train.max_instances_per_batch), options)
    rows: list[tuple[str, np.ndarray]] = []
    for batch in loader.epoch(0):
        feats = model(batch.feats.float(), batch.bag_index, batch.n_bags).extras["bag_feature"]
        rows.extend(zip(batch.keys, feats.double().numpy()))
    rows.sort(key=lambda r: r[0])
    return np.stack([f for _, f in rows]).astype(np.float32)


def confounder_dictionary(features: np.ndarray, k: int, seed: int = 66) -> np.ndarray:
    """(n, D) bag features → (k, D) float32 centroids (k-means on L2-normalised rows, raw-feature means)."""
    from sklearn.cluster import KMeans

    if len(features) < k:
        raise ValueError(f"model.ibmil_confounders is {k} but the training split has only {len(features)} bags")
    normed = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-10)
    labels = KMeans(n_clusters=k, n_init=1, max_iter=20, random_state=seed).fit_predict(normed)
    centroids = [features[labels == j].mean(axis=0) if (labels == j).any() else np.zeros(features.shape[1], np.float32) for j in range(k)]
    return np.stack(centroids).astype(np.float32)


@stage("ibmil")
def stage_init(cfg: Config, run_dir: str | None, options: StorageOptions | None = None, ctx: DistContext | None = None) -> dict[str, torch.Tensor] | None:
    """Tensors to load into the model before training: IBMIL's confounders (stage 1 run or reused);
    None for IBMIL's stage 1 itself.

    Raises ValueError when stage 2 has no run folder to keep stage 1 in.
    """
    if cfg.model.ibmil_stage != 2:
        return None
    ctx = ctx or DistContext.current(resolve_device(cfg.train.device))
    stage1 = cfg.model.ibmil_stage1 or (storage.join(run_dir, "stage1") if run_dir is not None else None)
    if stage1 is None:
        raise ValueError("model.name=ibmil trains in two stages and needs a run folder (--out) or model.ibmil_stage1")
    url = storage.join(stage1, CONFOUNDERS_FILE)
    fs, path = storage.open_fs(url, options)
    if not fs.exists(path):
        ckpt = LocalCheckpoints(storage.join(stage1, "checkpoints"), keep=cfg.run.checkpoint_keep, options=options, best_dirs=[storage.join(stage1, "best")])
        resume = ckpt.latest()
        if resume is not None and resume["best_epoch"] is not None:
            ckpt.best = f"epoch-{int(resume['best_epoch']):06d}"
        log.info("ibmil stage 1 in %s", storage.redact(stage1, options))
        s1 = stage1_config(cfg)
        fit(s1, ctx=ctx, resume=resume, on_epoch=ckpt if ctx.is_main else None, options=options)
        conf = None
        if ctx.is_main:
            best = storage.join(stage1, "best")
            state = load_dir(best, options) if storage.exists(storage.join(best, "state.pt"), options) else ckpt.latest()  # no val split: the last epoch
            conf = confounder_dictionary(bag_features(state, s1, options), cfg.model.ibmil_confounders)
            buf = io.BytesIO()
            np.save(buf, conf, allow_pickle=False)
            storage.atomic_write_bytes(url, buf.getvalue(), options)
        conf = ctx.gather_objects(conf)[0]
    else:
        conf = np.load(io.BytesIO(storage.read_bytes(url, options)), allow_pickle=False)
    if conf.shape[0] != cfg.model.ibmil_confounders:
        raise ValueError(f"{storage.redact(url, options)}: {conf.shape[0]} confounders, model.ibmil_confounders is {cfg.model.ibmil_confounders}")
    return {"confounders": torch.from_numpy(np.ascontiguousarray(conf, dtype=np.float32))}
