"""The training loop: one function, the same in a plain process and inside a Ray Train worker.

``fit_members(cfgs)`` builds data, model(s) and optimizer, then per epoch trains, evaluates val and
test on all bags, updates each member's best-by-validation selection and hands an
:class:`EpochReport` to ``on_epoch`` (a local checkpoint writer, or Ray Train's ``report``). One
config is today's single run (:class:`Single`: a plain module and torch's AdamW); several configs
that differ only in :data:`~aem_dist.engine.population.MEMBER_KEYS` train as one population
(:class:`~aem_dist.engine.population.Members`) on the same batches. ``fit(cfg)`` is the one-member
case. It never imports Ray.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import Config
from ..data.devicecache import place_on_device
from ..data.folds import open_manifest
from ..data.loader import LoaderSpec, SplitLoader
from ..data.manifest import Manifest
from ..data.registry import open_split
from ..data.packing import PackedBatch, subsample
from ..losses import class_weights
from ..models import MILModel, build_model
from ..storage import StorageOptions
from . import precision
from .compile import loss_step
from .dist import DistContext, parallelize
from .evaluate import BagPrediction, gather_predictions, predict, split_metrics
from .selection import BestTracker, warn_val_split
from .stepstats import NonFiniteLossError, StepStats  # noqa: F401  (NonFiniteLossError: re-exported)

log = logging.getLogger(__name__)


class CosineToZero:
    """Per-iteration cosine decay from the base lr to 0 over ``total`` steps (an object, so its state saves)."""

    def __init__(self, total: int):
        self.total = max(1, int(total))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


@dataclass
class Data:
    manifest: Manifest
    train: SplitLoader
    val: SplitLoader | None
    test: SplitLoader | None


@dataclass
class EpochReport:
    """What the loop hands to ``on_epoch`` after each epoch (on every rank).

    A single run has one member; a population has K, each with its own row and best-epoch selection.
    The plain fields (``row``, ``is_best``, ...) are member 0's.
    """

    epoch: int
    row: dict[str, Any]  # this epoch's history row (member 0)
    is_best: bool
    best_epoch: int | None
    state: Callable[[], dict[str, Any]]  # the full checkpoint state (all members), built on demand
    best_score: float = -math.inf
    step_times: list[float] = field(default_factory=list)  # rank 0's step durations this epoch (s)
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped so far, by reason
    extra: dict[str, Any] = field(default_factory=dict)  # added by reporters, e.g. time/checkpoint_s
    members: list["MemberEpoch"] = field(default_factory=list)  # populations: every member, in order
    member_state: Callable[[int], dict[str, Any]] | None = None  # member k's standalone-format state

    @property
    def member_best(self) -> list[bool]:
        """Per member: is this epoch its best so far (write its ``best/state.pt``)?"""
        return [m.is_best for m in self.members] if self.members else [self.is_best]

    def best_state(self, k: int) -> dict[str, Any]:
        """What member k's ``best/state.pt`` holds (a single run: the full checkpoint state)."""
        return self.member_state(k) if self.member_state is not None else self.state()

    def flat(self) -> dict[str, Any]:
        """One flat dict for reporters (Ray, Prometheus): ``epoch``, ``train/loss``, ``val/auc``, ...,
        ``best/epoch``, ``best/val_score``, ``skipped/<reason>`` and ``time/step_s`` (a list).
        A population adds ``members``: the same dict for each member, in order."""
        out = _flat_row(self.epoch, self.row, self.best_epoch, self.best_score)
        out.update({f"skipped/{k}": v for k, v in self.skipped.items()})
        out["time/step_s"] = list(self.step_times)
        out.update(self.extra)
        if self.members:
            shared = {f"skipped/{k}": v for k, v in self.skipped.items()} | self.extra
            # the population's step durations are recorded once, with its first member
            out["members"] = [_flat_row(self.epoch if m.stopped_at is None else m.stopped_at, m.row, m.best_epoch,
                m.best_score) | shared | ({"time/step_s": list(self.step_times)} if k == 0 else {}) for k, m in enumerate(self.members)]
        return out


@dataclass
class MemberEpoch:
    row: dict[str, Any]
    is_best: bool
    best_epoch: int | None
    best_score: float
    stopped_at: int | None = None  # train.patience stopped this member after that epoch (its row is then that epoch's)


