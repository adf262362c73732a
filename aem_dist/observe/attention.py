"""Per-bag predictions and per-instance attention of a trained run, and their zarr store.

``aem-dist predict`` loads a run's best checkpoint (``<run>/best/state.pt``), rebuilds the model from
the checkpoint's ``model_meta``, runs it over one or more splits of a dataset and writes a zarr (v3)
store — local or ``s3://`` (through fsspec) — laid out for ragged bags::

    <out>/zarr.json     group; attrs: format, complete, run, data, splits, class_names, model,
                        checkpoint_epoch, n_bags, n_instances, created_by
    slide_id  (B,)      str    the real slide id (from the bag's json)
    key       (B,)      str    the dataset key (safe slide id)
    split     (B,)      str    split the bag comes from
    label     (B,)      int64  true class index
    probs     (B, C)    float32 softmax class probabilities
    pred      (B,)      int64  argmax class
    offsets   (B+1,)    int64  bag b owns rows offsets[b]:offsets[b+1] of the instance arrays
    attention (T,)      float32 attention per instance (mean over heads); sums to 1 within each bag
    coords    (T, 2)    int32  patch (x, y) in pixels, row-aligned with attention
    tumour    (T,)      bool   ground-truth tumour mask, only when the bags carry one (synthetic data)

T = Σ n_instances. Instance arrays are chunked along T, so reading one bag touches one or two chunks.
The group's ``complete`` attribute is written last; :class:`AttentionStore` refuses a store without it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .. import __version__, storage
from ..config import DataConfig
from ..storage import StorageOptions

FORMAT = "aem-dist-attention/1"
BEST_DIR = "best"
INSTANCE_CHUNK = 1 << 20  # 1 Mi instances per chunk: 4 MiB of float32 attention
BAG_CHUNK = 1 << 16


class AttentionStoreError(ValueError):
    """An attention store is missing, incomplete or not in the expected format."""


# --- loading a trained run ---------------------------------------------------------------------


@dataclass
class RunModel:
    """A trained model rebuilt from a run folder's best checkpoint."""

    model: Any  # aem_dist.models.base.MILModel, in eval mode on CPU
    meta: dict[str, Any]  # the checkpoint's model_meta: name, dim, n_classes, class_names, model
    epoch: int
    config: dict[str, Any]  # the run's resolved config (results.json or run.json), {} if absent
    url: str


def _read_json(url: str, options: StorageOptions | None) -> dict[str, Any] | None:
    return storage.read_record(url, options)


_EPOCH_CHOICE = re.compile(r"^epoch-(\d+)$")


def _inside(folder: str, run: str) -> None:
    """A local checkpoint folder must lie inside its run: a symlinked ``epoch-N`` (or ``state.pt``) that
    leads elsewhere is refused by name rather than loaded as the run's. Raises ValueError."""
    if storage.is_remote(run):
        return
    root = os.path.realpath(storage.strip_scheme(run))
    for p in (folder, os.path.join(folder, "state.pt")):
        real = os.path.realpath(p)
        if os.path.islink(p) or not real.startswith(root + os.sep):
            raise ValueError(f"{p}: leads out of the run folder (to {real}); a checkpoint is only read from inside its run")


def checkpoint_folders(run: str, options: StorageOptions | None = None) -> dict[int, str]:
    """Per-epoch checkpoints a run folder still holds: epoch → folder URL.

    Local runs keep ``run/checkpoints/epoch-NNNNNN``; Ray runs with the default storage keep
    ``run/ray/train/<name>/checkpoint_*`` (their epoch is read from the state itself).
    """
    from ..engine.checkpoint import load_dir

    out: dict[int, str] = {}
    fs, path = storage.open_fs(storage.join(run, "checkpoints"), options)
    if fs.exists(path):
        for p in fs.ls(path, detail=False):
            m = re.match(r"^epoch-(\d{6})$", p.rstrip("/").rsplit("/", 1)[-1])
            if m and fs.exists(f"{p.rstrip('/')}/state.pt"):
                _inside(p.rstrip("/"), run)
                out[int(m.group(1))] = storage.join(run, "checkpoints", m.group(0))
    fs, path = storage.open_fs(storage.join(run, "ray", "train"), options)
    if not out and fs.exists(path):
        scheme = run.split("://", 1)[0] + "://" if "://" in run else ""
        for p in fs.glob(f"{path}/*/checkpoint_*/state.pt"):
            folder = scheme + p.rsplit("/", 1)[0]
            out[int(load_dir(folder, options).get("epoch", -1))] = folder
    return out


