"""A seeded, WSI-like synthetic bag generator.

Each slide is a blob of tissue on a patch grid (coords in pixels, 256-px patches). Its instances are
drawn from a mixture of Gaussian "tissue types" with a slide-specific composition. Tumour slides
(label ≥ 1) hold one to a few spatially contiguous regions whose share of the slide is log-uniform
(micro- to macro-metastasis) and whose instances are shifted toward their class's tumour direction.

Two tumour models (docs/data.md, "Synthetic data", names every knob and what it stands for):

- *legacy* (``subtype_strength`` unset: ``demo``, ``mil-small``, ``wsi-small``): one direction per
  class, weak per-instance shift ``signal``; unchanged bit for bit from the first generator.
- *heterogeneous* (``wsi-c16``, ``c16-mini``): several tumour sub-prototypes per class, each its own
  direction and strength — some separate from normal tissue almost perfectly instance by instance (as
  a good frozen pathology encoder does), some far less; each slide mixes them in its own proportions.
  **Mimics** (``mimic_rate``) are small clusters of normal tissue that look like the most
  discriminative sub-prototype (in lymph nodes: germinal centres, histiocytes, crush or ink artefacts
  that an encoder places next to tumour). They are the mechanism knob: a model whose attention
  collapses onto the few most tumour-like instances cannot tell a mimic cluster from a
  micro-metastasis, one that weighs the surrounding, less discriminative tumour can. With
  ``mimic_rate: 0`` concentrating on the strongest instances loses nothing.

Decoys are optional train-only shortcuts: a few instances with a strong shift along a class-specific
direction that go with their class in train/val and appear at random in test (off in the
heterogeneous presets; cross-validation folds mix the splits, so decoys only mean something with the
fixed splits).

Bag sizes are log-normal: sizes are the log-normal quantiles at (i + ½)/n, shuffled, so a preset's
median holds exactly even for a few bags. Every bag has its own RNG stream ``(seed, split, index)``,
so a dataset is rebuilt bit-for-bit from its seed and any bag can be made alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterator, Sequence

import numpy as np
import yaml
from scipy.stats import norm

from .schema import Bag

PATCH = 256
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SynthSpec:
    """Parameters of a synthetic dataset (docs/data.md, "Synthetic data", says what each stands for).
    Validated on construction (also after ``replace``): a bad value raises ValueError naming the key."""

    name: str
    n_bags: dict[str, int]
    dim: int
    class_names: tuple[str, ...]
    median_instances: int
    sigma: float = 0.8
    min_instances: int = 1
    max_instances: int = 50_000
    tumour_frac: tuple[float, float] = (0.001, 0.30)  # log-uniform share of a tumour slide that is tumour
    n_regions: tuple[int, int] = (1, 3)
    signal: float = 1.0  # legacy tumour model: the per-instance shift
    n_tissue_types: int = 8
    tissue_spread: float = 1.0
    decoy_strength: float = 4.0
    decoy_count: tuple[int, int] = (1, 3)
    decoy_rate_train: float = 0.7  # P(decoy of own class | tumour bag) in train/val
    decoy_rate_false: float = 0.05  # P(decoy of another class) in train/val
    decoy_rate_test: float = 0.4  # P(decoy of a random class) in test, whatever the label
    class_weights: tuple[float, ...] | None = None  # default: balanced
    # heterogeneous tumour model (all unset/neutral: the legacy model, bit for bit)
    subtype_strength: tuple[float, ...] | None = None  # per sub-prototype shift along its own direction
    subtype_weight: tuple[float, ...] | None = None  # expected share of each sub-prototype in a tumour (default equal)
    subtype_concentration: float = 1.0  # Dirichlet concentration of a slide's sub-prototype mix (low: one sub-prototype per slide)
    strength_jitter: float = 0.4  # a tumour instance's shift is strength × U(1 − j, 1 + j)
    min_tumour_instances: int = 1  # the smallest tumour region, in instances (a micro-metastasis still spans patches)
    mimic_rate: float = 0.0  # share of slides carrying one cluster of mimics (look like sub-prototype 0; are normal)
    mimic_count: tuple[int, int] = (2, 6)  # instances in a mimic cluster

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def heterogeneous(self) -> bool:
        return self.subtype_strength is not None

    def describe(self) -> dict:
        return asdict(self)


class SpecError(ValueError):
    """A bad preset, scale or knob (the CLI prints it as one line)."""


def _bad(key: str, why: str, value: Any) -> ValueError:
    return SpecError(f"synthetic spec: {key} {why} (got {value!r})")


def _validate(s: SynthSpec) -> None:
    """Every knob's range; the message names the key."""
    for key in ("dim", "median_instances", "min_instances", "max_instances", "n_tissue_types", "min_tumour_instances"):
        v = getattr(s, key)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise _bad(key, "must be an integer ≥ 1", v)
    if not s.min_instances <= s.median_instances <= s.max_instances:
        raise _bad("median_instances", f"must lie in [min_instances, max_instances] = [{s.min_instances}, {s.max_instances}]", s.median_instances)
    if len(s.class_names) < 2:
        raise _bad("class_names", "needs at least 2 classes (normal first)", s.class_names)
    if not s.n_bags or any(k not in SPLIT_IDS or not isinstance(v, int) or v < 0 for k, v in s.n_bags.items()):
        raise _bad("n_bags", f"must map splits among {tuple(SPLIT_IDS)} to counts ≥ 0", s.n_bags)
    for key in ("sigma", "signal", "tissue_spread", "decoy_strength", "subtype_concentration"):
        v = getattr(s, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or (key == "subtype_concentration" and v == 0):
            raise _bad(key, "must be a finite number ≥ 0" + (" (> 0)" if key == "subtype_concentration" else ""), v)
    for key in ("decoy_rate_train", "decoy_rate_false", "decoy_rate_test", "mimic_rate"):
        v = getattr(s, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            raise _bad(key, "must be a probability in [0, 1]", v)
    if not isinstance(s.strength_jitter, (int, float)) or not 0 <= s.strength_jitter < 1:
        raise _bad("strength_jitter", "must be in [0, 1)", s.strength_jitter)
    lo, hi = _pair(s, "tumour_frac", float)
    if not 0 < lo <= hi <= 1:
        raise _bad("tumour_frac", "must be (lo, hi) with 0 < lo ≤ hi ≤ 1", s.tumour_frac)
    for key in ("n_regions", "decoy_count", "mimic_count"):
        lo, hi = _pair(s, key, int)
        if not 1 <= lo <= hi:
            raise _bad(key, "must be (lo, hi) integers with 1 ≤ lo ≤ hi", getattr(s, key))
    if s.class_weights is not None and (len(s.class_weights) != s.n_classes or any(not w >= 0 for w in s.class_weights) or sum(s.class_weights) <= 0):
        raise _bad("class_weights", f"must be {s.n_classes} weights ≥ 0, not all 0", s.class_weights)
    if s.subtype_strength is not None:
        if len(s.subtype_strength) < 1 or any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in s.subtype_strength):
            raise _bad("subtype_strength", "must be one or more shifts > 0", s.subtype_strength)
    if s.subtype_weight is not None:
        n = len(s.subtype_strength) if s.subtype_strength is not None else None
        if n is None:
            raise _bad("subtype_weight", "needs subtype_strength", s.subtype_weight)
        if len(s.subtype_weight) != n or any(not isinstance(v, (int, float)) or not v > 0 for v in s.subtype_weight):
            raise _bad("subtype_weight", f"must be {n} weights > 0 (one per subtype_strength)", s.subtype_weight)
    if not s.heterogeneous and (s.mimic_rate > 0 or s.min_tumour_instances != 1):
        key = "mimic_rate" if s.mimic_rate > 0 else "min_tumour_instances"
        raise _bad(key, "needs the heterogeneous tumour model (set subtype_strength)", getattr(s, key))


def _pair(s: SynthSpec, key: str, kind: type) -> tuple:
    v = getattr(s, key)
    if not isinstance(v, (tuple, list)) or len(v) != 2 or any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in v):
        raise _bad(key, "must be a pair (lo, hi)", v)
    if kind is int and any(int(x) != x for x in v):
        raise _bad(key, "must be a pair of integers", v)
    return tuple(v)


