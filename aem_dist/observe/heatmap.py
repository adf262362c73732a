"""Attention heatmaps: one PNG per slide from an attention store's coords and attention.

Patches sit on a regular grid (coords are pixel offsets of equal-sized patches); the heatmap paints
each patch's attention into its grid cell. Next to it, when the store carries a ground-truth tumour
mask (synthetic data), the mask is drawn and its outline is overlaid on the heatmap, so one can see
whether attention lights up the tumour.

Colour scales:
* ``rank`` (default) — the patch's attention percentile within the slide (0-1), the usual choice for
  WSI heatmaps: every slide uses the full colour range;
* ``linear`` — attention / the slide's largest attention (0-1);
* ``log`` — log10(attention × N): 0 is uniform attention, +1 ten times more than uniform.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from .. import storage
from ..data.limits import check_grid
from ..storage import StorageOptions
from .attention import AttentionStore, BagResult
from .figures import new_figure, save_png

SCALES = ("rank", "linear", "log")
log = logging.getLogger(__name__)


def patch_grid(coords: np.ndarray) -> tuple[np.ndarray, int]:
    """Grid cells ``(N, 2)`` (column, row) of patch coords and the inferred patch size in pixels."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    shifted = coords - coords.min(axis=0)
    nonzero = shifted[shifted > 0]
    step = int(np.gcd.reduce(nonzero)) if len(nonzero) else 1
    return shifted // max(step, 1), max(step, 1)


def scaled(attention: np.ndarray, scale: str) -> tuple[np.ndarray, str, tuple[float, float]]:
    """Attention mapped to a colour value, the colour bar's label and its range."""
    a = np.asarray(attention, dtype=np.float64)
    if scale == "rank":
        ranks = np.empty(len(a))
        ranks[np.argsort(a, kind="stable")] = np.arange(len(a))
        return ranks / max(len(a) - 1, 1), "attention percentile within slide", (0.0, 1.0)
    if scale == "linear":
        return a / max(a.max(), 1e-300), "attention / slide maximum", (0.0, 1.0)
    if scale == "log":
        v = np.log10(np.clip(a * len(a), 1e-12, None))
        lim = max(1.0, float(np.ceil(np.abs(v).max())))
        return v, "log10(attention × N)  (0 = uniform)", (-lim, lim)
    raise ValueError(f"unknown heatmap scale {scale!r}; choose from {', '.join(SCALES)}")