def resolve_checkpoint(run: str, which: str = BEST_DIR, options: StorageOptions | None = None) -> str:
    """The checkpoint folder of ``run`` that ``--checkpoint`` names: ``best`` (the selected epoch),
    ``last`` (the latest epoch checkpointed) or ``epoch-N``. Raises FileNotFoundError listing what
    the run holds, ValueError for another choice."""
    if which == BEST_DIR:
        return storage.join(run, BEST_DIR)
    m = _EPOCH_CHOICE.match(which)
    if which != "last" and m is None:
        raise ValueError(f"--checkpoint {which!r}: choose best, last or epoch-N")
    folders = checkpoint_folders(run, options)
    if not folders:
        raise FileNotFoundError(f"{storage.redact(run, options)}: no per-epoch checkpoints (only --checkpoint best is available)")
    epoch = max(folders) if which == "last" else int(m.group(1))
    if epoch not in folders:
        raise FileNotFoundError(f"{storage.redact(run, options)}: no checkpoint of epoch {epoch} (kept: {', '.join(f'epoch-{e}' for e in sorted(folders))}, "
            f"and best)")
    return folders[epoch]


def load_run_model(run: str, options: StorageOptions | None = None, checkpoint: str = BEST_DIR) -> RunModel:
    """Rebuild the model of ``run`` (a train run or trial folder) from one of its checkpoints:
    ``best`` (``run/best/state.pt``), ``last`` or ``epoch-N`` (see :func:`resolve_checkpoint`).

    Raises FileNotFoundError naming the checkpoint when the run has none, ValueError when the
    checkpoint lacks ``model_meta``.
    """
    from ..engine.checkpoint import load_dir
    from ..engine.inference import model_from_state

    folder = resolve_checkpoint(run, checkpoint, options)
    try:
        state = load_dir(folder, options)
    except FileNotFoundError:
        hint = "no epoch had a finite validation score, so there is no best: try --checkpoint last; or " if checkpoint == BEST_DIR and checkpoint_folders(run,
            options) else ""
        raise FileNotFoundError(f"{storage.redact(storage.join(folder, 'state.pt'), options)}: no checkpoint ({hint}is {storage.redact(run, options)} a "
            f"finished run folder?)") from None
    meta = state.get("model_meta")
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{storage.redact(folder, options)}/state.pt: checkpoint has no model_meta; cannot rebuild the model")
    model = model_from_state(state, f"{storage.redact(folder, options)}/state.pt")
    record = _read_json(storage.join(run, "results.json"), options) or _read_json(storage.join(run, "run.json"), options) or {}
    return RunModel(model, meta, int(state.get("epoch", -1)), record.get("config") or {}, run)


# --- predicting --------------------------------------------------------------------------------


@dataclass
class BagResult:
    """One bag's prediction and attention, with its split and ground truth (if the data has one)."""

    slide_id: str
    key: str
    split: str
    label: int
    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (N,) sums to 1
    coords: np.ndarray  # (N, 2) int32; zeros when the dataset has no coords
    tumour: np.ndarray | None = None  # (N,) bool
    embedding: np.ndarray | None = None  # (hidden,) float32 pooled bag embedding z (models that have one)


class _CountingLoader:
    """Wraps a split loader so a progress bar advances per bag as ``predict`` consumes batches."""

    def __init__(self, loader: Any, bar: Any):
        self._loader = loader
        self._bar = bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def epoch(self, epoch: int) -> Iterator[Any]:
        for batch in self._loader.epoch(epoch):
            yield batch
            self._bar.update(batch.n_bags)