KNOBS = tuple(f.name for f in fields(SynthSpec) if f.name not in ("name", "n_bags", "class_names"))


def parse_knobs(overrides: Sequence[str]) -> dict[str, Any]:
    """``["mimic_rate=0.3", "subtype_strength=[3.5, 1.2]"]`` → a dict (values parsed as YAML, lists
    become tuples); a malformed item or an unknown key raises ValueError naming it."""
    out = {}
    for text in overrides:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"synthetic spec: override {text!r} is not KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SpecError(f"synthetic spec: {key} value {value!r} is not valid YAML ({err.__class__.__name__})") from None
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    _check_keys(out)
    return out


def _check_keys(knobs: dict[str, Any]) -> None:
    for key in knobs:
        if key not in KNOBS:
            raise SpecError(f"synthetic spec: unknown knob {key!r}; knobs: {', '.join(KNOBS)}")


def with_knobs(spec: SynthSpec, knobs: dict[str, Any]) -> SynthSpec:
    """``spec`` with knobs overridden; an unknown key or a bad value raises ValueError naming the key."""
    _check_keys(knobs)
    return replace(spec, **{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}) if knobs else spec


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
    # CAMELYON16-shaped: 270 train/val (9:1) + 130 test, binary, 40 % tumour slides; heterogeneous
    # tumour (docs/data.md, "Synthetic data"; calibration: docs/reproduction.md).
    "wsi-c16": SynthSpec(
        name="wsi-c16",
        n_bags={"train": 243, "val": 27, "test": 130},
        dim=384,
        class_names=("normal", "tumor"),
        median_instances=8_000,
        sigma=0.8,
        min_instances=500,
        max_instances=50_000,
        class_weights=(0.6, 0.4),
        tissue_spread=0.5,
        tumour_frac=(0.002, 0.40),
        subtype_strength=(8.0, 4.0),
        subtype_weight=(0.3, 0.7),
        subtype_concentration=1.0,
        min_tumour_instances=4,
        mimic_rate=0.25,
        mimic_count=(2, 6),
        decoy_rate_train=0.0,
        decoy_rate_false=0.0,
        decoy_rate_test=0.0,
    ),
    # the learning-quality test's preset (tests/models/test_learning_quality.py): wsi-c16's tumour model
    # on few, small bags in few dimensions, so ABMIL trains in seconds on one core.
    "c16-mini": SynthSpec(
        name="c16-mini",
        n_bags={"train": 96, "val": 24, "test": 64},
        dim=32,
        class_names=("normal", "tumor"),
        median_instances=100,
        sigma=0.5,
        min_instances=40,
        max_instances=400,
        class_weights=(0.5, 0.5),
        tissue_spread=0.5,
        tumour_frac=(0.02, 0.40),
        subtype_strength=(8.0, 4.0),
        subtype_weight=(0.3, 0.7),
        min_tumour_instances=3,
        mimic_rate=0.25,
        mimic_count=(2, 4),
        decoy_rate_train=0.0,
        decoy_rate_false=0.0,
        decoy_rate_test=0.0,
    ),
}


