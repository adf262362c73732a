"""A seeded, WSI-like synthetic bag generator.

Each slide is a blob of tissue on a patch grid (coords in pixels, 256-px patches). Its instances are
drawn from a mixture of Gaussian "tissue types" with a slide-specific composition. Tumour slides
(label ≥ 1) hold one to a few spatially contiguous regions, 0.1 %–30 % of the slide, whose features
are shifted toward their class prototype — weakly per instance, so the evidence is spread over a
region. Decoys are a few instances with a strong shift along a class-specific direction: in train and
val they mostly come with their class (an easy shortcut that draws attention onto a handful of
instances), in test they appear at random. A model whose attention collapses onto the decoys
generalises worse; that is the over-concentration AEM counters.

Bag sizes are log-normal: sizes are the log-normal quantiles at (i + ½)/n, shuffled, so a preset's
median holds exactly even for a few bags. Every bag has its own RNG stream ``(seed, split, index)``,
so a dataset is rebuilt bit-for-bit from its seed and any bag can be made alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import numpy as np
from scipy.stats import norm

from .schema import Bag

PATCH = 256
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SynthSpec:
    """Parameters of a synthetic dataset (see module docstring for their meaning)."""

    name: str
    n_bags: dict[str, int]
    dim: int
    class_names: tuple[str, ...]
    median_instances: int
    sigma: float = 0.8
    min_instances: int = 1
    max_instances: int = 50_000
    tumour_frac: tuple[float, float] = (0.001, 0.30)
    n_regions: tuple[int, int] = (1, 3)
    signal: float = 1.0
    n_tissue_types: int = 8
    tissue_spread: float = 1.0
    decoy_strength: float = 4.0
    decoy_count: tuple[int, int] = (1, 3)
    decoy_rate_train: float = 0.7  # P(decoy of own class | tumour bag) in train/val
    decoy_rate_false: float = 0.05  # P(decoy of another class) in train/val
    decoy_rate_test: float = 0.4  # P(decoy of a random class) in test, whatever the label
    class_weights: tuple[float, ...] | None = None  # default: balanced

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return asdict(self)


PRESETS: dict[str, SynthSpec] = {
    "demo": SynthSpec(
        name="demo",
        n_bags={"train": 96, "val": 32, "test": 48},
        dim=32,
        class_names=("normal", "tumour"),
        median_instances=120,
        sigma=0.6,
        min_instances=8,
        max_instances=1_500,
        tumour_frac=(0.05, 0.30),
        signal=3.0,
        decoy_rate_train=0.4,
    ),
    "mil-small": SynthSpec(  # classic-MIL-shaped (Musk-like): ~10 instances a bag
        name="mil-small",
        n_bags={"train": 800, "val": 100, "test": 200},
        dim=166,
        class_names=("negative", "positive"),
        median_instances=9,
        sigma=0.5,
        min_instances=2,
        max_instances=60,
        tumour_frac=(0.1, 0.5),
        n_regions=(1, 1),
        signal=1.5,
    ),
    "wsi-small": SynthSpec(
        name="wsi-small",
        n_bags={"train": 200, "val": 40, "test": 80},
        dim=384,
        class_names=("normal", "subtype_a", "subtype_b"),
        median_instances=1_000,
        sigma=0.9,
        min_instances=100,
        max_instances=20_000,
        signal=1.0,
    ),
    "wsi-c16": SynthSpec(  # CAMELYON16-shaped: 270 train/val (9:1) + 130 test, binary
        name="wsi-c16",
        n_bags={"train": 243, "val": 27, "test": 130},
        dim=384,
        class_names=("normal", "tumor"),
        median_instances=8_000,
        sigma=0.8,
        min_instances=500,
        max_instances=50_000,
        signal=1.0,
        class_weights=(0.6, 0.4),
    ),
}


def get_spec(name: str, scale: float = 1.0, size_scale: float = 1.0) -> SynthSpec:
    """A preset, optionally with its bag counts multiplied by ``scale`` (same bag-size law) and its
    bag sizes (median, min, max instances) by ``size_scale`` (same spread ``sigma``; tumour regions
    stay a fraction of the bag, decoys stay 1–3 instances). ``size_scale`` lets a machine without a
    GPU run a preset's protocol (e.g. ``wsi-c16`` at 1/8: median 1 000 instances) with every bag kept.

    Raises ValueError for an unknown preset or a scale that is not positive."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if scale <= 0 or size_scale <= 0:
        raise ValueError(f"scale and size_scale must be > 0 (got {scale}, {size_scale})")
    spec = PRESETS[name]
    if scale != 1.0:
        spec = replace(spec, n_bags={k: max(1, round(v * scale)) for k, v in spec.n_bags.items()})
    if size_scale != 1.0:
        lo = max(1, round(spec.min_instances * size_scale))
        spec = replace(spec, median_instances=max(lo, round(spec.median_instances * size_scale)), min_instances=lo,
                       max_instances=max(lo, round(spec.max_instances * size_scale)))
    return spec