def predict_split(
    run: RunModel,
    data_root: str,
    split: str,
    *,
    options: StorageOptions | None = None,
    data: DataConfig | None = None,
    max_instances: int | None = 65_536,
    max_bags: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> list[BagResult]:
    """Predictions and attention for every bag of ``split`` of the dataset at ``data_root``.

    Bags are packed (up to ``max_bags`` / ``max_instances`` per forward pass; attention is per bag,
    so packing does not change it). Raises ValueError if the dataset's feature dim or classes do not
    match the checkpoint, or if the model has no attention (mean/max pooling).
    """
    import torch

    from ..data.folds import open_manifest
    from ..data.loader import LoaderSpec
    from ..data.registry import open_split
    from ..data.synthetic import unpack_mask
    from ..engine.dist import DistContext
    from ..engine.evaluate import predict
    from ..progress import progress as progress_bar

    where = storage.redact(data_root, options)
    data_cfg = (data or DataConfig()).model_copy(update={"root": data_root})
    # A run trained on a fold is predicted on that fold's splits (its test bags are the fold's).
    manifest = open_manifest(data_cfg, options)
    if manifest.dim != int(run.meta["dim"]):
        raise ValueError(f"{where}: feature dim {manifest.dim} != the checkpoint's {run.meta['dim']} ({storage.redact(run.url, options)})")
    if manifest.class_names and manifest.n_classes != int(run.meta["n_classes"]):  # (an unlabelled dataset may name no classes)
        raise ValueError(f"{where}: {manifest.n_classes} classes != the checkpoint's {run.meta['n_classes']}")
    spec = LoaderSpec(split, 0, 1, train=False, max_instances=max_instances, max_bags=max_bags, on_bad_sample=data_cfg.on_bad_sample, with_coords=True)
    loader = open_split(data_cfg, manifest, spec, options)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model = run.model.to(dev)
    ctx = DistContext(rank=0, world_size=1, device=dev)
    with progress_bar(loader.n_bags, f"predict {split}", "bag", disable=not progress) as bar:
        rows = predict(model, _CountingLoader(loader, bar), ctx, keep_attention=True)
    # The in-memory loader keeps each bag's json metadata: real slide ids and, for synthetic data,
    # the ground-truth tumour mask.
    metas = {b.key: (b.slide_id, b.meta, b.n) for b in getattr(loader, "bags", [])}
    out: list[BagResult] = []
    for r in rows:
        if r.attention is None:
            raise ValueError(f"model {run.meta.get('name')!r} has no attention to export")
        slide_id, meta, n = metas.get(r.key, (r.key, {}, len(r.attention)))
        mask = unpack_mask(meta["tumour_mask_bits"], n) if isinstance(meta.get("tumour_mask_bits"), str) else None
        coords = r.coords if r.coords is not None else np.zeros((len(r.attention), 2), dtype=np.int32)
        emb = None if r.embedding is None else np.asarray(r.embedding, dtype=np.float32)
        out.append(BagResult(slide_id, r.key, split, r.label, np.asarray(r.probs), np.asarray(r.attention), np.asarray(coords, dtype=np.int32), mask, emb))
    return out


# --- the zarr store ----------------------------------------------------------------------------


# What a store written by write_attention holds at its top level: anything else there is someone else's.
STORE_ENTRIES = frozenset({"zarr.json", "slide_id", "key", "split", "label", "probs", "pred", "offsets", "attention", "coords", "tumour", "embedding"})


def check_output(out: str, options: StorageOptions | None = None) -> None:
    """Refuse to write an attention store at ``out`` unless nothing is there (or an empty folder), or
    an attention store that ``predict`` wrote before (which is replaced). Writing a store clears its
    location, so a folder, bucket or prefix holding anything else — a run's checkpoints, the current
    directory, a bucket's objects — is refused in one line before anything is read or written.
    Raises AttentionStoreError."""
    where = storage.redact(out, options)
    fs, path = storage.open_fs(out, options)
    try:
        if not fs.exists(path):
            return
        if not fs.isdir(path):
            raise AttentionStoreError(f"--out {where}: a file is there; predict writes a new zarr store and never replaces what it did not write")
        names = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} - {""})
    except AttentionStoreError:
        raise
    except Exception as err:
        raise AttentionStoreError(storage.describe_error(err, out, options, "inspect")) from None
    if not names:
        return
    foreign = [n for n in names if n not in STORE_ENTRIES]
    if not foreign and "zarr.json" in names:
        try:
            ours = (storage.read_json(storage.join(out, "zarr.json"), options, cap=1 << 20, what="zarr group") or {}).get("attributes", {})
        except (FileNotFoundError, storage.StorageError, AttributeError):
            ours = {}
        if isinstance(ours, dict) and ours.get("format") == FORMAT:
            return  # an attention store of ours (complete or not): replaced
    shown = ", ".join(foreign[:3] or names[:3]) + (" …" if len(foreign or names) > 3 else "")
    raise AttentionStoreError(f"--out {where}: holds {len(names)} entries that are not an attention store written by predict ({shown}); "
        f"predict never deletes what it did not write: choose a new or empty location")