def get_spec(name: str, scale: float = 1.0, size_scale: float = 1.0, knobs: dict[str, Any] | None = None) -> SynthSpec:
    """A preset, optionally with its bag counts multiplied by ``scale`` (same bag-size law), its
    bag sizes (median, min, max instances) by ``size_scale`` (same spread ``sigma``; tumour regions
    stay a fraction of the bag, decoys and mimics stay a few instances, ``min_tumour_instances`` is
    kept) and ``knobs`` overridden (:func:`with_knobs`; :func:`parse_knobs` reads ``KEY=VALUE``).
    ``size_scale`` lets a machine without a GPU run a preset's protocol (e.g. ``wsi-c16`` at 1/8: median 1 000 instances) with every bag kept.

    Raises ValueError for an unknown preset, a scale that is not positive or a bad knob."""
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if scale <= 0 or size_scale <= 0:
        raise SpecError(f"scale and size_scale must be > 0 (got {scale}, {size_scale})")
    spec = PRESETS[name]
    if scale != 1.0:
        spec = replace(spec, n_bags={k: max(1, round(v * scale)) for k, v in spec.n_bags.items()})
    if size_scale != 1.0:
        lo = max(1, round(spec.min_instances * size_scale))
        spec = replace(spec, median_instances=max(lo, round(spec.median_instances * size_scale)), min_instances=lo,
                       max_instances=max(lo, round(spec.max_instances * size_scale)))
    return with_knobs(spec, knobs or {})