def _paint(cells: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = np.full(shape, np.nan)
    img[cells[:, 1], cells[:, 0]] = values
    return img


def has_coords(bag: BagResult) -> bool:
    """Whether the bag's patches have coordinates. ``predict`` stores zeros for a bag whose source had
    no ``coords`` (e.g. an h5 without that dataset); patches of a real slide never all sit at (0, 0)."""
    return len(bag.attention) <= 1 or bool(np.any(np.asarray(bag.coords) != 0))


def no_coords_message(slide_ids: Sequence[str], store: str) -> str:
    shown = ", ".join(repr(s) for s in slide_ids[:5]) + (f" and {len(slide_ids) - 5} more" if len(slide_ids) > 5 else "")
    return (f"{store}: {len(slide_ids)} slide(s) have no patch coordinates ({shown}): their features were ingested without coords, "
            "so there is no position to paint attention at (re-ingest from files with a coords dataset)")


def render(bag: BagResult, class_names: Sequence[str] = (), scale: str = "rank"):
    """The heatmap figure of one bag (side by side with its tumour mask when it has one).

    Raises ValueError for a bag without patch coordinates (:func:`has_coords`)."""
    if not has_coords(bag):
        raise ValueError(no_coords_message([bag.slide_id], "heatmap"))
    cells, patch = patch_grid(bag.coords)
    shape = check_grid(cells, f"slide {bag.slide_id!r}")  # coordinates are data: bound the image first
    values, cbar_label, (vmin, vmax) = scaled(bag.attention, scale)
    heat = _paint(cells, values, shape)
    panels = 2 if bag.tumour is not None else 1
    aspect = shape[1] / max(shape[0], 1)
    fig = new_figure(min(max(4.2 * aspect * panels + 1.5, 5.2 * panels), 16), 4.8)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    x0, y0 = (int(v) for v in np.asarray(bag.coords, dtype=np.int64).reshape(-1, 2).min(axis=0))
    # Slide pixel coordinates (patch top-left corners as stored), origin top-left as in the slide.
    extent = (x0, x0 + shape[1] * patch, y0 + shape[0] * patch, y0)
    im = axes[0].imshow(heat, cmap="inferno", vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
    axes[0].set_title("attention")
    fig.colorbar(im, ax=axes[0], shrink=0.85, label=cbar_label)
    if bag.tumour is not None:
        mask = _paint(cells, bag.tumour.astype(float), shape)
        axes[1].imshow(mask, cmap="Greens", vmin=-0.3, vmax=1.2, extent=extent, interpolation="nearest")
        axes[1].set_title(f"true tumour: {int(bag.tumour.sum())}/{len(bag.tumour)} patches")
        if bag.tumour.any():
            # Upsampled so the outline follows patch edges instead of cutting corners between centres.
            outline = np.kron(np.nan_to_num(mask, nan=0.0), np.ones((8, 8)))
            for ax, colour in ((axes[0], "cyan"), (axes[1], "black")):
                ax.contour(outline, levels=[0.5], colors=colour, linewidths=0.9, extent=extent, origin="upper")
    for ax in axes:
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    names = list(class_names)

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    pred = int(np.argmax(bag.probs))
    true = name(bag.label) if bag.label >= 0 else "no label"  # ingest --no-labels
    fig.suptitle(f"{bag.slide_id} ({bag.split}, N = {len(bag.attention)})\ntrue: {true}, predicted: {name(pred)} (p = {float(bag.probs[pred]):.2f})",
        fontsize=10)
    return fig


def safe_name(slide_id: str) -> str:
    """The slide id as a file name: only path separators, control characters and a leading dot are
    replaced (dots and the rest stay, so 'TCGA-A1.01' stays recognisable)."""
    name = "".join("_" if (c in "/\\" or ord(c) < 32) else c for c in slide_id)
    return "_" + name[1:] if name.startswith(".") else (name or "_")


def render_store(
    attention_url: str,
    out: str,
    *,
    bags: Sequence[str] | None = None,
    scale: str = "rank",
    limit: int | None = None,
    options: StorageOptions | None = None,
    progress: bool = True,
) -> list[str]:
    """One PNG per slide of the store (or of ``bags``, by slide id or key) under ``out``; returns their URLs.

    Slides without patch coordinates (:func:`has_coords`) cannot be drawn: named in ``bags``, or when no
    slide has any, that is a ValueError in one line; otherwise they are left out with a warning naming them."""
    from ..progress import progress as progress_bar

    if scale not in SCALES:
        raise ValueError(f"unknown heatmap scale {scale!r}; choose from {', '.join(SCALES)}")
    store = AttentionStore(attention_url, options)
    indices = [store.index(b) for b in bags] if bags else list(range(len(store)))
    where = storage.redact(attention_url, options)
    lacking = [i for i in indices if not has_coords(store.bag(i))]
    if lacking and (bags or len(lacking) == len(indices)):
        raise ValueError(no_coords_message([store.bag(i).slide_id for i in lacking], where))
    if lacking:
        log.warning("%s; left out", no_coords_message([store.bag(i).slide_id for i in lacking], where))
        indices = [i for i in indices if i not in set(lacking)]
    if limit is not None:
        indices = indices[: max(0, limit)]
    storage.makedirs(out, options)
    written: list[str] = []
    used: set[str] = set()
    with progress_bar(len(indices), "heatmaps", "slide", disable=not progress) as bar:
        for i in indices:
            bag = store.bag(i)
            name = safe_name(bag.slide_id)
            if name in used:  # two ids that differ only in replaced characters: the unique key decides
                name = f"{name}-{bag.key}"
            used.add(name)
            written.append(save_png(render(bag, store.attrs.get("class_names", ()), scale), storage.join(out, f"{name}.png"), options))
            bar.update(1)
    return written


def tumour_attention_auc(bag: BagResult) -> float:
    """ROC AUC of attention as a detector of the bag's tumour patches (NaN without a mixed mask)."""
    from sklearn.metrics import roc_auc_score

    if bag.tumour is None or not (0 < bag.tumour.sum() < len(bag.tumour)):
        return math.nan
    return float(roc_auc_score(bag.tumour, bag.attention))