def _flat_row(epoch: int, row: dict[str, Any], best_epoch: int | None, best_score: float) -> dict[str, Any]:
    out: dict[str, Any] = {"epoch": epoch}
    for section, values in row.items():
        if isinstance(values, dict):
            out.update({f"{section}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        elif isinstance(values, (int, float)) and section != "epoch":
            out[section] = values
    out["best/epoch"] = -1 if best_epoch is None else best_epoch
    out["best/val_score"] = best_score
    return out


@dataclass
class FitResult:
    best_epoch: int | None
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, Any]]
    skipped: dict[str, int]
    manifest: Manifest
    resumed_after: int | None = None  # the checkpointed epoch training resumed after (None: from scratch)
    stopped_at: int | None = None  # the epoch after which train.patience stopped training (None: it ran every epoch)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def data_seed(cfg: Config) -> int:
    """The seed of data order and subsampling draws: ``train.data_seed``, else ``train.seed``."""
    return cfg.train.seed if cfg.train.data_seed is None else cfg.train.data_seed


def open_data(cfg: Config, ctx: DistContext, options: StorageOptions | None = None) -> Data:
    """The manifest and this rank's loaders for train, val and test."""
    manifest = open_manifest(cfg.data, options)
    t = cfg.train

    def loader(split: str, train: bool) -> SplitLoader | None:
        if split not in manifest.splits:
            return None
        spec = LoaderSpec(split, ctx.rank, ctx.world_size, train, data_seed(cfg), t.max_instances_per_batch, t.max_bags_per_batch, cfg.data.on_bad_sample,
            sampler=cfg.data.sampler)
        return place_on_device(open_split(cfg.data, manifest, spec, options), cfg.data.device_cache, ctx.device)

    for split in manifest.splits:
        if manifest.n_unlabelled(split):  # ingest --no-labels: a dataset to predict on
            raise ValueError(f"{cfg.data.root}: split {split!r} holds {manifest.n_unlabelled(split)} bag(s) without a label (ingest --no-labels): training "
                f"needs labels; predict them with `aem-dist predict --data {cfg.data.root}`")
    train = loader("train", True)
    if train is None:
        raise ValueError(f"{cfg.data.root}: dataset has no 'train' split")
    return Data(manifest, train, loader("val", False), loader("test", False))


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel on CPU and CUDA (same update, one kernel instead of ~10 ops per tensor —
    the difference between a small model's step being optimizer-bound or not)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)


def seed_epoch_value(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the global RNG (dropout, masking) from (seed, epoch, rank): resuming at an epoch boundary
    then replays exactly what an uninterrupted run would have done."""
    torch.manual_seed(seed_epoch_value(seed, epoch, rank))


class Single:
    """Today's run: one model (DDP-wrapped under several ranks) and torch's fused AdamW (or ``optimizer``)."""

    size = 1

    def __init__(self, cfg: Config, core: MILModel, ctx: DistContext, optimizer: torch.optim.Optimizer | None = None):
        self.cfg = cfg
        self.core = core
        self.module = parallelize(core, ctx)
        self.optimizer = optimizer or make_optimizer(core, cfg, ctx.device)
        self.lam = cfg.loss.lam
        self.dtype = next(core.parameters()).dtype  # features are cast to the model's dtype per step
        self._step = None

    @classmethod
    def build(cls, cfg: Config, dim: int, n_classes: int, ctx: DistContext, model_init: dict[str, torch.Tensor] | None = None) -> "Single":
        """``cfg``'s model, initialised under ``train.seed`` (identical on every rank), then ``model_init``."""
        torch.manual_seed(cfg.train.seed)
        core = build_model(cfg.model, dim, n_classes)
        if model_init is not None:
            core.load_state_dict(model_init, strict=False)
        return cls(cfg, core, ctx)

    def loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, named terms)`` of one step, at ``train.precision``, compiled if ``train.compile``."""
        if self._step is None:  # built once per run: a compiled step keeps its graphs across epochs
            self._step = loss_step(self.module, self.core, self.cfg)
        return self._step(batch)

    def backward(self, batch: PackedBatch, ctx: DistContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward, loss and backward of one step; returns ``(total, named terms)``."""
        loss, terms = self.loss(batch)
        (loss * ctx.bag_share(batch.n_bags, loss)).sum().backward()  # every bag of the step weighs 1/Σn under DDP
        return loss, terms

    def clip_grads_(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.core.parameters(), max_norm)

    def after_step(self, progress: float) -> None:
        self.core.after_step(progress)

    def seed_epoch(self, epoch: int, rank: int) -> None:
        seed_epoch(self.cfg.train.seed, epoch, rank)

    def predict(self, loader: SplitLoader, ctx: DistContext, epoch: int) -> list[list[BagPrediction]]:
        return [predict(self.core, loader, ctx, epoch=epoch, precision=self.cfg.train.precision)]

    def lrs(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.core.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])

    def member_model_state(self, k: int) -> dict[str, Any]:
        return self.core.state_dict()