@dataclass
class _World:
    """Dataset-wide constants drawn once from the seed."""

    tissue: np.ndarray  # (K, D) centres of tissue types
    prototypes: np.ndarray  # (C, D) unit directions; row 0 unused (normal)
    decoys: np.ndarray  # (C, D) unit directions of decoys per class
    subtypes: np.ndarray | None = None  # (C, S, D) unit directions of the tumour sub-prototypes; row 0 unused
    sizes: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _world(spec: SynthSpec, seed: int) -> _World:
    rng = np.random.default_rng([seed, 7919])
    prototypes = _unit(rng, spec.n_classes, spec.dim)
    decoys = _unit(rng, spec.n_classes, spec.dim)
    dirs = [prototypes[1:], decoys[1:]]
    subtypes = None
    if spec.heterogeneous:  # drawn only then, so the legacy presets' streams stay as they were
        n_sub = len(spec.subtype_strength)
        subtypes = _unit(rng, spec.n_classes * n_sub, spec.dim).reshape(spec.n_classes, n_sub, spec.dim)
        dirs.append(subtypes[1:].reshape(-1, spec.dim))
    # Tissue types live off the class, decoy and sub-prototype directions, so only tumour, decoy and
    # mimic instances (not some background tissue that happens to point that way) carry the signal.
    signal_dirs = np.linalg.qr(np.concatenate(dirs).T)[0]  # (D, k) orthonormal
    tissue = rng.standard_normal((spec.n_tissue_types, spec.dim)) * spec.tissue_spread
    tissue -= (tissue @ signal_dirs) @ signal_dirs.T
    w = _World(tissue=tissue, prototypes=prototypes, decoys=decoys, subtypes=subtypes)
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
    return _make(spec, seed, split, index, world)[0]


NORMAL, MIMIC = 0, -1  # instance kinds of _make; a tumour instance of sub-prototype s is s + 1


def _make(spec: SynthSpec, seed: int, split: str, index: int, world: _World | None = None) -> tuple[Bag, np.ndarray]:
    """The bag and each instance's kind (NORMAL, MIMIC or 1 + its tumour sub-prototype) for the probe."""
    world = world or _world(spec, seed)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    n = int(world.sizes[split][index])
    label = int(world.labels[split][index])
    cells = _tissue_coords(rng, n)

    # Background: a slide-specific mix of tissue types plus isotropic noise.
    mix = rng.dirichlet(np.full(spec.n_tissue_types, 0.7))
    types = rng.choice(spec.n_tissue_types, size=n, p=mix)
    feats = world.tissue[types] + rng.standard_normal((n, spec.dim))

    kind = np.zeros(n, dtype=np.int8)
    tumour = np.zeros(n, dtype=bool)
    if label >= 1:
        lo, hi = spec.tumour_frac
        frac = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        regions = int(rng.integers(spec.n_regions[0], spec.n_regions[1] + 1))
        per_region = max(spec.min_tumour_instances, int(round(frac * n / regions)))
        for _ in range(regions):
            seed_cell = cells[rng.integers(n)]
            d2 = ((cells - seed_cell) ** 2).sum(axis=1)
            tumour[np.argsort(d2, kind="stable")[:per_region]] = True
        n_t = int(tumour.sum())
        jitter = rng.uniform(1 - spec.strength_jitter, 1 + spec.strength_jitter, size=(n_t, 1))
        if spec.heterogeneous:  # each slide its own mix of sub-prototypes
            strengths = np.asarray(spec.subtype_strength, dtype=float)
            weights = np.asarray(spec.subtype_weight or [1.0] * len(strengths), dtype=float)
            slide_mix = rng.dirichlet(spec.subtype_concentration * len(strengths) * weights / weights.sum())
            sub = rng.choice(len(strengths), size=n_t, p=slide_mix)
            feats[tumour] += jitter * strengths[sub, None] * world.subtypes[label][sub]
            kind[tumour] = sub + 1
        else:
            feats[tumour] += spec.signal * jitter * world.prototypes[label]
            kind[tumour] = 1

    decoy_class = _decoy_class(spec, rng, split, label)
    n_decoys = 0
    if decoy_class is not None:
        n_decoys = min(n, int(rng.integers(spec.decoy_count[0], spec.decoy_count[1] + 1)))
        idx = rng.choice(n, size=n_decoys, replace=False)
        feats[idx] += spec.decoy_strength * world.decoys[decoy_class]

    meta: dict[str, Any] = {"tumour_instances": int(tumour.sum()), "decoys": n_decoys, "tumour_mask_bits": _pack_mask(tumour)}
    if spec.heterogeneous:
        mimic = _mimics(spec, rng, world, cells, tumour, feats)
        kind[mimic] = MIMIC
        meta.update(mimics=int(mimic.sum()), mimic_mask_bits=_pack_mask(mimic),
                    subtype_instances=[int((kind == s + 1).sum()) for s in range(len(spec.subtype_strength))])
    bag = Bag(slide_id=f"{spec.name}-{split}-{index:05d}", feats=feats.astype(np.float16), label=label, coords=(cells * PATCH).astype(np.int32), meta=meta)
    return bag, kind