def open_zarr_store(url: str, options: StorageOptions | None = None, read_only: bool = False) -> Any:
    """A zarr store for a local path or an fsspec URL (``s3://`` with the configured endpoint/credentials)."""
    from zarr.storage import FsspecStore, LocalStore

    if not storage.is_remote(url):
        path = os.path.abspath(storage.strip_scheme(url))  # '.' as a store root: zarr cannot clear it by that name
        return LocalStore(path, read_only=read_only)
    url = "s3://" + url.split("://", 1)[1] if url.startswith("s3a://") else url
    opts: dict[str, Any] = {}
    if url.startswith("s3://"):
        opts = (options or StorageOptions.from_config()).s3_kwargs()
        opts.pop("skip_instance_cache", None)
    return FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


def write_attention(
    out: str,
    bags: Sequence[BagResult],
    *,
    class_names: Sequence[str],
    attrs: dict[str, Any] | None = None,
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Write ``bags`` as an attention store at ``out``; returns its attrs. ``out`` must be new, empty or
    an attention store written before (replaced): anything else is refused (see :func:`check_output`)."""
    import zarr

    if not bags:
        raise ValueError("no bags to write")
    check_output(out, options)
    sizes = np.array([len(b.attention) for b in bags], dtype=np.int64)
    offsets = np.zeros(len(bags) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    n_bags, total = len(bags), int(offsets[-1])
    store = open_zarr_store(out, options)
    group = zarr.open_group(store, mode="w")
    group.attrs.put({"format": FORMAT, "complete": False})

    def array(name: str, data: np.ndarray, chunk: int) -> None:
        chunks = (max(1, min(chunk, len(data))), *data.shape[1:])
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data

    array("slide_id", np.array([b.slide_id for b in bags], dtype=np.dtypes.StringDType()), BAG_CHUNK)
    array("key", np.array([b.key for b in bags], dtype=np.dtypes.StringDType()), BAG_CHUNK)
    array("split", np.array([b.split for b in bags], dtype=np.dtypes.StringDType()), BAG_CHUNK)
    array("label", np.array([b.label for b in bags], dtype=np.int64), BAG_CHUNK)
    probs = np.stack([np.asarray(b.probs, dtype=np.float32) for b in bags])
    array("probs", probs, BAG_CHUNK)
    array("pred", probs.argmax(axis=1).astype(np.int64), BAG_CHUNK)
    array("offsets", offsets, BAG_CHUNK)
    array("attention", np.concatenate([np.asarray(b.attention, dtype=np.float32) for b in bags]), INSTANCE_CHUNK)
    array("coords", np.concatenate([np.asarray(b.coords, dtype=np.int32).reshape(-1, 2) for b in bags]), INSTANCE_CHUNK)
    if all(b.tumour is not None for b in bags):
        array("tumour", np.concatenate([np.asarray(b.tumour, dtype=bool) for b in bags]), INSTANCE_CHUNK)
    if all(b.embedding is not None for b in bags):
        # (n_bags, hidden): the pooled bag embeddings, for the report's UMAP (Fig. 11).
        array("embedding", np.stack([np.asarray(b.embedding, dtype=np.float32) for b in bags]), BAG_CHUNK)
    meta = {
        **(attrs or {}),
        "format": FORMAT,
        "class_names": list(class_names),
        "splits": sorted({b.split for b in bags}),
        "n_bags": n_bags,
        "n_instances": total,
        "created_by": f"aem-dist {__version__}",
    }
    group.attrs.put({**meta, "complete": True})  # last: the store counts as written only now
    return meta


class AttentionStore:
    """Read an attention store written by :func:`write_attention` (local or ``s3://``)."""

    def __init__(self, url: str, options: StorageOptions | None = None):
        import zarr

        self.url = url
        where = storage.redact(url, options)
        try:
            self.group = zarr.open_group(open_zarr_store(url, options, read_only=True), mode="r")
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise AttentionStoreError(f"{where}: not an attention store ({type(err).__name__}: {err})") from None
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format") != FORMAT:
            raise AttentionStoreError(f"{where}: format {self.attrs.get('format')!r} is not {FORMAT!r}")
        if not self.attrs.get("complete"):
            raise AttentionStoreError(f"{where}: incomplete attention store (its writing never finished)")
        self._check_shapes(where)
        self.slide_ids = [str(s) for s in self.group["slide_id"][...]]
        self.keys = [str(s) for s in self.group["key"][...]]
        self.splits = [str(s) for s in self.group["split"][...]]
        self.labels = np.asarray(self.group["label"][...])
        self.probs = np.asarray(self.group["probs"][...])
        self.preds = np.asarray(self.group["pred"][...])
        self.offsets = np.asarray(self.group["offsets"][...])
        self.has_tumour = "tumour" in self.group
        self.has_embedding = "embedding" in self.group

    def _check_shapes(self, where: str) -> None:
        """The shapes the store declares, checked before any array is read: bag arrays as long as
        ``slide_id`` (at most ``Limits.max_bags``), ``offsets`` one longer, increasing by at most
        ``data.max_instances_per_bag`` per bag and ending at the length of the instance arrays — so a
        zarr.json saying 2e9 instances is one line, not a 15 GiB heatmap buffer."""
        from ..data.limits import Limits

        limits = Limits()
        try:
            n = int(self.group["slide_id"].shape[0])
            if n > limits.max_bags:
                raise AttentionStoreError(f"{where}: declares {n:,} bags, more than a dataset may hold ({limits.max_bags:,})")
            for name in ("key", "split", "label", "probs", "pred", "embedding"):
                if name in self.group and int(self.group[name].shape[0]) != n:
                    raise AttentionStoreError(f"{where}: {name!r} has {self.group[name].shape[0]:,} rows for {n:,} bags")
            if tuple(self.group["offsets"].shape) != (n + 1,):
                raise AttentionStoreError(f"{where}: 'offsets' has shape {tuple(self.group['offsets'].shape)}, expected ({n + 1},)")
            offsets = np.asarray(self.group["offsets"][...], dtype=np.int64)
            sizes = np.diff(offsets)
            if offsets[0] != 0 or (sizes < 0).any() or (sizes > limits.max_instances_per_bag).any():
                raise AttentionStoreError(f"{where}: 'offsets' do not describe bags of 0 … {limits.max_instances_per_bag:,} instances each")
            for name in ("attention", "coords", "tumour"):
                if name in self.group and int(self.group[name].shape[0]) != int(offsets[-1]):
                    raise AttentionStoreError(f"{where}: {name!r} declares {self.group[name].shape[0]:,} rows, the offsets {int(offsets[-1]):,}")
        except KeyError as err:
            raise AttentionStoreError(f"{where}: not an attention store (no array {err})") from None

    def embeddings(self) -> np.ndarray | None:
        """(n_bags, hidden) float32 pooled bag embeddings in store order; None when the model had none."""
        return np.asarray(self.group["embedding"][...]) if self.has_embedding else None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def index(self, name: str) -> int:
        """Position of a bag by slide id or key; KeyError naming the store otherwise."""
        for names in (self.slide_ids, self.keys):
            if name in names:
                return names.index(name)
        raise KeyError(f"{self.url}: no bag {name!r} (has {len(self)} bags, e.g. {self.slide_ids[:3]})")

    def bag(self, i: int) -> BagResult:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        tumour = np.asarray(self.group["tumour"][lo:hi]) if self.has_tumour else None
        return BagResult(
            slide_id=self.slide_ids[i],
            key=self.keys[i],
            split=self.splits[i],
            label=int(self.labels[i]),
            probs=self.probs[i],
            attention=np.asarray(self.group["attention"][lo:hi]),
            coords=np.asarray(self.group["coords"][lo:hi]),
            tumour=tumour,
        )

    def __iter__(self) -> Iterator[BagResult]:
        for i in range(len(self)):
            yield self.bag(i)


# --- attention concentration (the paper's Fig. 9) ----------------------------------------------


def concentration_grid(n: int = 200, low: float = 1e-3) -> np.ndarray:
    """Fractions of top-ranked instances, log-spaced from ``low`` to 1."""
    return np.geomspace(low, 1.0, n)


def concentration_curve(attention: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Cumulative attention held by the top ``f`` fraction of a bag's instances, for each ``f`` in ``grid``.

    The top-k share is linearly interpolated between whole instances (k = f·N), so bags of different
    sizes average on one grid; the curve is 0 at f = 0 and 1 at f = 1.
    """
    a = np.sort(np.asarray(attention, dtype=np.float64))[::-1]
    cum = np.concatenate([[0.0], np.cumsum(a)])
    cum /= cum[-1] if cum[-1] > 0 else 1.0
    return np.interp(np.asarray(grid) * len(a), np.arange(len(a) + 1), cum)


def mean_concentration(attentions: Sequence[np.ndarray], grid: np.ndarray) -> np.ndarray:
    """Mean over bags of :func:`concentration_curve`."""
    if not attentions:
        return np.full(len(grid), math.nan)
    return np.mean([concentration_curve(a, grid) for a in attentions], axis=0)