def train_epoch(trainee, sched, loader: SplitLoader, cfg: Config, ctx: DistContext, epoch: int) -> tuple[list[dict[str, float]], list[float]]:
    """One epoch of training on this rank; returns stats per member over all ranks and this rank's step times.

    Stats: ``loss`` and every named loss term (``ce``, ``aem``, and model terms such as ``diversity``)
    as means per step, the unweighted term values (``aem`` is Σ a log a before λ); counts of steps,
    bags and instances summed over ranks; mean data-loading wait per rank. A term is a scalar for a
    single run and a (K,) vector for a population of K; the loss backpropagated is its sum over
    members (each member's gradient is its own, see :mod:`aem_dist.engine.population`). Losses stay
    on the device (:class:`StepStats`: read every ``train.log_every`` steps and at the end); step
    times are host times, so on a GPU they measure dispatch, not kernels.
    """
    trainee.module.train()
    opt = trainee.optimizer
    stats = StepStats(ctx.device, cfg.train.log_every)
    data_wait = 0.0
    step_times: list[float] = []
    gen = torch.Generator().manual_seed(data_seed(cfg) * 7919 + epoch * 131 + ctx.rank)
    it = iter(loader.epoch(epoch))
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            break
        data_wait += time.perf_counter() - t0
        batch = subsample(batch, cfg.data.subsample_ratio, gen).to(ctx.device, trainee.dtype)
        opt.zero_grad(set_to_none=True)
        loss, terms = trainee.backward(batch, ctx)  # forward + loss + backward at train.precision (compiled if train.compile)
        if cfg.train.grad_clip:
            trainee.clip_grads_(cfg.train.grad_clip)
        opt.step()
        trainee.after_step(_run_progress(sched))  # e.g. MHIM-MIL's EMA teacher
        sched.step()
        stats.add(loss, terms, batch.n_bags, batch.n_instances, batch.keys)  # no host sync
        if stats.due():
            stats.check(ctx, epoch)  # NonFiniteLossError on every rank, naming the step's bags
        step_times.append(time.perf_counter() - t0)
    out = stats.finish(ctx, epoch, extra={"data_wait_s": data_wait})  # checks, then sums over ranks
    out["data_wait_s"] /= ctx.world_size
    # per member: a population's terms come back as lists of K values, a single run's as floats
    return [{k: (v[m] if isinstance(v, list) else v) for k, v in out.items()} for m in range(trainee.size)], step_times