def _mimics(spec: SynthSpec, rng: np.random.Generator, world: _World, cells: np.ndarray, tumour: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """With probability ``mimic_rate``, one contiguous cluster of normal instances shifted like
    sub-prototype 0 of a random tumour class (in place on ``feats``); their mask."""
    mimic = np.zeros(len(cells), dtype=bool)
    u = rng.random()
    cls = int(rng.integers(1, spec.n_classes))
    k = int(rng.integers(spec.mimic_count[0], spec.mimic_count[1] + 1))
    free = np.flatnonzero(~tumour)
    if u >= spec.mimic_rate or len(free) == 0:
        return mimic
    centre = cells[free[rng.integers(len(free))]]
    d2 = ((cells[free] - centre) ** 2).sum(axis=1)
    mimic[free[np.argsort(d2, kind="stable")[:k]]] = True
    jitter = rng.uniform(1 - spec.strength_jitter, 1 + spec.strength_jitter, size=(int(mimic.sum()), 1))
    feats[mimic] += jitter * spec.subtype_strength[0] * world.subtypes[cls][0]
    return mimic


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
    for split, _, bag, _ in _generate(spec, seed):
        yield split, bag


def _generate(spec: SynthSpec, seed: int) -> Iterator[tuple[str, int, Bag, np.ndarray]]:
    world = _world(spec, seed)
    for split in ("train", "val", "test"):
        for i in range(spec.n_bags.get(split, 0)):
            yield (split, i, *_make(spec, seed, split, i, world))


def total_bags(spec: SynthSpec) -> int:
    return sum(spec.n_bags.values())


def write_synthetic(spec: SynthSpec, out: str, seed: int = 0, *, shard_bytes: int | None = None, options=None, progress: bool = True,
                    probe: bool = True, knobs: dict[str, Any] | None = None, overwrite: bool = True):
    """Generate ``spec`` with ``seed`` and write it as a dataset at ``out``; returns the manifest.

    The manifest's ``source`` records the preset, the seed, every knob of the spec (``spec``), the
    knobs overridden on the command line (``knobs``) and, with ``probe``, the instance-level linear
    probe (``probe``: aem_dist/data/probe.py). An existing dataset at ``out`` is replaced, or refused with
    ``overwrite=False`` (see :class:`~aem_dist.data.shards.DatasetWriter`)."""
    from ..progress import progress as progress_bar
    from .probe import ProbeSample
    from .shards import DEFAULT_SHARD_BYTES, DatasetWriter

    source = {"generator": "synthetic", "preset": spec.name, "seed": seed, "spec": spec.describe(), "knobs": dict(knobs or {})}
    sample = ProbeSample(seed) if probe else None
    with DatasetWriter(out, spec.dim, list(spec.class_names), options=options, shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES, source=source,
                       overwrite=overwrite) as writer:
        with progress_bar(total_bags(spec), f"synth {spec.name}", "bag", disable=not progress) as bar:
            for split, i, bag, kind in _generate(spec, seed):
                writer.add(split, bag)
                if sample is not None:
                    sample.add(split, i, bag, kind)
                bar.update(1)
        if sample is not None:
            writer.source["probe"] = sample.result()  # the manifest is written when the writer closes
    return writer.manifest