@dataclass
class _World:
    """Dataset-wide constants drawn once from the seed."""

    tissue: np.ndarray  # (K, D) centres of tissue types
    prototypes: np.ndarray  # (C, D) unit directions; row 0 unused (normal)
    decoys: np.ndarray  # (C, D) unit directions of decoys per class
    sizes: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _world(spec: SynthSpec, seed: int) -> _World:
    rng = np.random.default_rng([seed, 7919])
    prototypes = _unit(rng, spec.n_classes, spec.dim)
    decoys = _unit(rng, spec.n_classes, spec.dim)
    # Tissue types live off the class and decoy directions, so only tumour and decoy instances
    # (not some background tissue that happens to point that way) carry the signal.
    signal_dirs = np.linalg.qr(np.concatenate([prototypes[1:], decoys[1:]]).T)[0]  # (D, k) orthonormal
    tissue = rng.standard_normal((spec.n_tissue_types, spec.dim)) * spec.tissue_spread
    tissue -= (tissue @ signal_dirs) @ signal_dirs.T
    w = _World(tissue=tissue, prototypes=prototypes, decoys=decoys)
    weights = np.asarray(spec.class_weights or [1.0] * spec.n_classes, dtype=float)
    weights = weights / weights.sum()
    for split, n in spec.n_bags.items():
        srng = np.random.default_rng([seed, SPLIT_IDS[split], 104729])
        q = norm.ppf((np.arange(n) + 0.5) / n)
        sizes = np.exp(np.log(spec.median_instances) + spec.sigma * q)
        sizes = np.clip(np.round(sizes), spec.min_instances, spec.max_instances).astype(np.int64)
        w.sizes[split] = srng.permutation(sizes)
        # Exact class balance: largest-remainder allocation, then shuffled.
        counts = np.floor(weights * n).astype(int)
        for i in np.argsort(-(weights * n - counts))[: n - counts.sum()]:
            counts[i] += 1
        w.labels[split] = srng.permutation(np.repeat(np.arange(spec.n_classes), counts))
    return w


