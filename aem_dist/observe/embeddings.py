"""Bag embeddings for the report's Fig. 11: a 2-D UMAP map and the V-measure of a k-means clustering.

The embedding of a bag is the pooled vector its classifier reads (ABMIL's ``z``; ``MILOutput.embedding``),
kept by ``predict``. For one trained model, :func:`embedding_map` clusters the test bags' embeddings
with k-means (k = number of classes, 10 restarts, seeded) in the embedding space itself — not in the 2-D
picture — and scores the clusters against the true classes with the V-measure (the harmonic mean of
homogeneity and completeness; scikit-learn's ``v_measure_score``): 1 means the clusters are the classes.
The 2-D map is UMAP (umap-learn), seeded; it is only the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BAGS = 5  # fewer test bags than this: no meaningful neighbourhood graph or clustering


@dataclass
class EmbeddingMap:
    """One model's test bags: 2-D coordinates, classes, k-means clusters and their V-measure."""

    keys: list[str]
    labels: np.ndarray  # (n,) true class
    xy: np.ndarray  # (n, 2) UMAP coordinates
    clusters: np.ndarray  # (n,) k-means cluster in the embedding space
    v_measure: float


def umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, 2) UMAP of ``x`` (n, d); neighbours capped below n so small test sets work. Seeded
    (umap-learn then runs single-threaded, reproducibly)."""
    import warnings

    import umap  # noqa: PLC0415  (umap-learn imports numba: seconds; only the report needs it)

    n_neighbors = max(2, min(15, len(x) - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by setting random_state", spectral-init notes on tiny sets
        reducer = umap.UMAP(n_neighbors=n_neighbors, n_components=2, random_state=seed, init="random" if len(x) < 10 else "spectral")
        return np.asarray(reducer.fit_transform(np.asarray(x, dtype=np.float32)), dtype=np.float64)


def kmeans_clusters(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(n,) k-means cluster of every row of ``x`` (scikit-learn, 10 restarts, seeded)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(x, dtype=np.float64))


def v_measure(labels: np.ndarray, clusters: np.ndarray) -> float:
    """V-measure of ``clusters`` against the true ``labels`` (scikit-learn's ``v_measure_score``, β = 1)."""
    from sklearn.metrics import v_measure_score

    return float(v_measure_score(labels, clusters))


def embedding_map(keys: list[str], embeddings: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0) -> EmbeddingMap:
    """UMAP coordinates, k-means clusters (k = ``n_classes``) and V-measure of one model's bag
    ``embeddings`` (n, hidden). Raises ValueError with fewer than :data:`MIN_BAGS` bags."""
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) < MIN_BAGS:
        raise ValueError(f"{len(x)} bags: a map and a clustering need at least {MIN_BAGS}")
    labels = np.asarray(labels, dtype=np.int64)
    clusters = kmeans_clusters(x, n_classes, seed)
    return EmbeddingMap(list(keys), labels, umap_2d(x, seed), clusters, v_measure(labels, clusters))


def map_csv(maps: list[tuple[str, EmbeddingMap]]) -> str:
    """The points behind the figure: one row per (model, bag)."""
    rows = ["model,key,label,cluster,x,y"]
    for name, m in maps:
        safe = name.replace('"', "'")
        for i, key in enumerate(m.keys):
            rows.append(f'"{safe}",{key},{int(m.labels[i])},{int(m.clusters[i])},{m.xy[i, 0]:.6g},{m.xy[i, 1]:.6g}')
    return "\n".join(rows) + "\n"