def fit(
    cfg: Config,
    *,
    ctx: DistContext | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    options: StorageOptions | None = None,
    model_init: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train ``cfg`` to the end (from ``resume`` if given); evaluate val/test; pick the best epoch.

    ``model_init``: tensors loaded into the freshly built model (by state_dict name, the rest keeps its
    init) before training — what :mod:`aem_dist.engine.stages` returns, e.g. IBMIL's confounders."""
    return fit_members([cfg], ctx=ctx, resume=resume, on_epoch=on_epoch, options=options, model_init=model_init)[0]


def with_precision(cfgs: list[Config], manifest: Manifest, ctx: DistContext) -> list[Config]:
    """``cfgs`` with ``train.precision`` as the run uses it, the backend flags set and the choice logged
    once: ``auto`` resolved by the device's bf16 units (:func:`aem_dist.engine.precision.resolve`), and
    bf16 replaced by fp32 for a model whose forward fails under bf16 autocast (one warning line)."""
    t = cfgs[0].train
    units = precision.bf16_units(ctx.device.type)
    used = precision.resolve(t.precision, units)
    if used == "bf16":
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            why = precision.bf16_failure(build_model(cfgs[0].model, manifest.dim, manifest.n_classes).to(ctx.device), manifest.dim, ctx.device)
        if why is not None:
            log.warning("train.precision=%s: model.name=%s cannot run in bfloat16 (%s); running fp32", t.precision, cfgs[0].model.name, why)
            used = "fp32"
    applied = precision.configure(used, t.deterministic, ctx.device)
    if ctx.is_main:
        log.info("numerics: %s", applied | {"requested": t.precision, "bf16_units": units or None})
    if used == t.precision:
        return cfgs
    return [c.model_copy(update={"train": c.train.model_copy(update={"precision": used})}) for c in cfgs]


def fit_members(
    cfgs: list[Config],
    *,
    ctx: DistContext | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    options: StorageOptions | None = None,
    model_init: dict[str, torch.Tensor] | None = None,
) -> list[FitResult]:
    """Train one config, or a population of configs on the same batches; one result per config
    (``model_init``: single runs only, see :func:`fit`)."""
    cfg = cfgs[0]  # data, model, epochs and budgets are the same for every member
    ctx = ctx or DistContext.current(resolve_device(cfg.train.device))
    threads = ctx.use_cpu_share()  # a trial's torch threads = the CPUs it was given
    if threads is not None and ctx.is_main:
        log.info("torch threads: %d (CPU share %g of %d visible)", threads, ctx.cpus, os.cpu_count() or 1)
    data = open_data(cfg, ctx, options)
    m = data.manifest
    cfgs = with_precision(cfgs, m, ctx)  # train.precision resolved (auto; a model that cannot run bf16)
    cfg = cfgs[0]
    if len(cfgs) == 1:
        trainee = Single.build(cfg, m.dim, m.n_classes, ctx, model_init)
    else:
        from .population import Members

        trainee = Members(cfgs, m, ctx)
    K = trainee.size
    if "train" in m.splits:  # train.class_weights: every member's loss model (a population's shared architecture) weighs slide-label CE
        (trainee.core if K == 1 else trainee.pop.base).class_weights = class_weights(cfg.train.class_weights, m.splits["train"].class_counts, m.class_names)
    if cfg.train.patience is not None and data.val is None:
        raise ValueError(f"train.patience={cfg.train.patience} needs a val split to watch; {cfg.data.root} has none")
    sched = torch.optim.lr_scheduler.LambdaLR(trainee.optimizer, CosineToZero(sum(data.train.steps(e) for e in range(cfg.train.epochs))))
    histories: list[list[dict[str, Any]]] = [[] for _ in range(K)]
    trackers = [BestTracker(c.train.select_metric, c.train.select_tie, c.train.patience) for c in cfgs]  # selection (and patience) per member
    start = 0
    if resume is not None:
        trainee.load_state_dict(resume)
        trainee.optimizer.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        if K == 1:
            histories = [list(resume["history"])]
            trackers[0].load_state_dict(resume.get("selection", resume))
        else:
            histories = [list(h) for h in resume["history"]]
            for tracker, sel in zip(trackers, resume["selection"]):
                tracker.load_state_dict(sel)
        start = int(resume["epoch"]) + 1
        log.info("resuming after epoch %d (best so far: %s)", start - 1, [t.best_epoch for t in trackers] if K > 1 else trackers[0].best_epoch)
    if ctx.is_main and data.val is not None and start == 0:
        warn_val_split(m.splits["val"].n_bags, m.splits["val"].class_counts, m.class_names)

    def meta() -> dict[str, Any]:
        return {"name": cfg.model.name, "dim": m.dim, "n_classes": m.n_classes, "class_names": m.class_names, "model": cfg.model.model_dump()}

    def state(epoch: int) -> dict[str, Any]:
        per = (lambda xs: xs[0]) if K == 1 else list
        return {
            **trainee.state_dict(),
            "optimizer": trainee.optimizer.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "best_epoch": per([t.best_epoch for t in trackers]),
            "best_score": per([t.best_score for t in trackers]),
            "selection": per([t.state_dict() for t in trackers]),
            "history": per(histories),
            "model_meta": meta(),
        }

    def member_state(k: int, epoch: int) -> dict[str, Any]:
        """Member k as its own run would save it (weights, selection, history), for predict/heatmap."""
        t = trackers[k]
        return {"model": trainee.member_model_state(k), "epoch": epoch, "best_epoch": t.best_epoch, "best_score": t.best_score, "selection": t.state_dict(),
            "history": histories[k], "model_meta": meta()}

    bar = _progress(cfg, ctx, start)
    for epoch in range(start, cfg.train.epochs):
        if all(t.stopped_at is not None for t in trackers):  # train.patience: every member has stopped
            break
        trainee.seed_epoch(epoch, ctx.rank)
        t0 = time.perf_counter()
        train_stats, step_times = train_epoch(trainee, sched, data.train, cfg, ctx, epoch)
        repeat_frac = data.train.repeat_fraction(epoch)  # padding repeats (equal steps per rank)
        lrs = trainee.lrs()
        rows: list[dict[str, Any]] = [{"epoch": epoch, "train": train_stats[k] | {"repeat_frac": repeat_frac}, "lr": lrs[k]} for k in range(K)]
        train_s = time.perf_counter() - t0
        last = epoch == cfg.train.epochs - 1
        if (epoch + 1) % cfg.train.eval_every == 0 or last:
            for split, loader in (("val", data.val), ("test", data.test)):
                if loader is not None:
                    for k, rows_k in enumerate(trainee.predict(loader, ctx, epoch)):
                        rows[k][split] = split_metrics(gather_predictions(rows_k, ctx, loader), m.n_classes)
        timing = {"epoch_s": time.perf_counter() - t0, "train_s": train_s, "instances_per_s": train_stats[0]["instances"] / max(train_s, 1e-9)}
        members = []
        for k, row in enumerate(rows):
            if trackers[k].stopped_at is not None:
                # A population member whose patience ran out: its standalone run has ended, so nothing of
                # its further (shared, harmless) training is recorded; it reports its last row again.
                members.append(MemberEpoch(histories[k][-1], False, trackers[k].best_epoch, trackers[k].best_score, trackers[k].stopped_at))
                continue
            row["time"] = dict(timing)
            histories[k].append(row)
            is_best = "val" in row and trackers[k].update(epoch, row["val"])
            stopped = "val" in row and not last and trackers[k].out_of_patience(epoch)  # (running out at the last epoch stops nothing)
            if stopped and ctx.is_main:
                log.info("train.patience=%d: %sno better validation score since epoch %s; stopping after epoch %d", cfg.train.patience,
                    f"member {k}: " if K > 1 else "", trackers[k].best_epoch, epoch)
            members.append(MemberEpoch(row, is_best, trackers[k].best_epoch, trackers[k].best_score, trackers[k].stopped_at))
        if on_epoch is not None:
            on_epoch(
                EpochReport(
                    epoch, rows[0], members[0].is_best, trackers[0].best_epoch, lambda e=epoch: state(e), trackers[0].best_score, step_times, _skipped(data),
                    members=members if K > 1 else [], member_state=(lambda k, e=epoch: member_state(k, e)) if K > 1 else None,
                )
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_postfix(rows[0]) + (f" (member 0 of {K})" if K > 1 else ""))
        elif ctx.is_main:
            log.info("epoch %d: %s", epoch, _postfix(rows[0]) + (f" (member 0 of {K})" if K > 1 else ""))
        if cfg.debug.fail_at_epoch == epoch and ctx.is_main:
            raise RuntimeError(f"injected failure after epoch {epoch} (debug.fail_at_epoch)")
    if bar is not None:
        bar.close()
    if any(t.best_epoch is None for t in trackers) and histories[0] and ctx.is_main:
        log.warning("no epoch had a finite validation score (train.select_metric=%s); reporting the last epoch", cfg.train.select_metric)
    skipped = _skipped(data)
    results = []
    for k in range(K):
        h, b = histories[k], trackers[k].best_epoch
        row = h[[r["epoch"] for r in h].index(b)] if b is not None else (h[-1] if h else {})
        results.append(FitResult(b, row.get("val", {}), row.get("test", {}), h, skipped, m, start - 1 if resume is not None else None, trackers[k].stopped_at))
    return results


def _run_progress(sched) -> float:
    """The share of the run's steps done, from the cosine schedule (1 step of 1 for other schedules)."""
    return (sched.last_epoch + 1) / getattr(sched.lr_lambdas[0], "total", sched.last_epoch + 1)


def _skipped(data: Data) -> dict[str, int]:
    total: dict[str, int] = {}
    for loader in (data.train, data.val, data.test):
        if loader is not None:
            for reason, n in loader.skipped.items():
                total[reason] = total.get(reason, 0) + int(n)
    return total


def _postfix(row: dict[str, Any]) -> str:
    parts = [f"loss {row['train']['loss']:.4f}", f"aem {row['train']['aem']:.3f}"]
    for split in ("val", "test"):
        if split in row:
            parts.append(f"{split} auc {row[split]['auc']:.3f} f1 {row[split]['f1']:.3f}")
    return ", ".join(parts)


def _progress(cfg: Config, ctx: DistContext, start: int):
    if not (cfg.train.progress and ctx.is_main):
        return None
    from ..progress import progress

    return progress(cfg.train.epochs, "epochs", "epoch", initial=start)