def _tissue_coords(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` grid cells forming one irregular blob of tissue, as (x, y) cell indices."""
    side = int(np.ceil(np.sqrt(n / 0.6))) + 2
    yy, xx = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2
    stretch = rng.uniform(0.7, 1.4)
    angle = np.arctan2(yy - centre, xx - centre)
    wobble = 1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi)) + 0.02 * rng.standard_normal((side, side))
    dist = np.hypot((xx - centre) * stretch, (yy - centre) / stretch) / wobble
    order = np.argsort(dist, axis=None, kind="stable")[:n]
    return np.stack([xx.ravel()[order], yy.ravel()[order]], axis=1)


def make_bag(spec: SynthSpec, seed: int, split: str, index: int, world: _World | None = None) -> Bag:
    """Bag ``index`` of ``split``; identical whenever called with the same arguments."""
    world = world or _world(spec, seed)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    n = int(world.sizes[split][index])
    label = int(world.labels[split][index])
    cells = _tissue_coords(rng, n)

    # Background: a slide-specific mix of tissue types plus isotropic noise.
    mix = rng.dirichlet(np.full(spec.n_tissue_types, 0.7))
    types = rng.choice(spec.n_tissue_types, size=n, p=mix)
    feats = world.tissue[types] + rng.standard_normal((n, spec.dim))

    tumour = np.zeros(n, dtype=bool)
    if label >= 1:
        lo, hi = spec.tumour_frac
        frac = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        regions = int(rng.integers(spec.n_regions[0], spec.n_regions[1] + 1))
        per_region = max(1, int(round(frac * n / regions)))
        for _ in range(regions):
            seed_cell = cells[rng.integers(n)]
            d2 = ((cells - seed_cell) ** 2).sum(axis=1)
            tumour[np.argsort(d2, kind="stable")[:per_region]] = True
        strength = spec.signal * rng.uniform(0.6, 1.4, size=(int(tumour.sum()), 1))
        feats[tumour] += strength * world.prototypes[label]

    decoy_class = _decoy_class(spec, rng, split, label)
    n_decoys = 0
    if decoy_class is not None:
        n_decoys = min(n, int(rng.integers(spec.decoy_count[0], spec.decoy_count[1] + 1)))
        idx = rng.choice(n, size=n_decoys, replace=False)
        feats[idx] += spec.decoy_strength * world.decoys[decoy_class]

    return Bag(
        slide_id=f"{spec.name}-{split}-{index:05d}",
        feats=feats.astype(np.float16),
        label=label,
        coords=(cells * PATCH).astype(np.int32),
        meta={"tumour_instances": int(tumour.sum()), "decoys": n_decoys, "tumour_mask_bits": _pack_mask(tumour)},
    )


def _decoy_class(spec: SynthSpec, rng: np.random.Generator, split: str, label: int) -> int | None:
    """Which class's decoy this bag carries, if any (label-linked in train/val, random in test)."""
    u = rng.random()
    other = int(rng.integers(1, spec.n_classes))
    if split == "test":
        return other if u < spec.decoy_rate_test else None
    if label >= 1 and u < spec.decoy_rate_train:
        return label
    if u > 1 - spec.decoy_rate_false:
        return other
    return None


def _pack_mask(mask: np.ndarray) -> str:
    """Tumour mask as hex of packed bits (ground truth for heatmaps and attention checks)."""
    return np.packbits(mask).tobytes().hex()


def unpack_mask(hex_bits: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_bits), dtype=np.uint8))[:n].astype(bool)


def generate(spec: SynthSpec, seed: int = 0) -> Iterator[tuple[str, Bag]]:
    """All bags of the dataset as ``(split, bag)``, split by split in index order."""
    world = _world(spec, seed)
    for split in ("train", "val", "test"):
        for i in range(spec.n_bags.get(split, 0)):
            yield split, make_bag(spec, seed, split, i, world)


def total_bags(spec: SynthSpec) -> int:
    return sum(spec.n_bags.values())


def write_synthetic(spec: SynthSpec, out: str, seed: int = 0, *, shard_bytes: int | None = None, options=None, progress: bool = True):
    """Generate ``spec`` with ``seed`` and write it as a dataset at ``out``; returns the manifest."""
    from ..progress import progress as progress_bar
    from .shards import DEFAULT_SHARD_BYTES, DatasetWriter

    source = {"generator": "synthetic", "preset": spec.name, "seed": seed, "spec": spec.describe()}
    with DatasetWriter(out, spec.dim, list(spec.class_names), options=options, shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES, source=source) as writer:
        with progress_bar(total_bags(spec), f"synth {spec.name}", "bag", disable=not progress) as bar:
            for split, bag in generate(spec, seed):
                writer.add(split, bag)
                bar.update(1)
    return writer.manifest
